"""The pipeline client: imagepub's HTTP API seen from a build pipeline.

One class, :class:`ImagepubClient`, over ``requests``; one place where HTTP answers become typed
errors (:func:`_raise_for`): the API refused the request (:class:`ApiRefused`) or could not be
reached or answered (:class:`ApiUnavailable`). :meth:`ImagepubClient.follow` yields a job's
snapshots live from its Server-Sent Events, resuming with ``Last-Event-ID`` when the connection
drops and polling when the events endpoint is not there. :func:`context_archive` makes the
gzipped tar of a build context, honouring ``.dockerignore``.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import re
import secrets
import tarfile
import tempfile
import time
from typing import IO, Any, Callable, Iterator

import requests

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
USER_AGENT = "imagepub-cli/0.1"
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
UPLOAD_READ_TIMEOUT = 300.0  # the API stores a whole build context before it answers
SSE_READ_TIMEOUT = 60.0  # the API sends a keep-alive every 15 s: silence this long is a dead stream
MAX_RETRIES = 5  # consecutive connection failures while following a job, before giving up


class ClientError(Exception):
    """Anything that stops the client from getting an answer about a job."""


class ApiUnavailable(ClientError):
    """The API could not be reached, timed out, or answered 5xx."""


class WaitTimeout(ClientError):
    """The job had not ended when the caller's ``--timeout`` ran out."""


class ApiRefused(ClientError):
    """The API refused the request (4xx, problem+json): ``code``, ``detail`` and field ``errors``."""

    def __init__(self, status: int, code: str, detail: str, errors: list[dict[str, str]] | None = None):
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail, self.errors = status, code, detail, errors or []


