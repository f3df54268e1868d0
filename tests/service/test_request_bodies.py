"""Hostile request bodies, in-process (issue 18, items 6 and 7): JSON nested to blow Python's
recursion, and bodies over the size limit sent without Content-Length (chunked), for every
endpoint that takes a body. The same against the real server: tests/e2e/test_hostile_http.py
(not a second test_hostile_http.py: the test folders share one module namespace)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from service import config
from service.app import create_app
from service.auth import hash_token
from service.http import MAX_JSON_DEPTH

from clients import CLIENTS, TOKENS, bearer
from helpers import GOOD, CheckedClient, problem

BODY_LIMIT = 64 * 1024  # the default, as in the finding
CONTEXT_LIMIT = 128 * 1024
BUILD_LIMIT = CONTEXT_LIMIT + BODY_LIMIT  # the build endpoint's own, larger limit

PULL = {"registry": "local", "repository": "team/app", "tag": "1"}
REPOSITORY = {"name": "team/app"}
BUILD = {"targets": [{"registry": "local", "repository": "team/app", "tags": ["1"]}]}
JSON_ENDPOINTS = [("/v1/publish", GOOD), ("/v1/pull", PULL), ("/v1/registries/prod-ecr/repositories", REPOSITORY)]


@pytest.fixture
def client(redis_url, redis_client, monkeypatch) -> CheckedClient:
    settings = config.parse(
        {
            "registries": {
                "local": {"type": "registry", "host": "localhost:5000"},
                "prod-ecr": {"type": "ecr", "region": "eu-west-1", "account_id": "123456789012", "create_repositories": True},
            },
            "limits": {"max_body_bytes": BODY_LIMIT, "max_context_bytes": CONTEXT_LIMIT},
            "clients": [{"name": name, "token_sha256": hash_token(TOKENS[name]), **rules} for name, rules in CLIENTS.items()],
        },
        {"IMAGEPUB_REDIS_URL": redis_url},
    )
    return CheckedClient(create_app(settings).test_client(), headers=bearer("admin"))


class EndlessBody(io.RawIOBase):
    """A request body that never ends: ``prefix``, then ``filler`` for ever. Counts what was
    read from it, as a server's socket would."""

    def __init__(self, prefix: bytes, filler: bytes = b" "):
        self.prefix, self.filler, self.taken = prefix, filler, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = (self.prefix[self.taken:] or self.filler * len(buffer))[: len(buffer)]
        buffer[: len(data)] = data
        self.taken += len(data)
        return len(data)


def post_streamed(client: CheckedClient, path: str, body: io.RawIOBase | bytes, content_type: str = "application/json"):
    """POST without Content-Length (``Transfer-Encoding: chunked``), as gunicorn hands it on:
    the stream ends where the chunked body ends (``wsgi.input_terminated``)."""
    stream = io.BytesIO(body) if isinstance(body, bytes) else body
    return client.post(path, headers={"Transfer-Encoding": "chunked"}, environ_overrides={
        "wsgi.input": stream, "wsgi.input_terminated": True, "CONTENT_TYPE": content_type})


def padded(document: dict, size: int) -> bytes:
    """``document`` as JSON of exactly ``size`` bytes (whitespace inside the object)."""
    text = json.dumps(document)
    return (text[:-1] + " " * (size - len(text)) + "}").encode()


def context() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"FROM scratch\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def multipart(request: str | bytes, boundary: str = "imagepubboundary", epilogue: bytes = b"") -> tuple[bytes, str]:
    request = request.encode() if isinstance(request, str) else request
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\nContent-Type: application/json\r\n\r\n".encode()
            + request + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"context\"; filename=\"c.tar.gz\"\r\n"
            f"Content-Type: application/gzip\r\n\r\n".encode() + context() + f"\r\n--{boundary}--\r\n".encode() + epilogue)
    return body, f"multipart/form-data; boundary={boundary}"


# --- item 6: deeply nested JSON ----------------------------------------------------------------

NESTED = {
    "arrays": "[" * 5000 + "]" * 5000,
    "objects": '{"a":' * 5000 + "1" + "}" * 5000,
    "mixed": '[{"a":' * 2500 + "1" + "}]" * 2500,
    "inside a request": '{"source": "a:1", "targets": ' + "[" * 5000 + "]" * 5000 + "}",
    "unclosed": "[" * 60_000,
    "just over the bound": "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
}


