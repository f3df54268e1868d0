"""A fleet on the real stack: two Docker daemons (two private dockerds with their own data roots),
a worker next to each, two API processes, one Redis. Jobs find the daemon that holds their
image; the images listing is the same from every API on every call; a killed worker's job is
re-run on its own daemon while the other daemon's jobs go on."""

from __future__ import annotations

import itertools
import json
import subprocess
import time

import pytest
import redis

from service.queue import JobQueue
from service_process import Service, base_config, imagepub_command


@pytest.fixture(scope="module")
def fleet(stack):
    host_b = stack.add_dockerd("b")
    config = base_config(stack)
    config["recovery"] = {"lock_ttl_seconds": 2, "scan_interval_seconds": 0.5, "max_worker_losses": 3}
    svc = Service(stack, config, "fleet", redis_db=10)
    redis.Redis.from_url(svc.redis_url).flushdb()
    api_1 = svc.start_api()
    api_2 = svc.start_api("api-2", port=_free_port())
    svc.start_worker(suffix="worker-a", args=("--daemon", "a"))
    svc.start_worker(suffix="worker-b", args=("--daemon", "b"), env={"DOCKER_HOST": host_b})
    svc.apis = (api_1, api_2)
    svc.host_b = host_b
    _wait_for(lambda: {d["name"]: d["state"] for d in api_1.get("/v1/daemons").json()["daemons"]} == {"a": "up", "b": "up"})
    yield svc
    svc.stop_worker("worker-a")
    svc.stop_worker("worker-b")


def _free_port() -> int:
    from stack import free_port

    return free_port()


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.1)


def _indexed(api, name: str, daemon: str) -> bool:
    images = api.get("/v1/images", params={"daemon": daemon}).json()["images"]
    return any(name in image["tags"] for image in images)


def _ids_on(r, queue: str) -> list[str]:
    """The job ids of the messages waiting on ``queue``."""
    return [JobQueue.job_of(raw) for raw in r.lrange(queue, 0, -1)]


def publish(api, source: str, repository: str, tag: str = "v1", **extra) -> dict:
    return api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": repository, "tags": [tag]}], **extra})


def test_daemons_are_listed_with_their_workers(fleet):
    daemons = {d["name"]: d for d in fleet.apis[0].get("/v1/daemons").json()["daemons"]}
    for name in ("a", "b"):
        assert daemons[name]["state"] == "up" and daemons[name]["docker_version"]
        assert [w["alive"] for w in daemons[name]["workers"]] == [True]
        assert daemons[name]["queue"] == f"imagepub.daemon.{name}"
    ready = fleet.apis[1].get("/readyz").json()
    assert ready["checks"]["daemons"] == {"ok": True, "up": ["a", "b"], "down": []}
    metrics = fleet.apis[1].get("/metrics").text
    assert 'imagepub_daemon_up{daemon="a"} 1.0' in metrics and 'imagepub_daemon_up{daemon="b"} 1.0' in metrics


def test_twenty_publishes_of_an_image_only_b_holds_all_run_on_b(fleet, stack, unique):
    source = f"only-b-{unique}:v1"
    stack.build_image(source, layers=1, docker_host=fleet.host_b)
    _wait_for(lambda: _indexed(fleet.apis[0], source, "b"))
    apis = itertools.cycle(fleet.apis)
    jobs = [publish(next(apis), source, f"fleet/only-b-{unique}", tag=f"t{i}") for i in range(20)]
    assert {job["daemon"] for job in jobs} == {"b"}
    for i, job in enumerate(jobs):
        done = fleet.apis[0].wait(job["id"], timeout=120)
        assert done["state"] == "succeeded" and done["daemon"] == "b", done
        assert stack.registry_digest(stack.registry, f"fleet/only-b-{unique}", f"t{i}") == done["targets"][0]["digest"]


def test_a_source_nobody_holds_is_refused_at_submit(fleet, unique):
    resp = fleet.apis[1].post("/v1/publish", json={"source": f"nowhere-{unique}:v1", "targets": [{"registry": "local", "repository": "x", "tags": ["v1"]}]})
    assert resp.status_code == 422 and resp.json()["code"] == "image_not_found"
    assert resp.json()["errors"][0]["field"] == "source"
    resp = fleet.apis[1].post("/v1/publish", json={"source": f"nowhere-{unique}:v1", "daemon": "c", "targets": [{"registry": "local", "repository": "x", "tags": ["v1"]}]})
    assert resp.status_code == 422 and resp.json()["code"] == "daemon_not_found"


