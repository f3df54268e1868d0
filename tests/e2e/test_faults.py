"""Fault injection on the real stack: workers killed (``kill -9`` of the whole process group, as
when a pod or machine dies) at randomised points of real pushes, pulls and builds, the Docker
daemon restarted, the registry gone for 20 s, Redis restarted. After each fault every job ends
exactly once, in the state it would have reached without the fault, with the digest the registry
itself serves, and the next publish to the same repository works: no lock of a dead worker,
no half-done state left behind.

The randomised points come from one seed, printed in every failure and in the report, so a
failure can be replayed: ``IMAGEPUB_FAULT_SEED=1234 ./scripts/test tests/e2e/test_faults.py``.
``IMAGEPUB_FAULT_TRIALS`` repeats every case; ``IMAGEPUB_FAULT_REPORT`` names a JSON-lines file
that receives one line per trial (``bench/reliability`` runs this file that way and writes
``docs/reliability.md``). ``IMAGEPUB_FAULT_LOCK_TTL`` / ``IMAGEPUB_FAULT_SCAN_INTERVAL`` set the
recovery settings under test (defaults: 2 s and 0.5 s, to keep CI short).

Transfers go through a bandwidth-capped TCP forwarder in front of the test registry
(tests/slow_proxy.py), so that a push or a pull lasts seconds and a kill lands inside it.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import tarfile
import threading
import time

import pytest
import redis

from service.queue import QUEUES_KEY, waiting_key
from service_process import Service, base_config
from slow_proxy import SlowProxy
from webhook_receiver import Receiver

SEED = int(os.environ.get("IMAGEPUB_FAULT_SEED") or random.SystemRandom().randrange(10**6))
TRIALS = int(os.environ.get("IMAGEPUB_FAULT_TRIALS") or 1)
REPORT = os.environ.get("IMAGEPUB_FAULT_REPORT")
LOCK_TTL = float(os.environ.get("IMAGEPUB_FAULT_LOCK_TTL") or 2)
SCAN_INTERVAL = float(os.environ.get("IMAGEPUB_FAULT_SCAN_INTERVAL") or 0.5)
MAX_LOSSES = 3
MiB = 1024 * 1024
RATE = 4 * MiB  # bytes per second through the slow registry, each way
WEBHOOK_TIMEOUT = 3.0
# Generous: a job that waited on a dead worker's lock would take job_timeout_seconds (an hour).
RECOVERY_BOUND = 90 + LOCK_TTL + SCAN_INTERVAL

trials = pytest.mark.parametrize("trial", range(TRIALS))


@pytest.fixture(scope="module")
def slow(stack):
    proxy = SlowProxy(stack.registry, rate=RATE)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def faulty(stack, slow):
    config = base_config(stack)
    config["registries"]["slow"] = {"type": "registry", "host": slow.address}
    config["recovery"] = {"lock_ttl_seconds": LOCK_TTL, "scan_interval_seconds": SCAN_INTERVAL, "max_worker_losses": MAX_LOSSES}
    # long enough to ride out a 20 s registry outage, short steps so a recovered push is quick
    config["retry"] = {"max_attempts": 40, "backoff_base_seconds": 0.5, "backoff_max_seconds": 2}
    # a webhook delivery's lease is its timeout + 5 s: a killed worker's delivery is made again after it
    config["webhooks"] = {"allowed_hosts": ["127.0.0.1"], "timeout_seconds": WEBHOOK_TIMEOUT}
    svc = Service(stack, config, "faults", redis_db=7)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    svc.start_worker()
    print(f"fault injection seed: {SEED} (replay with IMAGEPUB_FAULT_SEED={SEED})")
    yield svc
    svc.stop_worker()


@pytest.fixture
def rng(request):
    """This test's random points: the same for the same seed and test."""
    return random.Random(f"{SEED}:{request.node.name}")


