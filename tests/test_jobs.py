"""The job state machine on a real SQLite file, including several processes at once."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from server.jobs import CANCELLED, MAX_ATTEMPTS, JobState, NewJob, QueueFull, SqliteJobStore


def make(store: SqliteJobStore, timeout: float = 60, retention: float = 3600, max_queue: int = 100) -> str:
    new = NewJob("sam3-image", {"params": {}, "image_key": "k"}, None, "t" * 32, timeout, retention)
    return store.submit(new, max_queue).id


@pytest.fixture
def store(tmp_path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs.sqlite3")


def test_lifecycle_and_metrics(store):
    job_id = make(store)
    assert store.get(job_id).state is JobState.QUEUED
    [started] = store.start([job_id], worker_pid=123)
    assert started.state is JobState.PROCESSING and started.worker_pid == 123 and started.attempts == 1
    assert store.complete(job_id, {"primary": None})
    job = store.get(job_id)
    assert job.state is JobState.COMPLETED and job.result == {"primary": None}
    assert set(job.metrics()) == {"queue_time", "inference_time", "total_time"}


def test_transitions_are_guarded(store):
    job_id = make(store)
    assert store.complete(job_id, {}) is False  # not started
    store.start([job_id], 1)
    assert store.start([job_id], 2) == []  # dispatched twice: runs once
    assert store.fail(job_id, "boom")
    assert store.complete(job_id, {}) is False  # a late result after the watchdog changes nothing
    assert store.fail(job_id, "again") is False
    assert store.get(job_id).error == "boom"


def test_only_a_queued_job_can_be_cancelled(store):
    queued, running = make(store), make(store)
    store.start([running], 1)
    assert store.cancel(queued) and store.cancel(queued) is False
    assert store.get(queued).state is JobState.FAILED and store.get(queued).error == CANCELLED
    assert store.start([queued], 1) == []  # a cancelled job never runs
    assert store.cancel(running) is False and store.cancel("unknown") is False
    assert store.get(running).state is JobState.PROCESSING


def test_queue_is_bounded(store):
    ids = [make(store, max_queue=2) for _ in range(2)]
    with pytest.raises(QueueFull) as full:
        make(store, max_queue=2)
    assert full.value.depth == 2
    store.start(ids[:1], 1)
    store.complete(ids[0], {})
    make(store, max_queue=2)  # a finished job frees its place


def _submit_many(path, count, results):
    store = SqliteJobStore(path)
    accepted = 0
    for _ in range(count):
        try:
            make(store, max_queue=10)
            accepted += 1
        except QueueFull:
            pass
    results.put(accepted)


def test_the_bound_holds_across_processes(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    SqliteJobStore(path)
    results = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_submit_many, args=(path, 8, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sum(results.get(timeout=5) for _ in procs) == 10
    assert SqliteJobStore(path).counts()["QUEUED"] == 10


def test_watchdog_fails_overdue_jobs_queued_or_running(store):
    queued, running, fresh = make(store, timeout=0.01), make(store, timeout=0.01), make(store)
    store.start([running], 1)
    time.sleep(0.02)
    failed = {job.id for job in store.fail_overdue()}
    assert failed == {queued, running}
    assert "timed out" in store.get(queued).error and store.get(fresh).state is JobState.QUEUED
    assert store.start([queued], 1) == []  # an overdue job is never started


def test_jobs_of_a_dead_worker_fail(store):
    alive, dead = make(store), make(store)
    store.start([alive], 10)
    store.start([dead], 20)
    failed = store.fail_orphans(lambda pid: pid == 10)
    assert [job.id for job in failed] == [dead]
    assert "died" in store.get(dead).error and store.get(alive).state is JobState.PROCESSING


def test_restart_recovery_reruns_once_then_fails(store):
    job_id = make(store)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        store.start([job_id], 1)
        requeued, failed = store.recover()
        if attempt < MAX_ATTEMPTS:
            assert requeued == [job_id] and store.get(job_id).state is JobState.QUEUED
        else:
            assert failed == [job_id] and "restarts" in store.get(job_id).error
    assert store.queued_ids() == []


def test_retention_deletes_jobs(store):
    old, new = make(store, retention=0.01), make(store)
    time.sleep(0.02)
    assert store.get(old) is None  # 404 right at expiry, before the janitor runs
    assert [job.id for job in store.expire()] == [old]
    assert store.get(new) is not None and store.expire() == []