def test_one_name_for_two_images_is_ambiguous_unless_the_daemon_is_named(fleet, stack, unique):
    source = f"twice-{unique}:v1"
    stack.build_image(source, layers=1)
    stack.build_image(source, layers=1, docker_host=fleet.host_b)
    _wait_for(lambda: _indexed(fleet.apis[0], source, "a") and _indexed(fleet.apis[0], source, "b"))
    resp = fleet.apis[0].post("/v1/publish", json={"source": source, "targets": [{"registry": "local", "repository": f"fleet/twice-{unique}", "tags": ["v1"]}]})
    assert resp.status_code == 409 and resp.json()["code"] == "ambiguous_source", resp.text
    assert "on a" in resp.json()["detail"] and "on b" in resp.json()["detail"]
    job = publish(fleet.apis[0], source, f"fleet/twice-{unique}", daemon="a")
    done = fleet.apis[0].wait(job["id"])
    assert done["state"] == "succeeded" and done["daemon"] == "a"
    image_a = stack.docker().images.get(source)
    assert done["source_image_id"] == image_a.id


def test_a_pull_lands_in_the_daemon_it_names(fleet, stack, unique):
    source = f"to-pull-{unique}:v1"
    stack.build_image(source, layers=1, docker_host=fleet.host_b)
    _wait_for(lambda: _indexed(fleet.apis[0], source, "b"))
    pushed = fleet.apis[0].wait(publish(fleet.apis[0], source, f"fleet/pull-{unique}")["id"])
    assert pushed["state"] == "succeeded" and pushed["daemon"] == "b"
    job = fleet.apis[1].submit("/v1/pull", {"registry": "local", "repository": f"fleet/pull-{unique}", "tag": "v1", "daemon": "a"})
    done = fleet.apis[1].wait(job["id"])
    assert done["state"] == "succeeded" and done["daemon"] == "a", done
    reference = f"{stack.registry}/fleet/pull-{unique}:v1"
    assert stack.docker().images.get(reference).id == pushed["source_image_id"]
    assert not stack.docker(base_url=fleet.host_b).images.list(name=reference)
    # and the pulled image is found on a: publishing it goes there
    _wait_for(lambda: _indexed(fleet.apis[0], reference, "a"))
    again = fleet.apis[0].wait(publish(fleet.apis[0], reference, f"fleet/pull-{unique}", tag="again")["id"])
    assert again["state"] == "succeeded" and again["daemon"] == "a"


def test_the_images_listing_is_the_same_on_every_call(fleet, stack, unique):
    stack.build_image(f"list-a-{unique}:v1", layers=1)
    stack.build_image(f"list-b-{unique}:v1", layers=1, docker_host=fleet.host_b)
    _wait_for(lambda: _indexed(fleet.apis[0], f"list-a-{unique}:v1", "a") and _indexed(fleet.apis[0], f"list-b-{unique}:v1", "b"))
    answers = [api.get("/v1/images").json() for api in fleet.apis * 5]
    assert all(answer == answers[0] for answer in answers)
    daemons = {image["daemon"] for image in answers[0]["images"] for tag in image["tags"] if unique in tag}
    assert daemons == {"a", "b"}
    only_b = fleet.apis[1].get("/v1/images", params={"daemon": "b", "reference": f"list-*-{unique}"}).json()["images"]
    assert [image["tags"] for image in only_b] == [[f"list-b-{unique}:v1"]]