class Trial:
    """One fault: when it happened, what became of the job, for the assertions and the report."""

    def __init__(self, svc: Service, case: str, rng: random.Random):
        self.svc, self.api, self.case, self.rng = svc, svc.api, case, rng
        self.points: list[float] = []
        self.fault_at: float | None = None
        self.worker_start: float | None = None  # kill → the new worker ready

    def point(self, low: float, high: float) -> float:
        """Sleep until a random point of the window [low, high] s from now; return it."""
        delay = round(self.rng.uniform(low, high), 3)
        self.points.append(delay)
        time.sleep(delay)
        return delay

    def kill_worker(self) -> None:
        """kill -9 of the worker's process group, then a new worker, as an orchestrator does."""
        self.svc.kill_worker()
        self.fault_at = time.monotonic()
        self.svc.start_worker()
        self.worker_start = time.monotonic() - self.fault_at

    def wait(self, job_id: str, timeout: float = RECOVERY_BOUND) -> dict:
        done = self.api.wait(job_id, timeout=timeout)
        self.report(done)
        return done

    def report(self, job: dict, ended: float | None = None) -> None:
        """One line of the report: ``ended`` when the fault's effect ended otherwise than with
        the job (a webhook delivered again)."""
        if not REPORT or self.fault_at is None:
            return
        ended = ended or time.monotonic()
        states = [e["data"] for e in self.history(job["id"]) if e["event"] == "state"]
        last_run = [s for s in states if s["state"] == "running"][-1:] or [job]
        own_run = _seconds(last_run[0]["updated_at"], job["finished_at"]) if job.get("finished_at") else None
        with open(REPORT, "a") as out:
            out.write(json.dumps({
                "case": self.case, "seed": SEED, "points": self.points, "state": job["state"],
                "attempts": job["attempts"], "worker_losses": job.get("worker_losses", 0),
                "recovery_seconds": round(ended - self.fault_at, 2),
                "last_attempt_seconds": round(own_run, 2) if own_run is not None else None,
                "worker_start_seconds": round(self.worker_start, 2) if self.worker_start is not None else None,
                "lock_ttl_seconds": LOCK_TTL, "scan_interval_seconds": SCAN_INTERVAL,
            }) + "\n")

    def history(self, job_id: str) -> list[dict]:
        """Every snapshot the job's event stream holds, from Redis itself (a replay over SSE
        collapses a long history into its latest snapshot: issue 18, item 11)."""
        stream = redis.Redis.from_url(self.svc.redis_url, decode_responses=True).xrange(f"imagepub:job:{job_id}:events")
        return [{"id": event_id, "event": fields["type"], "data": json.loads(fields["job"])} for event_id, fields in stream]

    def __str__(self) -> str:
        return f"{self.case}: seed {SEED}, points {self.points} (replay with IMAGEPUB_FAULT_SEED={SEED})"


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    parse = lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def until(api, job_id: str, what, timeout: float = 60) -> dict:
    """Poll the job until ``what(job)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if what(job):
            return job
        assert job["state"] not in {"succeeded", "failed", "cancelled"}, f"ended before the fault point: {job}"
        assert time.monotonic() < deadline, f"never reached the fault point: {job}"
        time.sleep(0.02)


def pushing(job: dict) -> bool:
    return job["state"] == "running" and any(
        layer["status"] == "pushing" and (layer.get("current") or 0) > 0 for t in job.get("targets", []) for layer in t["layers"])


def publish(api, source: str, repository: str, tags=("v1",), registry: str = "slow", **extra) -> dict:
    return api.submit("/v1/publish", {"source": source, "targets": [{"registry": registry, "repository": repository, "tags": list(tags)}], **extra})


def assert_ended_once(trial: Trial, job: dict, stack, *, losses: int, state: str = "succeeded") -> None:
    """The job ended once, as it would have without the fault, with the registry's own digest."""
    assert job["state"] == state, f"{trial}: {job}"
    assert job.get("worker_losses", 0) == losses, f"{trial}: the fault did not land inside the job: {job}"
    terminal = [e for e in trial.history(job["id"]) if e["event"] == "state" and e["data"]["state"] in {"succeeded", "failed", "cancelled"}]
    assert len(terminal) == 1, f"{trial}: ended {len(terminal)} times"
    if state == "succeeded":
        for target in job.get("targets", []):
            for reference in target["references"]:
                tag = reference.rsplit(":", 1)[1]
                assert stack.registry_digest(stack.registry, target["repository"], tag) == target["digest"], f"{trial}: {reference}"


