"""A client's webhook endpoint cannot stall imagepub (issue 18, finding 2).

Callback receivers that trickle a response a byte at a time, never answer, or read the request
slowly: every delivery ends at ``webhooks.timeout_seconds``, at most ``webhooks.concurrency`` of
them at once, on threads of their own — jobs and control calls go on meanwhile. A delivery cut
short by a killed worker is made again after its lease, with the same ``X-Imagepub-Delivery``."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from service_process import Service, base_config
from webhook_receiver import Connections, HostileReceiver, Receiver
from workers.outbox import LEASE_MARGIN_SECONDS, POLL_SECONDS

TIMEOUT = 4.0
CONCURRENCY = 2
JOB_PROCESSES = 3  # more than CONCURRENCY: the bound on deliveries must be the webhook pool's
MAX_ATTEMPTS = 2
LEASE = TIMEOUT + LEASE_MARGIN_SECONDS


@pytest.fixture(scope="module")
def hooks(stack):
    config = base_config(stack)
    config["webhooks"] = {"secret_env": "IMAGEPUB_WEBHOOK_SECRET", "allowed_hosts": ["127.0.0.1"],
                          "timeout_seconds": TIMEOUT, "concurrency": CONCURRENCY, "max_attempts": MAX_ATTEMPTS}
    svc = Service(stack, config, "hooks", env={"IMAGEPUB_WEBHOOK_SECRET": "whsec-hostile"}, redis_db=12)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    svc.start_worker(concurrency=JOB_PROCESSES)
    yield svc
    svc.stop_worker()


@pytest.fixture
def outbox(hooks):
    """The outbox's Redis; every test leaves it empty (no delivery of one test holds the next)."""
    client = redis.Redis.from_url(hooks.redis_url, decode_responses=True)
    yield client
    deadline = time.monotonic() + 60
    while client.zcard("imagepub:webhooks"):
        assert time.monotonic() < deadline, client.zrange("imagepub:webhooks", 0, -1, withscores=True)
        time.sleep(0.2)


@pytest.fixture
def image(stack, unique):
    name = f"hooks-{unique}:v1"
    stack.build_image(name, layers=1, layer_bytes=4096)
    return name


def metrics(api) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(api.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def publish(api, source, repository, **extra):
    return api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": repository, "tags": ["v1"]}], **extra})


def test_slow_receivers_never_hold_up_jobs_or_control_calls(hooks, outbox, image, unique):
    api = hooks.api
    before = metrics(api)
    connections = Connections()
    receivers = [HostileReceiver(mode, connections) for mode in ("trickle", "trickle", "silent", "slow-reader")]
    try:
        slow = [publish(api, image, f"slowhook-{unique}-{i}", callback_url=r.url) for i, r in enumerate(receivers)]
        for job in slow:
            assert api.wait(job["id"], timeout=60)["state"] == "succeeded"
        assert connections.wait(lambda c: c.open == CONCURRENCY, timeout=10), connections.log  # the webhook pool is full

        # a publish without a callback, and a control call, are answered while they hang on
        probe = publish(api, image, f"slowhook-probe-{unique}")
        assert api.wait(probe["id"], timeout=20)["state"] == "succeeded"
        images = api.get("/v1/images")
        assert images.status_code == 200, images.text
        assert connections.open > 0, "the slow deliveries were over before: nothing was tested"
        assert value(metrics(api), "imagepub_webhooks_pending") >= 1

        # every attempt (MAX_ATTEMPTS per receiver) was cut at its deadline, never more than
        # CONCURRENCY at once; then each was given up
        attempts = MAX_ATTEMPTS * len(receivers)
        assert connections.wait(lambda c: len(c.log) == attempts and c.open == 0, timeout=60), connections.log
        for entry in connections.log:
            assert entry["closed"] - entry["opened"] < TIMEOUT + 1.0, entry
        assert connections.most_at_once() == CONCURRENCY, connections.log
    finally:
        for receiver in receivers:
            receiver.close()
    deadline = time.monotonic() + 10
    while value(after := metrics(api), "imagepub_webhooks_pending"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for outcome, count in (("retried", len(receivers)), ("failed", len(receivers)), ("delivered", 0)):
        got = value(after, "imagepub_webhook_deliveries_total", outcome=outcome) - value(before, "imagepub_webhook_deliveries_total", outcome=outcome)
        assert got == count, (outcome, got)


def test_more_slow_callbacks_than_the_pool_never_open_more_connections(hooks, outbox, image, unique):
    api = hooks.api
    connections = Connections()
    receiver = HostileReceiver("silent", connections)
    try:
        jobs = [publish(api, image, f"poolhook-{unique}-{i}", callback_url=receiver.url) for i in range(5)]
        # every job's first attempt comes, CONCURRENCY at a time (new entries go before retries)
        assert connections.wait(lambda c: len(c.log) >= len(jobs), timeout=90), connections.log
        assert connections.most_at_once() == CONCURRENCY, connections.log
        for job in jobs:
            assert api.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"
    finally:
        receiver.close()  # the retries left are refused at once


def test_a_delivery_cut_by_a_killed_worker_is_made_again_after_its_lease(hooks, outbox, image, unique):
    api = hooks.api
    hold = threading.Event()
    receiver = Receiver([200, 200], hold=hold)
    try:
        job = publish(api, image, f"killhook-{unique}", callback_url=receiver.url)
        assert len(receiver.wait(1, timeout=60)) == 1  # in flight: the receiver holds its answer
        hooks.kill_worker()  # kill -9 of the worker's whole process group
        hold.set()
        hooks.start_worker(concurrency=JOB_PROCESSES)
        ready = time.monotonic()
        calls = receiver.wait(2, timeout=LEASE + 20)
        assert len(calls) == 2, "the webhook of the killed worker's delivery was not made again"
        first, again = calls
        # due again when the lease passed (or the new worker was ready, if that was later)
        assert again["at"] - first["at"] < max(LEASE, ready - first["at"]) + POLL_SECONDS + 2.0
        assert again["headers"]["X-Imagepub-Delivery"] == first["headers"]["X-Imagepub-Delivery"]
        assert json.loads(again["body"])["id"] == job["id"] and json.loads(again["body"])["state"] == "succeeded"
        time.sleep(POLL_SECONDS * 3)
        assert len(receiver.calls) == 2  # delivered: settled, never again
    finally:
        hold.set()
        receiver.server.shutdown()
