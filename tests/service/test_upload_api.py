"""Publishing an uploaded image archive, the API's side (in-process, real Redis, a directory
artifact store in a temporary folder): what is accepted and recorded, and every kind of archive
refused at the door with 422 ``invalid_archive`` on the ``image`` part, nothing left stored.
The whole path to the registries is tests/e2e/test_upload.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time

import pytest

from service import config
from service.app import create_app

import image_archives as ia
from clients import CLIENTS, TOKENS, bearer
from helpers import CheckedClient, problem

from service.auth import hash_token

TARGETS = [{"registry": "local", "repository": "team/app", "tags": ["1.0"]}]


@pytest.fixture
def store(tmp_path):
    return tmp_path / "artifacts"


@pytest.fixture
def upload_app(redis_url, redis_client, store):
    settings = config.parse({
        "registries": {"local": {"type": "registry", "host": "localhost:5000"}},
        "limits": {"max_archive_bytes": 256 * 1024, "max_body_bytes": 4096},
        "artifacts": {"type": "directory", "path": str(store)},
        "clients": [{"name": name, "token_sha256": hash_token(TOKENS[name]), **rules} for name, rules in CLIENTS.items()],
    }, {"IMAGEPUB_REDIS_URL": redis_url})
    return create_app(settings)


@pytest.fixture
def client(upload_app) -> CheckedClient:
    return CheckedClient(upload_app.test_client(), headers=bearer("admin"))


def post(client, image: bytes | None, request: dict | None = None, **kw):
    body, content_type = ia.multipart(request or {"targets": TARGETS}, image, **kw)
    return client.post("/v1/publish", data=body, content_type=content_type)


def stored(store) -> list[str]:
    """What the artifact store holds: uploads, and spool files of uploads in progress."""
    if not store.exists():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_file()) + sorted(p.name for p in (store / ".incoming").glob("*"))


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_an_oci_layout_is_accepted_recorded_and_stored(client, store, tmp_path, gz):
    data, _ = ia.oci_archive(tmp_path / "layout", gz=gz)
    resp = post(client, data)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert job["kind"] == "publish" and "source" not in job["request"] and "daemon" not in job
    assert job["archive"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "format": "oci-archive"}
    assert (store / job["id"]).read_bytes() == data
    assert stored(store) == [job["id"]]


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_a_docker_save_archive_is_accepted(client, store, gz):
    data = ia.tar(ia.docker_archive_entries(1), gz=gz)
    resp = post(client, data, request_first=False)  # the parts in either order
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.get_json()["archive"]["format"] == "docker-archive"


def _oci_entries(tmp_path) -> list[tuple[str, bytes]]:
    data, _ = ia.oci_archive(tmp_path / "layout", platforms=("linux/amd64",))
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def _index_of_two(tmp_path) -> bytes:
    entries = _oci_entries(tmp_path)
    index = json.loads(dict(entries)["index.json"])
    other = dict(index["manifests"][0], digest="sha256:" + "0" * 64)
    index["manifests"].append(other)
    return ia.tar([(n, d) if n != "index.json" else (n, json.dumps(index).encode()) for n, d in entries])


def _missing_blob(tmp_path) -> bytes:
    entries = _oci_entries(tmp_path)
    wanted = json.loads(dict(entries)["index.json"])["manifests"][0]["digest"].split(":")[1]
    return ia.tar([(n, d) for n, d in entries if not n.endswith(wanted)])


BAD = {
    "not-a-tar": lambda tmp: os.urandom(5000),
    "gzip-of-garbage": lambda tmp: gzip.compress(os.urandom(5000)),
    "damaged-gzip": lambda tmp: ia.tar(ia.docker_archive_entries(1), gz=True)[:-200],
    "neither-layout": lambda tmp: ia.tar([("hello.txt", b"hello")]),
    "two-docker-images": lambda tmp: ia.tar(ia.docker_archive_entries(2)),
    "docker-layer-missing": lambda tmp: ia.tar([e for e in ia.docker_archive_entries(1) if not e[0].endswith("layer.tar")]),
    "manifest-json-not-json": lambda tmp: ia.tar([("manifest.json", b"{not json")]),
    "dot-dot": lambda tmp: ia.tar(ia.docker_archive_entries(1) + [("../escape.txt", b"x")]),
    "dot-dot-inside": lambda tmp: ia.tar(ia.docker_archive_entries(1) + [("blobs/../../escape.txt", b"x")]),
    "absolute": lambda tmp: ia.tar([("/etc/cron.d/x", b"x")] + ia.docker_archive_entries(1)),
    "symlink-out": lambda tmp: ia.tar(ia.docker_archive_entries(1) + [("evil", ia.link(tarfile.SYMTYPE, "../../etc/passwd"))]),
    "absolute-symlink": lambda tmp: ia.tar(ia.docker_archive_entries(1) + [("evil", ia.link(tarfile.SYMTYPE, "/etc/passwd"))]),
    "hardlink-out": lambda tmp: ia.tar(ia.docker_archive_entries(1) + [("evil", ia.link(tarfile.LNKTYPE, "../outside"))]),
    "device": lambda tmp: ia.tar(ia.docker_archive_entries(1) + [("dev", ia.link(tarfile.CHRTYPE))]),
    "fifo": lambda tmp: ia.tar(ia.docker_archive_entries(1) + [("fifo", ia.link(tarfile.FIFOTYPE))]),
    "oci-two-images": _index_of_two,
    "oci-blob-missing": _missing_blob,
    "oci-layout-not-json": lambda tmp: ia.tar([("oci-layout", b"nope"), ("index.json", b'{"manifests": []}')]),
    "huge-manifest-json": lambda tmp: ia.tar([("manifest.json", b" " * (1024 * 1024 + 1))], gz=True),
    "empty": lambda tmp: b"",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_archive_is_422_invalid_archive_on_image_and_nothing_is_stored(client, store, tmp_path, kind, redis_client):
    resp = post(client, BAD[kind](tmp_path))
    body = problem(resp, 422, "invalid_archive")
    assert body["errors"][0]["field"] == "image", body
    assert stored(store) == []
    assert not redis_client.keys("imagepub:job:*")  # no job either


def test_a_gzip_bomb_is_refused_once_it_unpacks_past_its_bound(client, store):
    # 4 × max_archive_bytes (256 KiB) unpacked is the bound: 2 MiB of zeros inside one file
    bomb = ia.tar(ia.docker_archive_entries(1) + [("zeros", bytes(2 * 1024 * 1024))], gz=True)
    assert len(bomb) < 256 * 1024
    body = problem(post(client, bomb), 422, "invalid_archive")
    assert "unpacks to more than" in body["errors"][0]["message"] and "max_archive_bytes" in body["errors"][0]["message"]
    assert stored(store) == []


def test_past_max_archive_bytes_is_413(client, store):
    data = ia.tar(ia.docker_archive_entries(1) + [("big", os.urandom(300 * 1024))])
    problem(post(client, data), 413, "archive_too_large")
    assert stored(store) == []


def test_a_request_part_past_max_body_bytes_is_413(client, store):
    data = ia.tar(ia.docker_archive_entries(1))
    request = {"targets": TARGETS, "callback_url": "https://example.com/" + "a" * 5000}
    problem(post(client, data, request), 413, "payload_too_large")


@pytest.mark.parametrize("request_body, field", [
    ({"source": "app:1", "targets": TARGETS}, "source"),
    ({"targets": TARGETS, "daemon": "a"}, "daemon"),
    ({"targets": [{"registry": "nowhere", "repository": "team/app", "tags": ["1"]}]}, "targets.0.registry"),
    ({"targets": [{"registry": "local", "repository": "Team/App", "tags": ["1"]}]}, "targets.0.repository"),
])
def test_the_request_part_is_validated_like_a_publish(client, store, request_body, field):
    body = problem(post(client, ia.tar(ia.docker_archive_entries(1)), request_body), 422,
                   "registry_not_configured" if field.endswith("registry") else "validation_failed")
    assert [e["field"] for e in body["errors"]] == [field]
    assert stored(store) == []


def test_a_client_may_upload_only_into_its_repositories(upload_app, store):
    other = CheckedClient(upload_app.test_client(), headers=bearer("team-b"))  # team-b/* only
    body = problem(post(other, ia.tar(ia.docker_archive_entries(1)), {"targets": TARGETS}), 403, "forbidden")
    assert body["errors"][0]["field"] == "targets.0.repository"
    assert stored(store) == []


@pytest.mark.parametrize("parts, field", [
    ({"request": True, "image": False}, "image"),
    ({"request": False, "image": True}, "request"),
])
def test_missing_parts_are_named(client, store, parts, field):
    body, content_type = ia.multipart({"targets": TARGETS}, ia.tar(ia.docker_archive_entries(1)) if parts["image"] else None)
    if not parts["request"]:
        body = body[body.index(b"--imagepub-test", 10):]  # the image part alone
    resp = client.post("/v1/publish", data=body, content_type=content_type)
    assert [e["field"] for e in problem(resp, 422, "validation_failed")["errors"]] == [field]
    assert stored(store) == []


def test_a_malformed_multipart_body_is_400(client, store):
    resp = client.post("/v1/publish", data=b"--nope\r\nno headers end", content_type="multipart/form-data; boundary=imagepub-test")
    problem(resp, 400, "invalid_multipart")
    resp = client.post("/v1/publish", data=b"x", content_type="multipart/form-data")
    problem(resp, 400, "invalid_multipart")


def test_the_same_idempotency_key_replays_and_the_second_upload_is_not_kept(client, store, tmp_path):
    data, _ = ia.oci_archive(tmp_path / "layout")
    body, content_type = ia.multipart({"targets": TARGETS}, data)
    first = client.post("/v1/publish", data=body, content_type=content_type, headers={"Idempotency-Key": "upload-1"})
    again = client.post("/v1/publish", data=body, content_type=content_type, headers={"Idempotency-Key": "upload-1"})
    assert first.status_code == again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_json()["id"] == first.get_json()["id"]
    assert stored(store) == [first.get_json()["id"]]
    other, _ = ia.oci_archive(tmp_path / "other")
    body, content_type = ia.multipart({"targets": TARGETS}, other)
    resp = client.post("/v1/publish", data=body, content_type=content_type, headers={"Idempotency-Key": "upload-1"})
    problem(resp, 409, "idempotency_conflict")  # the archive is part of the request
    assert stored(store) == [first.get_json()["id"]]


def test_cancelling_a_queued_upload_deletes_it(client, store):
    job = post(client, ia.tar(ia.docker_archive_entries(1))).get_json()
    assert stored(store) == [job["id"]]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").get_json()["state"] == "cancelled"
    assert stored(store) == []


def test_a_build_context_waits_in_the_artifact_store_not_in_redis(client, store, redis_client):
    context = ia.tar([("Dockerfile", b"FROM scratch\nCOPY a /a\n"), ("a", b"a")], gz=True)
    resp = client.post("/v1/build", data={
        "request": json.dumps({"targets": TARGETS}),
        "context": (io.BytesIO(context), "context.tar.gz", "application/gzip"),
    }, content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert (store / job["id"]).read_bytes() == context
    assert all(len(redis_client.get(key) or "") < 4096 for key in redis_client.keys("imagepub:job:*") if redis_client.type(key) == "string")
    assert not redis_client.exists(f"imagepub:job:{job['id']}:context")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert stored(store) == []


def test_a_full_queue_is_503_before_the_archive_is_read(redis_url, redis_client, store):
    settings = config.parse({
        "registries": {"local": {"type": "registry", "host": "localhost:5000"}},
        "limits": {"max_queued_jobs": 1},
        "artifacts": {"type": "directory", "path": str(store)},
        "auth": {"anonymous": True},
    }, {"IMAGEPUB_REDIS_URL": redis_url})
    client = CheckedClient(create_app(settings).test_client())
    queued = post(client, ia.tar(ia.docker_archive_entries(1))).get_json()
    time.sleep(0.2)  # the queue depth is read at most every 0.1 s
    body, content_type = ia.multipart({"targets": TARGETS}, ia.tar(ia.docker_archive_entries(1)))
    stream = _Counting(body)
    resp = client.post("/v1/publish", input_stream=stream, content_length=len(body), content_type=content_type)
    problem(resp, 503, "queue_full")
    assert stream.read_bytes == 0  # the client's upload was not taken only to be refused
    assert stored(store) == [queued["id"]]


class _Counting(io.BytesIO):
    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.read_bytes += n
        return n
