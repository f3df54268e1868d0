"""What every view needs: the app's services, and request bodies read within their limits and
loaded through a schema."""

from __future__ import annotations

import io
import json
import re
from typing import IO, Any

import flask
from flask import current_app, request
from marshmallow import Schema, ValidationError
from werkzeug.utils import cached_property
from werkzeug.wsgi import get_input_stream

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from .schemas import field_errors

# No imagepub request nests beyond 4 levels. Python's json parser recurses once per level, and
# a few thousand `[` take it past the interpreter's recursion limit; refusing at 32 keeps
# everything that walks a request (marshmallow, json.dumps into the job record) far from it.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def ctx() -> dict[str, Any]:
    return current_app.extensions["imagepub"]


class BoundedRequest(flask.Request):
    """Flask's request, whose body is refused (413) as soon as it proves longer than the limit,
    however it is framed: werkzeug refuses a Content-Length above it, but reads a chunked body
    only up to the limit and ignores the rest, which would accept a valid prefix."""

    @cached_property
    def stream(self) -> IO[bytes]:  # type: ignore[override]
        limit = self.max_content_length
        if limit is not None and self.content_length is not None and self.content_length > limit:
            raise too_large(limit)
        if limit is not None and self.content_length is None and "wsgi.input_terminated" in self.environ:
            return _BoundedBody(self.environ["wsgi.input"], limit)
        return get_input_stream(self.environ, max_content_length=limit)


class _BoundedBody(io.RawIOBase):
    """A body without Content-Length: read through, at most ``limit + 1`` bytes of it."""

    def __init__(self, stream: IO[bytes], limit: int):
        self._stream, self._limit, self._read = stream, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._limit + 1 - self._read)
        data = self._stream.read(want) if want > 0 else b""
        self._read += len(data)
        if self._read > self._limit:
            raise too_large(self._limit)  # one byte past the limit is proof enough: read no more
        buffer[: len(data)] = data
        return len(data)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes")


def parse_json(data: bytes | str, field: str) -> Any:
    """``data`` parsed as JSON, or 400 ``invalid_json`` naming ``field`` (the body, or a part)."""
    try:
        text = data.decode(json.detect_encoding(data)) if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise _invalid_json(field, "is not UTF-8 text") from None
    if _nests_deeper(text, MAX_JSON_DEPTH):
        raise _invalid_json(field, f"nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError:
        raise _invalid_json(field, "is not valid JSON") from None


def _nests_deeper(text: str, limit: int) -> bool:
    """Whether the brackets of a JSON text, strings left out, nest deeper than ``limit``:
    one pass, no recursion."""
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > limit:
            return True
    return False


def _invalid_json(field: str, message: str) -> BadRequest:
    name = "the request body" if field == "body" else f"the `{field}` part"
    return BadRequest(f"{name} {message}", code="invalid_json", errors=[{"field": field, "message": message}])


def json_body() -> Any:
    if not request.is_json:
        raise UnsupportedMediaType("send the request body as application/json")
    return parse_json(request.get_data(), "body")


def load(schema: Schema, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None


def load_query(schema: Schema) -> dict[str, Any]:
    try:
        return schema.load(request.args.to_dict())
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None
