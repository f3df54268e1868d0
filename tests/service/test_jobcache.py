"""The API process' cache of job records (service/jobcache.py), against real Redis servers: a
record read once is served from memory, and never after Redis has changed it, whoever wrote it
and however (a write, a write during the read, a flush); a listener that dies, a Redis killed and
started again empty, or a Redis that refuses tracking, leave every read going to Redis."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from service.jobcache import JobCache
from stack import free_port

KEY = "cachetest:job:a"


class Reads:
    """``fetch`` for JobCache.get: reads Redis and counts the round trips."""

    def __init__(self, client: redis.Redis, key: str = KEY):
        self.client, self.key, self.count = client, key, 0

    def __call__(self) -> str | None:
        self.count += 1
        return self.client.get(self.key)


@pytest.fixture
def writer(redis_url):
    """Another client, as a worker or another API process is."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def cache(redis_client):
    return JobCache(redis_client, "cachetest:job:")


def test_a_record_read_once_comes_from_memory_until_another_client_writes_it(cache, redis_client, writer):
    writer.set(KEY, "queued")
    reads = Reads(redis_client)
    assert [cache.get(KEY, reads) for _ in range(5)] == ["queued"] * 5
    assert reads.count == 1

    writer.set(KEY, "running")  # a worker's snapshot: Redis tells the listener before it answers
    assert cache.get(KEY, reads) == "running"
    assert reads.count == 2
    writer.delete(KEY)
    assert cache.get(KEY, reads) is None
    assert cache.get(KEY, reads) is None  # a missing record is not kept: it is read each time
    assert reads.count == 4


def test_keys_outside_the_prefix_are_not_cached_and_do_not_disturb(cache, redis_client, writer):
    writer.set(KEY, "queued")
    reads = Reads(redis_client)
    cache.get(KEY, reads)
    writer.set("cachetest:other", "x")
    assert cache.get(KEY, reads) == "queued"
    assert reads.count == 1


def test_a_record_written_while_it_was_being_read_is_not_kept(cache, redis_client, writer):
    writer.set(KEY, "queued")

    def read_then_overtaken() -> str | None:
        value = redis_client.get(KEY)
        writer.set(KEY, "running")  # lands after the read, before its answer is kept
        cache.get("cachetest:job:b", Reads(redis_client, "cachetest:job:b"))  # another request reads the news meanwhile
        return value

    assert cache.get(KEY, read_then_overtaken) == "queued"  # what Redis held when it was read
    reads = Reads(redis_client)
    assert cache.get(KEY, reads) == "running"
    assert reads.count == 1


def test_a_flush_forgets_everything(cache, redis_client, writer):
    writer.set(KEY, "queued")
    cache.get(KEY, Reads(redis_client))
    writer.flushdb()
    writer.set(KEY, "new")  # (another database's flush would only cost a miss)
    assert cache.get(KEY, Reads(redis_client)) == "new"


def test_a_listener_killed_by_redis_stops_the_cache_until_a_new_one_listens(cache, redis_client, writer):
    writer.set(KEY, "queued")
    reads = Reads(redis_client)
    cache.get(KEY, reads)
    listeners = [c for c in writer.client_list() if "__redis__" in c.get("cmd", "") or c.get("sub") == "1"]
    assert listeners, "the cache subscribes a listener"
    for listener in listeners:
        writer.client_kill_filter(_id=listener["id"])
    writer.set(KEY, "running")  # its invalidation had nobody to go to

    assert cache.get(KEY, reads) == "running"
    assert cache.get(KEY, reads) == "running"
    assert reads.count == 3  # no cache until the next listener (a second later)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and cache.size == 0:
        cache.get(KEY, reads)
        time.sleep(0.05)
    assert cache.size == 1, "a new listener subscribes and the cache serves again"
    writer.set(KEY, "succeeded")
    assert cache.get(KEY, reads) == "succeeded"


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of the test's own, to kill and start again on the same port."""
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    procs: list[subprocess.Popen] = []

    def start() -> redis.Redis:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        procs.append(proc)
        client = redis.Redis(port=port, decode_responses=True, socket_connect_timeout=1, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    yield start, procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_redis_killed_and_started_again_empty_is_read_not_remembered(own_redis):
    start, procs = own_redis
    client = start()
    cache = JobCache(client, "cachetest:job:")
    client.set(KEY, "queued")
    reads = Reads(client)
    assert cache.get(KEY, reads) == "queued"
    assert cache.get(KEY, reads) == "queued"
    assert reads.count == 1

    procs[-1].kill()  # kill -9: no goodbye on any connection
    procs[-1].wait()
    start().set(KEY, "elsewhere")  # a Redis that lost everything, then a write nobody told the cache of

    assert cache.get(KEY, Reads(client)) == "elsewhere"
    other = Reads(client, "cachetest:job:none")
    assert cache.get("cachetest:job:none", other) is None


def test_a_redis_that_refuses_tracking_leaves_every_read_to_redis(own_redis, caplog):
    start, _ = own_redis
    client = start()
    client.execute_command("ACL", "SETUSER", "default", "-client|tracking")
    cache = JobCache(client, "cachetest:job:")
    client.set(KEY, "queued")
    reads = Reads(client)
    assert [cache.get(KEY, reads) for _ in range(3)] == ["queued"] * 3
    assert reads.count == 3
    assert "job cache off" in caplog.text


def test_no_read_that_begins_after_a_write_was_acknowledged_returns_what_it_replaced(cache, redis_client, redis_url):
    """Readers on threads, a writer moving the records on: a read that began after a write was
    acknowledged to its writer returns that write or a later one, never an older value. (A worker
    saves a job, a pipeline learns of it through the live stream, then reads the job.)"""
    import random
    import threading

    keys = [f"cachetest:job:{i}" for i in range(8)]
    writer = redis.Redis.from_url(redis_url, decode_responses=True)
    acknowledged = {key: 0 for key in keys}  # the newest version a writer's SET returned for
    for key in keys:
        writer.set(key, "0")
    stale: list[tuple[str, int, int]] = []
    stop = threading.Event()

    def read() -> None:
        rng = random.Random()
        while not stop.is_set():
            key = rng.choice(keys)
            floor = acknowledged[key]
            value = int(cache.get(key, lambda k=key: redis_client.get(k)))
            if value < floor:
                stale.append((key, value, floor))

    readers = [threading.Thread(target=read) for _ in range(4)]
    for thread in readers:
        thread.start()
    deadline = time.monotonic() + 3
    version = 0
    while time.monotonic() < deadline:
        version += 1
        key = random.choice(keys)
        writer.set(key, str(version))
        acknowledged[key] = version
        time.sleep(random.choice((0, 0.0005, 0.002)))
    stop.set()
    for thread in readers:
        thread.join()
    assert version > 500 and cache.size > 0
    assert stale == []
