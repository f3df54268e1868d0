"""The pipeline client end to end: the installed ``imagepub`` console script, run as a subprocess
the way a CI job runs it, against the whole service (API, worker, daemon, registry).

Digests are checked against what the registry itself serves. The terminal rendering is checked
once, under a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest
import redis

from service_process import imagepub_command
from stack import free_port

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def cli_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEPUB_")}
    return {**env, "IMAGEPUB_URL": url, **extra}


def imagepub(service, *args: str, url: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([imagepub_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(url or service.api.base_url), stdin=subprocess.DEVNULL)


@pytest.fixture
def image(stack, unique):
    name = f"cli/src-{unique}:v1"
    stack.build_image(name, layers=3)
    return name


def test_publish_wait_prints_layers_and_the_registry_digest(service, stack, image, unique):
    repository = f"cli/app-{unique}"
    done = imagepub(service, "publish", image, "--to", f"local/{repository}:1.0,latest", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines), lines
    assert re.search(r" job \S+ queued: publish " + re.escape(image), lines[0])
    assert any(line.endswith(" running (attempt 1)") for line in lines)
    pushed = [line for line in lines if re.search(r" layer [0-9a-f]{12} pushed 64\.0 KiB$", line)]
    assert len(pushed) == 3, lines
    digest = stack.registry_digest(stack.registry, repository, "1.0")
    assert digest and digest == stack.registry_digest(stack.registry, repository, "latest")
    assert f" pushed {stack.registry}/{repository}:1.0 {digest} (" in lines[-2]
    assert f" pushed {stack.registry}/{repository}:latest {digest} (" in lines[-1]
    assert done.stderr == ""


def test_json_wait_prints_one_document(service, stack, image, unique):
    repository = f"cli/json-{unique}"
    done = imagepub(service, "publish", image, "--to", f"local/{repository}:v1", "--json", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    job = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert job["state"] == "succeeded"
    assert job["targets"][0]["digest"] == stack.registry_digest(stack.registry, repository, "v1")


def test_json_without_wait_is_the_accepted_job(service, api, image, unique):
    done = imagepub(service, "publish", image, "--to", f"local/cli/nowait-{unique}:v1", "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "queued"
    assert api.wait(job["id"])["state"] == "succeeded"


def test_failed_job_exits_1_with_its_error(service, unique):
    done = imagepub(service, "publish", f"nothing-here-{unique}:latest", "--to", f"local/cli/none-{unique}:t", "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r" failed: image_not_found: .+", done.stdout.splitlines()[-1])


@pytest.mark.parametrize("target, code, field", [
    ("local/cli/x:-bad", "validation_failed", "targets.0.tags.0"),
    ("nowhere/cli/x:1", "registry_not_configured", "targets.0.registry"),
])
def test_refused_request_exits_4(service, target, code, field):
    done = imagepub(service, "publish", "anything:1", "--to", target, "--wait")
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {code}: ")
    assert f"  {field}: " in done.stderr


def test_unreachable_api_exits_5(service):
    done = imagepub(service, "publish", "anything:1", "--to", "local/x:1", "--wait", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 5
    assert done.stderr.startswith("error: api_unavailable: ")


def test_follow_a_finished_job_and_list_it(service, api, stack, image, unique):
    repository = f"cli/follow-{unique}"
    job = api.wait(api.submit("/v1/publish", {"source": image, "targets": [{"registry": "local", "repository": repository, "tags": ["v1"]}]})["id"])
    assert job["state"] == "succeeded", job
    digest = stack.registry_digest(stack.registry, repository, "v1")

    followed = imagepub(service, "job", job["id"], "--follow", "--timeout", "30")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert f" job {job['id']} succeeded" in followed.stdout
    assert f" pushed {stack.registry}/{repository}:v1 {digest} (" in followed.stdout.splitlines()[-1]

    listed = imagepub(service, "jobs", "--state", "succeeded", "--kind", "publish", "--limit", "200")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job["id"]))
    assert row.split()[1:3] == ["publish", "succeeded"]
    as_json = json.loads(imagepub(service, "jobs", "--state", "succeeded", "--json").stdout)
    assert job["id"] in [j["id"] for j in as_json["jobs"]]


def test_cancelled_job_exits_3(service, api, stack, image, unique):
    repository = f"cli/cancel-{unique}"
    lock = f"imagepub:lock:ref:{stack.registry}/{repository}"
    r = redis.Redis.from_url(stack.redis_url)
    assert r.set(lock, "held-by-test", px=120_000)  # the worker waits for it inside the push step
    try:
        proc = subprocess.Popen([imagepub_command(), "publish", image, "--to", f"local/{repository}:v1", "--wait"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(service.api.base_url))
        first = proc.stdout.readline()
        job_id = re.search(r" job (\S+) queued", first).group(1)
        api.wait(job_id, states={"running"}, timeout=30)
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        out, err = proc.communicate(timeout=30)
    finally:
        r.delete(lock)
    assert proc.returncode == 3, first + out + err
    assert out.splitlines()[-1].endswith(f"job {job_id} cancelled")
    assert stack.registry_digest(stack.registry, repository, "v1") is None


def _run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
        return proc.wait(timeout=10), output.decode("utf-8", "replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_terminal_shows_progress_bars(service, stack, image, unique):
    repository = f"cli/tty-{unique}"
    env = cli_env(service.api.base_url, TERM="xterm-256color", COLUMNS="120", LINES="40")
    env.pop("NO_COLOR", None)
    code, raw = _run_in_pty([imagepub_command(), "publish", image, "--to", f"local/{repository}:v1", "--wait"], env)
    text = ANSI.sub("", raw)
    assert code == 0, text
    assert "\x1b[" in raw  # rich drew on the terminal
    assert "Traceback" not in text
    assert "━" in text  # the bars
    assert re.search(r"[0-9a-f]{12} pushed +━+ +64\.0 KiB/64\.0 KiB", text), text
    digest = stack.registry_digest(stack.registry, repository, "v1")
    assert f"pushed {stack.registry}/{repository}:v1 {digest}" in text
