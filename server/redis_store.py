"""Jobs in Redis, shared by several server replicas (each with its own GPUs).

The same state machine as `server.jobs.SqliteJobStore`, with every transition one Lua script,
so replicas and processes never race. Work is distributed with a Redis Stream and one consumer
group: each replica pulls job ids when it has capacity (`pull`), and a job stays pending in the
group until it ends. A replica holds a lease on the jobs it runs and renews it while its worker
is alive; when a replica dies, its leases lapse and any replica reclaims the jobs (`reclaim`) and
runs them again (at most MAX_ATTEMPTS times in all). A job finished twice keeps its first result.

Keys, under a prefix (default `sam3serve:`):
- `job:<id>` hash: the job; `job:<id>:input` string: its decoded input, until it ends;
- `unfinished` sorted set (id -> created_at): queue depth and order;
- `expiry` sorted set (id -> expires_at): retention; `finished:<STATE>` sorted sets for counts;
- `running:<replica>` set: the jobs a replica runs, whose leases it renews;
- `queue` stream with group `workers`; `recent` list: recent inference times.
Run Redis with persistence (`appendonly yes`) so that queued jobs survive its restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis

from server.jobs import CANCELLED, MAX_ATTEMPTS, Job, JobState, NewJob, QueueFull

GROUP = "workers"
RECENT = 20

# KEYS: job, input, unfinished, expiry, queue. ARGV: job fields as JSON, input (may be empty), max_queue.
SUBMIT = """
local depth = redis.call('ZCARD', KEYS[3])
if depth >= tonumber(ARGV[3]) then return depth + 1 end
local fields = cjson.decode(ARGV[1])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(fields['expires_at'])) + 60)
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('EXPIREAT', KEYS[2], math.ceil(tonumber(fields['expires_at'])) + 60)
end
redis.call('ZADD', KEYS[3], fields['created_at'], fields['id'])
redis.call('ZADD', KEYS[4], fields['expires_at'], fields['id'])
redis.call('XADD', KEYS[5], '*', 'job', fields['id'])
return 0
"""

# KEYS: job, running set. ARGV: now, worker pid, owner, lease_until. Returns 1 if started.
START = """
if redis.call('HGET', KEYS[1], 'state') ~= 'QUEUED' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'deadline')) <= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'PROCESSING', 'started_at', ARGV[1], 'worker_pid', ARGV[2],
           'owner', ARGV[3], 'lease_until', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SADD', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: job, input, unfinished, finished:<state>, queue, recent. ARGV: new state, now, result field, its value,
# stream group, job id, allowed current states (csv), length of `recent`, prefix of the running sets.
# Returns 1 if the job moved.
FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local allowed = false
for s in string.gmatch(ARGV[7], '[^,]+') do if s == state then allowed = true end end
if not allowed then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then redis.call('SREM', ARGV[9] .. owner, ARGV[6]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2], ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[1], 'worker_pid', 'lease_until')
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[1], 'expires_at'), ARGV[6])
local started = redis.call('HGET', KEYS[1], 'started_at')
if ARGV[1] == 'COMPLETED' and started then
  redis.call('LPUSH', KEYS[6], tonumber(ARGV[2]) - tonumber(started))
  redis.call('LTRIM', KEYS[6], 0, ARGV[8] - 1)
end
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then
  redis.call('XACK', KEYS[5], ARGV[5], entry)
  redis.call('XDEL', KEYS[5], entry)
end
return 1
"""

# KEYS: job, running set of its owner. ARGV: now, max attempts. 1 = queued again, 2 = failed, 0 = untouched.
REQUEUE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'PROCESSING' then return 0 end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if lease > tonumber(ARGV[1]) then return 0 end
redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
if tonumber(redis.call('HGET', KEYS[1], 'attempts')) >= tonumber(ARGV[2]) then return 2 end
redis.call('HSET', KEYS[1], 'state', 'QUEUED')
redis.call('HDEL', KEYS[1], 'started_at', 'worker_pid', 'owner', 'lease_until')
return 1
"""

FIELDS = (
    "id model state payload files_token created_at started_at finished_at deadline expires_at attempts"
    " worker_pid result error owner"
).split()


