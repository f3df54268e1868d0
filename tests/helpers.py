"""Helpers shared by the test packages (tests/ is on sys.path: see tests/conftest.py)."""

from __future__ import annotations

import json
import re

import yaml
from urllib.parse import quote, unquote
from pathlib import Path

from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from service.queue import JobQueue

SPEC = Path(__file__).resolve().parents[1] / "openapi.yaml"
_openapi = OpenAPI.from_file_path(
    str(SPEC),
    config=Config(extra_media_type_deserializers={
        "application/problem+json": json.loads, "application/yaml": yaml.safe_load, "text/event-stream": lambda body: _first_event(body.decode()),
    }),
)
GOOD = {"source": "python-lab:latest", "targets": [{"registry": "local", "repository": "team/app", "tags": ["latest", "1.4.2"]}]}


def _sse_events(text: str):
    """The events of a text/event-stream body with data, each as its fields (strings)."""
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in fields:
            yield fields


def _first_event(text: str) -> dict:
    """An SSE body as the contract describes it: one event, its fields as strings."""
    return next(_sse_events(text), {})


_REPOSITORY_PATH = re.compile(r"(/v1/registries/[^/]+/repositories/)(.+?)(/images)?")


def assert_conforms(method: str, path: str, status: int, headers: dict, body: bytes, mimetype: str) -> None:
    """A response (status, headers, body) is one openapi.yaml allows for its request."""
    # A repository in a path has slashes, which OpenAPI's path templates cannot match: encode
    # them as a caller may (the API takes both forms).
    match = _REPOSITORY_PATH.fullmatch(path)
    if match:
        path = match.group(1) + quote(unquote(match.group(2)), safe="") + (match.group(3) or "")
    _openapi.validate_response(
        MockRequest("http://localhost", method.lower(), path),
        MockResponse(body, status_code=status, headers=headers, content_type=mimetype),
    )


class CheckedClient:
    """A Flask test client whose every response is validated against the contract."""

    def __init__(self, client, headers: dict | None = None):
        self.client = client
        self.headers = headers or {}

    def open(self, *args, **kwargs):
        kwargs["headers"] = {**self.headers, **(kwargs.get("headers") or {})}
        response = self.client.open(*args, **kwargs)
        # the path as sent (a %2F in a repository name tells describe from images apart)
        sent = response.request.environ.get("RAW_URI", response.request.path).split("?", 1)[0]
        assert_conforms(response.request.method, sent, response.status_code,
                        dict(response.headers), response.get_data(), response.mimetype)
        return response

    def get(self, *a, **kw):
        return self.open(*a, method="GET", **kw)

    def post(self, *a, **kw):
        return self.open(*a, method="POST", **kw)


def problem(resp, status: int, code: str) -> dict:
    """Assert ``resp`` is the problem+json ``code`` with ``status``; return its body."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json(force=True)
    assert body["code"] == code and body["status"] == status
    return body


def job_queues(redis_client) -> list[str]:
    """Every job queue (kombu's Redis lists): the shared one, the daemons', each daemon's."""
    return ["imagepub.jobs", "imagepub.daemons", *sorted(redis_client.scan_iter("imagepub.daemon.*", _type="list"))]


def queued_job_ids(redis_client) -> list[str]:
    """Job ids in the Celery messages waiting on the job queues (kombu's Redis lists)."""
    return [JobQueue.job_of(raw) for queue in job_queues(redis_client) for raw in redis_client.lrange(queue, 0, -1)]


def parse_sse(text: str) -> list[dict]:
    """The events of a text/event-stream body: {"id", "event", "data" (parsed JSON)}."""
    return [{**fields, "data": json.loads(fields["data"])} for fields in _sse_events(text)]
