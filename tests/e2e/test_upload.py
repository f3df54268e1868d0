"""Uploaded image archives end to end (issue 11, item 2): ``POST /v1/publish`` as multipart →
the artifact store (a directory, or S3 on moto server) → a worker with no daemon
(``--no-daemon``, and a DOCKER_HOST that leads nowhere) → skopeo → the plain registry and the
emulated ECR. Every digest is checked against the registries themselves (their HTTP API, and
skopeo run by the test), never against our own code's claims.

The OCI archives are written here (tests/image_archives.py: a two-platform index, gzipped tar
layers); the docker-archives come from the stack's own daemon (``docker save``), whose image list
the jobs must leave alone.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import redis
import requests

import image_archives as ia
from service import config
from service.jobstore import JobStore, new_job_id
from service.queue import JobQueue
from service_process import Service, base_config, imagepub_command
from stack import MANIFEST_ACCEPT

BUCKET = "imagepub-uploads"
SMALL_LIMIT = 64 * 1024 * 1024


def _config(stack, artifacts: dict, **limits) -> dict:
    cfg = base_config(stack)
    for name in ("ecr", "ecr-no-create"):
        cfg["registries"][name]["ca_file"] = str(stack.ecr_ca)  # how a daemonless worker trusts the emulated ECR
    cfg["artifacts"] = artifacts
    cfg["limits"] = limits
    cfg["retry"] = {"max_attempts": 2, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5}
    return cfg


def _no_daemon_worker(svc: Service, suffix: str = "worker", queues: str = "jobs,control") -> None:
    # no daemon at all: not configured, and none where DOCKER_HOST points
    svc.start_worker(suffix=suffix, args=("--no-daemon", "--queues", queues), env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
                     ecr_hosts=True)


@pytest.fixture(scope="module")
def directory_store(stack, ecr_api_proxy):
    path = stack.tmp / "artifacts-dir"
    cfg = _config(stack, {"type": "directory", "path": str(path)}, max_archive_bytes=SMALL_LIMIT)
    svc = Service(stack, cfg, "uploads-dir", redis_db=11, env={"AWS_ENDPOINT_URL_ECR": ecr_api_proxy.url})
    svc.config = cfg
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    _no_daemon_worker(svc)
    svc.store = path
    svc.objects = lambda: sorted(p.name for p in path.iterdir() if p.is_file()) if path.exists() else []
    yield svc
    svc.stop_worker()


@pytest.fixture(scope="module")
def s3_client(stack):
    client = boto3.client("s3", endpoint_url=stack.moto_url, region_name=stack.ecr_region,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def s3_store(stack, ecr_api_proxy, s3_client):
    artifacts = {"type": "s3", "bucket": BUCKET, "prefix": "uploads/", "endpoint_url": stack.moto_url, "region": stack.ecr_region}
    cfg = _config(stack, artifacts, max_archive_bytes=SMALL_LIMIT)
    svc = Service(stack, cfg, "uploads-s3", redis_db=13, env={"AWS_ENDPOINT_URL_ECR": ecr_api_proxy.url})
    svc.config = cfg
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    # two workers: one for control calls (presigning, deleting), one for jobs (stopped to keep a job queued)
    _no_daemon_worker(svc, "control", "control")
    _no_daemon_worker(svc, "jobs", "jobs")
    svc.objects = lambda: sorted(o["Key"].removeprefix("uploads/") for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix="uploads/").get("Contents") or [])
    yield svc
    svc.stop_worker("jobs")
    svc.stop_worker("control")


@pytest.fixture(params=["directory", "s3"])
def store(request):
    """Each test below runs against both artifact stores."""
    return request.getfixturevalue(f"{request.param}_store")


def upload(api, archive: bytes, targets: list[dict], headers: dict | None = None, **request) -> requests.Response:
    body, content_type = ia.multipart({"targets": targets, **request}, archive)
    return api.http.post(api.base_url + "/v1/publish", data=body, headers={"Content-Type": content_type, **(headers or {})}, timeout=120)


def submit(api, archive: bytes, targets: list[dict], **request) -> dict:
    resp = upload(api, archive, targets, **request)
    assert resp.status_code == 202, resp.text
    return resp.json()


def manifest(stack, host: str, repository: str, reference: str) -> tuple[int, dict | None]:
    r = stack.registry_request("GET", host, f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
    return r.status, (json.loads(r.data) if r.status == 200 else None)


def wait_gone(store, key: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while key in store.objects():
        assert time.monotonic() < deadline, f"upload {key} is still in the store"
        time.sleep(0.2)


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_an_oci_index_lands_with_its_own_digest_and_every_platform(stack, store, tmp_path, gz):
    archive, image = ia.oci_archive(tmp_path / "layout", gz=gz)
    repository = f"uploads/oci-{uuid.uuid4().hex[:8]}"
    targets = [{"registry": "local", "repository": repository, "tags": ["v1", "latest"]},
               {"registry": "ecr", "repository": repository, "tags": ["v1"]}]
    job = store.api.wait(submit(store.api, archive, targets, create_repository=True)["id"], timeout=180)
    assert job["state"] == "succeeded", job
    assert job["archive"]["sha256"] == hashlib.sha256(archive).hexdigest() and job["archive"]["format"] == "oci-archive"
    assert job["archive"]["digest"] == image.digest and sorted(job["archive"]["platforms"]) == sorted(image.manifests)
    assert "daemon" not in job
    # what the registries serve, asked independently of imagepub
    for tag in ("v1", "latest"):
        assert stack.registry_digest(stack.registry, repository, tag) == image.digest
    assert stack.skopeo_digest(f"{stack.ecr_host}/{repository}:v1") == image.digest
    for host in (stack.registry, stack.ecr_host):
        status, index = manifest(stack, host, repository, "v1")
        assert status == 200 and sorted(m["digest"] for m in index["manifests"]) == sorted(image.manifests.values())
        for platform, digest in image.manifests.items():
            assert manifest(stack, host, repository, digest)[0] == 200, (host, platform)
    for target in job["targets"]:
        assert target["state"] == "succeeded" and target["digest"] == image.digest
        assert {layer["status"] for layer in target["layers"]} <= {"pushed", "exists", "mounted"}
        assert {layer["id"] for layer in target["layers"]} >= image.blobs
        pushed = [layer for layer in target["layers"] if layer["status"] == "pushed" and layer["id"] in image.blobs]
        assert pushed and all(layer["current"] == layer["total"] == image.sizes[layer["id"]] for layer in pushed)
    assert job["targets"][0]["references"] == [f"{stack.registry}/{repository}:v1", f"{stack.registry}/{repository}:latest"]
    wait_gone(store, job["id"])  # deleted when its job ended


def test_a_single_platform_oci_manifest_keeps_its_digest(stack, directory_store, tmp_path):
    archive, image = ia.oci_archive(tmp_path / "layout", platforms=("linux/arm64",))
    assert image.media_type == "application/vnd.oci.image.manifest.v1+json"
    repository = f"uploads/single-{uuid.uuid4().hex[:8]}"
    job = directory_store.api.wait(submit(directory_store.api, archive, [{"registry": "local", "repository": repository, "tags": ["v1"]}])["id"])
    assert job["state"] == "succeeded", job
    assert stack.registry_digest(stack.registry, repository, "v1") == image.digest == job["targets"][0]["digest"]
    assert job["archive"]["media_type"] == image.media_type and job["archive"]["platforms"] == []


def _docker_save(stack, name: str) -> bytes:
    stack.build_image(name, layers=2, layer_bytes=32 * 1024)
    return b"".join(stack.docker().api.get_image(name))


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_a_docker_save_archive_is_pushed_without_any_daemon(stack, store, gz):
    name = f"saved-{uuid.uuid4().hex[:8]}:v1"
    archive = _docker_save(stack, name)
    image_id = stack.docker().images.get(name).id
    archive = gzip.compress(archive, compresslevel=1) if gz else archive
    daemon_images = sorted(image.id for image in stack.docker().images.list(all=True))
    repository = f"uploads/saved-{uuid.uuid4().hex[:8]}"
    targets = [{"registry": "local", "repository": repository, "tags": ["v1"]},
               {"registry": "ecr", "repository": repository, "tags": ["v1", "v1.0"]}]
    job = store.api.wait(submit(store.api, archive, targets, create_repository=True)["id"], timeout=180)
    assert job["state"] == "succeeded", job
    assert job["archive"]["format"] == "docker-archive" and "daemon" not in job
    digest = job["archive"]["digest"]
    # skopeo made the manifest, once: every target serves that one digest
    assert stack.registry_digest(stack.registry, repository, "v1") == digest
    for tag in ("v1", "v1.0"):
        assert stack.skopeo_digest(f"{stack.ecr_host}/{repository}:{tag}") == digest
    assert [t["digest"] for t in job["targets"]] == [digest, digest]
    # and it is the daemon's image: the same config (the image id is its digest)
    status, pushed = manifest(stack, stack.registry, repository, "v1")
    assert status == 200 and pushed["config"]["digest"] == image_id
    # no daemon was involved: the stack's daemon has exactly the images it had
    assert sorted(image.id for image in stack.docker().images.list(all=True)) == daemon_images
    wait_gone(store, job["id"])


def test_an_unknown_blob_in_a_valid_looking_layout_fails_the_job_invalid_archive(store, tmp_path):
    """What the API cannot tell from the headers alone, the worker finds: a manifest naming a
    layer that is not in the archive."""
    layout = tmp_path / "layout"
    ia.oci_archive(layout, platforms=("linux/amd64",))
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    document = json.loads(manifest_path.read_bytes())
    document["layers"][0]["digest"] = "sha256:" + "1" * 64
    raw = json.dumps(document).encode()
    manifest_path.unlink()
    digest = hashlib.sha256(raw).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(raw)
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))
    job = store.api.wait(submit(store.api, ia.tar_of_directory(layout), [{"registry": "local", "repository": "uploads/broken", "tags": ["v1"]}])["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "invalid_archive", job
    assert "sha256:" + "1" * 64 in job["error"]["message"]
    wait_gone(store, job["id"])


def test_a_bad_archive_is_refused_at_submit_and_nothing_is_stored(store):
    before = store.objects()
    resp = upload(store.api, ia.tar(ia.docker_archive_entries(2)), [{"registry": "local", "repository": "uploads/x", "tags": ["v1"]}])
    assert resp.status_code == 422 and resp.headers["Content-Type"] == "application/problem+json", resp.text
    assert resp.json()["code"] == "invalid_archive" and resp.json()["errors"][0]["field"] == "image"
    assert store.objects() == before


def test_cancelling_a_queued_upload_deletes_it(store, tmp_path):
    jobs_worker = "jobs" if store.name == "uploads-s3" else "worker"
    store.stop_worker(jobs_worker)  # nobody takes the job: it stays queued
    try:
        archive, _ = ia.oci_archive(tmp_path / "layout")
        job = submit(store.api, archive, [{"registry": "local", "repository": "uploads/cancelled", "tags": ["v1"]}])
        assert job["id"] in store.objects()
        assert store.api.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
        wait_gone(store, job["id"])
    finally:
        _no_daemon_worker(store, jobs_worker, "jobs" if jobs_worker == "jobs" else "jobs,control")


def test_the_same_idempotency_key_gives_the_same_job_and_keeps_one_upload(store, tmp_path):
    archive, image = ia.oci_archive(tmp_path / "layout")
    targets = [{"registry": "local", "repository": f"uploads/idem-{uuid.uuid4().hex[:8]}", "tags": ["v1"]}]
    key = {"Idempotency-Key": f"upload-{uuid.uuid4()}"}
    first, again = (upload(store.api, archive, targets, headers=key) for _ in range(2))
    assert first.status_code == again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    other, _ = ia.oci_archive(tmp_path / "other")
    conflict = upload(store.api, other, targets, headers=key)
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    done = store.api.wait(first.json()["id"], timeout=120)
    assert done["state"] == "succeeded" and done["targets"][0]["digest"] == image.digest
    time.sleep(1)
    assert not [key for key in store.objects()]  # the replay's and the conflict's uploads were never kept


# --- size and memory ----------------------------------------------------------------------


def _raw_post(port: int, head: bytes, pieces) -> tuple[bytes, int]:
    """Send ``head``, then ``pieces`` from a thread for as long as the server reads them; the
    server's answer, and how many body bytes it took by then (its socket buffers included)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = [0]

    def send() -> None:
        try:
            for piece in pieces:
                sock.sendall(piece)
                sent[0] += len(piece)
        except OSError:  # the server closed the connection: it reads no more
            pass

    try:
        sock.sendall(head)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            answer += data
        sender.join(timeout=30)
        return answer, sent[0]
    finally:
        sock.close()


