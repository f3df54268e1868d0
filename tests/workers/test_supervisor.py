"""How the supervisor finds jobs whose message a worker took off its queue and lost before it
started them (``Supervisor.recover_untaken``), on the stack's Redis: queues, waiting indexes and
job locks as the API and the workers write them. The whole fault, a real worker killed during
the hand-off, is ``tests/e2e/test_faults.py::test_kill_after_a_worker_took_the_message_before_the_job_started``."""

from __future__ import annotations

import json
import time

import pytest

from service import config
from service.jobs import new_job
from service.jobstore import JobStore
from service.queue import DAEMONS_QUEUE, JobQueue, waiting_key
from service.routing import queue_for
from workers.supervisor import Supervisor

LOCK_TTL = 2.0
WAITING = waiting_key(DAEMONS_QUEUE)


@pytest.fixture
def parts(stack, tmp_path):
    url = stack.redis_url.rsplit("/", 1)[0] + "/6"
    settings = config.parse({"recovery": {"lock_ttl_seconds": LOCK_TTL, "scan_interval_seconds": 0.2},
                             "artifacts": {"type": "directory", "path": str(tmp_path)}}, {"IMAGEPUB_REDIS_URL": url})
    store = JobStore.from_config(settings)
    store.redis.flushdb()
    queue = JobQueue.from_config(settings)
    supervisor = Supervisor(settings, store, queue, "test-supervisor")
    supervisor.register_queues()  # as it does when its worker starts: a worker of a daemon takes from the daemons' queue
    yield store, queue, supervisor
    store.redis.flushdb()


def _submit(store: JobStore, queue: JobQueue, age: float = 0.0, state: str = "queued") -> str:
    """A publish of a daemon's image (the daemons' queue), stored and queued as the API does,
    its message put there ``age`` seconds ago."""
    job = new_job("publish", {"source": "app:1", "targets": [{"registry": "local", "repository": "team/app", "tags": ["1"]}]})
    assert queue_for(job) == DAEMONS_QUEUE
    store.create(job, queue.message(job["id"], DAEMONS_QUEUE), queue=DAEMONS_QUEUE)
    store.redis.zadd(WAITING, {job["id"]: time.time() - age})
    if state != "queued":
        store.save({**job, "state": state}, event="state")
    return job["id"]


def _take(store: JobStore) -> str:
    """A worker's main process takes the message next in line (BRPOP): the job id it carries."""
    return JobQueue.job_of(store.redis.rpop(DAEMONS_QUEUE))


def _queued(store: JobStore) -> list[str]:
    return [JobQueue.job_of(raw) for raw in store.redis.lrange(DAEMONS_QUEUE, 0, -1)]


def _scan(supervisor: Supervisor, store: JobStore) -> list[str]:
    store.redis.delete("imagepub:supervisor:untaken")  # the sweep lock: one scan after another
    return supervisor.recover_untaken()


def test_a_job_taken_off_an_empty_queue_and_lost_is_queued_again_on_the_second_look(parts):
    store, queue, supervisor = parts
    job_id = _submit(store, queue, age=LOCK_TTL + 1)
    assert _take(store) == job_id  # ... and the worker dies
    assert _scan(supervisor, store) == []  # seen once: a live worker would take its lock in milliseconds
    assert _scan(supervisor, store) == [job_id]
    assert _queued(store) == [job_id]
    assert time.time() - store.redis.zscore(WAITING, job_id) < 1  # in line again, from now
    assert _scan(supervisor, store) == [] and _scan(supervisor, store) == []  # once


def test_a_job_taken_before_the_message_now_in_line_and_lost_is_queued_again(parts):
    store, queue, supervisor = parts
    lost = _submit(store, queue, age=3 * LOCK_TTL + 1)
    waiting = [_submit(store, queue, age=age) for age in (LOCK_TTL + 0.5, 0.5)]
    assert _take(store) == lost
    _scan(supervisor, store)
    assert _scan(supervisor, store) == [lost]
    assert sorted(_queued(store)) == sorted(waiting + [lost])


def test_jobs_still_in_line_or_being_taken_or_ended_are_not_queued_again(parts):
    store, queue, supervisor = parts
    in_line = [_submit(store, queue, age=age) for age in (60, 50)]  # a backlog: old, but in line
    young = _submit(store, queue, age=0.1)
    assert _take(store) == in_line[0]
    store.redis.set(store.job_lock_key(in_line[0]), "a worker's lease")  # taken and locked: running
    ended = _submit(store, queue, age=60, state="succeeded")
    retry_waits = _submit(store, queue, age=60, state="retrying")
    store.schedule(retry_waits, time.time() + 60)
    for job_id in (ended, retry_waits, young):  # their messages were taken long ago
        store.redis.lrem(DAEMONS_QUEUE, 1, next(m for m in store.redis.lrange(DAEMONS_QUEUE, 0, -1) if job_id in m))
    for _ in range(3):
        assert _scan(supervisor, store) == []
    assert _queued(store) == [in_line[1]]
    assert {m.decode() if isinstance(m, bytes) else m for m in store.redis.zrange(WAITING, 0, -1)} == {in_line[0], in_line[1], young}
    # left over entries are gone: the ended job's and the one whose retry waits for its time


def test_a_taken_job_whose_worker_takes_its_lock_leaves_the_index(parts):
    """What the worker's pool process does (Guard.acquire): the lock and the entry, together."""
    from workers.jobs import Guard

    store, queue, supervisor = parts

    class Parts:  # what Guard reads of a worker's Deps
        def __init__(self):
            self.store, self.redis, self.settings = store, store.redis, supervisor.settings

    job_id = _submit(store, queue, age=LOCK_TTL + 1)
    _take(store)
    guard = Guard(Parts(), job_id, DAEMONS_QUEUE)
    taken, job = guard.acquire()
    try:
        assert taken and job["id"] == job_id
        assert store.redis.zscore(WAITING, job_id) is None
        assert _scan(supervisor, store) == [] and _scan(supervisor, store) == []
    finally:
        guard.release()