def _problem(resp: requests.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _raise_for(resp: requests.Response) -> None:
    """Turn a non-2xx answer into :class:`ApiRefused` (4xx) or :class:`ApiUnavailable` (5xx)."""
    if resp.status_code < 400:
        return
    body = _problem(resp)
    code = body.get("code") or f"http_{resp.status_code}"
    detail = body.get("detail") or body.get("title") or resp.reason or "no detail"
    if resp.status_code >= 500:
        raise ApiUnavailable(f"{resp.request.method} {resp.url}: {resp.status_code} {code}: {detail}")
    raise ApiRefused(resp.status_code, code, detail, body.get("errors"))


class _Retries:
    """Consecutive connection failures while following: back off, then give up."""

    def __init__(self, limit: int = MAX_RETRIES):
        self.limit, self.failures = limit, 0

    def failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures > self.limit:
            raise ApiUnavailable(f"lost the API after {self.limit} retries: {exc}") from None
        time.sleep(min(0.5 * 2 ** (self.failures - 1), 8.0))

    def reset(self) -> None:
        self.failures = 0


class ImagepubClient:
    def __init__(self, base_url: str, token: str | None = None, session: requests.Session | None = None,
                 poll_interval: float = 1.0):
        self.base_url = base_url.rstrip("/")
        self.poll_interval = poll_interval
        self.http = session or requests.Session()
        self.http.headers["User-Agent"] = USER_AGENT
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, *, read_timeout: float = READ_TIMEOUT, **kw: Any) -> requests.Response:
        try:
            resp = self.http.request(method, self.base_url + path, timeout=(CONNECT_TIMEOUT, read_timeout), **kw)
        except requests.RequestException as exc:
            raise ApiUnavailable(f"{method} {self.base_url}{path}: {exc.__class__.__name__}: {_reason(exc)}") from None
        _raise_for(resp)
        return resp

    # --- submitting -------------------------------------------------------------------------

    def publish(self, request: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._request("POST", "/v1/publish", json=request, headers=_idempotency(idempotency_key)).json()

    def pull(self, request: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._request("POST", "/v1/pull", json=request, headers=_idempotency(idempotency_key)).json()

    def copy(self, request: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._request("POST", "/v1/copy", json=request, headers=_idempotency(idempotency_key)).json()

    def build(self, context: IO[bytes], request: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/build``: multipart/form-data with the JSON ``request`` and the gzipped
        tar ``context`` (see :class:`MultipartBody`), streamed from the file."""
        body = MultipartBody(request, context)
        headers = {"Content-Type": body.content_type, **_idempotency(idempotency_key)}
        return self._request("POST", "/v1/build", data=body, headers=headers, read_timeout=UPLOAD_READ_TIMEOUT).json()

    def publish_archive(self, upload: "ArchiveUpload", idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/publish`` with an image archive: multipart/form-data, the JSON ``request``
        first (a refused request costs no upload), then the archive, streamed as it is read."""
        headers = {"Content-Type": upload.content_type, **_idempotency(idempotency_key)}
        body = upload if upload.len is not None else iter(upload)  # a length: Content-Length; else chunked
        return self._request("POST", "/v1/publish", data=body, headers=headers, read_timeout=UPLOAD_READ_TIMEOUT).json()

    # --- reading ----------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, state: str | None = None, kind: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Up to ``limit`` jobs, newest first, following the API's cursor across pages."""
        found: list[dict[str, Any]] = []
        cursor = None
        while len(found) < limit:
            params = {"state": state, "kind": kind, "limit": min(limit - len(found), 200), "cursor": cursor}
            page = self._request("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None}).json()
            found += page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor or not page["jobs"]:
                break
        return found[:limit]

    def images(self, reference: str | None = None, daemon: str | None = None) -> dict[str, Any]:
        params = {key: value for key, value in (("reference", reference), ("daemon", daemon)) if value}
        return self._request("GET", "/v1/images", params=params).json()

    def limits(self) -> dict[str, int]:
        """The server's body limits, as its contract states them (``info.x-imagepub-limits`` of
        ``/openapi.yaml``); empty when it does not say."""
        import yaml

        try:
            spec = yaml.safe_load(self._request("GET", "/openapi.yaml").text)
            return dict((spec.get("info") or {}).get("x-imagepub-limits") or {})
        except Exception:  # an older server, or none: it checks the body itself
            return {}

    def daemons(self) -> dict[str, Any]:
        return self._request("GET", "/v1/daemons").json()

    def audit(self, limit: int = 50, **filters: str | None) -> list[dict[str, Any]]:
        """Up to ``limit`` audit entries, newest first, following the cursor: a page may be
        short (the API reads a bounded number of entries per page), so only a null cursor ends."""
        found: list[dict[str, Any]] = []
        cursor = None
        while len(found) < limit:
            params = {**{k: v for k, v in filters.items() if v is not None}, "limit": min(limit - len(found), 1000)}
            if cursor:
                params["cursor"] = cursor
            page = self._request("GET", "/v1/audit", params=params).json()
            found += page["entries"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return found[:limit]

    # --- following --------------------------------------------------------------------------

    def follow(self, job_id: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The job's snapshots as they happen, ending with its terminal state.

        Raises :class:`WaitTimeout` when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_event_id: str | None = None
        retries = _Retries()
        while True:
            _check_deadline(deadline, job_id)
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            read_timeout = SSE_READ_TIMEOUT if deadline is None else max(1.0, min(SSE_READ_TIMEOUT, deadline - time.monotonic() + 1))
            try:
                resp = self.http.get(f"{self.base_url}/v1/jobs/{job_id}/events", headers=headers, stream=True,
                                     timeout=(CONNECT_TIMEOUT, read_timeout))
            except requests.RequestException as exc:
                retries.failed(exc)
                continue
            with resp:
                streaming = resp.status_code == 200 and resp.headers.get("Content-Type", "").startswith("text/event-stream")
                if not streaming and resp.status_code == 404 and _problem(resp).get("code") == "job_not_found":
                    _raise_for(resp)
                got_events = False
                try:
                    for event_id, job in _job_events(_chunks(resp)) if streaming else ():
                        retries.reset()
                        if job is None:  # a keep-alive
                            _check_deadline(deadline, job_id)
                            continue
                        got_events = True
                        last_event_id = event_id or last_event_id
                        yield job
                        if job.get("state") in TERMINAL_STATES:
                            return
                        _check_deadline(deadline, job_id)
                except requests.RequestException as exc:
                    _check_deadline(deadline, job_id)
                    retries.failed(exc)
                    continue
            if not streaming:
                # No events endpoint here (an older API, a proxy that refuses streams): poll.
                yield from self._poll(job_id, deadline)
                return
            # The stream closed before the job ended (a restarted API pod): resume where it was.
            if not got_events:
                retries.failed(ApiUnavailable("the event stream closed without an event"))

    def _poll(self, job_id: str, deadline: float | None) -> Iterator[dict[str, Any]]:
        retries, last = _Retries(), None
        while True:
            try:
                job = self.job(job_id)
            except ApiUnavailable as exc:
                _check_deadline(deadline, job_id)
                retries.failed(exc)
                continue
            retries.reset()
            if job != last:
                yield job
                last = job
            if job.get("state") in TERMINAL_STATES:
                return
            _check_deadline(deadline, job_id)
            time.sleep(self.poll_interval)


def _reason(exc: requests.RequestException) -> str:
    """The innermost cause, without the URL noise requests wraps around it."""
    reason = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", reason)
    return str(reason)


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def _check_deadline(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise WaitTimeout(f"job {job_id} has not ended yet; it goes on without us")


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """Bytes as they arrive: ``read1`` answers with what is there instead of waiting for a full
    buffer, which would hold back events on a stream that is not chunked."""
    raw = resp.raw
    if not hasattr(raw, "read1"):
        yield from resp.iter_content(chunk_size=512)
        return
    while True:
        try:
            data = raw.read1(65536)
        except Exception as exc:  # urllib3's own errors: the connection dropped mid-stream
            raise requests.ConnectionError(exc) from None
        if not data:
            return
        yield data


def sse_events(chunks: Iterator[bytes]) -> Iterator[tuple[str | None, str, str] | None]:
    """Parse text/event-stream: ``(id, event, data)`` per event, ``None`` per comment line."""
    buffer = b""
    event_id: str | None = None
    event, data = "message", []
    for chunk in chunks:
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line, buffer = buffer[:newline].rstrip(b"\r").decode("utf-8", "replace"), buffer[newline + 1:]
            if not line:
                if data:
                    yield event_id, event, "\n".join(data)
                event, data = "message", []
            elif line.startswith(":"):
                yield None
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "id":
                    event_id = value
                elif name == "event":
                    event = value
                elif name == "data":
                    data.append(value)


def _job_events(chunks: Iterator[bytes]) -> Iterator[tuple[str | None, dict[str, Any] | None]]:
    for item in sse_events(chunks):
        if item is None:
            yield None, None
            continue
        event_id, _, data = item
        try:
            job = json.loads(data)
        except ValueError:
            continue
        if isinstance(job, dict) and "state" in job:
            yield event_id, job


# --- build uploads ------------------------------------------------------------------------------


class MultipartBody:
    """multipart/form-data with two parts, ``request`` (application/json) then ``context``
    (application/gzip, filename ``context.tar.gz``), read from the file as it is sent.

    ``len`` lets requests send a Content-Length instead of a chunked body."""

    def __init__(self, request: dict[str, Any], context: IO[bytes]):
        boundary = "imagepub-" + secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="request"\r\n'
            "Content-Type: application/json\r\n\r\n"
            f"{json.dumps(request)}\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="context"; filename="context.tar.gz"\r\n'
            "Content-Type: application/gzip\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        context.seek(0, os.SEEK_END)
        self.len = len(head) + context.tell() + len(tail)
        context.seek(0)
        self._parts = [_BytesReader(head), context, _BytesReader(tail)]

    def read(self, size: int = -1) -> bytes:
        out = b""
        while self._parts and (size < 0 or len(out) < size):
            piece = self._parts[0].read(-1 if size < 0 else size - len(out))
            if piece:
                out += piece
            else:
                self._parts.pop(0)
        return out


class UploadFailed(ClientError):
    """The archive could not be read while it was being sent (a file, stdin, the daemon)."""


class ArchiveUpload:
    """multipart/form-data with two parts, ``request`` (application/json) then ``image`` (the
    archive), its bytes taken from ``chunks`` as they are sent; ``on_sent(n)`` hears of each.

    With ``size`` (a file), ``len`` gives requests a Content-Length; without it (stdin, a
    daemon's ``docker save``) the body goes chunked."""

    def __init__(self, request: dict[str, Any], chunks: Iterator[bytes], size: int | None = None,
                 on_sent: Callable[[int], None] | None = None, filename: str = "image.tar"):
        boundary = "imagepub-" + secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._head = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="request"\r\n'
            "Content-Type: application/json\r\n\r\n"
            f"{json.dumps(request)}\r\n"
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: application/x-tar\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        self.len = None if size is None else len(self._head) + size + len(self._tail)
        self._chunks, self._on_sent = chunks, on_sent
        self._pieces: Iterator[bytes] | None = None
        self._buffer = b""

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        while True:
            try:
                chunk = next(self._chunks, None)
            except (OSError, ValueError) as exc:
                raise UploadFailed(f"reading the archive failed: {exc}") from None
            if chunk is None:
                break
            if chunk:
                yield chunk
                if self._on_sent:
                    self._on_sent(len(chunk))
        yield self._tail

    def read(self, size: int = -1) -> bytes:
        """For a body of known length: requests reads it in blocks."""
        if self._pieces is None:
            self._pieces = iter(self)
        while size < 0 or len(self._buffer) < size:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buffer += piece
        out = self._buffer if size < 0 else self._buffer[:size]
        self._buffer = self._buffer[len(out):]
        return out


def file_chunks(f: IO[bytes], chunk_size: int = 1 << 20) -> Iterator[bytes]:
    return iter(lambda: f.read(chunk_size), b"")


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.pos + size
        piece, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return piece


class DockerIgnore:
    """``.dockerignore`` as the Docker CLI reads it: Go ``filepath.Match`` patterns plus ``**``,
    ``!`` exceptions, the last matching line wins, and a pattern that matches a directory
    matches everything under it."""

    def __init__(self, lines: list[str]):
        self.patterns: list[tuple[bool, re.Pattern[str]]] = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
            if pattern and pattern != ".":
                try:
                    regex = re.compile(_glob_regex(pattern))
                except re.error:  # a malformed character class: match the text as written
                    regex = re.compile(re.escape(pattern))
                self.patterns.append((negate, regex))

    @classmethod
    def from_dir(cls, context_dir: str) -> "DockerIgnore":
        try:
            with open(os.path.join(context_dir, ".dockerignore"), encoding="utf-8") as f:
                return cls(f.read().splitlines())
        except FileNotFoundError:
            return cls([])

    @property
    def has_exceptions(self) -> bool:
        return any(negate for negate, _ in self.patterns)

    def excluded(self, path: str) -> bool:
        """Is ``path`` (relative to the context, ``/``-separated) left out?"""
        parts = path.split("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        excluded = False
        for negate, regex in self.patterns:
            if any(regex.fullmatch(c) for c in candidates):
                excluded = not negate
        return excluded


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and pattern.find("]", i + 1) > i + 1:
            end = pattern.find("]", i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body[0] in "^!" else body).replace("\\", "\\\\") + "]")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def context_archive(context_dir: str, dockerfile: str | None = None) -> tuple[IO[bytes], str]:
    """A gzipped tar of ``context_dir`` without what ``.dockerignore`` leaves out, in a
    temporary file; and the Dockerfile's path inside it.

    ``dockerfile`` is a path (default ``CONTEXT_DIR/Dockerfile``); one outside the context is
    added as ``.imagepub.Dockerfile``. The Dockerfile and ``.dockerignore`` are always sent, as
    the Docker CLI does. Entries are sorted and owned by root, so a context gives the same tar."""
    context_dir = os.path.abspath(context_dir)
    dockerfile_path = os.path.abspath(dockerfile or os.path.join(context_dir, "Dockerfile"))
    inside = os.path.commonpath([context_dir, dockerfile_path]) == context_dir
    dockerfile_name = os.path.relpath(dockerfile_path, context_dir).replace(os.sep, "/") if inside else ".imagepub.Dockerfile"
    ignore = DockerIgnore.from_dir(context_dir)
    out = tempfile.TemporaryFile()
    added: set[str] = set()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(path: str, arcname: str) -> None:
            tar.add(path, arcname=arcname, recursive=False, filter=_reset_owner)
            added.add(arcname)

        for root, dirs, files in os.walk(context_dir):
            dirs.sort()
            rel_root = os.path.relpath(root, context_dir).replace(os.sep, "/")
            for name in list(dirs):
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                if not ignore.excluded(rel):
                    add(os.path.join(root, name), rel)
                elif not ignore.has_exceptions:
                    dirs.remove(name)  # nothing under it can come back
            for name in sorted(files):
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                if not ignore.excluded(rel):
                    add(os.path.join(root, name), rel)
        for name, path in ((dockerfile_name, dockerfile_path), (".dockerignore", os.path.join(context_dir, ".dockerignore"))):
            if name not in added and os.path.isfile(path):
                add(path, name)
    out.seek(0)
    return out, dockerfile_name
