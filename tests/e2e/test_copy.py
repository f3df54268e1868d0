"""Copies between registries end to end, with no daemon: POST /v1/copy → a worker that has none
(``--no-daemon``, and a DOCKER_HOST that leads nowhere) → skopeo → the registries.

The worker runs in a private mount namespace where the emulated ECR's host name resolves as it
does for the daemon (tests/stack.py, ``ecr_hosts``), and trusts the test CA only through the
ECR registry's ``ca_file`` in imagepub's configuration. The test image is a multi-platform OCI
layout written here (tests/oci_layout.py), with cosign-style signature and attestation tags.
Every result is checked against the registries themselves (their HTTP API, their request logs),
never against our own code's claims.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis

import oci_layout
from registry_proxy import ecr_error
from service_process import Service, base_config
from slow_proxy import SlowProxy
from stack import MANIFEST_ACCEPT

PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def slow(stack):
    """The password-protected registry behind a 1 MiB/s link: a copy from it lasts seconds."""
    proxy = SlowProxy(stack.auth_registry, rate=1 * MiB)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def copier(stack, ecr_api_proxy, slow):
    config = base_config(stack)
    for name in ("ecr", "ecr-no-create"):
        config["registries"][name]["ca_file"] = str(stack.ecr_ca)  # the production way to trust a registry's CA
    # no ca_file: TLS fails (the worker's /etc/docker and /etc/containers are the machine's)
    config["registries"]["ecr-untrusted"] = {"type": "ecr", "region": stack.ecr_region, "create_repositories": True}
    config["registries"]["slow-secure"] = {**config["registries"]["secure"], "host": slow.address}
    config["registries"]["down"] = {"type": "registry", "host": "127.0.0.1:1"}
    config["retry"] = {"max_attempts": 2, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5}
    svc = Service(stack, config, "copier", redis_db=14, env={"AWS_ENDPOINT_URL_ECR": ecr_api_proxy.url})
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    # no daemon at all: not configured, and none where DOCKER_HOST points
    svc.start_worker(args=("--no-daemon",), env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, ecr_hosts=True)
    yield svc
    svc.stop_worker()


@pytest.fixture
def api(copier):
    return copier.api


@pytest.fixture
def ecr_tokens(copier, ecr_api_proxy):
    """The ECR API proxy's counters zeroed, and no ECR token cached in the copier's Redis."""
    ecr_api_proxy.reset()
    client = redis.Redis.from_url(copier.redis_url)
    for key in client.scan_iter("imagepub:ecr-token:*"):
        client.delete(key)
    yield ecr_api_proxy
    ecr_api_proxy.reset()


@pytest.fixture(scope="module")
def auth_file(stack) -> Path:
    path = stack.tmp / "copy-test-auth.json"
    token = base64.b64encode(f"{stack.auth_user}:{stack.auth_password}".encode()).decode()
    path.write_text(json.dumps({"auths": {stack.auth_registry: {"auth": token}}}))
    return path


class Fixture:
    """A multi-platform image in a registry, with a signature and an attestation of its index
    and a signature of its arm64 image."""

    def __init__(self, stack, host: str, repository: str, layer_sizes=(4096, 2048), auth_file=None):
        self.host, self.repository = host, repository
        layout = stack.tmp / f"oci-{uuid.uuid4().hex[:8]}"
        self.image = oci_layout.write_image(layout, "1", PLATFORMS, layer_sizes)
        self.artifacts = dict([
            oci_layout.write_signature(layout, self.image.digest, "sig"),
            oci_layout.write_signature(layout, self.image.digest, "att"),
            oci_layout.write_signature(layout, self.image.manifests["linux/arm64"], "sig"),
        ])
        for tag in ["1", *self.artifacts]:
            oci_layout.push(layout, tag, f"{host}/{repository}:{tag}", authfile=auth_file)

    @property
    def digest(self) -> str:
        return self.image.digest


@pytest.fixture(scope="module")
def multi(stack) -> Fixture:
    return Fixture(stack, stack.registry, f"src/multi-{uuid.uuid4().hex[:8]}")


def _copy(api, body: dict, state: str = "succeeded") -> dict:
    job = api.wait(api.submit("/v1/copy", body)["id"], timeout=180)
    assert job["state"] == state, (job["error"], job["last_error"], job["attempts"])
    return job


def _body(source: tuple[str, str, str], *targets: tuple[str, str, list[str]], **options) -> dict:
    registry, repository, reference = source
    ref = {"digest": reference} if reference.startswith("sha256:") else {"tag": reference}
    return {"source": {"registry": registry, "repository": repository, **ref},
            "targets": [{"registry": r, "repository": repo, "tags": tags} for r, repo, tags in targets], **options}


def _raw_manifest(stack, host: str, repository: str, reference: str) -> dict:
    resp = stack.registry_request("GET", host, f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
    assert resp.status == 200, resp.status
    return json.loads(resp.data)


def _has_blob(stack, host: str, repository: str, digest: str) -> bool:
    return stack.registry_request("HEAD", host, f"/v2/{repository}/blobs/{digest}").status == 200


def _blob_uploads(log: str, repository: str) -> list[str]:
    """Blob digests the registry stored from uploads into ``repository`` (the upload's final PUT)."""
    return re.findall(rf'"PUT /v2/{re.escape(repository)}/blobs/uploads/[^" ]*[?&]digest=sha256%3A([0-9a-f]{{64}})', log)


# --- exact copies ---------------------------------------------------------------------------------


def test_every_platform_keeps_its_digest_at_every_hop(api, stack, multi, ecr_tokens):
    """local → basic-auth registry → emulated ECR → local again: the same index digest, the same
    blobs, the same signature and attestation tags, at every hop."""
    u = uuid.uuid4().hex[:8]
    hops = [
        (("local", multi.repository, "1"), ("secure", f"hop/one-{u}", stack.auth_registry)),
        (("secure", f"hop/one-{u}", "1"), ("ecr", f"hop/two-{u}", stack.ecr_host)),
        (("ecr", f"hop/two-{u}", "1"), ("local", f"hop/three-{u}", stack.registry)),
    ]
    for source, (registry, repository, host) in hops:
        job = _copy(api, _body(source, (registry, repository, ["1", "stable"]), create_repository=True))
        target = job["targets"][0]
        assert job["source"]["digest"] == multi.digest and job["source"]["platforms"] == list(PLATFORMS)
        assert target["digest"] == multi.digest and target["references"] == [f"{host}/{repository}:1", f"{host}/{repository}:stable"]
        for tag in ("1", "stable"):  # what the registry itself serves
            assert stack.registry_digest(host, repository, tag) == multi.digest
        assert {m["digest"] for m in _raw_manifest(stack, host, repository, "1")["manifests"]} == set(multi.image.manifests.values())
        assert target["manifests"] == [*multi.image.manifests.values(), multi.digest]
        for blob in multi.image.blobs:  # the very blobs: nothing re-compressed
            assert _has_blob(stack, host, repository, blob)
        layers = {layer["id"]: layer for layer in target["layers"]}
        assert multi.image.blobs <= set(layers)
        assert all(layer["status"] in {"copied", "exists", "mounted"} and layer["current"] == layer["total"] > 0 for layer in layers.values())
        for blob in multi.image.blobs:
            assert layers[blob]["total"] == multi.image.sizes[blob]
        assert sorted(s["tag"] for s in target["signatures"]) == sorted(multi.artifacts)
        for tag, digest in multi.artifacts.items():
            assert stack.registry_digest(host, repository, tag) == digest
    assert stack.skopeo_digest(f"{stack.ecr_host}/hop/two-{u}:1") == multi.digest  # and as skopeo reads it
    assert ecr_tokens.calls["GetAuthorizationToken"] == 1


def test_a_platform_subset(api, stack, multi):
    u = uuid.uuid4().hex[:8]
    one = _copy(api, _body(("local", multi.repository, "1"), ("secure", f"sub/arm64-{u}", ["1"]), platforms=["linux/arm64"]))
    arm64 = multi.image.manifests["linux/arm64"]
    # one platform: its own manifest under the tag, digest kept
    assert stack.registry_digest(stack.auth_registry, f"sub/arm64-{u}", "1") == arm64 == one["targets"][0]["digest"]
    assert one["targets"][0]["manifests"] == [arm64] and one["source"]["platforms"] == ["linux/arm64"]
    assert {layer["id"] for layer in one["targets"][0]["layers"]} == set(multi.image.layers["linux/arm64"]) | _config_of(stack, multi, "linux/arm64")
    # only the signature of what the destination serves (the index's would sign another digest)
    assert [s["tag"] for s in one["targets"][0]["signatures"]] == [arm64.replace(":", "-") + ".sig"]

    two = _copy(api, _body(("local", multi.repository, multi.digest), ("secure", f"sub/two-{u}", ["1", "latest"]),
                           platforms=["linux/arm/v7", "linux/arm64"]))
    target = two["targets"][0]
    index = _raw_manifest(stack, stack.auth_registry, f"sub/two-{u}", "1")
    # an index of just those two, in the source's order, written once under both tags
    assert [m["digest"] for m in index["manifests"]] == [multi.image.manifests["linux/arm64"], multi.image.manifests["linux/arm/v7"]]
    assert stack.registry_digest(stack.auth_registry, f"sub/two-{u}", "1") == target["digest"] != multi.digest
    assert stack.registry_digest(stack.auth_registry, f"sub/two-{u}", "latest") == target["digest"]
    assert target["manifests"] == [multi.image.manifests["linux/arm64"], multi.image.manifests["linux/arm/v7"], target["digest"]]
    for digest in target["manifests"]:
        assert stack.registry_request("HEAD", stack.auth_registry, f"/v2/sub/two-{u}/manifests/{digest}",
                                      headers={"Accept": MANIFEST_ACCEPT}).status == 200
    assert not _has_blob(stack, stack.auth_registry, f"sub/two-{u}", multi.image.layers["linux/amd64"][0])

    # asking for every platform of the index is the whole index
    every = _copy(api, _body(("local", multi.repository, "1"), ("local", f"sub/all-{u}", ["1"]), platforms=list(PLATFORMS)))
    assert every["targets"][0]["digest"] == multi.digest


def _config_of(stack, fixture: Fixture, platform: str) -> set[str]:
    manifest = _raw_manifest(stack, fixture.host, fixture.repository, fixture.image.manifests[platform])
    return {manifest["config"]["digest"]}


def test_signatures_false_copies_the_image_alone(api, stack, multi):
    u = uuid.uuid4().hex[:8]
    job = _copy(api, _body(("local", multi.repository, "1"), ("local", f"nosig/app-{u}", ["1"]), signatures=False))
    assert job["targets"][0]["signatures"] == []
    assert stack.registry_tags(stack.registry, f"nosig/app-{u}") == ["1"]


def test_a_second_copy_into_the_same_registry_sends_no_layer_again(api, stack):
    u = uuid.uuid4().hex[:8]
    multi = Fixture(stack, stack.registry, f"src/again-{u}")  # blobs no registry has seen yet
    first = _copy(api, _body(("local", multi.repository, "1"), ("secure", f"again/a-{u}", ["1"]), signatures=False))
    uploaded = set(_blob_uploads(stack.log("auth-registry"), f"again/a-{u}"))
    layers = {d.split(":", 1)[1] for d in multi.image.blobs}
    assert layers <= uploaded  # the first copy sent them
    assert {layer["status"] for layer in first["targets"][0]["layers"] if layer["id"] in multi.image.blobs} == {"copied"}

    second = _copy(api, _body(("local", multi.repository, "1"), ("secure", f"again/b-{u}", ["1"]), signatures=False))
    log = stack.log("auth-registry")
    assert not layers & set(_blob_uploads(log, f"again/b-{u}"))  # no layer sent again...
    mounts = re.findall(rf'"POST /v2/again/b-{u}/blobs/uploads/\?from=again%2Fa-{u}&mount=sha256%3A([0-9a-f]{{64}})', log)
    assert layers <= set(mounts)  # ...each mounted from the first repository
    statuses = {layer["id"]: layer["status"] for layer in second["targets"][0]["layers"]}
    assert {statuses[blob] for blob in multi.image.blobs} == {"mounted"}
    # and a third copy to a repository that has it all: every blob exists
    third = _copy(api, _body(("local", multi.repository, "1"), ("secure", f"again/b-{u}", ["2"]), signatures=False))
    assert {layer["status"] for layer in third["targets"][0]["layers"]} == {"exists"}
    assert stack.registry_digest(stack.auth_registry, f"again/b-{u}", "2") == multi.digest


def test_one_token_for_many_copies_into_ecr(api, stack, multi, ecr_tokens):
    u = uuid.uuid4().hex[:8]
    jobs = [api.submit("/v1/copy", _body(("local", multi.repository, "1"), ("ecr", f"many/app-{u}-{i}", ["1"]),
                                         create_repository=True, signatures=False)) for i in range(6)]
    for job in jobs:
        done = api.wait(job["id"], timeout=180)
        assert done["state"] == "succeeded", done
        assert stack.registry_digest(stack.ecr_host, done["targets"][0]["repository"], "1") == multi.digest
    assert ecr_tokens.calls["GetAuthorizationToken"] == 1


# --- no daemon --------------------------------------------------------------------------------


def test_no_daemon_is_involved(api, stack, multi):
    """The worker has no daemon; the stack's daemon sees nothing: no event, no new image."""
    docker = stack.docker()
    images_before = sorted(image.id for image in docker.images.list(all=True))
    since = int(time.time()) - 1
    u = uuid.uuid4().hex[:8]
    job = _copy(api, _body(("local", multi.repository, "1"), ("secure", f"nodaemon/app-{u}", ["1"])))
    assert "daemon" not in job
    until = int(time.time()) + 1
    time.sleep(1.1)  # the daemon's event log is by the second
    events = list(docker.api.events(since=since, until=until, decode=True))
    assert events == []
    assert sorted(image.id for image in docker.images.list(all=True)) == images_before


# --- immutable tags, tokens, throttling ------------------------------------------------------------


def test_immutable_tag_with_the_same_digest_succeeds_and_another_fails(api, stack, multi):
    u = uuid.uuid4().hex[:8]
    repository = f"immutable/app-{u}"
    _copy(api, _body(("local", multi.repository, "1"), ("ecr", repository, ["1.0"]), create_repository=True, signatures=False))
    # ECR's answer to a manifest PUT on an immutable tag, whatever it holds
    stack.ecr_registry.immutable_tag(repository, "1.0")
    same = _copy(api, _body(("local", multi.repository, "1"), ("ecr", repository, ["1.0"]), signatures=False))
    assert same["targets"][0]["digest"] == multi.digest
    assert ("PUT", f"/v2/{repository}/manifests/1.0", 400) in stack.ecr_registry.requests()

    other = Fixture(stack, stack.registry, f"src/other-{u}")
    stack.ecr_registry.immutable_tag(repository, "1.0")
    failed = _copy(api, _body(("local", other.repository, "1"), ("ecr", repository, ["1.0"]), signatures=False), "failed")
    assert failed["error"]["code"] == "tag_immutable" and failed["attempts"] == 1
    assert multi.digest in failed["error"]["message"] and other.digest in failed["error"]["message"]
    assert stack.registry_digest(stack.ecr_host, repository, "1.0") == multi.digest


def test_an_expired_ecr_token_is_fetched_again(api, stack, multi, ecr_tokens):
    u = uuid.uuid4().hex[:8]
    _copy(api, _body(("local", multi.repository, "1"), ("ecr", f"expired/warm-{u}", ["1"]), create_repository=True, signatures=False))
    stack.ecr_registry.expired_token()
    job = _copy(api, _body(("local", multi.repository, "1"), ("ecr", f"expired/app-{u}", ["1"]), create_repository=True, signatures=False))
    assert job["attempts"] == 1 and stack.registry_digest(stack.ecr_host, f"expired/app-{u}", "1") == multi.digest
    assert ecr_tokens.calls["GetAuthorizationToken"] == 2  # the cached one, then a fresh one


def test_throttling_is_retried(api, stack, multi):
    u = uuid.uuid4().hex[:8]
    source = f"throttled/src-{u}"
    _copy(api, _body(("local", multi.repository, "1"), ("ecr", source, ["1"]), create_repository=True, signatures=False))
    # skopeo itself tries 5 times (Retry-After: 0 makes it quick); then imagepub's retry policy
    stack.ecr_registry.fail("GET", rf"^/v2/{source}/manifests/", 429, ecr_error("TOOMANYREQUESTS", "Rate exceeded"), times=5,
                            headers={"Retry-After": "0"})
    job = _copy(api, _body(("ecr", source, "1"), ("local", f"throttled/dst-{u}", ["1"]), signatures=False))
    assert job["attempts"] == 2 and job["last_error"]["code"] == "throttled", job
    assert stack.registry_digest(stack.registry, f"throttled/dst-{u}", "1") == multi.digest


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, code, words, attempts",
    [
        ("missing tag", "image_not_found", "manifest unknown", 1),
        ("missing repository", "image_not_found", "is not in its registry", 1),
        ("bad password at the source", "auth_failed", "authentication required", 1),
        ("bad password at the target", "auth_failed", "authentication required", 1),
        ("unknown platform", "image_not_found", "has no linux/s390x image; it has linux/amd64, linux/arm/v7, linux/arm64", 1),
        ("a platform of a single image", "image_not_found", "is a single linux/amd64 image, not linux/arm64", 1),
        ("registry down", "registry_unavailable", "connection refused", 2),
        ("untrusted certificate", "registry_tls_failed", "x509", 1),
        ("ECR repository missing", "repository_not_found", "does not exist", 1),
    ],
)
def test_failures(api, stack, multi, case, code, words, attempts):
    u = uuid.uuid4().hex[:8]
    single = None
    if case == "a platform of a single image":
        single = f"src/single-{u}"
        layout = stack.tmp / f"oci-single-{u}"
        oci_layout.write_image(layout, "1", ("linux/amd64",))
        oci_layout.push(layout, "1", f"{stack.registry}/{single}:1")
    source, target, options = {
        "missing tag": (("local", multi.repository, "nope"), ("local", f"f/{u}", ["1"]), {}),
        "missing repository": (("local", f"nothing/{u}", "1"), ("local", f"f/{u}", ["1"]), {}),
        "bad password at the source": (("wrong-password", multi.repository, "1"), ("local", f"f/{u}", ["1"]), {}),
        "bad password at the target": (("local", multi.repository, "1"), ("wrong-password", f"f/{u}", ["1"]), {}),
        "unknown platform": (("local", multi.repository, "1"), ("local", f"f/{u}", ["1"]), {"platforms": ["linux/s390x"]}),
        "a platform of a single image": (("local", single, "1"), ("local", f"f/{u}", ["1"]), {"platforms": ["linux/arm64"]}),
        "registry down": (("down", multi.repository, "1"), ("local", f"f/{u}", ["1"]), {}),
        "untrusted certificate": (("local", multi.repository, "1"), ("ecr-untrusted", f"f/{u}", ["1"]), {"create_repository": True}),
        "ECR repository missing": (("local", multi.repository, "1"), ("ecr-no-create", f"f/{u}", ["1"]), {}),
    }[case]
    job = _copy(api, _body(source, target, **options), "failed")
    assert job["error"]["code"] == code and words in job["error"]["message"], job["error"]
    assert job["attempts"] == attempts
    assert job["targets"][0]["references"] == [] and stack.registry_tags(stack.registry, f"f/{u}") == []
    if case == "bad password at the source":  # the one it tried is not told
        assert "not-the-password" not in json.dumps(job)


