"""Durable jobs, shared by every front-end and worker process (and, on Redis, every replica).

One state machine serves every contract:

    QUEUED -> PROCESSING -> COMPLETED
       |          |
       +----------+-------> FAILED

Each transition is a single guarded UPDATE (`WHERE state IN (...)`), so a late or duplicated
writer (a worker finishing after the watchdog failed its job, a job dispatched twice) changes
nothing. A job is kept `retention` seconds after submission, then deleted with its files.

Two stores implement it: `SqliteJobStore` (the default, one machine) and
`server.redis_store.RedisJobStore` (several replicas sharing one Redis). A store also keeps each
job's decoded input until the job ends.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

# A job interrupted twice by a server restart is not run a third time: it may be what kills it.
MAX_ATTEMPTS = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    model       TEXT NOT NULL,
    state       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    input_path  TEXT,
    files_token TEXT NOT NULL,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    deadline    REAL NOT NULL,
    expires_at  REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    worker_pid  INTEGER,
    result      TEXT,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at);
"""


class JobState(StrEnum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


UNFINISHED = (JobState.QUEUED, JobState.PROCESSING)
CANCELLED = "Request cancelled before it started"  # the error of a job cancelled while QUEUED
COUNT_UNFINISHED = "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)"


@dataclass
class Job:
    id: str
    model: str
    state: JobState
    payload: dict  # {"params": validated model parameters, "image_key": content hash of the input}
    input_path: str | None
    files_token: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    deadline: float
    expires_at: float
    attempts: int
    worker_pid: int | None
    result: dict | None
    error: str | None
    owner: str | None = None  # the replica running it (Redis store only)

    @property
    def finished(self) -> bool:
        return self.state in (JobState.COMPLETED, JobState.FAILED)

    def metrics(self) -> dict:
        """Seconds spent waiting, running and in total (Segmind's `metrics`)."""
        out = {}
        if self.started_at is not None:
            out["queue_time"] = round(self.started_at - self.created_at, 4)
        if self.finished_at is not None:
            if self.started_at is not None:
                out["inference_time"] = round(self.finished_at - self.started_at, 4)
            out["total_time"] = round(self.finished_at - self.created_at, 4)
        return out

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["state"] = JobState(data["state"])
        data["payload"] = json.loads(data["payload"])
        data["result"] = json.loads(data["result"]) if data["result"] else None
        return cls(**data)


class QueueFull(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(f"{depth} jobs are waiting or running")
        self.depth = depth


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class NewJob:
    """A job to create: what it runs, on what input, and how long it may wait and be kept."""

    model: str
    payload: dict  # {"params": validated model parameters, "image_key": content hash of the input, ...}
    input_data: bytes | None  # the decoded input (.npz), kept by the store until the job ends
    files_token: str
    job_timeout: float
    retention: float
    id: str = field(default_factory=new_job_id)


class JobStore(Protocol):
    """What the gateway, the workers and the janitor need from a store (SQLite or Redis)."""

    def submit(self, new: NewJob, max_queue: int) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def start(self, job_ids: list[str], worker_pid: int) -> list[Job]: ...
    def complete(self, job_id: str, result: dict) -> bool: ...
    def fail(self, job_id: str, error: str) -> bool: ...
    def cancel(self, job_id: str) -> bool: ...
    def read_input(self, job: Job) -> bytes: ...
    def release_input(self, job: Job) -> None: ...
    def unfinished(self) -> int: ...
    def active(self) -> int: ...
    def fail_overdue(self) -> list[Job]: ...
    def fail_orphans(self, worker_alive: Callable[[int], bool]) -> list[Job]: ...
    def recover(self) -> tuple[list[str], list[str]]: ...
    def queued_ids(self) -> list[str]: ...
    def expire(self) -> list[Job]: ...
    def counts(self) -> dict[str, int]: ...
    def recent_inference_time(self, limit: int = 20) -> float | None: ...


class SqliteJobStore:
    """SQLite-backed job store; safe to use from many threads and processes at once.

    Inputs are files in `inputs_dir`, one per job.
    """

    def __init__(self, path: Path, inputs_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.inputs_dir = Path(inputs_dir) if inputs_dir else self.path.parent / "inputs"
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection().executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        # One connection per thread and process: sqlite3 connections must not cross either.
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def submit(self, new: NewJob, max_queue: int) -> Job:
        """Create a QUEUED job with its input, or raise QueueFull when `max_queue` jobs are unfinished."""
        now = time.time()
        input_path = None
        if new.input_data is not None:
            input_path = self.inputs_dir / f"{new.id}.npz"
            input_path.write_bytes(new.input_data)
        try:
            with self._tx() as db:
                (depth,) = db.execute(COUNT_UNFINISHED, UNFINISHED).fetchone()
                if depth >= max_queue:
                    raise QueueFull(depth)
                db.execute(
                    "INSERT INTO jobs (id, model, state, payload, input_path, files_token, created_at, deadline,"
                    " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        new.id,
                        new.model,
                        JobState.QUEUED,
                        json.dumps(new.payload),
                        str(input_path) if input_path else None,
                        new.files_token,
                        now,
                        now + new.job_timeout,
                        now + new.retention,
                    ),
                )
        except QueueFull:
            if input_path:
                input_path.unlink(missing_ok=True)
            raise
        return self.get(new.id)

    def read_input(self, job: Job) -> bytes:
        """The job's decoded input (an .npz archive) as the gateway stored it."""
        if not job.input_path:
            raise FileNotFoundError(f"job {job.id} has no stored input")
        return Path(job.input_path).read_bytes()

    def release_input(self, job: Job) -> None:
        """Drop the job's input: it ended, or expired."""
        if job.input_path:
            Path(job.input_path).unlink(missing_ok=True)

    def unfinished(self) -> int:
        (depth,) = self._connection().execute(COUNT_UNFINISHED, UNFINISHED).fetchone()
        return depth

    def active(self) -> int:
        """Jobs running on this server (here: every PROCESSING job; the store serves one server)."""
        return self.counts()[JobState.PROCESSING.value]

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or past its retention."""
        row = (
            self._connection()
            .execute("SELECT * FROM jobs WHERE id = ? AND expires_at > ?", (job_id, time.time()))
            .fetchone()
        )
        return Job._from_row(row) if row else None

    def start(self, job_ids: list[str], worker_pid: int) -> list[Job]:
        """QUEUED -> PROCESSING for the given jobs; returns those this call moved (others are skipped)."""
        now = time.time()
        started = []
        with self._tx() as db:
            for job_id in job_ids:
                moved = db.execute(
                    "UPDATE jobs SET state = ?, started_at = ?, worker_pid = ?, attempts = attempts + 1"
                    " WHERE id = ? AND state = ? AND deadline > ?",
                    (JobState.PROCESSING, now, worker_pid, job_id, JobState.QUEUED, now),
                ).rowcount
                if moved:
                    started.append(job_id)
        return [job for job_id in started if (job := self.get(job_id))]

    def complete(self, job_id: str, result: dict) -> bool:
        """PROCESSING -> COMPLETED; False when the job was already failed (e.g. by the watchdog)."""
        with self._tx() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, result = ?, worker_pid = NULL"
                    " WHERE id = ? AND state = ?",
                    (JobState.COMPLETED, time.time(), json.dumps(result), job_id, JobState.PROCESSING),
                ).rowcount
            )

    def fail(self, job_id: str, error: str) -> bool:
        """QUEUED/PROCESSING -> FAILED with a message for the client."""
        with self._tx() as db:
            return self._fail_in(db, job_id, error)

    def cancel(self, job_id: str) -> bool:
        """QUEUED -> FAILED with CANCELLED; False when the job already started or finished."""
        with self._tx() as db:
            return self._fail_in(db, job_id, CANCELLED, (JobState.QUEUED,))

    def _fail_where(self, condition: str, args: tuple, error: Callable[[Job], str]) -> list[Job]:
        # Read first: the janitor calls this every second, and an idle pass must not take the write lock.
        rows = (
            self._connection()
            .execute(f"SELECT * FROM jobs WHERE state IN (?, ?) AND {condition}", (*UNFINISHED, *args))
            .fetchall()
        )
        if not rows:
            return []
        failed = []
        with self._tx() as db:
            for job in [Job._from_row(r) for r in rows]:
                job.error = error(job)
                if self._fail_in(db, job.id, job.error):
                    failed.append(job)
        return failed

    @staticmethod
    def _fail_in(db: sqlite3.Connection, job_id: str, error: str, states: tuple[JobState, ...] = UNFINISHED) -> bool:
        """`states` (QUEUED/PROCESSING) -> FAILED inside an open transaction; False when the job is in no such state."""
        marks = ",".join("?" * len(states))
        return bool(
            db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ?, worker_pid = NULL"
                f" WHERE id = ? AND state IN ({marks})",
                (JobState.FAILED, time.time(), error, job_id, *states),
            ).rowcount
        )

    def fail_overdue(self) -> list[Job]:
        """The watchdog: every unfinished job past its deadline FAILS."""
        return self._fail_where(
            "deadline <= ?",
            (time.time(),),
            lambda job: f"Job timed out: not finished {job.deadline - job.created_at:.0f} s after submission",
        )

    def fail_orphans(self, worker_alive: Callable[[int], bool]) -> list[Job]:
        """PROCESSING jobs whose worker process is gone FAIL (the worker crashed mid-job)."""
        rows = self._connection().execute(
            "SELECT DISTINCT worker_pid FROM jobs WHERE state = ?", (JobState.PROCESSING,)
        )
        pids = [r[0] for r in rows.fetchall()]
        dead = [pid for pid in pids if pid is not None and not worker_alive(pid)]
        if not dead:
            return []
        marks = ",".join("?" * len(dead))
        return self._fail_where(
            f"worker_pid IN ({marks})",
            tuple(dead),
            lambda job: f"The worker process running this job died (pid {job.worker_pid}); the server is still serving",
        )

    def recover(self) -> tuple[list[str], list[str]]:
        """After a restart: jobs that were running are queued again, once; returns (requeued, failed) ids."""
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = ?", (JobState.PROCESSING,)).fetchall()
            requeued = [r["id"] for r in rows if r["attempts"] < MAX_ATTEMPTS]
            failed = [r["id"] for r in rows if r["attempts"] >= MAX_ATTEMPTS]
            for job_id in requeued:
                db.execute(
                    "UPDATE jobs SET state = ?, started_at = NULL, worker_pid = NULL WHERE id = ?",
                    (JobState.QUEUED, job_id),
                )
            for job_id in failed:
                db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, error = ?, worker_pid = NULL WHERE id = ?",
                    (
                        JobState.FAILED,
                        time.time(),
                        f"Job interrupted by {MAX_ATTEMPTS} server restarts while running; not retried again",
                        job_id,
                    ),
                )
        return requeued, failed

    def queued_ids(self) -> list[str]:
        rows = self._connection().execute("SELECT id FROM jobs WHERE state = ? ORDER BY created_at", (JobState.QUEUED,))
        return [r[0] for r in rows.fetchall()]

    def expire(self) -> list[Job]:
        """Delete jobs past their retention; returns them so that their files can be deleted too."""
        rows = self._connection().execute("SELECT * FROM jobs WHERE expires_at <= ?", (time.time(),)).fetchall()
        if rows:
            with self._tx() as db:
                db.executemany("DELETE FROM jobs WHERE id = ?", [(r["id"],) for r in rows])
        return [Job._from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._connection().execute(
            "SELECT state, COUNT(*) FROM jobs WHERE expires_at > ? GROUP BY state", (time.time(),)
        )
        counts = {state.value: 0 for state in JobState}
        counts.update({state: n for state, n in rows.fetchall()})
        return counts

    def recent_inference_time(self, limit: int = 20) -> float | None:
        """Mean running time of the last finished jobs, for Retry-After estimates."""
        (mean,) = (
            self._connection()
            .execute(
                "SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs"
                " WHERE state = ? ORDER BY finished_at DESC LIMIT ?)",
                (JobState.COMPLETED, limit),
            )
            .fetchone()
        )
        return mean
