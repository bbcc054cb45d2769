"""A real `sam3-serve serve` process on 127.0.0.1 for tests: start, wait until ready, stop or kill."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self, weights_dir: Path, data_dir: Path, *args: str, port: int | None = None, threads: int | None = 1
    ) -> None:
        self.weights_dir = weights_dir
        self.data_dir = data_dir
        self.args = list(args)
        self.port = port or free_port()
        # With --ssl-certfile the server speaks HTTPS; the tests trust that certificate.
        cert = self.args[self.args.index("--ssl-certfile") + 1] if "--ssl-certfile" in self.args else None
        self.url = f"{'https' if cert else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cert) if cert else True
        self.log_path = data_dir.parent / f"server-{self.port}-{len(os.listdir(data_dir.parent))}.log"
        self.process: subprocess.Popen | None = None
        self.threads = threads  # tests keep the server to one thread: the test process shares 2 cores

    def start(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--device",
            "cpu",
            "--port",
            str(self.port),
            "--weights-dir",
            str(self.weights_dir),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self._log = open(self.log_path, "wb")
        # Own session: the whole process tree can be killed at once, as a crash would.
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready after {START_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM the main process (as docker stop does) and wait for the whole server to exit."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._wait_group_gone(timeout)
        return code

    def kill(self) -> None:
        """SIGKILL every process of the server at once: a crash or a power cut."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self._wait_group_gone(30)

    def _wait_group_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)
        os.killpg(self.process.pid, signal.SIGKILL)

    def job_row(self, job_id: str) -> dict | None:
        """The job as stored in the server's SQLite file (tests read the real store)."""
        with sqlite3.connect(self.data_dir / "jobs.sqlite3") as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def wait_for_state(self, job_id: str, states: set[str], timeout: float = 60, headers: dict | None = None) -> dict:
        """Poll the status route until the job is in one of `states` (bounded)."""
        deadline = time.monotonic() + timeout
        body = {}
        while time.monotonic() < deadline:
            url = f"{self.url}/v2/requests/{job_id}/status"
            response = httpx.get(url, headers=headers or {}, timeout=5, verify=self.verify)
            body = response.json()
            if body.get("status") in states:
                return body
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never reached {states}; last status {body}")