class RedisJobStore:
    """The job store of replicas sharing one Redis; `replica` names this server process tree."""

    def __init__(self, url: str, replica: str, lease_seconds: float = 30.0, prefix: str = "sam3serve:") -> None:
        self.redis = redis.Redis.from_url(url)
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.prefix = prefix
        self.queue = prefix + "queue"
        self._submit = self.redis.register_script(SUBMIT)
        self._start = self.redis.register_script(START)
        self._finish = self.redis.register_script(FINISH)
        self._requeue = self.redis.register_script(REQUEUE)
        try:
            self.redis.xgroup_create(self.queue, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- the state machine ---------------------------------------------------------------------

    def submit(self, new: NewJob, max_queue: int) -> Job:
        now = time.time()
        fields = {
            "id": new.id,
            "model": new.model,
            "state": JobState.QUEUED.value,
            "payload": json.dumps(new.payload),
            "files_token": new.files_token,
            "created_at": repr(now),
            "deadline": repr(now + new.job_timeout),
            "expires_at": repr(now + new.retention),
            "attempts": "0",
        }
        keys = [self._key("job", new.id), self._key("job", new.id, "input"), self._key("unfinished")]
        over = self._submit(
            keys=[*keys, self._key("expiry"), self.queue],
            args=[json.dumps(fields), new.input_data or b"", max_queue],
        )
        if over:
            raise QueueFull(int(over) - 1)
        return self.get(new.id)

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or past its retention."""
        job = self._load(job_id)
        return job if job and job.expires_at > time.time() else None

    def _load(self, job_id: str) -> Job | None:
        values = self.redis.hmget(self._key("job", job_id), FIELDS)
        if values[0] is None:
            return None
        data = {k: (v.decode() if v is not None else None) for k, v in zip(FIELDS, values)}
        return Job(
            id=data["id"],
            model=data["model"],
            state=JobState(data["state"]),
            payload=json.loads(data["payload"]),
            input_path=None,
            files_token=data["files_token"],
            created_at=float(data["created_at"]),
            started_at=_float(data["started_at"]),
            finished_at=_float(data["finished_at"]),
            deadline=float(data["deadline"]),
            expires_at=float(data["expires_at"]),
            attempts=int(data["attempts"] or 0),
            worker_pid=int(data["worker_pid"]) if data["worker_pid"] else None,
            result=json.loads(data["result"]) if data["result"] else None,
            error=data["error"],
            owner=data["owner"],
        )

    def start(self, job_ids: list[str], worker_pid: int) -> list[Job]:
        now = time.time()
        started = [
            job_id
            for job_id in job_ids
            if self._start(
                keys=[self._key("job", job_id), self._key("running", self.replica)],
                args=[repr(now), worker_pid, self.replica, repr(now + self.lease_seconds)],
            )
        ]
        return [job for job_id in started if (job := self.get(job_id))]

    def _end(self, job_id: str, state: JobState, field: str, value: str, sources: tuple[JobState, ...]) -> bool:
        keys = [
            self._key("job", job_id),
            self._key("job", job_id, "input"),
            self._key("unfinished"),
            self._key("finished", state.value),
            self.queue,
            self._key("recent"),
        ]
        args = [state.value, repr(time.time()), field, value, GROUP, job_id, ",".join(s.value for s in sources)]
        return bool(self._finish(keys=keys, args=[*args, RECENT, self._key("running", "")]))

    def complete(self, job_id: str, result: dict) -> bool:
        """PROCESSING -> COMPLETED; a second completion (a job re-run after its lease lapsed) is ignored."""
        return self._end(job_id, JobState.COMPLETED, "result", json.dumps(result), (JobState.PROCESSING,))

    def fail(self, job_id: str, error: str) -> bool:
        return self._end(job_id, JobState.FAILED, "error", error, (JobState.QUEUED, JobState.PROCESSING))

    def cancel(self, job_id: str) -> bool:
        """QUEUED -> FAILED with CANCELLED; False when the job already started or finished."""
        return self._end(job_id, JobState.FAILED, "error", CANCELLED, (JobState.QUEUED,))

    # -- inputs -------------------------------------------------------------------------------

    def read_input(self, job: Job) -> bytes:
        data = self.redis.get(self._key("job", job.id, "input"))
        if data is None:
            raise FileNotFoundError(f"job {job.id} has no stored input")
        return data

    def release_input(self, job: Job) -> None:
        self.redis.delete(self._key("job", job.id, "input"))

    # -- distribution ---------------------------------------------------------------------------

    def pull(self, count: int, block_ms: int) -> list[str]:
        """Up to `count` new job ids for this replica (blocks up to `block_ms`); they stay pending until they end."""
        if count <= 0:
            return []
        reply = self.redis.xreadgroup(GROUP, self.replica, {self.queue: ">"}, count=count, block=block_ms)
        ids = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                job_id = fields[b"job"].decode()
                if self.redis.exists(self._key("job", job_id)):
                    # Remember the stream entry, so that whoever ends the job acknowledges it.
                    self.redis.hset(self._key("job", job_id), "entry", entry_id)
                    ids.append(job_id)
                else:  # expired before anyone pulled it
                    self.redis.xack(self.queue, GROUP, entry_id)
                    self.redis.xdel(self.queue, entry_id)
        return ids

    def renew(self, worker_alive: Callable[[int], bool]) -> None:
        """Extend the leases of this replica's running jobs whose worker process is alive."""
        until = repr(time.time() + self.lease_seconds)
        for raw in self.redis.smembers(self._key("running", self.replica)):
            key = self._key("job", raw.decode())
            pid = self.redis.hget(key, "worker_pid")
            if pid is not None and worker_alive(int(pid)):
                self.redis.hset(key, "lease_until", until)

    def reclaim(self) -> tuple[list[str], list[Job]]:
        """Take over jobs pending too long in other (dead) replicas: ids to run here, and jobs failed for good.

        A job whose owner still holds its lease is left alone; one whose lease lapsed is queued
        again (or FAILS after MAX_ATTEMPTS runs); one that was delivered but never started is run.
        """
        idle_ms = int(self.lease_seconds * 1000)
        run, failed = [], []
        start = "0-0"
        while True:
            start, entries, _ = self.redis.xautoclaim(self.queue, GROUP, self.replica, idle_ms, start, count=100)
            for entry_id, fields in entries:
                job_id = fields[b"job"].decode()
                job = self.get(job_id)
                if job is None or job.finished:
                    self.redis.xack(self.queue, GROUP, entry_id)
                    self.redis.xdel(self.queue, entry_id)
                    continue
                if job.state is JobState.PROCESSING:
                    outcome = self._requeue(
                        keys=[self._key("job", job_id), self._key("running", job.owner or "")],
                        args=[repr(time.time()), MAX_ATTEMPTS],
                    )
                    if outcome == 2:
                        error = f"Job interrupted {MAX_ATTEMPTS} times while running (its server died); not retried"
                        if self.fail(job_id, error):
                            failed.append(self.get(job_id))
                        continue
                    if outcome == 0:
                        continue  # still leased: its replica is alive, just slow
                run.append(job_id)
            if start in (b"0-0", "0-0"):
                return run, [job for job in failed if job]

    # -- housekeeping, as in SqliteJobStore ------------------------------------------------------------

    def unfinished(self) -> int:
        return self.redis.zcard(self._key("unfinished"))

    def active(self) -> int:
        """Jobs running on this replica."""
        return self.redis.scard(self._key("running", self.replica))

    def _unfinished_jobs(self) -> list[Job]:
        ids = [raw.decode() for raw in self.redis.zrange(self._key("unfinished"), 0, -1)]
        return [job for job_id in ids if (job := self.get(job_id))]

    def fail_overdue(self) -> list[Job]:
        now, failed = time.time(), []
        for job in self._unfinished_jobs():
            if job.deadline <= now:
                error = f"Job timed out: not finished {job.deadline - job.created_at:.0f} s after submission"
                if self.fail(job.id, error):
                    job.error = error
                    failed.append(job)
        return failed

    def fail_orphans(self, worker_alive: Callable[[int], bool]) -> list[Job]:
        """This replica's running jobs whose worker process died FAIL (a crash mid-job)."""
        failed = []
        for raw in self.redis.smembers(self._key("running", self.replica)):
            job = self.get(raw.decode())
            if job and job.state is JobState.PROCESSING and job.worker_pid and not worker_alive(job.worker_pid):
                error = f"The worker process running this job died (pid {job.worker_pid}); the server is still serving"
                if self.fail(job.id, error):
                    job.error = error
                    failed.append(job)
        return failed

    def recover(self) -> tuple[list[str], list[str]]:
        """Nothing to do at start-up: a dead replica's jobs come back through `reclaim` when their leases lapse."""
        return [], []

    def queued_ids(self) -> list[str]:
        return [job.id for job in self._unfinished_jobs() if job.state is JobState.QUEUED]

    def expire(self) -> list[Job]:
        now = time.time()
        ids = [raw.decode() for raw in self.redis.zrangebyscore(self._key("expiry"), 0, now)]
        expired = []
        for job_id in ids:
            job = self._load(job_id)
            if job is not None:
                expired.append(job)
            pipe = self.redis.pipeline()
            pipe.zrem(self._key("expiry"), job_id)
            pipe.zrem(self._key("unfinished"), job_id)
            for state in JobState:
                pipe.zrem(self._key("finished", state.value), job_id)
            pipe.delete(self._key("job", job_id), self._key("job", job_id, "input"))
            pipe.execute()
        return expired

    def counts(self) -> dict[str, int]:
        now = time.time()
        counts = {state.value: 0 for state in JobState}
        for job in self._unfinished_jobs():
            counts[job.state.value] += 1
        for state in (JobState.COMPLETED, JobState.FAILED):
            counts[state.value] = self.redis.zcount(self._key("finished", state.value), now, "+inf")
        return counts

    def recent_inference_time(self, limit: int = RECENT) -> float | None:
        values = [float(v) for v in self.redis.lrange(self._key("recent"), 0, limit - 1)]
        return sum(values) / len(values) if values else None


def _float(value: str | None) -> float | None:
    return float(value) if value is not None else None
