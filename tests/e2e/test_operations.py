"""Operating it: readiness that tells the truth, metrics that move, logs that are JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis
import requests

from prometheus_client.parser import text_string_to_metric_families


def scrape(api) -> dict[tuple[str, tuple], float]:
    resp = api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _stacks_of(service, stack) -> str:
    """What every process of the API is doing (py-spy, when installed), and its log's end: a
    liveness failure says why."""
    arbiter = stack.proc(f"{service.name}-api").pid
    pids = [arbiter, *map(int, subprocess.run(["pgrep", "-P", str(arbiter)], capture_output=True, text=True).stdout.split())]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    dumps = [subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
             if Path(spy).exists() else f"(py-spy not installed: no stacks of {pid})" for pid in pids]
    return "\n".join(dumps) + "\n--- API log ---\n" + stack.log(f"{service.name}-api")[-6000:]


def test_readyz_follows_redis_and_workers(api, stack, service):
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"]["live"] >= 1

    stack.stop_redis()
    try:
        down = api.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["redis"]["ok"] is False and down.json()["status"] == "unavailable"
        try:
            alive = api.http.get(api.base_url + "/healthz", timeout=10)
        except requests.Timeout:
            raise AssertionError("/healthz did not answer within 10 s while Redis was down:\n" + _stacks_of(service, stack)) from None
        assert alive.status_code == 200  # alive, just not ready
    finally:
        stack.start_redis()
    deadline = time.monotonic() + 30
    while api.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, api.get("/readyz").text
        time.sleep(0.2)


def test_metrics_move_with_a_publish(api, stack, unique):
    source = f"metrics-{unique}:v1"
    stack.build_image(source, layers=2, layer_bytes=32 * 1024)
    before = scrape(api)
    job = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": f"metrics-{unique}", "tags": ["a", "b"]}]})["id"])
    assert job["state"] == "succeeded"
    after = scrape(api)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imagepub_jobs_submitted_total", kind="publish") >= 1
    assert delta("imagepub_jobs_finished_total", kind="publish", state="succeeded", code="") >= 1
    assert delta("imagepub_layers_total", registry="local", outcome="pushed") >= 2
    assert delta("imagepub_pushed_bytes_total", registry="local") >= 2 * 32 * 1024
    assert delta("imagepub_job_duration_seconds_count", kind="publish", state="succeeded") >= 1
    assert value(after, "imagepub_workers_alive") >= 1
    assert ("imagepub_queue_depth", ()) in after

    failed = api.wait(api.submit("/v1/publish", {"source": f"missing-{unique}:x", "targets": [{"registry": "local", "repository": "x", "tags": ["t"]}]})["id"])
    assert failed["state"] == "failed"
    assert value(scrape(api), "imagepub_jobs_finished_total", kind="publish", state="failed", code="image_not_found") >= 1


def test_logs_are_json_lines_with_job_ids(api, stack, service, unique):
    source = f"logs-{unique}:v1"
    stack.build_image(source, layers=1)
    job = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "secure", "repository": f"logs-{unique}", "tags": ["v1"]}]})["id"])
    assert job["state"] == "succeeded"
    for name in ("imagepub-api", "imagepub-worker"):
        lines = [line for line in stack.log(name).splitlines() if line.strip() and not line.startswith("=== ")]
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert records
        for record in records:  # one schema for every line: gunicorn's, Celery's, the app's
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
            assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"} and record["logger"] and "message" in record, record
        if name == "imagepub-worker":
            mine = [r for r in records if r.get("job_id") == job["id"]]
            assert {"job started", "job succeeded"} <= {r["message"] for r in mine}
        else:
            assert any(r.get("job_id") == job["id"] for r in records)
            access = [r for r in records if r["logger"] == "gunicorn.access" and r.get("path") == "/v1/publish"]
            assert access and all(isinstance(r[k], int) for r in access for k in ("status", "bytes", "duration_us")), access
            assert access[-1]["method"] == "POST" and access[-1]["status"] == 202
    assert stack.auth_password not in stack.log("imagepub-worker")


def test_a_stopped_worker_leaves_no_alive_file(stack, unique):
    """The liveness file says a worker is alive: a worker that stops removes it (a leftover
    would claim a worker that is gone), and leaves the fleet at once."""
    from service_process import Service, base_config

    alive = stack.tmp / f"alive-{unique}"
    svc = Service(stack, base_config(stack), f"alive-{unique}", redis_db=11, env={"IMAGEPUB_WORKER_ALIVE_FILE": str(alive)})
    svc.start_worker(concurrency=1)
    deadline = time.monotonic() + 20
    while not alive.exists():
        assert time.monotonic() < deadline, "the worker never touched its alive file"
        time.sleep(0.1)
    svc.stop_worker()
    assert not alive.exists()
    workers = redis.Redis.from_url(svc.redis_url, decode_responses=True).hkeys("imagepub:fleet:workers")
    assert workers == []
