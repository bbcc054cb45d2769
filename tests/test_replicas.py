"""Two server replicas sharing one real Redis (jobs) and one directory (files): any replica answers for
any job, work goes to whichever has room, a killed replica's job completes on the other, and a Redis
restart loses nothing."""

from __future__ import annotations

import httpx
import pytest
import redis
from segmind import SegmindClient

from tests.conftest import noise_image, png_b64
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess

IMAGE = png_b64(noise_image(96, 128))
QUICK = {"image": IMAGE, "text_prompt": "a cat", "threshold": 0.1}
SLOW = {"image": IMAGE, "points_per_side": 128}  # several seconds on the tiny model
LEASE = "3"


@pytest.fixture(scope="module")
def cluster(weights_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    store = RedisServer(root / "redis").start()
    # One job per worker at a time, so that a busy replica leaves the next job to the other.
    shared = ["--jobs", store.url, "--artifacts", str(root / "files"), "--lease-seconds", LEASE]
    shared += ["--max-batch-size", "1"]
    replicas = [ServerProcess(weights_dir, root / f"data-{name}", *shared).start() for name in ("a", "b")]
    yield store, replicas
    for replica in replicas:
        if replica.process.poll() is None:
            replica.terminate()
    store.stop()


def test_any_replica_answers_for_any_job(cluster):
    _, (a, b) = cluster
    job = SegmindClient(base_url=f"{a.url}/v1").submit_async("sam3-image", **QUICK)
    done = b.wait_for_state(job.request_id, {"COMPLETED"}, timeout=120)
    assert done["request_id"] == job.request_id
    result = httpx.get(f"{b.url}/v2/requests/{job.request_id}", timeout=10).json()
    assert result["status"] == "COMPLETED" and result["output"].startswith(b.url)
    for replica in (a, b):  # the files are in the shared directory
        assert httpx.get(result["output"].replace(b.url, replica.url), timeout=10).status_code == 200
    # v1 on a replica waits for the job wherever it runs.
    response = httpx.post(f"{b.url}/v1/sam3-image", json=QUICK, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_both_replicas_take_work(cluster):
    store, (a, _) = cluster
    client = SegmindClient(base_url=f"{a.url}/v1")
    jobs = [client.submit_async("sam3-image", **SLOW) for _ in range(4)]
    owners = set()
    client_redis = redis.Redis.from_url(store.url)
    for job in jobs:
        a.wait_for_state(job.request_id, {"COMPLETED"}, timeout=240)
    for job in jobs:
        # The worker records its replica on start; the pid is cleared on finish but the owner stays.
        owners.add(client_redis.hget(f"sam3serve:job:{job.request_id}", "owner"))
    assert len(owners) == 2, owners


def test_a_killed_replicas_job_completes_on_the_other(cluster):
    store, (a, b) = cluster
    client_redis = redis.Redis.from_url(store.url)
    job = SegmindClient(base_url=f"{a.url}/v1").submit_async("sam3-image", **SLOW)
    a.wait_for_state(job.request_id, {"PROCESSING"}, timeout=60)
    owner = client_redis.hget(f"sam3serve:job:{job.request_id}", "owner").decode()
    victim, survivor = (a, b) if f"-{a.process.pid}-" in owner else (b, a)
    assert f"-{victim.process.pid}-" in owner
    victim.kill()
    done = survivor.wait_for_state(job.request_id, {"COMPLETED", "FAILED"}, timeout=240)
    assert done["status"] == "COMPLETED", done
    row = client_redis.hgetall(f"sam3serve:job:{job.request_id}")
    assert row[b"attempts"] == b"2" and f"-{survivor.process.pid}-" in row[b"owner"].decode()


def test_redis_restart_keeps_serving(cluster):
    store, replicas = cluster
    alive = next(r for r in replicas if r.process.poll() is None)
    store.restart()
    job = SegmindClient(base_url=f"{alive.url}/v1").submit_async("sam3-image", **QUICK)
    assert alive.wait_for_state(job.request_id, {"COMPLETED"}, timeout=120)["status"] == "COMPLETED"
