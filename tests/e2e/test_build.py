"""Build jobs and the daemon's images, end to end: a context uploaded through the API, built by
the worker's daemon, published and verified; a failing build; contexts that try to escape."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time

import pytest

import network_probe
from service_process import imagepub_command


def make_context(files: dict[str, bytes], *, gzip: bool = True, extra=()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def submit_build(api, context: bytes, request: dict, headers=None):
    return api.http.post(f"{api.base_url}/v1/build", files={
        "request": (None, json.dumps(request), "application/json"),
        "context": ("context.tar.gz", context, "application/gzip"),
    }, headers=headers or {}, timeout=60)


def test_build_and_publish_with_two_tags(api, stack, unique):
    payload = os.urandom(8192)
    context = make_context({"Dockerfile": b"FROM scratch\nARG GREETING\nCOPY payload.bin /payload.bin\nLABEL greeting=$GREETING\n", "payload.bin": payload})
    repository = f"built/app-{unique}"
    resp = submit_build(api, context, {"targets": [{"registry": "local", "repository": repository, "tags": ["1.0", "latest"]}],
                                       "build_args": {"GREETING": "hello"}})
    assert resp.status_code == 202, resp.text
    job = api.wait(resp.json()["id"], timeout=120)
    assert job["state"] == "succeeded", job
    assert job["kind"] == "build" and job["build"]["image_id"].startswith("sha256:")
    assert any(line.startswith("Step 1/") and line.endswith(": FROM scratch") for line in job["build"]["log"]), job["build"]["log"]
    steps = [line for line in job["build"]["log"] if line.startswith("Step ")]
    assert [s.split(" : ")[0] for s in steps] == ["Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4"], job["build"]["log"]
    assert any(line.startswith("imagepub: LABEL org.imagepub.job=") for line in job["build"]["log"])
    digest = job["targets"][0]["digest"]
    for tag in ("1.0", "latest"):
        assert stack.registry_digest(stack.registry, repository, tag) == digest
    assert stack.skopeo_digest(f"{stack.registry}/{repository}:1.0") == digest
    built = stack.docker().api.inspect_image(job["build"]["image_id"])
    assert built["Config"]["Labels"]["greeting"] == "hello" and built["Config"]["Labels"]["org.imagepub.job"] == job["id"]

    # The listing reads the daemon's image index, which the worker rewrites a moment after each
    # burst of the daemon's image events (service/fleet.py): the build's image is in it soon.
    deadline = time.monotonic() + 20
    while True:
        images = api.get("/v1/images", params={"reference": "imagepub-build"}).json()["images"]
        listed = next((image for image in images if image["id"] == job["build"]["image_id"]), None)
        if listed is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert listed is not None, images
    assert f"imagepub-build:{job['id']}" in listed["tags"] and listed["size"] >= len(payload)


def test_failing_build_names_the_step(api, unique):
    context = make_context({"Dockerfile": b"FROM scratch\nCOPY present.txt /\nCOPY missing.txt /\n", "present.txt": b"here"}, gzip=False)
    resp = submit_build(api, context, {"targets": [{"registry": "local", "repository": f"broken-{unique}", "tags": ["x"]}]})
    assert resp.status_code == 202, resp.text
    job = api.wait(resp.json()["id"], timeout=120)
    assert job["state"] == "failed" and job["error"]["code"] == "build_failed", job
    # numbered as the Dockerfile is (three steps), not with the label step the builder adds
    assert re.match(r"Step 3/3 : COPY missing.txt /: COPY failed", job["error"]["message"]), job["error"]
    assert job["attempts"] == 1 and job["targets"][0]["references"] == []
    assert any("missing.txt" in line for line in job["build"]["log"])


def test_run_steps_run_on_no_network(api, stack, unique):
    """A RUN step is a tenant's code next to the workers. By default (``builds.network: none``)
    it sees a loopback of its own and nothing listening, while the same probe on the daemon
    host's network sees the stack's Redis. This test daemon runs without a bridge, so its own
    default network is as bare: tests/service/test_config.py pins the default itself, and
    test_hostile_tenants.py shows the setting reaching the daemon, with a network of its own."""
    resp = submit_build(api, network_probe.context(unique), {"targets": [{"registry": "local", "repository": f"built/probe-{unique}", "tags": ["1"]}]})
    assert resp.status_code == 202, resp.text
    job = api.wait(resp.json()["id"], timeout=120)
    assert job["state"] == "succeeded", job
    docker = stack.docker().api
    redis_port = int(stack.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    assert redis_port in network_probe.on_the_host(docker, job["build"]["image_id"]).listening_ports  # the probe sees what is there
    run = network_probe.seen(docker, job["build"]["image_id"])
    assert run.interfaces == {"lo"} and run.listening_ports == set(), run


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("files, extra, message", [
    ({"Dockerfile": b"FROM scratch\n", "../evil": b"x"}, (), "outside the context"),
    ({"Dockerfile": b"FROM scratch\n", "/etc/cron.d/evil": b"x"}, (), "outside the context"),
    ({"Dockerfile": b"FROM scratch\n", "a/../../evil": b"x"}, (), "outside the context"),
    ({"Dockerfile": b"FROM scratch\n"}, (_link("passwd", "/etc/passwd"),), "points outside"),
    ({"Dockerfile": b"FROM scratch\n"}, (_link("up", "../../etc"),), "points outside"),
    ({"Dockerfile": b"FROM scratch\n"}, (_link("hard", "../x", tarfile.LNKTYPE),), "points outside"),
    ({"Dockerfile": b"FROM scratch\n"}, (_link("dev", "", tarfile.CHRTYPE),), "device"),
    ({"NotADockerfile": b"FROM scratch\n"}, (), "no file 'Dockerfile'"),
])
def test_contexts_that_escape_are_refused(api, redis_client_db0, files, extra, message):
    before = redis_client_db0.zcard("imagepub:jobs")
    resp = submit_build(api, make_context(files, extra=extra), {"targets": [{"registry": "local", "repository": "x", "tags": ["t"]}]})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "invalid_context" and body["errors"][0]["field"] == "context"
    assert message in body["errors"][0]["message"]
    assert redis_client_db0.zcard("imagepub:jobs") == before  # nothing stored


def test_build_request_errors(api):
    resp = api.http.post(f"{api.base_url}/v1/build", json={"targets": []}, timeout=30)
    assert resp.status_code == 415 and resp.json()["code"] == "unsupported_media_type"
    resp = api.http.post(f"{api.base_url}/v1/build", files={"request": (None, "{}", "application/json")}, timeout=30)
    assert resp.status_code == 422 and resp.json()["errors"] == [{"field": "context", "message": "missing part"}]
    resp = submit_build(api, b"not a tar at all", {"targets": [{"registry": "local", "repository": "x", "tags": ["t"]}]})
    assert resp.status_code == 422 and "not a tar" in resp.json()["errors"][0]["message"]
    resp = submit_build(api, make_context({"Dockerfile": b"FROM scratch\n"}), {"targets": [{"registry": "local", "repository": "x", "tags": ["t"]}], "source": "x:1"})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "source"


def test_cli_build_one_line(service, stack, unique, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY app.bin /app.bin\n")
    (tmp_path / "app.bin").write_bytes(os.urandom(4096))
    (tmp_path / "secret.env").write_text("TOKEN=do-not-send")
    (tmp_path / ".dockerignore").write_text("secret.env\n")
    repository = f"pipeline/app-{unique}"
    out = subprocess.run([imagepub_command(), "build", str(tmp_path), "--to", f"local/{repository}:{unique}", "--wait"],
                         env={**os.environ, "IMAGEPUB_URL": service.api.base_url}, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    digest = stack.registry_digest(stack.registry, repository, unique)
    assert digest and digest in out.stdout