def assert_next_publish_works(api, stack, source: str, repository: str) -> None:
    """Nothing half-done blocks the repository: a new publish to it succeeds without waiting."""
    job = publish(api, source, repository, tags=("after",))
    done = api.wait(job["id"], timeout=60)
    assert done["state"] == "succeeded" and "waiting_for" not in done, done
    assert stack.registry_digest(stack.registry, repository, "after") == done["targets"][0]["digest"]


def big_image(stack, name: str, megabytes: int = 16, layers: int = 2) -> str:
    stack.build_image(name, layers=layers, layer_bytes=megabytes // layers * MiB)
    return name


# --- kill -9 at random points --------------------------------------------------------------


@trials
def test_kill_during_a_fresh_push(faulty, stack, rng, unique, trial):
    t = Trial(faulty, "kill: fresh push, layers uploading", rng)
    source, repository = big_image(stack, f"fault-fresh-{unique}:v1"), f"faults/fresh-{unique}-{trial}"
    job = publish(faulty.api, source, repository)
    until(faulty.api, job["id"], pushing)
    t.point(0, 1.5)  # 16 MiB at 4 MiB/s: about 4 s of upload
    t.kill_worker()
    done = t.wait(job["id"])
    assert_ended_once(t, done, stack, losses=1)
    assert_next_publish_works(faulty.api, stack, source, repository)


@trials
def test_kill_during_a_push_whose_layers_exist(faulty, stack, slow, rng, unique, trial):
    t = Trial(faulty, "kill: push, layers exist", rng)
    source, repository = big_image(stack, f"fault-exists-{unique}:v1", megabytes=2), f"faults/exists-{unique}-{trial}"
    assert faulty.api.wait(publish(faulty.api, source, repository, tags=("first",))["id"])["state"] == "succeeded"
    slow.latency = 0.05  # every request a little slow, so that eight tags of known layers take seconds
    try:
        job = publish(faulty.api, source, repository, tags=[f"t{i}" for i in range(8)])
        until(faulty.api, job["id"], lambda j: j["state"] == "running" and j["targets"][0]["layers"])
        t.point(0, 1.0)
        t.kill_worker()
    finally:
        slow.latency = 0.0
    done = t.wait(job["id"])
    assert_ended_once(t, done, stack, losses=1)
    assert {layer["status"] for layer in done["targets"][0]["layers"]} <= {"exists", "mounted"}, done
    assert_next_publish_works(faulty.api, stack, source, repository)


@trials
def test_kill_during_a_pull(faulty, stack, rng, unique, trial):
    t = Trial(faulty, "kill: pull", rng)
    source, repository = big_image(stack, f"fault-pull-{unique}:v1"), f"faults/pull-{unique}-{trial}"
    pushed = faulty.api.wait(publish(faulty.api, source, repository, registry="local")["id"])
    assert pushed["state"] == "succeeded", pushed
    client = stack.docker()
    client.images.remove(source, force=True)
    for reference in pushed["targets"][0]["references"]:
        client.images.remove(reference, force=True) if client.images.list(name=reference) else None
    job = faulty.api.submit("/v1/pull", {"registry": "slow", "repository": repository, "tag": "v1"})
    until(faulty.api, job["id"], lambda j: j["state"] == "running" and any(
        layer["status"] == "downloading" and (layer.get("current") or 0) > 0 for layer in (j.get("result") or {}).get("layers", [])))
    t.point(0, 1.5)
    t.kill_worker()
    done = t.wait(job["id"])
    assert_ended_once(t, done, stack, losses=1)
    assert done["result"]["digest"] == pushed["targets"][0]["digest"] == stack.registry_digest(stack.registry, repository, "v1")
    assert client.images.get(done["result"]["reference"]).id == done["result"]["image_id"]


def _build_context(steps: int, step_bytes: int) -> bytes:
    files = {f"part{i}.bin": os.urandom(step_bytes) for i in range(steps)}
    dockerfile = "FROM scratch\n" + "".join(f"COPY part{i}.bin /part{i}.bin\n" for i in range(steps))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in {"Dockerfile": dockerfile.encode(), **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _submit_build(api, context: bytes, repository: str) -> dict:
    resp = api.http.post(f"{api.base_url}/v1/build", files={
        "request": (None, json.dumps({"targets": [{"registry": "slow", "repository": repository, "tags": ["v1"]}]}), "application/json"),
        "context": ("context.tar", context, "application/x-tar"),
    }, timeout=60)
    assert resp.status_code == 202, resp.text
    return resp.json()


@trials
@pytest.mark.parametrize("phase", ["building", "pushing"])
def test_kill_during_a_build(faulty, stack, rng, unique, trial, phase):
    t = Trial(faulty, f"kill: build, while it {'runs' if phase == 'building' else 'pushes'}", rng)
    repository = f"faults/build-{phase}-{unique}-{trial}"
    job = _submit_build(faulty.api, _build_context(steps=6, step_bytes=4 * MiB), repository)
    if phase == "building":
        until(faulty.api, job["id"], lambda j: any(line.startswith("Step 2/") for line in (j.get("build") or {}).get("log", [])))
        t.point(0, 0.5)
    else:
        until(faulty.api, job["id"], pushing)
        t.point(0, 1.5)
    t.kill_worker()
    done = t.wait(job["id"])
    assert_ended_once(t, done, stack, losses=1)
    assert_next_publish_works(faulty.api, stack, done["build"]["image_id"], repository)


@trials
def test_kill_while_a_job_waits_for_a_repository_lock(faulty, stack, rng, unique, trial):
    t = Trial(faulty, "kill: job waiting for a repository lock", rng)
    repository = f"faults/wait-{unique}-{trial}"
    first = publish(faulty.api, big_image(stack, f"fault-wait-a-{unique}:v1", megabytes=24), repository, tags=("a",))
    until(faulty.api, first["id"], pushing)
    second = publish(faulty.api, big_image(stack, f"fault-wait-b-{unique}:v1", megabytes=2), repository, tags=("b",))
    waiting = until(faulty.api, second["id"], lambda j: j.get("waiting_for"))
    assert repository in waiting["waiting_for"], waiting
    t.point(0, 1.0)
    t.kill_worker()
    for job in (first, second):
        done = t.wait(job["id"])
        assert_ended_once(t, done, stack, losses=1)
        assert "waiting_for" not in done


def _pool_processes(svc: Service) -> list[int]:
    main = svc.stack.proc(f"{svc.name}-worker").pid
    children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
    assert children, "the worker has no pool processes"
    return [int(pid) for pid in children]


def _in_a_queue(client: redis.Redis, job_id: str) -> bool:
    """Is a message of the job still in one of the job queues (not yet taken by a worker)?"""
    return any(job_id in message for queue in client.smembers(QUEUES_KEY) for message in client.lrange(queue, 0, -1))


def test_kill_after_a_worker_took_the_message_before_the_job_started(faulty, stack, rng, unique):
    """The whole worker dies after its main process took the job's message off the queue and
    before a pool process began the job (a machine lost during the hand-off). The job is still
    queued and its message is gone with the worker. The next worker's supervisor finds it from
    the queue's waiting index, and queues it again."""
    t = Trial(faulty, "kill: message taken, job not started", rng)
    client = redis.Redis.from_url(faulty.redis_url, decode_responses=True)
    paused = _pool_processes(faulty)
    for pid in paused:  # the pool takes nothing in: the hand-off stays half-done
        os.kill(pid, signal.SIGSTOP)
    try:
        source = big_image(stack, f"fault-handoff-{unique}:v1", megabytes=2, layers=1)
        job = publish(faulty.api, source, f"faults/handoff-{unique}", registry="local")
        deadline = time.monotonic() + 30
        while _in_a_queue(client, job["id"]):
            assert time.monotonic() < deadline, "the worker never took the message"
            time.sleep(0.02)
        assert faulty.api.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
        # no copy kept by the broker either, to come back after a visibility timeout: kombu's
        # acknowledgement emulation is off (its record cost every hand-off a Redis transaction)
        assert not client.exists("unacked", "unacked_index")
        t.point(0, 0.5)
        t.kill_worker()
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    done = t.wait(job["id"], timeout=30 + LOCK_TTL + SCAN_INTERVAL)
    assert done["state"] == "succeeded" and done["attempts"] == 1 and done.get("worker_losses", 0) == 0, done
    assert stack.registry_digest(stack.registry, f"faults/handoff-{unique}", "v1") == done["targets"][0]["digest"]
    assert not _in_a_queue(client, job["id"])  # nothing left to run it again
    assert all(client.zscore(waiting_key(queue), job["id"]) is None for queue in client.smembers(QUEUES_KEY))


@trials
def test_two_kills_in_a_row_still_succeed(faulty, stack, rng, unique, trial):
    t = Trial(faulty, "kill twice: fresh push", rng)
    source, repository = big_image(stack, f"fault-twice-{unique}:v1", megabytes=32, layers=4), f"faults/twice-{unique}-{trial}"
    job = publish(faulty.api, source, repository)
    for attempt in (1, 2):
        until(faulty.api, job["id"], lambda j: pushing(j) and j["attempts"] == attempt)
        t.point(0, 1.5)
        t.kill_worker()
    done = t.wait(job["id"])
    assert_ended_once(t, done, stack, losses=2)
    assert done["attempts"] == 3


def test_as_many_kills_as_max_worker_losses_fail_the_job(faulty, stack, rng, unique):
    t = Trial(faulty, f"kill {MAX_LOSSES} times: fresh push", rng)
    source, repository = big_image(stack, f"fault-poison-{unique}:v1", megabytes=32, layers=4), f"faults/poison-{unique}"
    job = publish(faulty.api, source, repository)
    for attempt in range(1, MAX_LOSSES + 1):
        until(faulty.api, job["id"], lambda j: pushing(j) and j["attempts"] == attempt)
        t.point(0, 1.5)
        t.kill_worker()
    done = t.wait(job["id"])
    assert done["error"]["code"] == "worker_lost", done
    assert_ended_once(t, done, stack, losses=MAX_LOSSES, state="failed")
    assert_next_publish_works(faulty.api, stack, source, repository)


@trials
def test_kill_during_a_webhook_delivery(faulty, stack, rng, unique, trial):
    """The worker dies while the receiver has the delivery: the webhook is delivered again (the
    same delivery id) once the delivery's lease has passed, by the new worker."""
    t = Trial(faulty, "kill: webhook delivery", rng)
    hold = threading.Event()
    receiver = Receiver([200, 200], hold=hold)
    try:
        job = publish(faulty.api, big_image(stack, f"fault-hook-{unique}:v1", megabytes=2), f"faults/hook-{unique}-{trial}",
                      registry="local", callback_url=receiver.url)
        assert len(receiver.wait(1, timeout=60)) == 1  # the receiver holds its answer: in flight
        t.point(0, WEBHOOK_TIMEOUT * 0.8)
        t.kill_worker()
        hold.set()
        calls = receiver.wait(2, timeout=WEBHOOK_TIMEOUT + 5 + 30)
        assert len(calls) == 2, f"{t}: the cut delivery was not made again"
        assert calls[1]["headers"]["X-Imagepub-Delivery"] == calls[0]["headers"]["X-Imagepub-Delivery"]
        delivered = json.loads(calls[1]["body"])
        assert delivered["id"] == job["id"] and delivered["state"] == "succeeded"
        t.report(faulty.api.get(f"/v1/jobs/{job['id']}").json(), ended=calls[1]["at"])
        time.sleep(1.5)
        assert len(receiver.calls) == 2, f"{t}: delivered more than once after the kill"
    finally:
        hold.set()
        receiver.server.shutdown()


# --- the daemon, the registry and Redis go away mid-push -----------------------------------


def _states(trial: Trial, job_id: str) -> list[str]:
    states = [e["data"]["state"] for e in trial.history(job_id) if e["event"] == "state"]
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def test_daemon_restart_mid_push_is_retried(faulty, stack, rng, unique):
    t = Trial(faulty, "Docker daemon restarted mid-push", rng)
    source, repository = big_image(stack, f"fault-daemon-{unique}:v1"), f"faults/daemon-{unique}"
    job = publish(faulty.api, source, repository)
    until(faulty.api, job["id"], pushing)
    t.point(0, 1.0)
    stack.stop_dockerd()
    t.fault_at = time.monotonic()
    stack.start_dockerd()
    done = t.wait(job["id"])
    assert_ended_once(t, done, stack, losses=0)
    states = _states(t, job["id"])
    assert states[-3:] == ["retrying", "running", "succeeded"], f"{t}: {states}"
    assert done["last_error"]["code"] == "daemon_unavailable", done
    assert_next_publish_works(faulty.api, stack, source, repository)


def test_registry_outage_of_20s_mid_push_is_retried(faulty, stack, slow, rng, unique):
    t = Trial(faulty, "registry down 20 s mid-push", rng)
    source, repository = big_image(stack, f"fault-registry-{unique}:v1"), f"faults/registry-{unique}"
    job = publish(faulty.api, source, repository)
    until(faulty.api, job["id"], pushing)
    t.point(0, 1.0)
    slow.stop()
    t.fault_at = time.monotonic()
    try:
        time.sleep(20)
        assert faulty.api.get(f"/v1/jobs/{job['id']}").json()["state"] in {"running", "retrying"}
    finally:
        slow.start()
    done = t.wait(job["id"])
    assert_ended_once(t, done, stack, losses=0)
    # The daemon retries a layer upload itself (five times, waiting longer each time), which
    # rides out 20 s inside one attempt; a longer outage ends the attempt with
    # registry_unavailable and imagepub's retry policy takes over (retrying → running).
    states = _states(t, job["id"])
    assert states[-2:] == ["running", "succeeded"], f"{t}: {states}"
    if "retrying" in states:
        assert done["last_error"]["code"] == "registry_unavailable", done
    assert_next_publish_works(faulty.api, stack, source, repository)


def test_redis_restart_mid_push_ends_once(faulty, stack, rng, unique):
    t = Trial(faulty, "Redis restarted mid-push", rng)
    source, repository = big_image(stack, f"fault-redis-{unique}:v1"), f"faults/redis-{unique}"
    job = publish(faulty.api, source, repository)
    until(faulty.api, job["id"], pushing)
    t.point(0, 1.0)
    stack.restart_redis()
    t.fault_at = time.monotonic()
    done = t.wait(job["id"])
    assert done["state"] == "succeeded", f"{t}: {done}"
    assert_ended_once(t, done, stack, losses=done.get("worker_losses", 0))
    assert_next_publish_works(faulty.api, stack, source, repository)


# --- waiting for a lock: visible, cancellable, never on a dead holder ---------------------


def test_a_waiting_job_shows_it_and_cancels_at_once(faulty, stack, slow, unique):
    api = faulty.api
    repository = f"faults/cancel-wait-{unique}"
    first = publish(api, big_image(stack, f"fault-cw-a-{unique}:v1", megabytes=24), repository, tags=("a",))
    until(api, first["id"], pushing)
    second = publish(api, big_image(stack, f"fault-cw-b-{unique}:v1", megabytes=2), repository, tags=("b",))
    waiting = until(api, second["id"], lambda j: j.get("waiting_for"))
    assert waiting["state"] == "running" and waiting["waiting_for"] == f"another push to {slow.address}/{repository}"
    asked = time.monotonic()
    assert api.post(f"/v1/jobs/{second['id']}/cancel").status_code == 202
    cancelled = api.wait(second["id"], timeout=10)
    assert cancelled["state"] == "cancelled" and time.monotonic() - asked < 2, cancelled
    assert "waiting_for" not in cancelled  # it ended: it waits for nothing any more
    assert api.wait(first["id"])["state"] == "succeeded"
    assert stack.registry_digest(stack.registry, repository, "b") is None
