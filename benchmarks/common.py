"""What every benchmark needs: the device in words, PNG payloads, worker memory, servers."""

from __future__ import annotations

import base64
import io
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from tests.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"CPU: {model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def worker_peak_rss(server: ServerProcess) -> list[float]:
    """VmHWM (GiB) of the server's spawned inference workers."""
    pids = subprocess.run(["pgrep", "-s", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    peaks = []
    for pid in pids:
        try:
            if b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        peaks.append(round(kib / 2**20, 2))
    return peaks


def start(weights: Path, data: Path, *args: str) -> ServerProcess:
    return ServerProcess(weights, data, *args, threads=None).start()
