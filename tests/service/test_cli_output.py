"""The pipeline client without the stack: ``imagepub`` (in-process) against a fake API served
over real HTTP by a Flask app on a free port, the one seam. What the real API does is covered by
tests/e2e/test_cli.py; here: what is sent (targets, the build upload), what is printed, the exit
codes, and following a job through dropped streams and a missing events endpoint."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import pytest
from flask import Flask, Response, jsonify, request
from werkzeug.datastructures import Headers
from werkzeug.serving import make_server

from service import cli
from service.client import DockerIgnore, context_archive, sse_events

JOB_ID = "0190e6a2-7b3c-7def-8123-456789abcdef"
LAYER_BYTES = 64 * 1024


class FakeApi:
    """A Flask app to add routes to; served on first use of ``url``; records every request."""

    def __init__(self):
        self.app = Flask("fake_api")
        self.calls: list[dict] = []
        self._server = None

        @self.app.before_request
        def record():
            self.calls.append({"method": request.method, "path": request.path, "args": dict(request.args),
                               "headers": Headers(request.headers), "body": request.get_data(cache=True)})

    @property
    def url(self) -> str:
        if self._server is None:
            self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_port}"

    def close(self):
        if self._server is not None:
            self._server.shutdown()


@pytest.fixture
def api(monkeypatch):
    fake = FakeApi()
    monkeypatch.delenv("IMAGEPUB_TOKEN", raising=False)
    yield fake
    fake.close()


def run(api: FakeApi, *argv: str) -> int:
    return cli.main([*argv, "--url", api.url])


def make_job(state="queued", layers=(), attempts=0, kind="publish", **extra) -> dict:
    job = {
        "id": JOB_ID, "kind": kind, "state": state, "attempts": attempts,
        "created_at": "2026-11-27T10:00:00.000000Z", "updated_at": "2026-11-27T10:00:01.123456Z",
        "request": {"source": "app:1", "targets": [{"registry": "local", "repository": "team/app", "tags": ["1.0"]}]},
        "error": None, "last_error": None,
    }
    if kind == "build":
        job["request"] = {"targets": job["request"]["targets"], "dockerfile": "Dockerfile", "build_args": {}}
    if kind in ("publish", "build"):
        job["targets"] = [{"registry": "local", "repository": "team/app", "tags": ["1.0"], "state": "pending",
                           "references": [], "digest": None, "size": None, "layers": list(layers)}]
    else:
        job["request"] = {"registry": "local", "repository": "team/app", "tag": "1.0"}
        job["result"] = {"layers": list(layers)}
    job.update(extra)
    return job


def layer(layer_id, status, current=None, total=None):
    return {"id": layer_id, "status": status, "current": current, "total": total}


DIGEST = "sha256:" + "ab" * 32


def succeeded_job() -> dict:
    job = make_job("succeeded", [layer("aaa111aaa111", "pushed", LAYER_BYTES, LAYER_BYTES)], attempts=1)
    job["targets"][0].update(state="succeeded", references=["localhost:5000/team/app:1.0"], digest=DIGEST, size=3 * LAYER_BYTES)
    return job


def sse(event_id: str, job: dict, event: str = "progress") -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(job)}\n\n"


# --- what is sent ------------------------------------------------------------------------------


def test_publish_groups_targets_by_repository_and_sends_the_token(api, capsys):
    @api.app.post("/v1/publish")
    def publish():
        return jsonify(make_job()), 202

    code = cli.main(["publish", "app:1", "--to", "prod-ecr/team/app:1.2,latest", "--to", "hub/x:1", "--to", "prod-ecr/team/app:1.3,1.2",
                     "--create-repository", "--idempotency-key", "ci-42", "--url", api.url, "--token", "s3cret-token", "--json"])
    assert code == cli.EXIT_OK
    call = api.calls[0]
    assert json.loads(call["body"]) == {
        "source": "app:1", "create_repository": True,
        "targets": [{"registry": "prod-ecr", "repository": "team/app", "tags": ["1.2", "latest", "1.3"]},
                    {"registry": "hub", "repository": "x", "tags": ["1"]}],
    }
    assert call["headers"]["Authorization"] == "Bearer s3cret-token"
    assert call["headers"]["Idempotency-Key"] == "ci-42"
    out, err = capsys.readouterr()
    assert json.loads(out)["id"] == JOB_ID
    assert "s3cret-token" not in out + err


@pytest.mark.parametrize("value", ["app", "local/app", "local/:1", "/app:1", "local/app:"])
def test_malformed_target_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["publish", "app:1", "--to", value])
    assert exc.value.code == cli.EXIT_USAGE
    assert "REGISTRY/REPOSITORY:TAG" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [
    ("local/team/app:1.0", {"registry": "local", "repository": "team/app", "tag": "1.0"}),
    ("local/team/app", {"registry": "local", "repository": "team/app"}),
    (f"ecr/app@{DIGEST}", {"registry": "ecr", "repository": "app", "digest": DIGEST}),
])
def test_pull_reference(value, expected):
    assert cli.pull_arg(value) == expected


def test_dockerignore_patterns():
    ignore = DockerIgnore(["# comment", "*.log", "/build", "!build/keep.txt", "**/secret*", "docs/?.md", "[ab].txt"])
    assert ignore.excluded("x.log") and not ignore.excluded("sub/x.log")
    assert ignore.excluded("build/out.bin") and not ignore.excluded("build/keep.txt")
    assert ignore.excluded("secret.key") and ignore.excluded("a/b/secret-2")
    assert ignore.excluded("docs/a.md") and not ignore.excluded("docs/ab.md")
    assert ignore.excluded("a.txt") and not ignore.excluded("c.txt")


def _context(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY app.bin /\n")
    (tmp_path / "app.bin").write_bytes(b"\x00" * 1000)
    (tmp_path / "debug.log").write_text("noise")
    (tmp_path / "node_modules" / "big").mkdir(parents=True)
    (tmp_path / "node_modules" / "big" / "x.js").write_text("x")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print(1)")
    (tmp_path / "src" / "notes.log").write_text("keep me")
    (tmp_path / ".dockerignore").write_text("*.log\nnode_modules\nDockerfile\n.dockerignore\n")
    return tmp_path


def test_context_archive_honours_dockerignore(tmp_path):
    archive, dockerfile = context_archive(str(_context(tmp_path)))
    assert dockerfile == "Dockerfile"
    with tarfile.open(fileobj=archive, mode="r:gz") as tar:
        names = sorted(tar.getnames())
        assert tar.extractfile("app.bin").read() == b"\x00" * 1000
        assert {m.uid for m in tar.getmembers()} == {0}
    # the Dockerfile and .dockerignore go even when ignored; "*.log" is for the top level only
    assert names == [".dockerignore", "Dockerfile", "app.bin", "src", "src/main.py", "src/notes.log"]


def test_context_archive_dockerfile_outside_the_context(tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "a.txt").write_text("a")
    (tmp_path / "Dockerfile.ci").write_text("FROM scratch\n")
    archive, dockerfile = context_archive(str(context), str(tmp_path / "Dockerfile.ci"))
    assert dockerfile == ".imagepub.Dockerfile"
    with tarfile.open(fileobj=archive, mode="r:gz") as tar:
        assert sorted(tar.getnames()) == [".imagepub.Dockerfile", "a.txt"]
        assert tar.extractfile(".imagepub.Dockerfile").read() == b"FROM scratch\n"


def test_build_uploads_multipart_request_and_context(api, tmp_path, capsys, monkeypatch):
    received = {}

    @api.app.post("/v1/build")
    def build():
        received["request"] = json.loads(request.form["request"])
        upload = request.files["context"]
        received["filename"], received["mimetype"] = upload.filename, upload.mimetype
        received["form_types"] = {name: request.files[name].mimetype for name in request.files}
        with tarfile.open(fileobj=io.BytesIO(upload.read()), mode="r:gz") as tar:
            received["names"] = sorted(tar.getnames())
        return jsonify(make_job(kind="build")), 202

    monkeypatch.setenv("FROM_ENV", "env-value")
    context = _context(tmp_path)
    (context / "ci").mkdir()
    (context / "ci" / "Dockerfile").write_text("FROM scratch\n")
    code = run(api, "build", str(context), "--to", "local/team/app:1.0", "--to", "local/team/app:latest",
               "--file", str(context / "ci" / "Dockerfile"), "--build-arg", "VERSION=1.0", "--build-arg", "FROM_ENV")
    assert code == cli.EXIT_OK, capsys.readouterr()
    assert received["request"] == {
        "targets": [{"registry": "local", "repository": "team/app", "tags": ["1.0", "latest"]}],
        "dockerfile": "ci/Dockerfile", "build_args": {"VERSION": "1.0", "FROM_ENV": "env-value"},
    }
    assert (received["filename"], received["mimetype"]) == ("context.tar.gz", "application/gzip")
    # the root Dockerfile is not the one named: .dockerignore leaves it out
    assert received["names"] == [".dockerignore", "app.bin", "ci", "ci/Dockerfile", "src", "src/main.py", "src/notes.log"]
    upload = next(c for c in api.calls if c["path"] == "/v1/build")  # (after a look at the server's limits)
    assert upload["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert int(upload["headers"]["Content-Length"]) == len(upload["body"])
    assert capsys.readouterr().out == f"2026-11-27T10:00:01Z job {JOB_ID} queued: build → local/team/app:1.0\n"


# --- what is printed ---------------------------------------------------------------------------


def test_plain_lines_per_state_and_layer_status_never_per_byte():
    out = io.StringIO()
    view = cli.PlainView(out, io.StringIO())
    snapshots = [
        make_job("queued"),
        make_job("running", attempts=1),
        make_job("running", [layer("sha256:aaa111aaa111ffff", "preparing")], attempts=1),
        make_job("running", [layer("sha256:aaa111aaa111ffff", "pushing", 1024, LAYER_BYTES)], attempts=1),
        make_job("running", [layer("sha256:aaa111aaa111ffff", "pushing", 4096, LAYER_BYTES)], attempts=1),
        make_job("running", [layer("sha256:aaa111aaa111ffff", "pushing", 9000, LAYER_BYTES)], attempts=1),
    ]
    for job in snapshots:
        view.update(job)
    view.finish(succeeded_job())
    lines = out.getvalue().splitlines()
    assert lines == [
        f"2026-11-27T10:00:01Z job {JOB_ID} queued: publish app:1 → local/team/app:1.0",
        f"2026-11-27T10:00:01Z job {JOB_ID} running (attempt 1)",
        "2026-11-27T10:00:01Z layer aaa111aaa111 preparing",
        "2026-11-27T10:00:01Z layer aaa111aaa111 pushing 64.0 KiB",
        f"2026-11-27T10:00:01Z job {JOB_ID} succeeded",
        "2026-11-27T10:00:01Z layer aaa111aaa111 pushed 64.0 KiB",
        f"2026-11-27T10:00:01Z pushed localhost:5000/team/app:1.0 {DIGEST} (192.0 KiB)",
    ]


def test_plain_lines_name_the_target_when_there_are_several():
    job = make_job("running", attempts=1)
    job["targets"].append({**job["targets"][0], "registry": "hub", "layers": [layer("bbb", "exists")]})
    out = io.StringIO()
    cli.PlainView(out, io.StringIO()).update(job)
    assert out.getvalue().splitlines()[-1] == "2026-11-27T10:00:01Z layer bbb exists (hub/team/app)"


def test_retrying_and_failed_lines_carry_the_error():
    retrying = make_job("retrying", attempts=1, last_error={"code": "throttled", "message": "slow down"},
                        next_attempt_at="2026-11-27T10:00:05.5Z")
    failed = make_job("failed", attempts=2, error={"code": "push_failed", "message": "the registry said no"})
    assert cli.state_line(retrying) == f"job {JOB_ID} retrying after attempt 1: throttled: slow down; next attempt at 2026-11-27T10:00:05Z"
    assert cli.state_line(failed) == f"job {JOB_ID} failed: push_failed: the registry said no"


def test_size_text():
    assert [cli.size_text(n) for n in (None, 12, 65536, 3 * 1024**2 + 1, 5 * 1024**3)] == ["", "12 B", "64.0 KiB", "3.0 MiB", "5.0 GiB"]


def test_rich_view_renders_bars():
    out = io.StringIO()
    view = cli.RichView(out, io.StringIO())
    view.update(make_job("running", [layer("aaa111aaa111", "pushing", 1024, LAYER_BYTES)], attempts=1))
    view.finish(succeeded_job())
    text = out.getvalue()
    assert "aaa111aaa111 pushed" in text and "64.0 KiB/64.0 KiB" in text and DIGEST in text


def test_sse_parser():
    chunks = [b": hello\r\n\r\nid: 1-0\r\nevent: state\r\nda", b"ta: {\"a\":\ndata: 1}\n\nretry: 5\n\n", b"id: 2-0\ndata: x\n\n"]
    assert list(sse_events(iter(chunks))) == [None, ("1-0", "state", '{"a":\n1}'), ("2-0", "message", "x")]


# --- following and exit codes ------------------------------------------------------------------


def test_wait_resumes_a_dropped_stream_with_last_event_id(api, capsys):
    running = make_job("running", [layer("aaa111aaa111", "pushing", 1, LAYER_BYTES)], attempts=1)

    @api.app.post("/v1/publish")
    def publish():
        return jsonify(make_job()), 202

    @api.app.get("/v1/jobs/<job_id>/events")
    def events(job_id):
        if "Last-Event-ID" not in request.headers:  # the first connection drops before the end
            return Response(sse("5-0", make_job("running", attempts=1), "state") + ": keep-alive\n\n" + sse("6-0", running),
                            mimetype="text/event-stream")
        assert request.headers["Last-Event-ID"] == "6-0"
        return Response(sse("7-0", succeeded_job(), "state"), mimetype="text/event-stream")

    assert run(api, "publish", "app:1", "--to", "local/team/app:1.0", "--wait") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"job {JOB_ID} succeeded" in out and "layer aaa111aaa111 pushing 64.0 KiB" in out
    assert out.splitlines()[-1].endswith(f"pushed localhost:5000/team/app:1.0 {DIGEST} (192.0 KiB)")
    assert [c["headers"].get("Last-Event-ID") for c in api.calls if c["path"].endswith("/events")] == [None, "6-0"]


def test_wait_polls_when_there_is_no_events_endpoint(api, capsys):
    answers = iter([make_job("running", attempts=1), make_job("running", attempts=1)])

    @api.app.post("/v1/pull")
    def pull():
        return jsonify(make_job(kind="pull")), 202

    @api.app.get("/v1/jobs/<job_id>")
    def get_job(job_id):
        failed = make_job("failed", attempts=1, kind="pull", error={"code": "manifest_not_found", "message": "no tag 1.0"})
        return jsonify(next(answers, failed))

    # Flask's own 404 for the events route: not the API's problem+json job_not_found
    assert run(api, "pull", "local/team/app:1.0", "--wait") == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith(f"job {JOB_ID} failed: manifest_not_found: no tag 1.0")
    assert sum(c["path"] == f"/v1/jobs/{JOB_ID}" for c in api.calls) == 3


def test_wait_polls_when_the_api_has_no_stream_to_spare(api, capsys):
    answers = iter([make_job("running", attempts=1)])

    @api.app.post("/v1/publish")
    def publish():
        return jsonify(make_job()), 202

    @api.app.get("/v1/jobs/<job_id>/events")
    def events(job_id):
        problem = {"type": "/problems/too_many_streams", "title": "Service unavailable", "status": 503,
                   "code": "too_many_streams", "detail": f"poll GET /v1/jobs/{job_id} meanwhile"}
        return Response(json.dumps(problem), status=503, mimetype="application/problem+json", headers={"Retry-After": "5"})

    @api.app.get("/v1/jobs/<job_id>")
    def get_job(job_id):
        return jsonify(next(answers, succeeded_job()))

    assert run(api, "publish", "app:1", "--to", "local/team/app:1.0", "--wait") == cli.EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"pushed localhost:5000/team/app:1.0 {DIGEST} (192.0 KiB)")
    assert sum(c["path"] == f"/v1/jobs/{JOB_ID}/events" for c in api.calls) == 1
    assert sum(c["path"] == f"/v1/jobs/{JOB_ID}" for c in api.calls) == 2


def test_json_wait_prints_one_document_and_cancelled_exits_3(api, capsys):
    @api.app.get("/v1/jobs/<job_id>/events")
    def events(job_id):
        cancelled = make_job("cancelled", attempts=1, error={"code": "cancelled", "message": "cancelled while running"})
        return Response(sse("1-0", make_job("running", attempts=1)) + sse("2-0", cancelled, "state"), mimetype="text/event-stream")

    @api.app.get("/v1/jobs/<job_id>")
    def get_job(job_id):
        return jsonify(make_job("running", attempts=1))

    assert run(api, "job", JOB_ID, "--follow", "--json") == cli.EXIT_CANCELLED
    out = capsys.readouterr().out
    assert json.loads(out)["state"] == "cancelled"


def test_wait_timeout_exits_5(api, capsys):
    @api.app.get("/v1/jobs/<job_id>")
    def get_job(job_id):
        return jsonify(make_job("running", attempts=1))

    @api.app.get("/v1/jobs/<job_id>/events")
    def events(job_id):
        def stream():
            yield sse("1-0", make_job("running", attempts=1))
            for _ in range(100):
                time.sleep(0.1)
                yield ": keep-alive\n\n"
        return Response(stream(), mimetype="text/event-stream")

    started = time.monotonic()
    assert run(api, "job", JOB_ID, "--follow", "--timeout", "0.5") == cli.EXIT_UNAVAILABLE
    assert time.monotonic() - started < 5
    assert "error: timeout:" in capsys.readouterr().err


def test_refused_request_exits_4_with_code_and_fields(api, capsys):
    @api.app.post("/v1/publish")
    def publish():
        body = {"type": "about:blank", "title": "Request validation failed", "status": 422, "code": "validation_failed",
                "detail": "invalid fields: targets.0.tags.0", "errors": [{"field": "targets.0.tags.0", "message": "not a valid tag"}]}
        return Response(json.dumps(body), status=422, mimetype="application/problem+json")

    assert run(api, "publish", "app:1", "--to", "local/team/app:-bad", "--wait") == cli.EXIT_REFUSED
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["error: validation_failed: invalid fields: targets.0.tags.0", "  targets.0.tags.0: not a valid tag"]


def test_unknown_job_exits_4(api, capsys):
    @api.app.get("/v1/jobs/<job_id>")
    def get_job(job_id):
        return Response(json.dumps({"type": "about:blank", "title": "Not found", "status": 404, "code": "job_not_found",
                                    "detail": f"no job {job_id}"}), status=404, mimetype="application/problem+json")

    assert run(api, "job", "nope") == cli.EXIT_REFUSED
    assert capsys.readouterr().err.startswith("error: job_not_found: no job nope")


def test_server_error_exits_5(api, capsys):
    @api.app.post("/v1/publish")
    def publish():
        return Response(json.dumps({"title": "x", "status": 503, "code": "queue_unavailable", "detail": "try again"}),
                        status=503, mimetype="application/problem+json")

    assert run(api, "publish", "app:1", "--to", "local/x:1") == cli.EXIT_UNAVAILABLE
    assert "queue_unavailable: try again" in capsys.readouterr().err


def test_job_exit_code_follows_its_state(api, capsys):
    @api.app.get("/v1/jobs/<job_id>")
    def get_job(job_id):
        return jsonify(succeeded_job())

    assert run(api, "job", JOB_ID) == cli.EXIT_OK
    assert f"pushed localhost:5000/team/app:1.0 {DIGEST}" in capsys.readouterr().out


def test_jobs_table_pages_through(api, capsys):
    second = {**make_job("failed", attempts=1, error={"code": "image_not_found", "message": "no"}), "id": "0190e6a2-0000-7def-8123-456789abcdef"}

    @api.app.get("/v1/jobs")
    def jobs():
        if request.args.get("cursor"):
            return jsonify({"jobs": [second], "next_cursor": None})
        return jsonify({"jobs": [succeeded_job()], "next_cursor": JOB_ID})

    assert run(api, "jobs", "--state", "succeeded", "--limit", "5") == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "STATE", "ATTEMPTS", "CREATED", "WHAT", "ERROR"]
    assert lines[1].split()[:5] == [JOB_ID, "publish", "succeeded", "1", "2026-11-27T10:00:00Z"]
    assert lines[2].split()[-1] == "image_not_found"
    assert api.calls[0]["args"] == {"state": "succeeded", "limit": "5"}
    assert api.calls[1]["args"] == {"state": "succeeded", "limit": "4", "cursor": JOB_ID}


def test_images_table_and_json(api, capsys):
    @api.app.get("/v1/images")
    def images():
        return jsonify({"images": [{"id": "sha256:" + "cd" * 32, "tags": ["app:1", "app:latest"], "size": 2048, "created": "2026-11-27T09:00:00Z"}],
                        "next_cursor": None})

    assert run(api, "images", "--reference", "app") == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["cdcdcdcdcdcd", "app:1,app:latest", "2.0", "KiB", "2026-11-27T09:00:00Z"]
    assert api.calls[0]["args"] == {"reference": "app"}
    assert run(api, "images", "--json") == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["images"][0]["size"] == 2048


def test_url_and_token_from_the_environment(api, capsys, monkeypatch):
    @api.app.get("/v1/jobs/<job_id>")
    def get_job(job_id):
        return jsonify(make_job("running", attempts=1))

    monkeypatch.setenv("IMAGEPUB_URL", api.url)
    monkeypatch.setenv("IMAGEPUB_TOKEN", "from-env")
    assert cli.main(["job", JOB_ID]) == cli.EXIT_OK
    assert api.calls[0]["headers"]["Authorization"] == "Bearer from-env"
    assert "from-env" not in capsys.readouterr().out


def test_build_says_a_context_is_too_large_before_uploading_it(api, tmp_path, capsys):
    """The server states its limits in its contract; a context past max_context_bytes is
    refused by the CLI at once, naming the setting, and never uploaded (issue 17, item 7)."""
    @api.app.get("/openapi.yaml")
    def spec():
        return Response("openapi: 3.1.0\ninfo:\n  title: imagepub\n  x-imagepub-limits: {max_context_bytes: 100000}\n",
                        mimetype="application/yaml")

    @api.app.post("/v1/build")
    def build():  # never reached
        return jsonify({}), 500

    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY big /\n")
    (tmp_path / "big").write_bytes(__import__("os").urandom(200_000))  # incompressible
    code = run(api, "build", str(tmp_path), "--to", "local/app:1")
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED and "context_too_large" in err and "limits.max_context_bytes" in err, err
    assert [c["path"] for c in api.calls] == ["/openapi.yaml"]