@pytest.mark.parametrize("path", [path for path, _ in JSON_ENDPOINTS])
@pytest.mark.parametrize("text", NESTED.values(), ids=NESTED.keys())
def test_deeply_nested_json_body_is_400_invalid_json(client, path, text):
    body = problem(client.post(path, data=text, content_type="application/json"), 400, "invalid_json")
    assert body["errors"] == [{"field": "body", "message": f"nests deeper than {MAX_JSON_DEPTH} levels"}]


@pytest.mark.parametrize("text", NESTED.values(), ids=NESTED.keys())
def test_deeply_nested_json_in_the_build_request_part_is_400_invalid_json(client, redis_client, text):
    data, content_type = multipart(text)
    body = problem(client.post("/v1/build", data=data, content_type=content_type), 400, "invalid_json")
    assert body["errors"][0]["field"] == "request"
    assert redis_client.keys("imagepub:job:*") == []


def test_nesting_within_the_bound_and_brackets_in_strings_are_read_as_json(client):
    """The bound refuses depth, not brackets: a document at the bound reaches validation
    (422 on its unknown field), and so do brackets inside strings, escaped quotes included."""
    at_bound = {**GOOD, "extra": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))}
    body = problem(client.post("/v1/publish", json=at_bound), 422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == ["extra"]
    in_strings = {**GOOD, "source": '\\"[' * 3000}
    body = problem(client.post("/v1/publish", json=in_strings), 422, "validation_failed")
    assert {e["field"] for e in body["errors"]} == {"source"}


def test_bodies_that_are_not_json_are_400_invalid_json_naming_the_body(client):
    for data in (b"{not json", b"", b"\xff\xfe\xfd not text", b'{"a": 1} trailing'):
        body = problem(client.post("/v1/publish", data=data, content_type="application/json"), 400, "invalid_json")
        assert [e["field"] for e in body["errors"]] == ["body"]


# --- item 7: bodies over the limit, without Content-Length ---------------------------------------


@pytest.mark.parametrize("path, document", JSON_ENDPOINTS)
def test_streamed_json_body_over_the_limit_is_413_not_cut_to_a_valid_prefix(client, redis_client, path, document):
    """The finding: a valid document exactly at the limit, then garbage. Cut at the limit it
    parsed and was accepted; it is 413, as with Content-Length."""
    over = padded(document, BODY_LIMIT) + b"garbage" * 10_000
    problem(post_streamed(client, path, over), 413, "payload_too_large")
    problem(client.post(path, data=over, content_type="application/json"), 413, "payload_too_large")
    assert redis_client.keys("imagepub:job:*") == []


@pytest.mark.parametrize("path, document", JSON_ENDPOINTS)
def test_endless_streamed_body_is_413_after_reading_one_byte_past_the_limit(client, path, document):
    endless = EndlessBody(padded(document, BODY_LIMIT))
    problem(post_streamed(client, path, endless), 413, "payload_too_large")
    assert endless.taken == BODY_LIMIT + 1


def test_streamed_body_at_the_limit_is_read_whole(client, redis_client):
    resp = post_streamed(client, "/v1/publish", padded(GOOD, BODY_LIMIT))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    problem(post_streamed(client, "/v1/publish", padded(GOOD, BODY_LIMIT + 1)), 413, "payload_too_large")


def test_build_has_its_own_larger_limit_both_ways(client, redis_client):
    within, content_type = multipart(json.dumps(BUILD))
    over_body_limit = multipart(json.dumps(BUILD), epilogue=b" " * (BODY_LIMIT + 1 - len(within)))[0]
    assert BODY_LIMIT < len(over_body_limit) <= BUILD_LIMIT
    resp = post_streamed(client, "/v1/build", over_body_limit, content_type)
    assert resp.status_code == 202, resp.get_data(as_text=True)

    over = multipart(json.dumps(BUILD), epilogue=b"garbage" * (BUILD_LIMIT // 7))[0]
    # the build's 413 names its limit and the setting (issue 17, item 7)
    body = problem(post_streamed(client, "/v1/build", over, content_type), 413, "context_too_large")
    assert "limits.max_context_bytes" in body["detail"]
    problem(client.post("/v1/build", data=over, content_type=content_type), 413, "context_too_large")
    endless = EndlessBody(within)
    problem(post_streamed(client, "/v1/build", endless, content_type), 413, "context_too_large")
    assert endless.taken <= BUILD_LIMIT + 1
