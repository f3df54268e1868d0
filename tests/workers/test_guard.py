"""A running job's guard (``workers.jobs.Guard``): its lease kept alive past its TTL and a
cancellation noticed, by the one watcher thread of the process (``_Watcher``), on the stack's
Redis. The whole of it under a real worker: the kill and cancel tests of ``tests/e2e``."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from service import config
from service.jobs import new_job
from service.jobstore import JobStore
from service.queue import DAEMONS_QUEUE, JobQueue
from workers.jobs import Guard, _Watcher

LOCK_TTL = 2.0  # renewed every TTL/3: a margin of over a second for a watcher thread slowed by a busy machine


class Parts:  # what Guard reads of a worker's Deps
    def __init__(self, store: JobStore, settings):
        self.store, self.redis, self.settings = store, store.redis, settings


@pytest.fixture
def parts(stack, tmp_path):
    url = stack.redis_url.rsplit("/", 1)[0] + "/7"
    settings = config.parse({"recovery": {"lock_ttl_seconds": LOCK_TTL},
                             "artifacts": {"type": "directory", "path": str(tmp_path)}}, {"IMAGEPUB_REDIS_URL": url})
    store = JobStore.from_config(settings)
    store.redis.flushdb()
    yield Parts(store, settings)
    store.redis.flushdb()


def _job(parts: Parts) -> str:
    job = new_job("publish", {"source": "app:1", "targets": [{"registry": "local", "repository": "team/app", "tags": ["1"]}]})
    parts.store.create(job, JobQueue.from_config(parts.settings).message(job["id"], DAEMONS_QUEUE), queue=DAEMONS_QUEUE)
    return job["id"]


def _held(parts: Parts, job_id: str) -> bool:
    return parts.redis.exists(parts.store.job_lock_key(job_id)) == 1


def test_two_running_jobs_keep_their_leases_past_the_ttl_and_give_them_back(parts):
    guards = [Guard(parts, _job(parts)) for _ in range(2)]
    for guard in guards:
        assert guard.acquire()[0]
    try:
        time.sleep(3 * LOCK_TTL)  # three TTLs: each lease renewed, or it would have lapsed
        assert all(_held(parts, guard.job_id) for guard in guards)
        assert threading.active_count() < 10  # one watcher for the process, not a thread per job
    finally:
        guards[0].release()
    assert not _held(parts, guards[0].job_id)
    time.sleep(2 * LOCK_TTL)  # released: not renewed again by a later visit; the other still is
    assert not _held(parts, guards[0].job_id) and _held(parts, guards[1].job_id)
    guards[1].release()
    assert not _held(parts, guards[1].job_id)


def test_a_cancellation_is_noticed_by_the_watcher(parts):
    job_id = _job(parts)
    guard = Guard(parts, job_id)
    assert guard.acquire()[0]
    try:
        parts.store.save({**parts.store.get(job_id), "state": "running"}, event="state")
        assert parts.store.cancel(job_id)[0] == "requested"
        assert guard.cancelled.wait(20 * _Watcher.WATCH_SECONDS)  # noticed at a visit, every WATCH_SECONDS
    finally:
        guard.release()


def _child(parts: Parts, job_id: str, answer) -> None:
    guard = Guard(parts, job_id)
    taken, _ = guard.acquire()
    time.sleep(3 * LOCK_TTL)
    answer.put((taken, _held(parts, job_id)))
    guard.release()


def test_a_forked_pool_process_has_a_watcher_of_its_own(parts):
    """A Celery pool process is forked from a parent that may have a watcher already: threads do
    not survive a fork, so the child's guards need a watcher of their own."""
    warm = Guard(parts, _job(parts))
    assert warm.acquire()[0]  # this process' watcher exists before the fork
    try:
        job_id = _job(parts)
        context = multiprocessing.get_context("fork")
        answer = context.Queue()
        child = context.Process(target=_child, args=(parts, job_id, answer))
        child.start()
        assert answer.get(timeout=30) == (True, True)  # still held after three TTLs in the child
        child.join(10)
        assert child.exitcode == 0
    finally:
        warm.release()
