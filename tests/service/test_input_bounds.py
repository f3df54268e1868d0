"""Hostile input, in-process against real Redis (issue 18, items 5, 8, 9, 10, 11, 12): build
contexts that cost nothing to send and much to read, names too long for Docker once the
registry's host is counted, tag limits dodged by merging, repository names the routes swallowed,
event replays without bound, and problem titles that contradict their status. What needs a
worker, a daemon or ECR: tests/e2e/test_hostile_input.py."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
from http import HTTPStatus

import pytest

import tar_bombs as tb
from service import control, errors
from service.build_context import ContextRefused, check_context
from service.config import Limits

from clients import bearer
from helpers import GOOD, CheckedClient, parse_sse, problem

TARGET = {"registry": "local", "repository": "team/app", "tags": ["1"]}


def build(client, context: bytes, request: dict | None = None):
    return client.post("/v1/build", data={
        "request": json.dumps(request or {"targets": [TARGET]}),
        "context": (io.BytesIO(context), "context.tar.gz", "application/gzip"),
    }, content_type="multipart/form-data")


def refused(resp, *words: str) -> str:
    body = problem(resp, 422, "invalid_context")
    assert body["errors"][0]["field"] == "context"
    message = body["errors"][0]["message"]
    assert all(word in message for word in words), message
    return message


# --- item 5: tar header bombs --------------------------------------------------------------

MAX_ENTRIES = Limits.max_context_entries
TOO_MANY = MAX_ENTRIES  # with the Dockerfile, one entry past the limit

ENTRY_BOMBS = {
    "empty directories": tb.header("d/", b"5"),
    "empty files": tb.header("f"),
    "hard links": tb.header("h", b"1", linkname="Dockerfile"),
    "symbolic links": tb.header("s", b"2", linkname="Dockerfile"),
    "global pax headers": tb.extended(b"g", tb.pax_record("comment", "x")),
}


@pytest.mark.parametrize("entry", ENTRY_BOMBS.values(), ids=ENTRY_BOMBS.keys())
def test_entries_are_bounded(client, redis_client, entry):
    context = tb.gzipped((tb.dockerfile(), 1), (entry, TOO_MANY), (tb.end(), 1))
    refused(build(client, context), f"more than {MAX_ENTRIES} entries", "limits.max_context_entries")
    assert redis_client.keys("imagepub:job:*") == []
    # one fewer is a context like any other
    within = tb.gzipped((tb.dockerfile(), 1), (entry, TOO_MANY - 1), (tb.end(), 1))
    assert build(client, within).status_code == 202


def test_the_finding_is_refused_early_in_bounded_memory():
    """1,048,576 empty directories in 2.8 MB passed in 17 s and 410 MB: now refused at the
    10,001st entry, streaming (nothing of the archive is kept)."""
    context = tb.million_empty_directories()
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ContextRefused, match="limits.max_context_entries"):
            check_context(context, "Dockerfile", Limits())
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 5 and peak < 16 * 2**20, (elapsed, peak)


LONG = "a" * 60_000
HEADER_BOMBS = {
    # each extended header stays under the per-header bound; together they pass the total
    "GNU long names": (tb.extended(b"L", LONG.encode()) + tb.header("d/", b"5"), 400, "headers take more than"),
    "GNU long link names": (tb.extended(b"K", LONG.encode()) + tb.header("l", b"1", linkname="Dockerfile"), 400, "headers take more than"),
    "pax headers with long records": (tb.extended(b"x", tb.pax_record("comment", LONG)) + tb.header("d/", b"5"), 400, "headers take more than"),
    "pax headers of tiny records": (tb.extended(b"x", tb.pax_record("a", "b") * 10_000) + tb.header("d/", b"5"), 40, "pax headers hold more than"),
    "chained pax headers": (tb.extended(b"x", tb.pax_record("comment", LONG)), 400, "headers take more than"),
}


@pytest.mark.parametrize("chunk, times, words", HEADER_BOMBS.values(), ids=HEADER_BOMBS.keys())
def test_header_bytes_are_bounded(client, chunk, times, words):
    context = tb.gzipped((tb.dockerfile(), 1), (chunk, times), (tb.end(), 1))
    assert len(context) < 2**20  # cheap to send
    started = time.monotonic()
    refused(build(client, context), words, "limits.max_context_entries")
    assert time.monotonic() - started < 5


ONE_HEADER_BOMBS = {
    "a pax record over the bound": (tb.extended(b"x", tb.pax_record("path", "a" * 70_000)), "longer than 65536 bytes"),
    "a long name over the bound": (tb.extended(b"L", b"a" * 70_000), "longer than 65536 bytes"),
    # CPython's pax parser is quadratic in a run of digits (CVE-2024-6232): 5 s each, here
    "a pax header of digits": (tb.extended(b"x", b"1" * 60_000), "pax header is malformed"),
    "a GNU sparse file": (tb.header("s", b"S", 0), "sparse file"),
    "a pax GNU sparse map": (tb.extended(b"x", tb.pax_record("GNU.sparse.major", "1") + tb.pax_record("GNU.sparse.minor", "0"))
                             + tb.header("s") + tb.padded(b"99999999\n"), "sparse file"),
}


@pytest.mark.parametrize("chunk, words", ONE_HEADER_BOMBS.values(), ids=ONE_HEADER_BOMBS.keys())
def test_extended_headers_that_cost_more_than_their_size_are_refused(client, chunk, words):
    context = tb.gzipped((tb.dockerfile(), 1), (chunk, 1), (tb.end(), 1))
    started = time.monotonic()
    refused(build(client, context), words)
    assert time.monotonic() - started < 2


def test_many_chained_pax_headers_are_read_without_recursion(client):
    """tarfile recursed once per chained extended header: a thousand made a RecursionError, a
    500. Go (the daemon) reads them in a loop, the last one applying: so does the check."""
    chained = tb.extended(b"x", tb.pax_record("path", "elsewhere"))
    last = tb.extended(b"x", tb.pax_record("path", "Dockerfile"))
    context = tb.gzipped((chained, 1000), (last + tb.member("ignored", tb.DOCKERFILE), 1), (tb.end(), 1))
    assert build(client, context).status_code == 202


GZIP_BOMBS = {
    # a member declaring more than the bound: refused from its header, nothing decompressed
    "a huge member": ((tb.header("big", size=2**33 - 1), 1),),
    # 300 MB of zeros after the end of the archive, which the daemon reads too
    "zeros after the end": ((tb.end(), 1), (bytes(2**20), 300)),
    # real data, many members, past four times the upload limit
    "members that add up": ((tb.member("z", bytes(2**20)), 260),),
}


@pytest.mark.parametrize("parts", GZIP_BOMBS.values(), ids=GZIP_BOMBS.keys())
def test_gzip_bombs_are_refused_at_the_unpacked_bound(client, parts):
    context = tb.gzipped((tb.dockerfile(), 1), *parts)
    assert len(context) < 2**20
    started = time.monotonic()
    refused(build(client, context), f"unpacks to more than {4 * Limits.max_context_bytes} bytes", "limits.max_context_bytes")
    assert time.monotonic() - started < 5


def test_real_contexts_still_pass(client):
    """The check reads what tar writers write: tarfile's pax, GNU and ustar formats, long
    names, links inside the context, and a pre-POSIX directory."""
    import tarfile

    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", format=fmt) as tar:
            for name, data in (("Dockerfile", tb.DOCKERFILE), ("src/" + "long-name/" * 9 + "app.py", b"print(1)\n")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("src/link")
            link.type, link.linkname = tarfile.SYMTYPE, "../Dockerfile"
            tar.addfile(link)
        assert build(client, buffer.getvalue()).status_code == 202, fmt


# --- item 8: names too long once the registry's host is counted -----------------------------

LOCAL_ROOM = 255 - len("localhost:5000/")
ECR_ROOM = 255 - len("123456789012.dkr.ecr.eu-west-1.amazonaws.com/")


def name_of(length: int, prefix: str = "team/") -> str:
    return prefix + "a" * (length - len(prefix))


@pytest.mark.parametrize("registry, room", [("local", LOCAL_ROOM), ("prod-ecr", ECR_ROOM), ("hub", 255 - len("docker.io/"))])
def test_a_target_must_fit_dockers_name_limit_with_its_host(client, registry, room):
    def publish(repository, index=0):
        targets = [{**TARGET, "repository": f"team/ok-{i}"} for i in range(index)]
        return client.post("/v1/publish", json={**GOOD, "targets": targets + [{"registry": registry, "repository": repository, "tags": ["1"]}]})

    assert publish(name_of(room)).status_code == 202
    for index in (0, 2):  # the offending target is named, wherever it is
        body = problem(publish(name_of(room + 1), index), 422, "validation_failed")
        assert body["errors"] == [{"field": f"targets.{index}.repository", "message": body["errors"][0]["message"]}]
        assert f"at most {room}" in body["errors"][0]["message"]
    # the finding: team-a/ + 248 × a, within the 255 a repository alone may have
    assert len(name_of(255, "team-a/")) == 255
    problem(publish(name_of(255, "team-a/")), 422, "validation_failed")


def test_docker_hub_counts_library_for_a_one_component_name(client):
    room = 255 - len("docker.io/library/")
    ok = client.post("/v1/publish", json={**GOOD, "targets": [{"registry": "hub", "repository": "a" * room, "tags": ["1"]}]})
    assert ok.status_code == 202
    body = problem(client.post("/v1/publish", json={**GOOD, "targets": [{"registry": "hub", "repository": "a" * (room + 1), "tags": ["1"]}]}),
                   422, "validation_failed")
    assert body["errors"][0]["field"] == "targets.0.repository"


def test_ecr_without_an_account_id_counts_twelve_digits(settings, redis_client):
    from dataclasses import replace

    from service.app import create_app

    registries = {**settings.registries, "prod-ecr": replace(settings.registries["prod-ecr"], account_id=None)}
    client = CheckedClient(create_app(replace(settings, registries=registries)).test_client(), headers=bearer("admin"))
    target = {"registry": "prod-ecr", "tags": ["1"]}
    assert client.post("/v1/publish", json={**GOOD, "targets": [{**target, "repository": name_of(ECR_ROOM)}]}).status_code == 202
    problem(client.post("/v1/publish", json={**GOOD, "targets": [{**target, "repository": name_of(ECR_ROOM + 1)}]}), 422, "validation_failed")


def test_pull_and_build_names_fit_too(client):
    assert client.post("/v1/pull", json={"registry": "local", "repository": name_of(LOCAL_ROOM)}).status_code == 202
    body = problem(client.post("/v1/pull", json={"registry": "local", "repository": name_of(LOCAL_ROOM + 1)}), 422, "validation_failed")
    assert body["errors"][0]["field"] == "repository"
    request = {"targets": [TARGET, {**TARGET, "repository": name_of(ECR_ROOM + 1), "registry": "prod-ecr"}]}
    body = problem(build(client, tb.gzipped((tb.dockerfile(), 1), (tb.end(), 1)), request), 422, "validation_failed")
    assert body["errors"][0]["field"] == "targets.1.repository"


@pytest.mark.parametrize("source, ok", [
    ("a" * (255 - len("docker.io/library/")), True),           # Docker adds docker.io/library/
    ("a" * (256 - len("docker.io/library/")), False),
    ("team/" + "a" * (255 - len("docker.io/team/")), True),     # and docker.io/ to a path
    ("team/" + "a" * (256 - len("docker.io/team/")) + ":1", False),
    ("localhost:5000/" + "a" * 240 + "@sha256:" + "0" * 64, True),  # a host counts as written
    ("localhost:5000/" + "a" * 241 + ":tag", False),
])
def test_a_source_must_be_a_name_docker_allows(client, source, ok):
    resp = client.post("/v1/publish", json={**GOOD, "source": source})
    if ok:
        assert resp.status_code == 202, resp.get_data(as_text=True)
    else:
        assert problem(resp, 422, "validation_failed")["errors"][0]["field"] == "source"


# --- item 9: limits hold after merging -----------------------------------------------------

MAX_TAGS = 4  # tests/service/conftest.py


@pytest.mark.parametrize("endpoint", ["/v1/publish", "/v1/build"])
def test_tags_per_target_are_counted_after_merging(client, endpoint):
    """Three entries naming one repository, four tags each (each within the limit), would be
    one target of twelve tags."""
    entries = [{**TARGET, "tags": [f"t{i}-{n}" for n in range(MAX_TAGS)]} for i in range(3)]

    def submit(targets):
        if endpoint == "/v1/build":
            return build(client, tb.gzipped((tb.dockerfile(), 1), (tb.end(), 1)), {"targets": targets})
        return client.post(endpoint, json={**GOOD, "targets": targets})

    body = problem(submit(entries), 422, "validation_failed")
    assert body["errors"][0]["field"] == "targets.1.tags" and "targets.0" in body["errors"][0]["message"]
    # repeated tags are one tag: entries that merge within the limit are one target
    job = submit([{**TARGET, "tags": ["a", "b"]}, {**TARGET, "tags": ["b", "c", "d"]}]).get_json()
    assert [t["tags"] for t in job["request"]["targets"]] == [["a", "b", "c", "d"]]
    # another registry is another target
    other = {**TARGET, "registry": "hub", "tags": entries[1]["tags"]}
    assert submit([entries[0], other]).status_code == 202
    # one entry over the limit names itself
    body = problem(submit([{**TARGET, "tags": [f"t{n}" for n in range(MAX_TAGS + 1)]}]), 422, "validation_failed")
    assert body["errors"][0]["field"] == "targets.0.tags"


# --- item 10: every repository name reachable ------------------------------------------------


class RecordingControl:
    """The control queue's seam (service/control.py RegistryControl.call): records what the
    API asked a worker and answers like one."""

    def __init__(self):
        self.calls = []

    def call(self, task, registry, *args):
        self.calls.append((task, args[0]))
        if task == control.CREATE_REPOSITORY:
            return {"name": args[0]["name"], "uri": f"x/{args[0]['name']}"}
        if task == control.DESCRIBE_REPOSITORY:
            return {"name": args[0], "uri": f"x/{args[0]}"}
        return {"images": [], "next_cursor": None}


@pytest.fixture
def recording(app):
    app.extensions["imagepub"]["control"] = RecordingControl()
    return app.extensions["imagepub"]["control"]


REPOSITORIES = "/v1/registries/prod-ecr/repositories/"
DESCRIBE, IMAGES = control.DESCRIBE_REPOSITORY, control.LIST_IMAGES


@pytest.mark.parametrize("path, asked", [
    ("team/images", (IMAGES, "team")),                           # a literal /images at the end lists images
    ("team%2Fimages", (DESCRIBE, "team/images")),                 # an encoded slash belongs to the name
    ("team%2fimages", (DESCRIBE, "team/images")),
    ("team/images/images", (IMAGES, "team/images")),
    ("team%2Fimages/images", (IMAGES, "team/images")),
    ("images", (DESCRIBE, "images")),                             # exactly `images`
    ("images/images", (IMAGES, "images")),
    ("images%2Fimages", (DESCRIBE, "images/images")),
    ("team/images/app", (DESCRIBE, "team/images/app")),           # `images` in the middle
    ("team%2Fimages%2Fapp", (DESCRIBE, "team/images/app")),
    ("team/images/app/images", (IMAGES, "team/images/app")),
    ("team/app", (DESCRIBE, "team/app")),
    ("team%2Fapp/images", (IMAGES, "team/app")),
])
def test_the_path_says_which_repository_and_whether_images(client, recording, path, asked):
    assert client.get(REPOSITORIES + path).status_code == 200
    assert recording.calls == [asked]


@pytest.fixture
def team_a(settings, redis_client):
    """A client whose repositories are team-a/* (and the other names below), as in the
    finding, on an app whose control queue is the recording seam."""
    from dataclasses import replace

    from service.app import create_app
    from service.auth import hash_token
    from service.config import Client

    token = "imp_test-team-a-token"
    client = Client(name="team-a", token_sha256=hash_token(token), scopes=frozenset({"publish", "read"}),
                    repositories=("team-a/*", "images", "images/*", "a/*"))
    app = create_app(replace(settings, clients=(*settings.clients, client)))
    app.extensions["imagepub"]["control"] = RecordingControl()
    return CheckedClient(app.test_client(), headers={"Authorization": f"Bearer {token}"}), app.extensions["imagepub"]["control"]


@pytest.mark.parametrize("name", ["team-a/images", "images", "team-a/images/images", "team-a/images/app", "a/b/images"])
def test_a_created_repository_is_described_at_its_location(team_a, name):
    """The finding: team-a could create team-a/images (201) but describing it was 403, the
    images of team-a. Every Location describes the repository created, and the client reaches
    it and its images."""
    client, recording = team_a
    created = client.post("/v1/registries/prod-ecr/repositories", json={"name": name})
    assert created.status_code == 201
    described = client.get(created.headers["Location"])
    assert described.status_code == 200 and described.get_json()["name"] == name
    assert client.get(created.headers["Location"] + "/images").status_code == 200
    assert recording.calls[1:] == [(DESCRIBE, name), (IMAGES, name)]


# --- item 11: a resumed follower's replay is bounded -----------------------------------------

def test_a_replay_collapses_a_long_history_into_the_latest_snapshot(client, app):
    """Snapshots written as a worker writes them (through the job store): 400 of a job with
    many references. Resuming from 0 used to send all of them (5.9 MB in the finding)."""
    store = app.extensions["imagepub"]["store"]
    job = client.post("/v1/publish", json=GOOD).get_json()
    job["state"] = "running"
    store.save(job, event="state")
    for n in range(400):
        job["targets"][0]["references"] = [f"localhost:5000/team/app:tag-{n}-{i}" for i in range(100)]
        store.save(job, event="progress")
    job["state"] = "succeeded"
    store.save(job, event="state")
    total = sum(len(data) for _, _, data in store.events(job["id"], "0-0", count=1000))
    assert total > 2**20

    for last_event_id in ("0", "0-0", store.events(job["id"], "0-0", count=1)[0][0]):
        resp = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last_event_id})
        events = parse_sse(resp.get_data(as_text=True))
        assert len(resp.get_data()) < 64 * 1024
        assert [(e["event"], e["data"]["state"]) for e in events] == [("state", "succeeded")]
        assert events[-1]["data"] == client.get(f"/v1/jobs/{job['id']}").get_json()
        assert events[-1]["id"] == store.latest_event(job["id"])[0]


def test_a_short_gap_is_replayed_whole_and_a_long_one_by_count_or_size(client, app):
    from service.views import REPLAY_MAX_BYTES, REPLAY_MAX_EVENTS

    store = app.extensions["imagepub"]["store"]
    job = client.post("/v1/publish", json=GOOD).get_json()
    resume_from = store.latest_event(job["id"])[0]
    job["state"] = "running"
    store.save(job, event="state")
    for n in range(REPLAY_MAX_EVENTS - 2):
        job["attempts"] = n
        store.save(job, event="progress")
    job["state"] = "failed"
    store.save(job, event="state")
    events = parse_sse(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": resume_from}).get_data(as_text=True))
    assert [e["event"] for e in events] == ["state"] + ["progress"] * (REPLAY_MAX_EVENTS - 2) + ["state"]

    # the same number of events, but bigger than the byte bound all together: the latest alone
    big = client.post("/v1/publish", json=GOOD).get_json()
    resume_from = store.latest_event(big["id"])[0]
    big["targets"][0]["references"] = ["x" * (REPLAY_MAX_BYTES // 10)]
    for state in ["running"] * 10 + ["succeeded"]:
        big["state"] = state
        store.save(big, event="state")
    events = parse_sse(client.get(f"/v1/jobs/{big['id']}/events", headers={"Last-Event-ID": resume_from}).get_data(as_text=True))
    assert [(e["event"], e["data"]["state"]) for e in events] == [("state", "succeeded")]


# --- item 12: a problem's title matches its status ------------------------------------------

def _classes(cls=errors.ImagepubError):
    return [cls] + [sub for child in cls.__subclasses__() for sub in _classes(child)]


CLASSES = [cls for cls in _classes() if cls.__module__ == "service.errors"]
STATUSES = sorted({cls.status for cls in CLASSES} | {422, 404, 502})


def _instance(cls):
    return cls([{"field": "f", "message": "m"}]) if cls is errors.ValidationFailed else cls("m")


def expected_title(cls, status):
    """A class's title describes its own status; any other, the status's reason phrase."""
    return cls.title if status == cls.status else HTTPStatus(status).phrase


def test_no_title_belongs_to_another_status():
    """The finding in one line: a 422 titled "Internal error". No class's title is the
    reason phrase of a status other than its own."""
    phrases = {HTTPStatus(s).phrase.lower(): s for s in STATUSES} | {"internal error": 500}
    for cls in CLASSES:
        assert phrases.get(cls.title.lower(), cls.status) == cls.status, cls


def test_one_problem_type_has_one_title():
    titles = {}
    for cls in CLASSES:
        assert titles.setdefault((cls.code, cls.status), cls.title) == cls.title, cls


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_error_at_every_status_renders_a_title_of_that_status(app, cls):
    """Each class, rendered in-process with every status it may be given (with_status), and
    reported by a worker over the control queue (with the title an older worker sent)."""
    from service.app import _render_imagepub_error

    with app.test_request_context("/v1/registries/prod-ecr/repositories"):
        for status in STATUSES:
            body = _render_imagepub_error(_instance(cls).with_status(status)).get_json()
            assert (body["status"], body["title"]) == (status, expected_title(cls, status)), (cls, status)
            answer = {"ok": False, "error": {"code": cls.code, "message": "m", "status": status, "title": "Internal error"}}
            with pytest.raises(errors.ImagepubError) as raised:
                control.raise_from_answer(answer)
            body = _render_imagepub_error(raised.value).get_json()
            assert (body["status"], body["title"]) == (status, errors.title_for(cls.code, status))
            assert body["title"] in (expected_title(cls, status), HTTPStatus(status).phrase)


@pytest.mark.parametrize("status", [None, "x", 200, 302, 700, 499])
def test_a_worker_answer_without_an_error_status_is_a_bad_gateway(status):
    with pytest.raises(errors.ImagepubError) as raised:
        control.raise_from_answer({"ok": False, "error": {"code": "ecr_error", "message": "m", "status": status}})
    assert (raised.value.status, raised.value.title) == (502, "Bad Gateway")


def test_the_api_renders_a_workers_not_supported_with_its_own_title(client, app):
    """The finding through the API: a registry without repositories, answered by a worker
    with 422 (and, from a worker of before the fix, the title "Internal error")."""

    class OldWorker:
        def call(self, *args):
            return control.raise_from_answer({"ok": False, "error": {
                "code": "not_supported", "message": "registry 'local' is not an ECR registry", "status": 422, "title": "Internal error"}})

    app.extensions["imagepub"]["control"] = OldWorker()
    body = problem(client.get("/v1/registries/local/repositories"), 422, "not_supported")
    assert body["title"] == errors.NotSupported.title
