"""The audit trail against real Redis: the chain (its SHA-256 in Lua, concurrent appends, every
way of breaking it that `verify` must name, retention that keeps it verifiable), the decisions
the API records for every kind of answer, and GET /v1/audit (scope, filters, pagination)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
import time
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from clients import bearer
from helpers import GOOD, CheckedClient, problem
from service import audit as trail
from service import cli_audit
from service.app import create_app
from service.audit import AuditLog, Query, link
from service.audit_lua import SHA256
from service.auth import hash_token
from service.config import Client

AUDITOR = "imp_test-auditor-token"
DIGEST_A, DIGEST_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@pytest.fixture
def settings(settings):
    """The suite's clients, and one that may read the trail and nothing else."""
    return replace(settings, clients=settings.clients + (Client("auditor", hash_token(AUDITOR), frozenset({"audit"})),))


@pytest.fixture
def auditor(app) -> CheckedClient:
    return CheckedClient(app.test_client(), headers={"Authorization": f"Bearer {AUDITOR}"})


@pytest.fixture
def log(redis_url, redis_client) -> AuditLog:
    return AuditLog(redis.Redis.from_url(redis_url))


def rewrite(raw: redis.Redis, change, key="imagepub:audit") -> None:
    """Rewrite the stream as someone with Redis access would to edit an entry (a stream entry
    cannot be changed in place): every entry again, under its own id, ``change`` applied."""
    entries = raw.xrange(key)
    raw.delete(key)
    for i, (entry_id, fields) in enumerate(entries):
        raw.xadd(key, change(i, dict(fields)), id=entry_id)


def entry(i: int = 0, **fields) -> dict:
    return {"action": "publish", "outcome": "accepted", "client": "ci", "request_id": f"req-{i}", "status": 202, **fields}


# --- the chain ----------------------------------------------------------------------------


def test_lua_sha256_is_sha256(redis_url):
    client = redis.Redis.from_url(redis_url)
    sha256 = client.register_script(SHA256 + "\nreturn sha256(ARGV[1])")
    for length in list(range(0, 130)) + [183, 1000, 4096]:  # every padding case around 1 and 2 blocks
        message = os.urandom(length)
        assert sha256(args=[message]) == hashlib.sha256(message).digest(), length


def test_each_entry_holds_the_hash_of_the_one_before(log):
    written = log.record(*(entry(i) for i in range(5)))
    assert [e["seq"] for e in written] == [1, 2, 3, 4, 5]
    assert written[0]["prev"] == "0" * 64
    for before, after in zip(written, written[1:]):
        assert after["prev"] == before["hash"]
    raw = log.redis.xrange(log.key)
    for (entry_id, fields), shown in zip(raw, written):  # the script's hash is link() of what is stored
        assert link(fields[b"p"], fields[b"b"], entry_id.decode(), int(fields[b"n"])).hex() == shown["hash"]
    assert log.redis.hget(log.head_key, "h").hex() == written[-1]["hash"]
    assert log.verify().ok and log.verify().entries == 5