def test_past_max_archive_bytes_is_413_and_the_rest_is_never_read(directory_store):
    api, before = directory_store.api, directory_store.objects()
    head, _, content_type = ia.multipart_around({"targets": [{"registry": "local", "repository": "uploads/big", "tags": ["v1"]}]})
    piece = bytes(1 << 20)
    count = 2 * SMALL_LIMIT // len(piece)  # twice the limit, never all read
    head += ia.tar_header("layer.tar", count * len(piece))  # a valid tar as far as it goes
    # announced: refused before a byte of the body is read
    request = f"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
    answer, sent = _raw_post(directory_store.port, f"{request}Content-Length: {len(head) + count * len(piece)}\r\n\r\n".encode(),
                             [head] + [piece] * count)
    assert answer.startswith(b"HTTP/1.1 413") and b"archive_too_large" in answer and b"Connection: close" in answer, answer[:300]
    assert sent < SMALL_LIMIT, sent
    # chunked: refused once the archive passes the limit, and the rest is not read
    chunked = [b"%x\r\n%s\r\n" % (len(head), head)] + [b"%x\r\n%s\r\n" % (len(piece), piece)] * count
    answer, sent = _raw_post(directory_store.port, f"{request}Transfer-Encoding: chunked\r\n\r\n".encode(), chunked)
    assert answer.startswith(b"HTTP/1.1 413") and b"archive_too_large" in answer, answer[:300]
    assert sent < SMALL_LIMIT + 16 * 2**20, sent  # the limit and the sockets' buffers, not twice the limit
    assert directory_store.objects() == before
    assert not list((directory_store.store / ".incoming").iterdir())  # no spool file left either
    assert api.get("/healthz").status_code == 200


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _gunicorn_workers(arbiter: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{arbiter}/task/{arbiter}/children").read_text().split()]


@pytest.fixture(scope="module")
def big_uploads(stack):
    """An API alone (no worker: its jobs stay queued), a directory store, a 2 GiB limit."""
    path = stack.tmp / "artifacts-big"
    svc = Service(stack, _config(stack, {"type": "directory", "path": str(path)}, max_archive_bytes=2 * 1024**3), "uploads-big",
                  redis_db=15)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    svc.store = path
    return svc


def test_a_1_gib_upload_leaves_the_apis_memory_where_it_was(stack, big_uploads, tmp_path):
    api = big_uploads.api
    targets = [{"registry": "local", "repository": "uploads/huge", "tags": ["v1"]}]
    for _ in range(4):  # every worker process has served an upload: what a first one loads is loaded
        _, small = ia.padded_oci_archive_stream(tmp_path / f"warm-{uuid.uuid4().hex[:6]}", 4 * 1024 * 1024)
        job = submit(api, b"".join(small), targets)
        api.post(f"/v1/jobs/{job['id']}/cancel")
    workers = _gunicorn_workers(stack.proc(f"{big_uploads.name}-api").pid)
    before = {pid: _rss(pid) for pid in workers}
    size, stream = ia.padded_oci_archive_stream(tmp_path / "huge", 1024**3)
    head, tail, content_type = ia.multipart_around({"targets": targets})

    def body():
        yield head
        yield from stream
        yield tail

    resp = requests.post(api.base_url + "/v1/publish", data=body(), headers={"Content-Type": content_type}, timeout=600)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["archive"]["bytes"] == size > 1024**3
    after = {pid: _rss(pid) for pid in workers}
    grown = {pid: (after[pid] - before[pid]) / 2**20 for pid in workers}
    assert max(grown.values()) < 50, f"MiB grown per gunicorn worker: {grown}"
    stored = big_uploads.store / job["id"]
    assert stored.stat().st_size == size
    # cancelled while queued: the API deletes its upload
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    assert not stored.exists()


def test_a_build_context_waits_in_the_artifact_store(big_uploads, tmp_path):
    api, r = big_uploads.api, redis.Redis.from_url(big_uploads.redis_url)
    context = ia.tar([("Dockerfile", b"FROM scratch\nCOPY a /a\n"), ("a", os.urandom(64 * 1024))], gz=True)
    resp = api.http.post(api.base_url + "/v1/build", files={
        "request": (None, json.dumps({"targets": [{"registry": "local", "repository": "uploads/built", "tags": ["v1"]}]}), "application/json"),
        "context": ("context.tar.gz", context, "application/gzip"),
    }, timeout=60)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert (big_uploads.store / job["id"]).read_bytes() == context
    assert not [key for key in r.scan_iter("imagepub:*") if r.type(key) == b"string" and r.strlen(key) >= len(context)]
    api.post(f"/v1/jobs/{job['id']}/cancel")
    assert not (big_uploads.store / job["id"]).exists()


# --- the sweeper --------------------------------------------------------------------------


def test_the_sweeper_deletes_what_no_job_will(stack, store, monkeypatch):
    """Uploads whose job ended without deleting them (its worker died), or whose job never came
    (the API died in between) once the grace is over; never a queued job's, nor a fresh one."""
    from service.artifacts import ORPHAN_GRACE_SECONDS
    from workers.artifacts import from_config
    from workers.supervisor import Supervisor

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):  # a worker's credentials, here
        monkeypatch.setenv(name, stack.env()[name])
    settings = config.parse(store.config, {"IMAGEPUB_REDIS_URL": store.redis_url})
    artifacts = from_config(settings)
    job_store = JobStore.from_config(settings)
    ended = store.api.wait(submit(store.api, ia.tar(ia.docker_archive_entries(1)), [{"registry": "local", "repository": "uploads/swept", "tags": ["v1"]}])["id"])
    assert ended["state"] in ("succeeded", "failed")
    wait_gone(store, ended["id"])
    orphan, fresh = new_job_id(), new_job_id()
    for key in (ended["id"], orphan, fresh):
        _put(store, artifacts, key, b"leftover")
    _age(store, orphan, ORPHAN_GRACE_SECONDS + 60)
    supervisor = Supervisor(settings, job_store, JobQueue.from_config(settings), "test-sweeper", artifacts=artifacts)
    job_store.redis.delete("imagepub:supervisor:uploads")
    swept = supervisor.sweep_uploads()
    keep_fresh = store.name == "uploads-s3"  # moto's objects cannot be aged: only the ended job's is swept there
    assert sorted(swept) == sorted([ended["id"]] + ([] if keep_fresh else [orphan]))
    assert fresh in store.objects() and ended["id"] not in store.objects()
    artifacts.delete(fresh)
    artifacts.delete(orphan)


