"""Which held messages the supervisor takes for jobs whose worker died handing them to its pool
(``Supervisor.recover_unstarted``), on the stack's Redis. Messages are held where kombu's Redis
transport holds a delivered, unacknowledged one; the whole fault, with a real worker killed
mid-hand-off, is ``tests/e2e/test_faults.py::test_kill_after_a_worker_took_the_message_before_the_job_started``."""

from __future__ import annotations

import json
import time

import pytest

from service import config
from service.jobs import new_job
from service.jobstore import JobStore
from service.queue import DAEMONS_QUEUE, JobQueue
from service.routing import queue_for
from workers.supervisor import UNACKED, UNACKED_INDEX, Supervisor

LOCK_TTL = 2.0


@pytest.fixture
def parts(stack, tmp_path):
    url = stack.redis_url.rsplit("/", 1)[0] + "/6"
    settings = config.parse({"recovery": {"lock_ttl_seconds": LOCK_TTL, "scan_interval_seconds": 0.2},
                             "artifacts": {"type": "directory", "path": str(tmp_path)}}, {"IMAGEPUB_REDIS_URL": url})
    store = JobStore.from_config(settings)
    store.redis.flushdb()
    queue = JobQueue.from_config(settings)
    yield store, queue, Supervisor(settings, store, queue, "test-supervisor")
    store.redis.flushdb()


def _job(store: JobStore, state: str = "queued") -> str:
    """A publish of a daemon's image: routed to the daemons' queue (service/routing.py)."""
    job = new_job("publish", {"source": "app:1", "targets": [{"registry": "local", "repository": "team/app", "tags": ["1"]}]})
    assert queue_for(job) == DAEMONS_QUEUE
    store.create(job)
    if state != "queued":
        store.save({**job, "state": state}, event="state")
    return job["id"]


def _hold(store: JobStore, message: str, age: float) -> str:
    """Hold ``message`` as kombu does between delivering it and its acknowledgement."""
    tag = json.loads(message)["properties"]["delivery_tag"]
    store.redis.hset(UNACKED, tag, json.dumps([json.loads(message), "", DAEMONS_QUEUE]))
    store.redis.zadd(UNACKED_INDEX, {tag: time.time() - age})
    return tag


def _queued(store: JobStore) -> list[str]:
    return [JobQueue.job_of(json.dumps([json.loads(raw)])) for raw in store.redis.lrange(DAEMONS_QUEUE, 0, -1)]


def test_a_queued_job_held_past_the_lock_ttl_is_queued_again_once(parts):
    store, queue, supervisor = parts
    job_id = _job(store)
    tag = _hold(store, queue.message(job_id), age=LOCK_TTL + 1)
    assert supervisor.recover_unstarted() == [job_id]
    assert _queued(store) == [job_id]
    assert not store.redis.hexists(UNACKED, tag) and store.redis.zscore(UNACKED_INDEX, tag) is None
    store.redis.delete("imagepub:supervisor:unstarted")
    assert supervisor.recover_unstarted() == [] and _queued(store) == [job_id]


def test_a_due_retry_held_past_the_lock_ttl_is_queued_again_but_not_one_that_waits_for_its_time(parts):
    store, queue, supervisor = parts
    due, waiting = _job(store, state="retrying"), _job(store, state="retrying")
    store.schedule(waiting, time.time() + 60)  # its attempt just failed; the ack is on its way
    for job_id in (due, waiting):
        _hold(store, queue.message(job_id), age=LOCK_TTL + 1)
    assert supervisor.recover_unstarted() == [due]
    assert _queued(store) == [due]


def test_what_is_no_lost_hand_off_is_left_alone(parts):
    store, queue, supervisor = parts
    young = _job(store)
    running = _job(store, state="running")
    ended = _job(store, state="succeeded")
    being_taken = _job(store)
    store.redis.set(store.job_lock_key(being_taken), "a worker's lease")
    marked = _job(store)  # queued again already; that message too was taken and lost
    store.redis.set(store.requeued_key(marked), "another supervisor")
    old = LOCK_TTL + 1
    kept = [_hold(store, queue.message(young), age=0.1), _hold(store, queue.message(running), age=old),
            _hold(store, queue.message(ended), age=old), _hold(store, queue.message(being_taken), age=old),
            _hold(store, queue.message(marked), age=old)]
    control = json.loads(queue.message(_job(store)))
    control["headers"]["task"] = "imagepub.control.images"
    kept.append(_hold(store, json.dumps(control), age=old))
    store.redis.hset(UNACKED, "garbage", "not json")
    store.redis.zadd(UNACKED_INDEX, {"garbage": time.time() - old})
    assert supervisor.recover_unstarted() == []
    assert _queued(store) == []
    assert all(store.redis.hexists(UNACKED, tag) for tag in kept + ["garbage"])


def test_every_held_message_is_looked_at_however_many_running_jobs_hold_theirs(parts, monkeypatch):
    """Most held messages are running jobs' (acknowledged when they end), oldest first; the scan
    pages past them, and past the entries it removes."""
    import workers.supervisor

    monkeypatch.setattr(workers.supervisor, "HELD_SCAN_BATCH", 2)
    store, queue, supervisor = parts
    running = []
    for age in (60, 50, 40):
        job_id = _job(store, state="running")
        store.redis.set(store.job_lock_key(job_id), "its worker's lease")
        running.append(_hold(store, queue.message(job_id), age=age))
    lost = [_job(store) for _ in range(3)]
    for age, job_id in zip((30, 20, 10), lost):
        _hold(store, queue.message(job_id), age=age)
    assert supervisor.recover_unstarted() == lost
    assert sorted(_queued(store)) == sorted(lost)
    assert store.redis.hlen(UNACKED) == 3 and all(store.redis.hexists(UNACKED, tag) for tag in running)
