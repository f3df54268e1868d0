"""An image archive uploaded with a publish (``multipart/form-data``), received as it streams.

The body is read once, in chunks, and never held in memory: each chunk of the ``image`` part is
hashed, written to a spool file on disk and passed to the archive check
(service/image_archive.py), which reads the tar's headers as they go by. The ``request`` part
(the JSON) may come before or after it; the CLI sends it first, so that a refused request costs
no upload (the API answers before reading the archive, and the connection closes).

Limits, each refused as soon as it is passed, the rest of the body unread: the archive at
``limits.max_archive_bytes`` (413 ``archive_too_large``), the ``request`` part at
``limits.max_body_bytes`` (413), the parts' headers and anything between them at
``MAX_BUFFER`` bytes (400), at most ``MAX_PARTS`` parts.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from .artifacts import Artifacts, Upload
from .config import Limits
from .errors import BadRequest, PayloadTooLarge, ValidationFailed
from .image_archive import ArchiveInfo, ArchiveRefused, check_archive
from .jobstore import new_job_id

CHUNK = 256 * 1024
MAX_BUFFER = 4 * CHUNK
MAX_PARTS = 4
# Under gevent a fast sender never makes the socket wait, so a long upload would hold its
# process's other requests: give way every this many bytes.
YIELD_EVERY = 4 * 1024 * 1024
PARTS = ("request", "image")


def archive_too_large(limits: Limits) -> PayloadTooLarge:
    return PayloadTooLarge(f"the image archive is larger than limits.max_archive_bytes ({limits.max_archive_bytes} bytes)",
                           code="archive_too_large")


class _Form:
    """The parts of a multipart body, each read as a stream, in the order they come."""

    def __init__(self, body: BinaryIO, boundary: bytes, limits: Limits):
        self.body, self.limits = body, limits
        self.decoder = MultipartDecoder(boundary, max_form_memory_size=MAX_BUFFER, max_parts=MAX_PARTS)

    def event(self) -> Any:
        while True:
            try:
                event = self.decoder.next_event()
            except ValueError:  # werkzeug's words for a malformed body
                raise BadRequest("the multipart/form-data body is malformed", code="invalid_multipart") from None
            if event is not NEED_DATA:
                return event
            try:
                chunk = self.body.read(CHUNK)
            except PayloadTooLarge:  # a chunked body past the whole limit
                raise archive_too_large(self.limits) from None
            try:
                self.decoder.receive_data(chunk or None)
            except RequestEntityTooLarge:
                raise BadRequest(f"a part's headers, or what precedes the first part, pass {MAX_BUFFER} bytes; "
                                 f"at most {MAX_PARTS} parts", code="invalid_multipart") from None

    def parts(self) -> Iterator[tuple[str, "_Part"]]:
        while True:
            event = self.event()
            if isinstance(event, (Field, File)):  # a part's name decides, with or without a filename
                part = _Part(self)
                yield event.name, part
                part.drain()
            elif isinstance(event, Epilogue):
                return


class _Part(io.RawIOBase):
    """One part's data; ``on_data`` sees every chunk of it once, whoever reads it."""

    def __init__(self, form: _Form):
        self.form = form
        self.on_data: Callable[[bytes], None] | None = None
        self._data = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._data and not self._done:
            event = self.form.event()
            if not isinstance(event, Data):
                raise BadRequest("the multipart/form-data body is malformed", code="invalid_multipart")
            self._done = not event.more_data
            if self.on_data and event.data:
                self.on_data(event.data)
            self._data = memoryview(event.data)
        n = min(len(buffer), len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


@dataclass
class Received:
    """The archive, spooled to disk and checked: not stored yet."""

    spool: str
    sha256: str
    size: int
    info: ArchiveInfo

    def store(self, artifacts: Artifacts) -> Upload:
        """Put it in the artifact store under the id its job will have."""
        job_id = new_job_id()
        try:
            artifacts.put_file(job_id, self.spool, self.size)
        finally:
            _unlink(self.spool)
        record = {"sha256": self.sha256, "bytes": self.size, "format": self.info.format}
        return Upload(artifacts, job_id, self.sha256, self.size, fields={"archive": record})

    def discard(self) -> None:
        _unlink(self.spool)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _small(part: _Part, limit: int, name: str) -> bytes:
    data = part.read(limit + 1)
    while len(data) <= limit:
        more = part.read(limit + 1 - len(data))
        if not more:
            return data
        data += more
    raise PayloadTooLarge(f"the `{name}` part is larger than limits.max_body_bytes ({limit} bytes)")


def _image(part: _Part, limits: Limits, artifacts: Artifacts) -> Received:
    spool = artifacts.spool()
    digest, size = hashlib.sha256(), 0

    def on_data(chunk: bytes) -> None:
        nonlocal size
        before, size = size, size + len(chunk)
        if size > limits.max_archive_bytes:
            raise archive_too_large(limits)
        digest.update(chunk)
        spool.write(chunk)
        if before // YIELD_EVERY != size // YIELD_EVERY:
            time.sleep(0)  # gevent: other requests of this process get their turn

    part.on_data = on_data
    try:
        with spool:
            reader = io.BufferedReader(part, CHUNK)
            try:
                info = check_archive(reader, limits.max_archive_bytes)
            except ArchiveRefused as exc:
                raise ValidationFailed([{"field": "image", "message": str(exc)}], f"the image archive is refused: {exc}",
                                       code="invalid_archive") from None
            while reader.read(CHUNK):  # what follows the tar's end: part of the upload all the same
                pass
    except BaseException:
        _unlink(spool.name)
        raise
    if size == 0:
        _unlink(spool.name)
        raise ValidationFailed([{"field": "image", "message": "empty"}], code="invalid_archive")
    return Received(spool.name, digest.hexdigest(), size, info)


def receive_archive(body: BinaryIO, boundary: bytes, limits: Limits, artifacts: Artifacts,
                    load_request: Callable[[bytes], dict[str, Any]]) -> tuple[dict[str, Any], Received]:
    """The ``request`` part, loaded by ``load_request`` as soon as it has arrived, and the
    ``image`` part, spooled and checked. Raises the problem to answer otherwise."""
    form = _Form(body, boundary, limits)
    data: dict[str, Any] | None = None
    received: Received | None = None
    try:
        for name, part in form.parts():
            if name not in PARTS or (name == "request" and data is not None) or (name == "image" and received is not None):
                raise ValidationFailed([{"field": name or "body", "message": "unexpected part: send one `request` and one `image`"}])
            if name == "request":
                data = load_request(_small(part, limits.max_body_bytes, name))
            else:
                received = _image(part, limits, artifacts)
        missing = [name for name, value in (("request", data), ("image", received)) if value is None]
        if missing:
            raise ValidationFailed([{"field": name, "message": "missing part"} for name in missing])
    except BaseException:
        if received is not None:
            received.discard()
        raise
    return data, received
