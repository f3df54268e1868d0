"""The audit trail on the real stack: ``imagepub serve`` and ``imagepub worker`` with real API
clients (no anonymous access) on a Redis database of their own.

Every tag a job writes is recorded with the digest the registry itself serves (read from the
registry, not from our job), every decision on a submission of two clients with its code, and
the trail answers who put which digest where: through the API (scope, filters, pages), the CLI,
an export; `imagepub audit verify` holds the chain and names an entry edited or removed in
Redis; the trail outlives the jobs it speaks of, and holds no secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
import redis

from service.auth import hash_token
from service_process import Api, Service, base_config, imagepub_command

TOKENS = {name: f"imp_audit-{name}-{uuid.uuid4().hex[:8]}" for name in ("team-a", "team-b", "auditor", "admin")}


@pytest.fixture(scope="module")
def audited(stack, ecr_api_proxy):
    config = base_config(stack)
    del config["auth"]
    config["clients"] = [
        {"name": "team-a", "token_sha256": hash_token(TOKENS["team-a"]), "scopes": ["publish", "pull", "read"], "repositories": ["team-a/*"]},
        {"name": "team-b", "token_sha256": hash_token(TOKENS["team-b"]), "scopes": ["publish", "pull", "read"], "repositories": ["team-b/*"]},
        {"name": "auditor", "token_sha256": hash_token(TOKENS["auditor"]), "scopes": ["audit"]},
        {"name": "admin", "token_sha256": hash_token(TOKENS["admin"]), "scopes": ["admin"]},
    ]
    svc = Service(stack, config, "audited", redis_db=11, env={"AWS_ENDPOINT_URL_ECR": ecr_api_proxy.url})
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    svc.start_worker()
    yield svc
    svc.stop_worker()


def as_(svc: Service, name: str | None, token: str | None = None) -> Api:
    api = Api(svc.api.base_url)
    if name or token:
        api.http.headers["Authorization"] = f"Bearer {token or TOKENS[name]}"
    return api


def trail(svc: Service, **params) -> list[dict]:
    """Every entry matching ``params``, newest first, through the API's pages."""
    auditor, found, cursor = as_(svc, "auditor"), [], None
    while True:
        resp = auditor.get("/v1/audit", params={**params, "limit": 200, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, resp.text
        found += resp.json()["entries"]
        cursor = resp.json()["next_cursor"]
        if not cursor:
            return found


def audit_lines(stack) -> list[dict]:
    """The `audit` logger's JSON lines from the API and the worker."""
    lines = []
    for name in ("audited-api", "audited-worker"):
        for text in stack.log(name).splitlines():
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("logger") == "audit":
                lines.append(line)
    return lines


def run_cli(svc: Service, *args: str, token: str | None = None, server: bool = False) -> subprocess.CompletedProcess:
    """``imagepub audit …``: as a client of the API, or (``server``) where the server's
    configuration is, as export and verify are run."""
    env = {"PATH": os.environ["PATH"], "IMAGEPUB_URL": svc.api.base_url}
    if token:
        env["IMAGEPUB_TOKEN"] = token
    if server:
        env.update(svc.env)
    return subprocess.run([imagepub_command(), "audit", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def published(audited, stack):
    """team-a publishes an image to two tags and copies one tag elsewhere; both succeed."""
    u = uuid.uuid4().hex[:8]
    source, repository, copied = f"team-a/audit-{u}:v1", f"team-a/app-{u}", f"team-a/copy-{u}"
    stack.build_image(source, layers=1)
    team_a = as_(audited, "team-a")
    resp = team_a.post("/v1/publish", json={"source": source, "targets": [{"registry": "local", "repository": repository, "tags": ["v1", "v2"]}]},
                       headers={"X-Request-Id": f"publish-{u}"})
    assert resp.status_code == 202, resp.text
    publish = team_a.wait(resp.json()["id"])
    assert publish["state"] == "succeeded", publish
    copy = team_a.submit("/v1/copy", {"source": {"registry": "local", "repository": repository, "tag": "v1"},
                                      "targets": [{"registry": "local", "repository": copied, "tags": ["c1"]}]})
    copy = team_a.wait(copy["id"])
    assert copy["state"] == "succeeded", copy
    return {"u": u, "source": source, "repository": repository, "copied": copied, "publish": publish, "copy": copy,
            "digest": stack.registry_digest(stack.registry, repository, "v1")}


def test_every_tag_written_is_recorded_with_the_digest_the_registry_serves(audited, stack, published):
    u, repository = published["u"], published["repository"]
    entries = trail(audited, job=published["publish"]["id"])
    accepted = [e for e in entries if e["action"] == "publish"]
    assert len(accepted) == 1 and accepted[0]["outcome"] == "accepted" and accepted[0]["status"] == 202
    assert (accepted[0]["client"], accepted[0]["request_id"], accepted[0]["source"]) == ("team-a", f"publish-{u}", published["source"])
    assert accepted[0]["targets"] == [{"registry": "local", "repository": repository, "tags": ["v1", "v2"]}]
    written = sorted((e for e in entries if e["action"] == "push_tag"), key=lambda e: e["tag"])
    assert [(e["outcome"], e["registry"], e["repository"], e["tag"], e["client"], e["attempt"]) for e in written] == [
        ("written", "local", repository, "v1", "team-a", 1), ("written", "local", repository, "v2", "team-a", 1)]
    for entry in written:  # the registry's own answer, not the job's
        assert entry["digest"] == stack.registry_digest(stack.registry, repository, entry["tag"]) == published["digest"]
    copied = [e for e in trail(audited, job=published["copy"]["id"]) if e["action"] == "copy_tag"]
    assert [(e["outcome"], e["repository"], e["tag"]) for e in copied] == [("written", published["copied"], "c1")]
    assert copied[0]["digest"] == stack.registry_digest(stack.registry, published["copied"], "c1")
    # each entry is also a JSON line on the `audit` logger of the process that wrote it, with its hash
    hashes = {line["audit"]["hash"] for line in audit_lines(stack)}
    assert all(e["hash"] in hashes for e in entries + copied)


def test_a_failed_write_is_recorded_with_its_code(audited, stack):
    u = uuid.uuid4().hex[:8]
    stack.build_image(f"team-a/fail-{u}:v1", layers=1)
    team_a = as_(audited, "team-a")
    job = team_a.submit("/v1/publish", {"source": f"team-a/fail-{u}:v1",
                                        "targets": [{"registry": "wrong-password", "repository": f"team-a/fail-{u}", "tags": ["v1"]}]})
    assert team_a.wait(job["id"])["state"] == "failed"
    failed = [e for e in trail(audited, job=job["id"]) if e["action"] == "push_tag"]
    assert [(e["outcome"], e["code"], e["registry"], e["tag"], e["digest"]) for e in failed] == [
        ("failed", "auth_failed", "wrong-password", "v1", None)]


@pytest.mark.parametrize("who, other", [("team-a", "team-b"), ("team-b", "team-a")])
def test_refusals_of_each_client_are_recorded_with_their_code(audited, who, other):
    u = uuid.uuid4().hex[:8]
    good = {"source": f"{who}/app:1", "targets": [{"registry": "local", "repository": f"{who}/app-{u}", "tags": ["1"]}]}
    calls = {
        401: (as_(audited, None, token=TOKENS[who] + "x"), good, "unauthorized"),
        403: (as_(audited, who), {**good, "targets": [{"registry": "local", "repository": f"{other}/app-{u}", "tags": ["1"]}]}, "forbidden"),
        422: (as_(audited, who), {**good, "targets": [{"registry": "local", "repository": f"{who}/app-{u}", "tags": ["not a tag"]}]},
              "validation_failed"),
    }
    for status, (api, body, code) in calls.items():
        resp = api.post("/v1/publish", json=body, headers={"X-Request-Id": f"{who}-{status}-{u}"})
        assert resp.status_code == status and resp.json()["code"] == code, resp.text
        assert resp.headers["X-Request-Id"] == f"{who}-{status}-{u}"
    refused = {e["request_id"]: e for e in trail(audited, outcome="refused", action="publish") if e["request_id"].endswith(u)}
    assert sorted(refused) == sorted(f"{who}-{status}-{u}" for status in calls)
    for status, (_, _, code) in calls.items():
        entry = refused[f"{who}-{status}-{u}"]
        assert (entry["status"], entry["code"]) == (status, code)
        assert entry["client"] == (None if status == 401 else who)
    assert refused[f"{who}-401-{u}"]["reason"] == "token_invalid"
    assert refused[f"{who}-403-{u}"]["targets"] == [{"registry": "local", "repository": f"{other}/app-{u}", "tags": ["1"]}]


def test_only_the_audit_and_admin_scopes_read_the_trail(audited):
    for name in ("team-a", "team-b"):
        resp = as_(audited, name).get("/v1/audit")
        assert resp.status_code == 403 and resp.json()["code"] == "forbidden"
        assert resp.headers["Content-Type"] == "application/problem+json"
    assert as_(audited, None).get("/v1/audit").status_code == 401
    assert as_(audited, "auditor").get("/v1/audit").status_code == 200
    assert as_(audited, "admin").get("/v1/audit").status_code == 200


def test_filters_and_pages_answer_who_put_which_digest_where(audited, published):
    by_digest = trail(audited, digest=published["digest"], outcome="written")
    assert {(e["action"], e["repository"], e["tag"], e["client"]) for e in by_digest} == {
        ("push_tag", published["repository"], "v1", "team-a"), ("push_tag", published["repository"], "v2", "team-a"),
        ("copy_tag", published["copied"], "c1", "team-a")}
    mine = trail(audited, repository=f"team-a/*-{published['u']}")
    assert {e["job_id"] for e in mine} == {published["publish"]["id"], published["copy"]["id"]}
    assert trail(audited, registry="local", client="team-a", action="copy_tag", repository=published["copied"]) == \
        [e for e in mine if e["action"] == "copy_tag"]
    everything = trail(audited)
    pages, cursor = [], None
    while True:  # one entry a page, newest first, the same entries as all at once
        body = as_(audited, "auditor").get("/v1/audit", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        pages += body["entries"]
        cursor = body["next_cursor"]
        if not cursor or len(pages) >= 6:
            break
    assert pages == everything[:len(pages)]
    assert [e["seq"] for e in everything] == sorted((e["seq"] for e in everything), reverse=True)
    newest = everything[0]["time"]
    assert trail(audited, since=newest) == [e for e in everything if e["time"] == newest]
    assert trail(audited, until="2000-01-01T00:00:00Z") == []


def test_the_cli_answers_and_exports(audited, published):
    out = run_cli(audited, "--digest", published["digest"], "--json", token=TOKENS["auditor"])
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)["entries"]
    assert entries and all(e["digest"] == published["digest"] for e in entries)
    table = run_cli(audited, "--repository", f"team-a/app-{published['u']}", token=TOKENS["auditor"])
    assert table.returncode == 0 and f"local/{published['repository']}:v2" in table.stdout and published["digest"] in table.stdout
    refused = run_cli(audited, token=TOKENS["team-a"])
    assert refused.returncode == 4 and "forbidden" in refused.stderr
    export = run_cli(audited, "export", "--since", "1h", server=True)
    assert export.returncode == 0, export.stderr
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert lines == sorted(lines, key=lambda e: e["seq"]) and {e["id"] for e in entries} <= {e["id"] for e in lines}
    for before, after in zip(lines, lines[1:]):
        assert after["prev"] == before["hash"]  # the export carries the chain


def _rewrite(client: redis.Redis, change) -> None:
    """Edit the trail as someone with Redis access must (stream entries cannot be changed in
    place): rewrite the stream, every entry under its own id, ``change`` applied."""
    entries = client.xrange("imagepub:audit")
    pipe = client.pipeline()
    pipe.delete("imagepub:audit")
    for entry_id, fields in entries:
        fields = change(entry_id, dict(fields))
        if fields is not None:
            pipe.xadd("imagepub:audit", fields, id=entry_id)
    pipe.execute()


def test_verify_holds_the_chain_and_names_an_edited_or_removed_entry(audited, published):
    raw = redis.Redis.from_url(audited.redis_url)
    ok = run_cli(audited, "verify", server=True)
    assert ok.returncode == 0 and "audit chain intact" in ok.stdout, ok.stdout + ok.stderr
    written = [e for e in trail(audited, job=published["publish"]["id"]) if e["action"] == "push_tag"][0]
    original = dict(raw.xrange("imagepub:audit", written["id"], written["id"])[0][1])
    forged = published["digest"].replace(published["digest"][-6:], "000000").encode()
    try:
        # someone makes the trail say another digest went there
        _rewrite(raw, lambda i, f: {**f, b"b": f[b"b"].replace(published["digest"].encode(), forged)} if i.decode() == written["id"] else f)
        broken = run_cli(audited, "verify", server=True)
        assert broken.returncode == 1 and f"broken at entry {written['id']}" in broken.stderr and "altered" in broken.stderr, broken.stderr
        _rewrite(raw, lambda i, f: original if i.decode() == written["id"] else f)
        assert run_cli(audited, "verify", server=True).returncode == 0
        # someone takes the entry out
        raw.xdel("imagepub:audit", written["id"])
        removed = run_cli(audited, "verify", server=True)
        assert removed.returncode == 1 and f"#{written['seq']} is missing" in removed.stderr, removed.stderr
    finally:  # the trail as it was, for the other tests
        entries = raw.xrange("imagepub:audit")
        if written["id"].encode() not in [entry_id for entry_id, _ in entries]:
            pipe = raw.pipeline()
            pipe.delete("imagepub:audit")
            for entry_id, fields in sorted(entries + [(written["id"].encode(), original)], key=lambda e: tuple(map(int, e[0].split(b"-")))):
                pipe.xadd("imagepub:audit", fields, id=entry_id)
            pipe.execute()
    assert run_cli(audited, "verify", server=True).returncode == 0


def test_the_trail_outlives_the_job(audited, published):
    raw = redis.Redis.from_url(audited.redis_url)
    job_id = published["publish"]["id"]
    before = trail(audited, job=job_id)
    # what retention does to a finished job (its records expire), done now
    raw.delete(f"imagepub:job:{job_id}", f"imagepub:job:{job_id}:events")
    assert as_(audited, "admin").get(f"/v1/jobs/{job_id}").status_code == 404
    assert trail(audited, job=job_id) == before and len(before) == 3
    assert raw.ttl("imagepub:audit") == -1  # no expiry: its own retention trims it (audit.retention_days)


def test_no_secret_in_any_entry_or_audit_line(audited, stack):
    canary = f"imp_canary-{uuid.uuid4().hex[:12]}"
    team_b = as_(audited, "team-b")
    body = {"source": "team-b/app:1", "targets": [{"registry": "local", "repository": "team-b/app", "tags": ["1"]}]}
    as_(audited, None, token=canary).post("/v1/publish", json=body)  # a token that is not one: 401
    team_b.post("/v1/publish", json=body, headers={"X-Request-Id": canary})  # a token where a request id goes
    team_b.post("/v1/publish", json={**body, canary: True, "callback_url": f"https://hooks.example/?token={canary}"})  # 422
    team_b.post("/v1/publish", json={**body, "targets": [{"registry": canary, "repository": "team-a/app", "tags": ["1"]}]})  # 403
    raw = redis.Redis.from_url(audited.redis_url)
    stored = [b" ".join(k + b"=" + v for k, v in fields.items()) for _, fields in raw.xrange("imagepub:audit")]
    stored += [b" ".join(k + b"=" + v for k, v in raw.hgetall(key).items()) for key in (b"imagepub:audit:head", b"imagepub:audit:anchor")]
    places = {
        "the stream": b"\n".join(stored),
        "GET /v1/audit": json.dumps(trail(audited)).encode(),
        "the export": run_cli(audited, "export", server=True).stdout.encode(),
        "audit log lines": json.dumps(audit_lines(stack)).encode(),
    }
    secrets = {"canary token": canary, "a client's token": TOKENS["team-b"], "registry password": stack.auth_password,
               "the wrong password": "not-the-password"}
    leaks = [f"{what} in {where}" for what, secret in secrets.items() for where, blob in places.items() if secret.encode() in blob]
    assert not leaks, leaks
    assert len(places["audit log lines"]) > 0 and b"token_invalid" in places["the stream"]  # the search was not vacuous