def _put(store, artifacts, key: str, data: bytes) -> None:
    if store.name == "uploads-s3":
        artifacts.client.put_object(Bucket=BUCKET, Key="uploads/" + key, Body=data)
    else:
        (store.store / key).write_bytes(data)


def _age(store, key: str, seconds: float) -> None:
    if store.name != "uploads-s3":
        old = time.time() - seconds
        os.utime(store.store / key, (old, old))


# --- the command line ---------------------------------------------------------------------


def _cli(api, *args: str, env: dict | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([imagepub_command(), *args, "--url", api.base_url], capture_output=True, timeout=300, input=stdin,
                          env={**os.environ, **(env or {})})


def test_the_cli_uploads_a_file_and_stdin(stack, directory_store, tmp_path):
    archive, image = ia.oci_archive(tmp_path / "layout", gz=True)
    path = tmp_path / "image.oci.tar.gz"
    path.write_bytes(archive)
    repository = f"uploads/cli-{uuid.uuid4().hex[:8]}"
    done = _cli(directory_store.api, "publish", "--archive", str(path), "--to", f"local/{repository}:v1", "--wait")
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "uploading " + str(path) in out and "uploaded " in out and "succeeded" in out
    assert f"pushed {stack.registry}/{repository}:v1 {image.digest}" in out
    piped = _cli(directory_store.api, "publish", "--archive", "-", "--to", f"local/{repository}:piped", "--wait", "--json", stdin=archive)
    assert piped.returncode == 0, piped.stderr.decode()
    assert json.loads(piped.stdout)["targets"][0]["digest"] == image.digest  # --json: the job document alone
    assert stack.registry_digest(stack.registry, repository, "piped") == image.digest


def test_the_cli_uploads_an_image_from_its_own_docker_daemon(stack, directory_store):
    name = f"cli-upload-{uuid.uuid4().hex[:8]}:v1"
    stack.build_image(name, layers=2, layer_bytes=32 * 1024)
    image_id = stack.docker().images.get(name).id
    repository = f"uploads/cli-{uuid.uuid4().hex[:8]}"
    done = _cli(directory_store.api, "publish", name, "--upload", "--to", f"local/{repository}:v1", "--wait",
                env={"DOCKER_HOST": stack.docker_host})
    assert done.returncode == 0, done.stderr.decode()
    assert f"uploading {name} from the Docker daemon" in done.stdout.decode()
    status, pushed = manifest(stack, stack.registry, repository, "v1")
    assert status == 200 and pushed["config"]["digest"] == image_id
    missing = _cli(directory_store.api, "publish", "nothing-here:v1", "--upload", "--to", f"local/{repository}:v2",
                   env={"DOCKER_HOST": stack.docker_host})
    assert missing.returncode == 2 and "image_not_found" in missing.stderr.decode()