def test_concurrent_appends_never_fork_the_chain(redis_url, log):
    def append(n: int) -> None:
        own = AuditLog(redis.Redis.from_url(redis_url))  # a process of its own, as an API worker or a Celery one
        for i in range(40):
            own.record(entry(n * 100 + i))

    threads = [threading.Thread(target=append, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raw = log.redis.xrange(log.key)
    assert [int(f[b"n"]) for _, f in raw] == list(range(1, 321))
    assert len({f[b"p"] for _, f in raw}) == 320  # no two entries link to the same predecessor
    verdict = log.verify()
    assert verdict.ok and verdict.entries == 320, verdict


BREAKS = {
    # what was done to the stream: (change to entry 2 of 5, the entry verify must name, words it uses)
    "body edited": (lambda f: {**f, b"b": f[b"b"].replace(b'"s":202', b'"s":403')}, 2, "was altered"),
    "client edited": (lambda f: {**f, b"b": f[b"b"].replace(b'"c":"ci"', b'"c":"cj"')}, 2, "was altered"),
    "prev edited": (lambda f: {**f, b"p": bytes(32)}, 1, "was altered"),
    "number edited": (lambda f: {**f, b"n": b"7"}, 2, "numbered #7"),
    "body unreadable": (lambda f: {**f, b"b": b"{not json"}, 2, "unreadable"),
}


@pytest.mark.parametrize("what", BREAKS)
def test_an_edited_entry_is_named(log, what):
    change, named, words = BREAKS[what]
    log.record(*(entry(i) for i in range(5)))
    ids = [entry_id.decode() for entry_id, _ in log.redis.xrange(log.key)]
    assert log.verify().ok
    rewrite(log.redis, lambda i, f: change(f) if i == 2 else f)
    verdict = log.verify()
    assert not verdict.ok
    assert verdict.entry == ids[named] and ids[named] in str(verdict) and words in verdict.problem, verdict


def test_the_newest_entry_edited_is_named(log):
    log.record(*(entry(i) for i in range(3)))
    newest = log.redis.xrange(log.key)[-1][0].decode()
    rewrite(log.redis, lambda i, f: {**f, b"b": f[b"b"].replace(b"req-2", b"req-9")} if i == 2 else f)
    verdict = log.verify()
    assert not verdict.ok and verdict.entry == newest and "was altered" in verdict.problem


@pytest.mark.parametrize("removed", [0, 2, 4], ids=["oldest", "middle", "newest"])
def test_a_removed_entry_is_named(log, removed):
    log.record(*(entry(i) for i in range(5)))
    ids = [entry_id.decode() for entry_id, _ in log.redis.xrange(log.key)]
    log.redis.xdel(log.key, ids[removed])
    verdict = log.verify()
    assert not verdict.ok, verdict
    assert f"#{removed + 1} is missing" in verdict.problem, verdict
    # the break is laid to the entry after the gap, or to the removed newest one (the head names it)
    assert verdict.entry == ids[removed + 1] if removed < 4 else verdict.entry == ids[4]


def test_a_removed_head_is_named(log):
    log.record(entry(1), entry(2))
    log.redis.delete(log.head_key)
    assert not log.verify().ok and "head" in log.verify().problem
    assert AuditLog(log.redis, "other:").verify().ok  # an empty trail is intact


def test_retention_trims_old_entries_and_the_rest_still_verifies(redis_url, redis_client):
    short = AuditLog(redis.Redis.from_url(redis_url), retention_seconds=1, check_every_seconds=0)
    for start in range(0, 300, 50):
        short.record(*(entry(i) for i in range(start, start + 50)))
    time.sleep(1.2)
    short.record(entry(300))
    kept = short.redis.xrange(short.key)
    assert len(kept) < 301 and kept[-1][1][b"n"] == b"301"
    anchor = short.redis.hgetall(short.anchor_key)
    assert anchor[b"id"] == kept[0][0] and anchor[b"n"] == kept[0][1][b"n"] and anchor[b"p"] == kept[0][1][b"p"]
    verdict = short.verify()
    assert verdict.ok and verdict.entries == len(kept), verdict
    # removing what retention kept is not retention: named
    short.redis.xdel(short.key, kept[0][0])
    verdict = short.verify()
    assert not verdict.ok and "were removed" in verdict.problem, verdict


def test_a_retention_longer_than_the_epoch_trims_nothing(redis_url, redis_client):
    long = AuditLog(redis.Redis.from_url(redis_url), retention_seconds=36500 * 86400, check_every_seconds=0)
    assert [e["seq"] for e in long.record(entry(1))] == [1] and [e["seq"] for e in long.record(entry(2))] == [2]
    assert long.verify().ok


def test_retention_is_its_own_not_the_jobs(settings):
    assert settings.audit.retention_days == 400
    from service.config import parse
    assert parse({"audit": {"retention_days": 30}}, {}).audit.retention_days == 30
    with pytest.raises(Exception, match="retention_days"):
        parse({"audit": {"retention_days": 0}}, {})


def test_redis_trouble_is_logged_never_raised(log, caplog):
    broken = AuditLog(redis.Redis(port=1, socket_connect_timeout=0.2))
    with caplog.at_level(logging.INFO):
        assert broken.record(entry(1)) == []
    lines = [r for r in caplog.records if r.name == "audit"]
    assert lines and lines[0].audit["stored"] is False and lines[0].audit["request_id"] == "req-1"


def test_every_entry_is_a_log_line_with_its_hash(log, caplog):
    with caplog.at_level(logging.INFO):
        written = log.record(entry(1), entry(2, outcome="refused", code="forbidden", status=403))
    lines = [r.audit for r in caplog.records if r.name == "audit"]
    assert lines == written
    assert [e for e in log.export()] == written  # the export is the same form


# --- the decisions the API records ------------------------------------------------------------


def entries(auditor, **params) -> list[dict]:
    resp = auditor.get("/v1/audit", query_string={"limit": 1000, **params})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["entries"]


def by_request(auditor, request_id: str) -> dict:
    found = [e for e in entries(auditor) if e["request_id"] == request_id]
    assert len(found) == 1, found
    return found[0]


def test_accepted_submissions_are_recorded_with_what_they_name(as_client, auditor):
    ci = as_client("ci")
    job = ci.post("/v1/publish", json=GOOD, headers={"X-Request-Id": "pub-1"}).get_json()
    got = by_request(auditor, "pub-1")
    assert got | {"id": None, "time": None, "seq": None, "prev": None, "hash": None} == {
        "id": None, "seq": None, "time": None, "action": "publish", "outcome": "accepted", "status": 202, "code": None,
        "reason": None, "client": "ci", "request_id": "pub-1", "job_id": job["id"], "attempt": None, "registry": None,
        "repository": None, "tag": None, "digest": None, "source": "python-lab:latest",
        "targets": [{"registry": "local", "repository": "team/app", "tags": ["latest", "1.4.2"]}], "prev": None, "hash": None}
    pull = ci.post("/v1/pull", json={"registry": "local", "repository": "team/app", "digest": DIGEST_A},
                   headers={"X-Request-Id": "pull-1"}).get_json()
    got = by_request(auditor, "pull-1")
    assert (got["action"], got["job_id"], got["registry"], got["repository"], got["digest"]) == ("pull", pull["id"], "local", "team/app", DIGEST_A)
    copy = ci.post("/v1/copy", json={"source": {"registry": "local", "repository": "team/app", "tag": "v1"},
                                     "targets": [{"registry": "hub", "repository": "team/app", "tags": ["v1"]}]},
                   headers={"X-Request-Id": "copy-1"})
    assert copy.status_code == 202, copy.get_data(as_text=True)
    got = by_request(auditor, "copy-1")
    assert (got["registry"], got["repository"], got["tag"], got["targets"]) == (
        "local", "team/app", "v1", [{"registry": "hub", "repository": "team/app", "tags": ["v1"]}])
    assert ci.post(f"/v1/jobs/{job['id']}/cancel", headers={"X-Request-Id": "cancel-1"}).status_code == 200
    got = by_request(auditor, "cancel-1")
    assert (got["action"], got["outcome"], got["status"], got["job_id"]) == ("cancel", "accepted", 200, job["id"])


def test_an_accepted_build_is_recorded_with_its_targets(as_client, auditor):
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", b"FROM scratch\nCOPY a /a\n"), ("a", b"a")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    targets = [{"registry": "local", "repository": "team/built", "tags": ["1"]}]
    resp = as_client("admin").post("/v1/build", headers={"X-Request-Id": "build-1"}, content_type="multipart/form-data",
                                   data={"request": json.dumps({"targets": targets}), "context": (io.BytesIO(context.getvalue()), "c.tar")})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    got = by_request(auditor, "build-1")
    assert (got["action"], got["outcome"], got["client"], got["job_id"], got["targets"]) == (
        "build", "accepted", "admin", resp.get_json()["id"], targets)


def test_an_uploaded_archive_is_recorded_by_its_sha256(settings, redis_client, tmp_path):
    import image_archives as ia
    from service.config import Artifacts

    uploads = replace(settings, artifacts=Artifacts(type="directory", path=str(tmp_path / "artifacts")),
                      limits=replace(settings.limits, max_archive_bytes=256 * 1024))
    app = create_app(uploads)
    data, _ = ia.oci_archive(tmp_path / "layout")
    body, content_type = ia.multipart({"targets": [{"registry": "local", "repository": "team/app", "tags": ["1.0"]}]}, data)
    client = CheckedClient(app.test_client(), headers={**bearer("ci"), "X-Request-Id": "upload-1"})
    assert client.post("/v1/publish", data=body, content_type=content_type).status_code == 202
    reader = CheckedClient(app.test_client(), headers={"Authorization": f"Bearer {AUDITOR}"})
    got = by_request(reader, "upload-1")
    assert got["source"] == f"oci-archive sha256:{hashlib.sha256(data).hexdigest()}"
    assert got["targets"] == [{"registry": "local", "repository": "team/app", "tags": ["1.0"]}]


JOB = "0190f2a4-0000-7000-8000-000000000000"
REFUSALS = [
    # (client, action, path, body, headers, expected status, code, reason)
    (None, "publish", "/v1/publish", GOOD, {}, 401, "unauthorized", "token_missing"),
    ("bad-token", "publish", "/v1/publish", GOOD, {}, 401, "unauthorized", "token_invalid"),
    ("bad-token", "cancel", f"/v1/jobs/{JOB}/cancel", None, {}, 401, "unauthorized", "token_invalid"),
    ("reader", "publish", "/v1/publish", GOOD, {}, 403, "forbidden", None),
    ("ci", "publish", "/v1/publish", {**GOOD, "targets": [{"registry": "local", "repository": "prod/app", "tags": ["1"]}]}, {},
     403, "forbidden", None),
    ("ci", "publish", "/v1/publish", {**GOOD, "targets": [{"registry": "local", "repository": "team/app", "tags": ["bad tag"]}]}, {},
     422, "validation_failed", None),
    ("ci", "publish", "/v1/publish", {**GOOD, "targets": [{"registry": "nowhere", "repository": "team/app", "tags": ["1"]}]}, {},
     422, "registry_not_configured", None),
    ("ci", "publish", "/v1/publish", {"source": "x" * 5000}, {}, 413, "payload_too_large", None),
    ("ci", "publish", "/v1/publish", "not json", {"Content-Type": "text/plain"}, 415, "unsupported_media_type", None),
    ("ci", "pull", "/v1/pull", {"registry": "local", "repository": "Team/App"}, {}, 422, "validation_failed", None),
    ("reader", "copy", "/v1/copy", {"source": {"registry": "local", "repository": "team/app"}, "targets": []}, {}, 403, "forbidden", None),
    ("ci", "cancel", f"/v1/jobs/{JOB}/cancel", None, {}, 404, "job_not_found", None),
    ("ci", "create_repository", "/v1/registries/prod-ecr/repositories", {"name": "other/app"}, {}, 403, "forbidden", None),
    ("reader", "build", "/v1/build", GOOD, {}, 403, "forbidden", None),
    ("ci", "build", "/v1/build", GOOD, {}, 403, "forbidden", None),
]


@pytest.mark.parametrize("who, action, path, body, headers, status, code, reason", REFUSALS,
                         ids=[f"{r[1]}-{r[5]}-{r[6]}" for r in REFUSALS])
def test_refused_submissions_are_recorded_with_their_code(app, auditor, who, action, path, body, headers, status, code, reason):
    auth = {} if who is None else {"Authorization": "Bearer imp_not-a-real-token"} if who == "bad-token" else bearer(who)
    client = CheckedClient(app.test_client(), headers={**auth, "X-Request-Id": f"refused-{status}", **headers})
    kwargs = {"json": body} if not isinstance(body, str) else {"data": body}
    problem(client.open(path, method="POST", **kwargs), status, code)
    got = by_request(auditor, f"refused-{status}")
    assert (got["action"], got["outcome"], got["status"], got["code"], got["reason"]) == (action, "refused", status, code, reason)
    assert got["client"] == (who if who not in (None, "bad-token") else None)
    if action == "cancel":
        assert got["job_id"] == JOB  # a well-formed job id in the path is named
    if action == "create_repository":
        assert got["registry"] == "prod-ecr"


def test_a_refused_repository_is_named_when_the_body_was_valid(as_client, auditor):
    as_client("ci").post("/v1/publish", headers={"X-Request-Id": "prod"},
                         json={**GOOD, "targets": [{"registry": "local", "repository": "prod/app", "tags": ["1"]},
                                                   {"registry": "local", "repository": "team/app", "tags": ["1"]}]})
    got = by_request(auditor, "prod")
    assert got["targets"] == [{"registry": "local", "repository": "prod/app", "tags": ["1"]},
                              {"registry": "local", "repository": "team/app", "tags": ["1"]}]
    assert entries(auditor, repository="prod/*", outcome="refused") == [got]


def test_rate_limited_and_conflicting_requests_are_recorded(as_client, auditor):
    limited = as_client("limited")
    for _ in range(3):
        assert limited.post("/v1/publish", json=GOOD).status_code == 202
    problem(limited.post("/v1/publish", json=GOOD, headers={"X-Request-Id": "too-many"}), 429, "too_many_requests")
    got = by_request(auditor, "too-many")
    assert (got["client"], got["status"], got["code"]) == ("limited", 429, "too_many_requests")
    ci = as_client("ci")
    ci.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "k1"})
    other = {**GOOD, "source": "python-lab:2"}
    problem(ci.post("/v1/publish", json=other, headers={"Idempotency-Key": "k1", "X-Request-Id": "conflict"}), 409, "idempotency_conflict")
    assert by_request(auditor, "conflict")["code"] == "idempotency_conflict"