# --- credentials --------------------------------------------------------------------------------


def _worker_children(stack, name: str) -> set[int]:
    main = stack.proc(name).pid
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            if re.search(rf"^PPid:\s+{main}$", status, re.M):
                children.add(int(entry))
    return children | {main}


def _sessions(stack, pids: set[int]) -> list[Path]:
    """The copy sessions of these processes, in their temporary directory (the stack's TMPDIR)."""
    base = Path(stack.env().get("TMPDIR") or tempfile.gettempdir())
    return [p for p in base.glob("imagepub-copy-*") if int(p.name.split("-")[2]) in pids]


def _skopeo_commands(pids: set[int]) -> list[list[str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)$", status, re.M).group(1))
        if ppid in pids and argv and argv[0].endswith(b"skopeo"):
            found.append([a.decode() for a in argv if a])
    return found


@pytest.fixture(scope="module")
def slow_source(stack, auth_file) -> Fixture:
    """An image of ~3 MiB behind the slow link: its copy lasts about three seconds."""
    return Fixture(stack, stack.auth_registry, f"src/slow-{uuid.uuid4().hex[:8]}", layer_sizes=(1536 * 1024, 1536 * 1024),
                   auth_file=auth_file)


def test_credentials_stay_in_a_private_file_for_the_job_only(api, stack, slow, slow_source):
    u = uuid.uuid4().hex[:8]
    job = api.submit("/v1/copy", _body(("slow-secure", slow_source.repository, "1"), ("ecr", f"creds/app-{u}", ["1"]),
                                       platforms=["linux/arm64"], signatures=False, create_repository=True))
    pids = _worker_children(stack, "copier-worker")
    seen_commands, seen_files = [], {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and api.get(f"/v1/jobs/{job['id']}").json()["state"] not in {"succeeded", "failed"}:
        seen_commands += _skopeo_commands(pids)
        for session in _sessions(stack, pids):
            # a session may end between listing and reading it, and a file be read while written
            with contextlib.suppress(OSError, ValueError):
                seen_files[session] = stat.S_IMODE(session.stat().st_mode)
                for path in session.glob("auth-*.json"):
                    seen_files[path] = stat.S_IMODE(path.stat().st_mode)
                    seen_files.setdefault("auths", []).append(json.loads(path.read_text()))
        time.sleep(0.05)
    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert seen_commands, "no skopeo process seen while the copy ran"
    secrets = [stack.auth_password, stack.ecr_password]
    for argv in seen_commands:  # paths and references only
        assert not any(secret in arg for secret in secrets for arg in argv), argv
        assert not any(arg.startswith(("--creds", "--src-creds", "--dest-creds", "--password")) for arg in argv)
    auths = seen_files.pop("auths")
    assert {host for a in auths for host in a["auths"]} == {slow.address, stack.ecr_host}
    assert seen_files and all(mode in (0o700, 0o600) for mode in seen_files.values()), seen_files
    assert all(mode == 0o600 for path, mode in seen_files.items() if str(path).endswith(".json"))
    assert _sessions(stack, _worker_children(stack, "copier-worker")) == []  # removed with the job
    for secret in secrets + [base64.b64encode(f"{stack.auth_user}:{stack.auth_password}".encode()).decode()]:
        assert secret not in json.dumps(done)
        assert secret not in stack.log("copier-worker") and secret not in stack.log("copier-api")


def test_a_cancelled_copy_stops_and_leaves_nothing(api, stack, slow_source):
    u = uuid.uuid4().hex[:8]
    job = api.submit("/v1/copy", _body(("slow-secure", slow_source.repository, "1"), ("local", f"cancel/app-{u}", ["1"]),
                                       signatures=False))
    pids = _worker_children(stack, "copier-worker")
    deadline = time.monotonic() + 30
    while not _skopeo_commands(pids) or not any(
            layer["status"] == "copying" for t in api.get(f"/v1/jobs/{job['id']}").json()["targets"] for layer in t["layers"]):
        assert time.monotonic() < deadline, "the copy did not start"
        time.sleep(0.05)
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = api.wait(job["id"])
    assert done["state"] == "cancelled", done
    time.sleep(0.5)
    assert _skopeo_commands(_worker_children(stack, "copier-worker")) == []  # stopped, not left running
    assert _sessions(stack, _worker_children(stack, "copier-worker")) == []
    assert stack.registry_tags(stack.registry, f"cancel/app-{u}") == []


# --- the command line ---------------------------------------------------------------------------


def test_cli_copy_waits_and_prints_plain_lines(api, stack, multi):
    import subprocess

    from service_process import imagepub_command

    u = uuid.uuid4().hex[:8]
    done = subprocess.run(
        [imagepub_command(), "copy", f"local/{multi.repository}:1", "--to", f"secure/cli/app-{u}:1,latest",
         "--platform", "linux/arm64", "--platform", "linux/amd64", "--wait"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "IMAGEPUB_URL": api.base_url},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert re.search(rf"queued: copy local/{re.escape(multi.repository)}:1 \[linux/arm64, linux/amd64\] → secure/cli/app-{u}:1,latest", lines[0])
    assert any(re.search(r" blob [0-9a-f]{12} (copied|exists|mounted) ", line) for line in lines)
    digest = stack.registry_digest(stack.auth_registry, f"cli/app-{u}", "latest")
    assert f"copied {stack.auth_registry}/cli/app-{u}:latest {digest}" in done.stdout
