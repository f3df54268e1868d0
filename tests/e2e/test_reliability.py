"""Nothing lost: a job answered 202 ends in exactly one terminal state when workers are killed,
Redis restarts, registries fail; callers can cancel, follow live, and are called back.

A job is held "mid-run" deterministically by holding, from the test, the Redis lock that
serialises pushes of its target reference: the worker then sits inside the publish step."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import pytest
import redis
import requests

from service.client import ImagepubClient
from service_process import Service, base_config
from webhook_receiver import Receiver
from helpers import parse_sse
from workers.webhooks import delivery_id

SECRET = "whsec-test-4f1c2d"


@pytest.fixture(scope="module")
def resilient(stack):
    config = base_config(stack)
    config["registries"]["down"] = {"type": "registry", "host": "127.0.0.1:1"}
    config["recovery"] = {"lock_ttl_seconds": 2, "scan_interval_seconds": 0.5, "max_worker_losses": 3}
    config["retry"] = {"max_attempts": 3, "backoff_base_seconds": 0.3, "backoff_max_seconds": 1}
    config["webhooks"] = {"secret_env": "IMAGEPUB_WEBHOOK_SECRET", "allowed_hosts": ["127.0.0.1"], "max_attempts": 4}
    svc = Service(stack, config, "resilient", env={"IMAGEPUB_WEBHOOK_SECRET": SECRET}, redis_db=3)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    svc.start_worker()
    yield svc
    svc.stop_worker()


@pytest.fixture
def r(resilient):
    return redis.Redis.from_url(resilient.redis_url, decode_responses=True)


@pytest.fixture
def image(stack, unique):
    name = f"rel-{unique}:v1"
    stack.build_image(name, layers=2)
    return name


def hold_reference(r, stack, repository, tag=None):
    """Take the push lock of local/{repository} as another job pushing there would."""
    key = f"imagepub:lock:ref:{stack.registry}/{repository}"
    assert r.set(key, "held-by-test", px=120_000)
    return key


def publish_local(api, source, repository, tag="v1", **extra):
    return api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": repository, "tags": [tag]}], **extra})


def test_killed_worker_job_runs_again_and_succeeds(resilient, stack, r, image, unique):
    api = resilient.api
    lock = hold_reference(r, stack, f"crash-{unique}", "v1")
    job = publish_local(api, image, f"crash-{unique}")
    api.wait(job["id"], states={"running"}, timeout=30)

    resilient.kill_worker()
    resilient.start_worker()
    r.delete(lock)
    started = time.monotonic()
    done = api.wait(job["id"], timeout=60)
    assert done["state"] == "succeeded", done
    assert time.monotonic() - started < 60
    assert done["attempts"] == 2 and done["worker_losses"] == 1
    assert stack.registry_digest(stack.registry, f"crash-{unique}", "v1") == done["targets"][0]["digest"]


def test_job_that_kills_every_worker_ends_failed(resilient, stack, r, image, unique):
    api = resilient.api
    hold_reference(r, stack, f"poison-{unique}", "v1")
    job = publish_local(api, image, f"poison-{unique}")
    for attempt in (1, 2, 3):
        seen = api.wait(job["id"], states={"running", "failed"}, timeout=30)
        if seen["state"] == "failed":
            break
        while api.get(f"/v1/jobs/{job['id']}").json()["attempts"] < attempt:
            time.sleep(0.05)
        resilient.kill_worker()
        resilient.start_worker()
    done = api.wait(job["id"], timeout=60)
    assert done["state"] == "failed" and done["error"]["code"] == "worker_lost", done
    assert done["worker_losses"] == 3 and done["attempts"] == 3


def test_redis_restart_loses_nothing(resilient, stack, r, image, unique):
    api = resilient.api
    resilient.stop_worker()
    queued = [publish_local(api, image, f"restart-{unique}", tag=f"t{i}") for i in range(5)]
    stack.restart_redis()
    resilient.start_worker()
    for job in queued:
        done = api.wait(job["id"], timeout=60)
        assert done["state"] == "succeeded", done

    # and a job that is running while Redis restarts under it, followed live meanwhile: the raw
    # stream ends cleanly (no broken chunked body), and the CLI's client resumes to the end
    lock = hold_reference(r, stack, f"restart-{unique}", "live")
    job = publish_local(api, image, f"restart-{unique}", tag="live")
    api.wait(job["id"], states={"running"}, timeout=30)
    raw, followed = {}, []

    def follow_raw():
        try:
            with requests.get(f"{api.base_url}/v1/jobs/{job['id']}/events", stream=True, timeout=60) as resp:
                raw["events"] = parse_sse(resp.content.decode())
        except requests.RequestException as exc:
            raw["error"] = exc

    def follow_like_the_cli():
        followed.extend(ImagepubClient(api.base_url).follow(job["id"], timeout=90))

    followers = [threading.Thread(target=follow_raw), threading.Thread(target=follow_like_the_cli)]
    for follower in followers:
        follower.start()
    time.sleep(0.5)  # both streams are open and waiting
    stack.restart_redis()
    for follower in followers[:1]:
        follower.join(60)
    assert "error" not in raw, raw
    assert raw["events"][0]["data"]["state"] == "running"
    r.delete(lock)
    done = api.wait(job["id"], timeout=60)
    assert done["state"] == "succeeded", (done.get("error"), done.get("attempts"), done.get("last_error"))
    assert stack.registry_digest(stack.registry, f"restart-{unique}", "live") == done["targets"][0]["digest"]
    followers[1].join(60)
    assert followed and followed[-1]["state"] == "succeeded" and followed[-1]["targets"][0]["digest"] == done["targets"][0]["digest"]


def test_cancel_running_job_stops_it(resilient, stack, r, image, unique):
    api = resilient.api
    hold_reference(r, stack, f"cancel-{unique}", "v1")
    job = publish_local(api, image, f"cancel-{unique}")
    api.wait(job["id"], states={"running"}, timeout=30)
    resp = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202
    asked = time.monotonic()
    done = api.wait(job["id"], timeout=10)
    assert done["state"] == "cancelled" and time.monotonic() - asked < 5
    assert stack.registry_digest(stack.registry, f"cancel-{unique}", "v1") is None
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_cancel_during_a_real_push(resilient, stack, unique):
    api = resilient.api
    source = f"big-{unique}:v1"
    stack.build_image(source, layers=1, layer_bytes=150 * 1024 * 1024)
    job = publish_local(api, source, f"big-{unique}")
    deadline = time.monotonic() + 60
    while True:
        current = api.get(f"/v1/jobs/{job['id']}").json()
        layers = current.get("targets", [{}])[0].get("layers", [])
        if any(layer["status"] == "pushing" for layer in layers):
            break
        assert current["state"] in {"queued", "running"} and time.monotonic() < deadline, current
        time.sleep(0.02)
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = api.wait(job["id"], timeout=20)
    assert done["state"] == "cancelled", done
    assert stack.registry_digest(stack.registry, f"big-{unique}", "v1") is None
    stack.docker().api.remove_image(source, force=True)


def test_queued_job_cancelled_never_runs(resilient, stack, image, unique):
    api = resilient.api
    resilient.stop_worker()
    job = publish_local(api, image, f"never-{unique}")
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    resilient.start_worker()
    probe = api.wait(publish_local(api, image, f"after-{unique}")["id"])  # the worker drained the queue
    assert probe["state"] == "succeeded"
    after = api.get(f"/v1/jobs/{job['id']}").json()
    assert after["state"] == "cancelled" and after["attempts"] == 0 and after["started_at"] is None
    assert stack.registry_digest(stack.registry, f"never-{unique}", "v1") is None


def test_transient_failures_are_retried_then_fail_bounded(resilient, image):
    api = resilient.api
    job = api.submit("/v1/publish", {"source": image, "targets": [{"registry": "down", "repository": "x", "tags": ["v1"]}]})
    done = api.wait(job["id"], timeout=60)
    assert done["state"] == "failed" and done["error"]["code"] == "registry_unavailable", done
    assert done["attempts"] == 3
    history = parse_sse(api.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "0-0"}).text)
    retrying = [e["data"] for e in history if e["data"]["state"] == "retrying"]
    assert len({e["attempts"] for e in retrying}) == 2  # after attempts 1 and 2
    assert all(e["next_attempt_at"] and e["last_error"]["code"] == "registry_unavailable" for e in retrying)
    assert [e["data"]["state"] for e in history if e["event"] == "state"][-1] == "failed"


def test_live_events_follow_a_publish_to_its_end(resilient, stack, r, image, unique):
    api = resilient.api
    lock = hold_reference(r, stack, f"sse-{unique}", "v1")
    job = publish_local(api, image, f"sse-{unique}")
    events = []

    def follow():
        with requests.get(f"{api.base_url}/v1/jobs/{job['id']}/events", stream=True, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events.extend(parse_sse(resp.content.decode()))  # returns when the server closes

    follower = threading.Thread(target=follow)
    follower.start()
    api.wait(job["id"], states={"running"}, timeout=30)
    time.sleep(0.3)
    r.delete(lock)
    follower.join(60)
    assert not follower.is_alive(), "the stream did not close after the terminal event"
    assert {"running", "succeeded"} <= {e["data"]["state"] for e in events}
    assert events[-1]["event"] == "state" and events[-1]["data"]["state"] == "succeeded"
    # layer progress is written at most every Progress.interval (0.5 s) while it moves, and
    # always with the end: a push this small shows its layers in the terminal snapshot
    assert {layer["status"] for layer in events[-1]["data"]["targets"][0]["layers"]} <= {"pushed", "exists", "mounted"}
    assert events[-1]["data"]["targets"][0]["layers"]
    assert any(e["event"] == "progress" for e in events)  # its wait for the repository, at least
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    # resuming from the middle gives exactly what followed
    middle = events[len(events) // 2]["id"]
    resumed = parse_sse(api.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": middle}).text)
    assert [e["id"] for e in resumed] == ids[len(events) // 2 + 1:]


def test_webhook_is_signed_and_retried(resilient, image, unique):
    receiver = Receiver([503, 200])
    job = publish_local(resilient.api, image, f"hook-{unique}", callback_url=receiver.url)
    calls = receiver.wait(2)
    assert len(calls) == 2
    for call in calls:
        expected = "sha256=" + hmac.new(SECRET.encode(), call["body"], hashlib.sha256).hexdigest()
        assert call["headers"]["X-Imagepub-Signature"] == expected
        assert call["headers"]["X-Imagepub-Event"] == "job.succeeded"
        delivered = json.loads(call["body"])
        assert delivered["id"] == job["id"] and delivered["state"] == "succeeded"
        assert delivered["targets"][0]["digest"].startswith("sha256:")
    # one delivery id per job end, on every attempt: receivers de-duplicate by it
    assert calls[0]["headers"]["X-Imagepub-Delivery"] == calls[1]["headers"]["X-Imagepub-Delivery"]
    time.sleep(1)
    assert len(receiver.calls) == 2  # delivered: no more attempts
    receiver.server.shutdown()


def test_webhook_never_follows_redirects(resilient, image, unique):
    receiver = Receiver([302])
    publish_local(resilient.api, image, f"redirect-{unique}", callback_url=receiver.url)
    receiver.wait(1)
    time.sleep(2)
    assert [c["path"] for c in receiver.calls] == ["/hook"]
    receiver.server.shutdown()


def test_webhook_on_cancel_of_a_queued_job(resilient, image, unique):
    receiver = Receiver([200])
    resilient.stop_worker()
    try:
        job = publish_local(resilient.api, image, f"hook-cancel-{unique}", callback_url=receiver.url)
        resilient.api.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        resilient.start_worker()
    calls = receiver.wait(1)
    assert json.loads(calls[0]["body"])["state"] == "cancelled"
    assert calls[0]["headers"]["X-Imagepub-Event"] == "job.cancelled"
    assert calls[0]["headers"]["X-Imagepub-Delivery"] == delivery_id(job["id"], "cancelled")  # stable per job end
    receiver.server.shutdown()
