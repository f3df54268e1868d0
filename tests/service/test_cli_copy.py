"""``imagepub copy`` without the stack, against the fake API of test_cli_output: what it sends,
and what a copy looks like in a CI log (a line per blob status) and on a terminal (a bar per
blob). The real API and worker: tests/e2e/test_copy.py."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

from flask import Response, jsonify

from service import cli

# test_cli_output's fake API (a Flask app on a free port) and its helpers: one seam for both files
_spec = importlib.util.spec_from_file_location("cli_output", Path(__file__).with_name("test_cli_output.py"))
_cli_output = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli_output)
JOB_ID, api, layer, run, sse = _cli_output.JOB_ID, _cli_output.api, _cli_output.layer, _cli_output.run, _cli_output.sse

DIGEST = "sha256:" + "cd" * 32
SIG = "sha256-" + "cd" * 32 + ".sig"
BLOBS = ["sha256:" + c * 64 for c in "abc"]


def copy_job(state="queued", layers=(), **extra) -> dict:
    job = {
        "id": JOB_ID, "kind": "copy", "state": state, "attempts": 1 if state != "queued" else 0,
        "created_at": "2026-11-27T10:00:00.000000Z", "updated_at": "2026-11-27T10:00:01.123456Z",
        "request": {"source": {"registry": "prod-ecr", "repository": "team/app", "tag": "1.4"},
                    "targets": [{"registry": "hub", "repository": "acme/app", "tags": ["1.4", "latest"]}],
                    "platforms": ["linux/arm64"], "signatures": True, "create_repository": False, "callback_url": None},
        "targets": [{"registry": "hub", "repository": "acme/app", "tags": ["1.4", "latest"], "state": "pending", "references": [],
                     "digest": None, "size": None, "layers": list(layers), "repository_created": False, "manifests": [], "signatures": []}],
        "source": None, "error": None, "last_error": None,
    }
    job.update(extra)
    return job


def succeeded() -> dict:
    job = copy_job("succeeded", [layer(BLOBS[0], "copied", 2048, 2048), layer(BLOBS[1], "mounted", 4096, 4096),
                                 layer(BLOBS[2], "exists", 300, 300)])
    job["targets"][0].update(state="succeeded", references=["docker.io/acme/app:1.4", "docker.io/acme/app:latest"], digest=DIGEST,
                             size=6444, manifests=[DIGEST], signatures=[{"tag": SIG, "digest": "sha256:" + "ef" * 32}])
    return job


def test_copy_sends_the_source_targets_and_platforms(api, capsys):  # noqa: F811
    @api.app.post("/v1/copy")
    def copy():
        return jsonify(copy_job()), 202

    code = run(api, "copy", "prod-ecr/team/app:1.4", "--to", "hub/acme/app:1.4,latest", "--to", "ecr-eu/team/app:1.4",
               "--platform", "linux/arm64", "--platform", "linux/arm/v7", "--platform", "linux/arm64", "--no-signatures",
               "--create-repository", "--idempotency-key", "promote-1.4", "--json")
    assert code == cli.EXIT_OK
    call = api.calls[0]
    assert call["path"] == "/v1/copy" and call["headers"]["Idempotency-Key"] == "promote-1.4"
    assert json.loads(call["body"]) == {
        "source": {"registry": "prod-ecr", "repository": "team/app", "tag": "1.4"},
        "targets": [{"registry": "hub", "repository": "acme/app", "tags": ["1.4", "latest"]},
                    {"registry": "ecr-eu", "repository": "team/app", "tags": ["1.4"]}],
        "platforms": ["linux/arm64", "linux/arm/v7"], "signatures": False, "create_repository": True,
    }
    assert json.loads(capsys.readouterr().out)["kind"] == "copy"


def test_copy_by_digest_and_with_the_defaults(api, capsys):  # noqa: F811
    @api.app.post("/v1/copy")
    def copy():
        return jsonify(copy_job()), 202

    assert run(api, "copy", f"prod-ecr/team/app@{DIGEST}", "--to", "hub/acme/app:1.4") == cli.EXIT_OK
    assert json.loads(api.calls[0]["body"]) == {"source": {"registry": "prod-ecr", "repository": "team/app", "digest": DIGEST},
                                                "targets": [{"registry": "hub", "repository": "acme/app", "tags": ["1.4"]}]}


def test_copy_wait_prints_a_line_per_blob_status_and_what_was_copied(api, capsys):  # noqa: F811
    @api.app.post("/v1/copy")
    def copy():
        return jsonify(copy_job()), 202

    running = copy_job("running", [layer(BLOBS[0], "copying", 1024, 2048), layer(BLOBS[1], "waiting", None, 4096)])
    more = copy_job("running", [layer(BLOBS[0], "copying", 1536, 2048), layer(BLOBS[1], "mounted", 4096, 4096)])

    @api.app.get("/v1/jobs/<job_id>/events")
    def events(job_id):
        return Response(sse("1-0", running, "state") + sse("2-0", more) + sse("3-0", succeeded(), "state"), mimetype="text/event-stream")

    assert run(api, "copy", "prod-ecr/team/app:1.4", "--to", "hub/acme/app:1.4,latest", "--platform", "linux/arm64", "--wait") == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"job {JOB_ID} queued: copy prod-ecr/team/app:1.4 [linux/arm64] → hub/acme/app:1.4,latest")
    texts = [line.split(" ", 1)[1] for line in lines]
    assert texts[1:] == [
        f"job {JOB_ID} running (attempt 1)",
        "blob aaaaaaaaaaaa copying 2.0 KiB",
        "blob bbbbbbbbbbbb waiting 4.0 KiB",
        "blob bbbbbbbbbbbb mounted 4.0 KiB",  # not again for 1.5 KiB of 2: a line per status, not per byte
        f"job {JOB_ID} succeeded",
        "blob aaaaaaaaaaaa copied 2.0 KiB",
        "blob cccccccccccc exists 300 B",
        f"copied docker.io/acme/app:1.4 {DIGEST} (6.3 KiB)",
        f"copied docker.io/acme/app:latest {DIGEST} (6.3 KiB)",
        f"copied hub/acme/app:{SIG} sha256:{'ef' * 32}",
    ]


def test_copy_on_a_terminal_draws_a_bar_per_blob():
    out = io.StringIO()
    view = cli.RichView(out, io.StringIO())
    view.update(copy_job("running", [layer(BLOBS[0], "copying", 1024, 2048)]))
    view.finish(succeeded())
    text = out.getvalue()
    assert "aaaaaaaaaaaa copied" in text and "2.0 KiB/2.0 KiB" in text and "bbbbbbbbbbbb mounted" in text
    assert f"copied docker.io/acme/app:latest {DIGEST}" in text


def test_jobs_lists_copies(api, capsys):  # noqa: F811
    @api.app.get("/v1/jobs")
    def jobs():
        return jsonify({"jobs": [succeeded()], "next_cursor": None})

    assert run(api, "jobs", "--kind", "copy") == cli.EXIT_OK
    assert api.calls[0]["args"]["kind"] == "copy"
    assert "copy prod-ecr/team/app:1.4 [linux/arm64] → hub/acme/app:1.4,latest" in capsys.readouterr().out