def test_no_token_and_no_request_body_value_is_ever_recorded(app, auditor, redis_url):
    canary = "imp_canary-" + os.urandom(6).hex()
    client = app.test_client()
    client.post("/v1/publish", json=GOOD, headers={"Authorization": f"Bearer {canary}"})
    client.post("/v1/publish", json=GOOD, headers={**bearer("ci"), "X-Request-Id": canary})  # a token in the wrong header
    client.post("/v1/publish", headers=bearer("ci"), json={**GOOD, canary: 1, "callback_url": f"https://x.example/?t={canary}"})
    client.post("/v1/publish", headers=bearer("ci"), json={**GOOD, "targets": [{"registry": canary, "repository": "prod/x", "tags": ["1"]}]})
    raw = redis.Redis.from_url(redis_url)
    everything = json.dumps([[k.decode(), str(v)] for k in raw.keys("imagepub:audit*") for v in
                             (raw.xrange(k) if raw.type(k) == b"stream" else [raw.hgetall(k)])])
    assert canary not in everything and canary not in json.dumps(entries(auditor))
    assert len(entries(auditor)) == 4
    assert all(e["request_id"] != canary for e in entries(auditor))


def test_every_answer_has_a_request_id(as_client):
    ci = as_client("ci")
    assert ci.post("/v1/publish", json=GOOD, headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    for unusable in ("", "x" * 65, "has space", "-leading-dash", "imp_looks-like-a-token", "ünïcode"):
        got = ci.get("/v1/jobs", headers={"X-Request-Id": unusable}).headers["X-Request-Id"]
        assert got != unusable and len(got) == 24
    assert as_client(None).get("/healthz").headers["X-Request-Id"]
    first, second = (ci.get("/v1/jobs").headers["X-Request-Id"] for _ in range(2))
    assert first != second


def test_the_trail_survives_a_failure_to_record(app, as_client, monkeypatch, caplog):
    """A decision that could not be stored (a refusal here) is still answered and still logged."""
    def refuse(*_, **__):
        raise redis.exceptions.ConnectionError("gone")

    monkeypatch.setattr(app.extensions["imagepub"]["audit"], "_append", refuse)
    with caplog.at_level(logging.INFO):
        problem(as_client("ci").post("/v1/publish", json={**GOOD, "source": ""}, headers={"X-Request-Id": "unstored"}), 422, "validation_failed")
    lines = [r.audit for r in caplog.records if r.name == "audit"]
    assert lines and lines[-1]["request_id"] == "unstored" and lines[-1]["stored"] is False


def test_no_job_is_accepted_without_its_entry(app, as_client, monkeypatch):
    """The job and the entry of its acceptance are one script: when it fails, neither is
    written, the request is refused, and the refusal is what the trail records."""
    trail_log = app.extensions["imagepub"]["audit"]
    real = trail_log._create_and_append

    def refuse(*_, **__):
        raise redis.exceptions.ConnectionError("gone")

    monkeypatch.setattr(trail_log, "_create_and_append", refuse)
    problem(as_client("ci").post("/v1/publish", json=GOOD, headers={"X-Request-Id": "not-created"}), 503, "queue_unavailable")
    entries = [e for e in trail_log.page(trail.Query())[0] if e["request_id"] == "not-created"]
    assert [(e["outcome"], e["code"]) for e in entries] == [("refused", "queue_unavailable")]
    assert not as_client("ci").get("/v1/jobs").get_json()["jobs"]

    monkeypatch.setattr(trail_log, "_create_and_append", real)
    job = as_client("ci").post("/v1/publish", json=GOOD, headers={"X-Request-Id": "created"}).get_json()
    entries = [e for e in trail_log.page(trail.Query())[0] if e["request_id"] == "created"]
    assert [(e["outcome"], e["job_id"], e["status"]) for e in entries] == [("accepted", job["id"], 202)]


# --- GET /v1/audit ----------------------------------------------------------------------------


def test_reading_the_trail_needs_the_audit_or_admin_scope(as_client, auditor):
    for name in ("ci", "reader", "limited", "team-b"):
        problem(as_client(name).get("/v1/audit"), 403, "forbidden")
    problem(as_client(None).get("/v1/audit"), 401, "unauthorized")
    assert auditor.get("/v1/audit").status_code == 200
    assert as_client("admin").get("/v1/audit").status_code == 200


@pytest.fixture
def seeded(app):
    """A trail of 30 entries: decisions and writes of two clients in two registries."""
    log = app.extensions["imagepub"]["audit"]
    rows = []
    for i in range(30):
        client = "ci" if i % 2 else "team-b"
        if i % 3 == 0:
            rows.append({"action": "push_tag", "outcome": "written" if i % 5 else "failed", "client": client, "job_id": f"job-{i}",
                         "attempt": 1, "registry": "local" if i < 15 else "hub", "repository": f"team/app{i % 4}", "tag": f"v{i}",
                         "digest": DIGEST_A if i % 2 else DIGEST_B, "code": None if i % 5 else "push_failed"})
        else:
            rows.append(entry(i, client=client, targets=[{"registry": "prod-ecr", "repository": f"team-b/svc{i}", "tags": ["1"]}]))
    log.record(*rows[:15])
    time.sleep(0.01)
    middle = time.time()
    time.sleep(0.01)
    log.record(*rows[15:])
    return rows, middle


def test_newest_first_and_every_page_in_turn(auditor, seeded):
    rows, _ = seeded
    everything = entries(auditor)
    assert [e["seq"] for e in everything] == list(range(30, 0, -1))
    pages, cursor = [], None
    while True:
        resp = auditor.get("/v1/audit", query_string={"limit": 7, **({"cursor": cursor} if cursor else {})})
        body = resp.get_json()
        pages.append(body["entries"])
        cursor = body["next_cursor"]
        if not cursor:
            assert "Link" not in resp.headers
            break
        link_url = re.fullmatch(r'<(.+)>; rel="next"', resp.headers["Link"]).group(1)
        assert urlsplit(link_url).path == "/v1/audit" and parse_qs(urlsplit(link_url).query) == {"limit": ["7"], "cursor": [cursor]}
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
    assert [e for page in pages for e in page] == everything


FILTERS = [
    ({"client": "ci"}, lambda r: r["client"] == "ci"),
    ({"action": "push_tag", "outcome": "failed"}, lambda r: r["action"] == "push_tag" and r["outcome"] == "failed"),
    ({"digest": DIGEST_A}, lambda r: r.get("digest") == DIGEST_A),
    ({"registry": "hub"}, lambda r: r.get("registry") == "hub"),
    ({"registry": "prod-ecr"}, lambda r: bool(r.get("targets"))),
    ({"repository": "team/app[12]"}, lambda r: r.get("repository") in ("team/app1", "team/app2")),
    ({"repository": "team-b/*", "client": "team-b"}, lambda r: bool(r.get("targets")) and r["client"] == "team-b"),
]


@pytest.mark.parametrize("params, wanted", FILTERS, ids=[",".join(p) for p, _ in FILTERS])
def test_filters(auditor, seeded, params, wanted):
    rows, _ = seeded
    got = entries(auditor, **params)
    expected = [i + 1 for i, row in reversed(list(enumerate(rows))) if wanted(row)]
    assert [e["seq"] for e in got] == expected and expected


def test_job_filter_and_time_window(as_client, auditor, seeded):
    _, middle = seeded
    job = as_client("ci").post("/v1/publish", json=GOOD).get_json()
    assert [e["job_id"] for e in entries(auditor, job=job["id"])] == [job["id"]]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(middle)) + f".{int(middle % 1 * 1000):03d}Z"
    older, newer = entries(auditor, until=stamp), entries(auditor, since=stamp)
    assert [e["seq"] for e in older] == list(range(15, 0, -1))
    assert [e["seq"] for e in newer] == list(range(31, 15, -1))
    assert entries(auditor, since=stamp.replace("Z", "+02:00"), until=stamp.replace("Z", "+02:00")) == []