def test_a_killed_worker_of_a_reruns_its_job_on_a_while_b_goes_on(fleet, stack, unique):
    api = fleet.apis[0]
    source_a, source_b = f"kill-a-{unique}:v1", f"kill-b-{unique}:v1"
    stack.build_image(source_a, layers=1)
    stack.build_image(source_b, layers=1, docker_host=fleet.host_b)
    _wait_for(lambda: _indexed(api, source_a, "a") and _indexed(api, source_b, "b"))
    r = redis.Redis.from_url(fleet.redis_url)
    # hold job A mid-run: another "job" holds the push turn of its repository
    lock = f"imagepub:lock:ref:{stack.registry}/fleet/kill-a-{unique}"
    r.set(lock, "held-by-test", px=120_000)
    on_a = publish(api, source_a, f"fleet/kill-a-{unique}")
    running = api.wait(on_a["id"], states={"running"})
    assert running["daemon"] == "a"
    fleet.kill_worker("worker-a")
    try:
        # a's jobs wait, visibly, and can be cancelled; b's go on
        queued = publish(api, source_a, f"fleet/kill-a-{unique}", tag="queued")
        _wait_for(lambda: api.get(f"/v1/jobs/{queued['id']}").json().get("waiting_for") == "daemon a has no worker", timeout=45)
        assert api.post(f"/v1/jobs/{queued['id']}/cancel").json()["state"] == "cancelled"
        for i in range(3):
            done = api.wait(publish(api, source_b, f"fleet/kill-b-{unique}", tag=f"t{i}")["id"])
            assert done["state"] == "succeeded" and done["daemon"] == "b"
        # and daemonless work goes on too: a copy between registries, on the shared queue
        copied = api.wait(api.submit("/v1/copy", {"source": {"registry": "local", "repository": f"fleet/kill-b-{unique}", "tag": "t0"},
                                                  "targets": [{"registry": "local", "repository": f"fleet/kill-copy-{unique}", "tags": ["t0"]}]})["id"])
        assert copied["state"] == "succeeded" and "daemon" not in copied, copied
        assert stack.registry_digest(stack.registry, f"fleet/kill-copy-{unique}", "t0") == stack.registry_digest(stack.registry, f"fleet/kill-b-{unique}", "t0")
        # the lost job goes back on a's queue (b's supervisor finds it), not to b
        _wait_for(lambda: on_a["id"] in _ids_on(r, "imagepub.daemon.a"), timeout=30)
        time.sleep(2)  # several of b's scans: enqueued once, not at every scan
        assert _ids_on(r, "imagepub.daemon.a").count(on_a["id"]) == 1
        assert on_a["id"] not in _ids_on(r, "imagepub.daemon.b") + _ids_on(r, "imagepub.daemons")
    finally:
        fleet.start_worker(suffix="worker-a", args=("--daemon", "a"))
    r.delete(lock)
    done = api.wait(on_a["id"], timeout=60)
    assert done["state"] == "succeeded" and done["daemon"] == "a" and done["worker_losses"] == 1, done
    assert stack.registry_digest(stack.registry, f"fleet/kill-a-{unique}", "v1") == done["targets"][0]["digest"]


def test_the_cli_shows_the_fleet_and_publishes_to_a_named_daemon(fleet, stack, unique):
    source = f"cli-{unique}:v1"
    stack.build_image(source, layers=1, docker_host=fleet.host_b)
    _wait_for(lambda: _indexed(fleet.apis[0], source, "b"))
    url = fleet.apis[1].base_url
    run = lambda *args: subprocess.run([imagepub_command(), *args, "--url", url], capture_output=True, text=True, timeout=120)  # noqa: E731
    daemons = run("daemons")
    assert daemons.returncode == 0, daemons.stderr
    lines = daemons.stdout.splitlines()
    assert lines[0].split() == ["DAEMON", "STATE", "WORKERS", "QUEUED", "DOCKER"]
    assert {line.split()[0]: line.split()[1] for line in lines[1:]} == {"a": "up", "b": "up"}
    images = run("images", "--daemon", "b", "--reference", f"cli-{unique}", "--json")
    assert [(i["daemon"], i["tags"]) for i in json.loads(images.stdout)["images"]] == [("b", [source])]
    published = run("publish", source, "--to", f"local/fleet/cli-{unique}:v1", "--daemon", "b", "--wait", "--json")
    assert published.returncode == 0, published.stderr
    job = json.loads(published.stdout)
    assert job["state"] == "succeeded" and job["daemon"] == "b"
    refused = run("publish", source, "--to", f"local/fleet/cli-{unique}:v1", "--daemon", "a", "--wait")
    assert refused.returncode == 1 and "image_not_found" in refused.stdout + refused.stderr, refused  # the job fails: a lacks it


def test_an_archive_uploaded_to_api_1_runs_on_any_worker(fleet, stack, tmp_path, unique):
    """An uploaded archive needs no daemon: it goes on the shared queue, which every worker
    takes from, and waits in the artifact store (here the default: a directory on this host,
    which the API and both workers share)."""
    import image_archives as ia

    archive, image = ia.oci_archive(tmp_path / "layout")
    repository = f"fleet/upload-{unique}"
    body, content_type = ia.multipart({"targets": [{"registry": "local", "repository": repository, "tags": ["v1"]}]}, archive)
    api = fleet.apis[0]
    resp = api.http.post(api.base_url + "/v1/publish", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert resp.status_code == 202, resp.text
    done = fleet.apis[1].wait(resp.json()["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert "daemon" not in done  # no daemon's queue, no daemon's image store
    assert stack.registry_digest(stack.registry, repository, "v1") == image.digest
