"""The Redis job store against a real redis-server: the state machine, distribution, leases, persistence."""

from __future__ import annotations

import time

import pytest

from server.jobs import CANCELLED, MAX_ATTEMPTS, JobState, NewJob, QueueFull
from server.redis_store import RedisJobStore
from tests.redis_server import RedisServer

LEASE = 2.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def stores(redis_server, request) -> tuple[RedisJobStore, RedisJobStore]:
    """Two replicas' views of one Redis, under a prefix of their own per test."""
    prefix = f"t{abs(hash(request.node.name))}:"
    return (
        RedisJobStore(redis_server.url, "replica-a", lease_seconds=LEASE, prefix=prefix),
        RedisJobStore(redis_server.url, "replica-b", lease_seconds=LEASE, prefix=prefix),
    )


def make(store: RedisJobStore, data: bytes = b"input", timeout: float = 60, max_queue: int = 100) -> str:
    return store.submit(NewJob("sam3-image", {"params": {}}, data, "t" * 32, timeout, 3600), max_queue).id


def test_state_machine_is_guarded_and_shared(stores):
    a, b = stores
    job_id = make(a)
    assert b.get(job_id).state is JobState.QUEUED and b.read_input(b.get(job_id)) == b"input"
    [started] = b.start([job_id], worker_pid=7)
    assert started.state is JobState.PROCESSING and started.owner == "replica-b" and started.attempts == 1
    assert a.start([job_id], worker_pid=8) == []  # dispatched twice: runs once
    assert b.complete(job_id, {"primary": "x.png"})
    assert a.complete(job_id, {"primary": "other.png"}) is False  # a second result changes nothing
    assert a.fail(job_id, "late") is False
    done = a.get(job_id)
    assert done.state is JobState.COMPLETED and done.result == {"primary": "x.png"}
    assert done.metrics()["inference_time"] >= 0
    with pytest.raises(FileNotFoundError):
        a.read_input(done)  # inputs go with the job's end
    assert a.counts()["COMPLETED"] == 1 and a.unfinished() == 0 and a.recent_inference_time() is not None


def test_only_a_queued_job_can_be_cancelled(stores):
    a, b = stores
    queued, running = make(a), make(a)
    b.start([running], worker_pid=7)
    assert b.cancel(queued) and a.cancel(queued) is False
    job = a.get(queued)
    assert job.state is JobState.FAILED and job.error == CANCELLED and a.unfinished() == 1
    with pytest.raises(FileNotFoundError):
        a.read_input(job)  # the input goes with the job's end
    assert a.start([queued], worker_pid=8) == [] and a.cancel(running) is False


def test_queue_limit_is_atomic_across_replicas(stores):
    a, b = stores
    make(a, max_queue=2)
    make(b, max_queue=2)
    with pytest.raises(QueueFull) as full:
        make(a, max_queue=2)
    assert full.value.depth == 2


def test_each_job_is_pulled_by_one_replica(stores):
    a, b = stores
    ids = {make(a) for _ in range(6)}
    pulled_a = a.pull(4, block_ms=100)
    pulled_b = b.pull(10, block_ms=100)
    assert len(pulled_a) == 4 and len(pulled_b) == 2
    assert set(pulled_a) | set(pulled_b) == ids and not set(pulled_a) & set(pulled_b)
    assert a.pull(10, block_ms=50) == [] and b.pull(0, block_ms=50) == []


def test_a_dead_replicas_job_is_reclaimed_after_its_lease(stores):
    a, b = stores
    job_id = make(a)
    assert a.pull(1, block_ms=100) == [job_id]
    a.start([job_id], worker_pid=1)
    assert b.reclaim() == ([], [])  # within the lease: a is presumed alive
    a.renew(lambda pid: True)
    time.sleep(LEASE / 2)
    assert b.reclaim() == ([], [])  # the renewed lease still holds
    assert wait_reclaim(b) == ([job_id], [])
    job = b.get(job_id)
    assert job.state is JobState.QUEUED and job.owner is None
    [again] = b.start([job_id], worker_pid=2)
    assert again.attempts == 2 and again.owner == "replica-b"
    assert b.complete(job_id, {"primary": None})
    assert a.complete(job_id, {"primary": None}) is False  # the first replica finishing late is harmless
    assert a.redis.xpending(a.queue, "workers")["pending"] == 0


def wait_reclaim(store: RedisJobStore) -> tuple[list[str], list]:
    """Reclaim until something lapses (a pending entry must idle a whole lease first)."""
    deadline = time.monotonic() + 3 * LEASE
    while (outcome := store.reclaim()) == ([], []) and time.monotonic() < deadline:
        time.sleep(0.1)
    return outcome


def test_a_job_interrupted_too_often_fails(stores):
    a, b = stores
    job_id = make(a)
    assert a.pull(1, block_ms=100) == [job_id]
    a.start([job_id], worker_pid=1)  # replica a dies while running it: its lease is never renewed
    assert wait_reclaim(b) == ([job_id], [])
    b.start([job_id], worker_pid=2)  # and so does replica b, on the second attempt
    run, failed = wait_reclaim(a)
    assert run == [] and [job.id for job in failed] == [job_id]
    assert f"interrupted {MAX_ATTEMPTS} times" in a.get(job_id).error


def test_overdue_orphaned_and_expired_jobs(stores):
    a, _ = stores
    overdue = make(a, timeout=0.01)
    orphan = make(a)
    a.start([orphan], worker_pid=42)
    time.sleep(0.05)
    assert [job.id for job in a.fail_overdue()] == [overdue]
    assert [job.id for job in a.fail_orphans(lambda pid: pid != 42)] == [orphan]
    assert a.active() == 0 and a.counts()["FAILED"] == 2
    expiring = a.submit(NewJob("sam3-image", {"params": {}}, b"x", "u" * 32, 60, 0.05), 100).id
    time.sleep(0.1)
    assert a.get(expiring) is None
    assert [job.id for job in a.expire()] == [expiring] and a.expire() == []


def test_queued_jobs_survive_a_redis_restart(redis_server, stores):
    a, _ = stores
    ids = [make(a) for _ in range(3)]
    redis_server.restart()
    fresh = RedisJobStore(redis_server.url, "replica-c", lease_seconds=LEASE, prefix=a.prefix)
    assert [fresh.get(i).state for i in ids] == [JobState.QUEUED] * 3
    assert sorted(fresh.pull(10, block_ms=100)) == sorted(ids)
    assert fresh.read_input(fresh.get(ids[0])) == b"input"