def test_a_page_reads_a_bounded_number_of_entries(auditor, seeded, monkeypatch):
    monkeypatch.setattr(trail, "SCAN_LIMIT", 4)
    resp = auditor.get("/v1/audit", query_string={"client": "nobody"})
    assert resp.get_json()["entries"] == [] and resp.get_json()["next_cursor"]  # short, but not the end
    seen, cursor = [], None
    while True:
        body = auditor.get("/v1/audit", query_string={"action": "push_tag", **({"cursor": cursor} if cursor else {})}).get_json()
        seen += body["entries"]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert [e["seq"] for e in seen] == [i for i in range(30, 0, -1) if (i - 1) % 3 == 0]


@pytest.mark.parametrize("param, value", [
    ("limit", "0"), ("limit", "1001"), ("cursor", "abc"), ("cursor", "99999999999999999999-0"), ("digest", "sha256:xyz"),
    ("action", "delete"), ("outcome", "maybe"), ("since", "yesterday"), ("until", "2025-02-30T00:00:00Z"),
    ("repository", "Team/App"), ("job", "not-a-job"), ("colour", "red"),
])
def test_bad_parameters_are_422_naming_the_field(auditor, param, value):
    body = problem(auditor.get("/v1/audit", query_string={param: value}), 422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == [param]


def test_the_first_and_the_last_possible_cursors(auditor, seeded):
    for first in ("0-0", "00-00", "0-000"):  # (the fuzzer's "00-00" was a 500: Redis refuses "(00-00")
        assert auditor.get("/v1/audit", query_string={"cursor": first}).get_json() == {"entries": [], "next_cursor": None}
    assert auditor.get("/v1/audit", query_string={"cursor": "0030-0", "limit": 1000}).get_json()["entries"] == []
    last = auditor.get("/v1/audit", query_string={"cursor": "9999999999999999999-9999999999999999999", "limit": 1000})
    assert [e["seq"] for e in last.get_json()["entries"]] == list(range(30, 0, -1))


def test_the_cli_knows_the_same_actions_and_outcomes():
    assert cli_audit.ACTIONS == trail.ACTIONS and cli_audit.OUTCOMES == trail.OUTCOMES


def test_query_matches_targets_and_places():
    decision = {"client": "ci", "targets": [{"registry": "hub", "repository": "team/a", "tags": ["1"]}]}
    assert Query(registry="hub").matches(decision) and Query(repository="team/*").matches(decision)
    assert not Query(registry="local").matches(decision) and not Query(repository="other/*").matches(decision)
    assert Query(repository="team/a").matches({"registry": "local", "repository": "team/a"})
