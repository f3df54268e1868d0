"""A build's sources: every image its Dockerfile makes the daemon read, authorised like a
publish's source (issue 18, item 3), so that no build starts from, or copies out of, another
client's image and pushes it into the caller's repositories.

The rule is the publish's (``service/access.py``): a client may read an image named in its
repository patterns, whatever the registry host; admins any image. An image id names no
repository: a full one is judged on the worker, by the names of the image it resolves to (as a
publish's source); a prefix is refused (the daemon resolves it again when it builds, so no
check could pin the image it will find). Checked at submission (here) and again on the worker
before it builds (``workers/build_sources.py``), where the daemon's images are.

For a client that is not an admin, the Dockerfile is read from the context as the daemon will
read it: the last entry at its path, which must be a regular file on a path of directories,
in a context that writes nothing through a symbolic link (the daemon would unpack that entry
wherever the link points, the Dockerfile included). What cannot be read so is refused (422
``unreadable_dockerfile``), never guessed. The archive has passed ``check_context`` first.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import re
import zlib
from collections.abc import Mapping
from typing import Any

from . import sources
from .access import is_admin, may_use_image_name
from .build_context import (
    HEADER_BYTES_PER_ENTRY,
    PAX_RECORDS_PER_ENTRY,
    UNPACKED_PER_UPLOADED,
)
from .config import Client, Limits
from .dockerfile import ImageUse, RemoteSource, Unreadable
from .dockerfile import image_uses as dockerfile_image_uses
from .errors import Forbidden, ValidationFailed
from .schemas import SOURCE_RE
from .tar_headers import Budget, Source, TarRefused, entries

# A Dockerfile is text of a few KiB; a larger one is refused rather than parsed in the API
# (256 KiB of the costliest text takes it about 0.4 s).
MAX_DOCKERFILE_BYTES = 256 * 1024
_FULL_ID = re.compile(r"(?:sha256:)?[a-f0-9]{64}", re.ASCII)


class _Keeping(Source):
    """The archive's bytes, keeping the data of the entry the caller marks: the tar reader
    passes over each entry's data with ``skip`` right after it yields the entry."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.keep, self.kept = False, b""

    def skip(self, n: int) -> bool:
        if not self.keep:
            return super().skip(n)
        self.keep, self.kept = False, self.read(n)
        return len(self.kept) == n


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def read_dockerfile(archive: bytes, path: str, limits: Limits) -> bytes:
    """The Dockerfile at ``path`` in the context ``archive``, as the daemon unpacks it."""
    wanted = posixpath.normpath(path)
    parents = set(_parents(wanted))
    stream = gzip.GzipFile(fileobj=io.BytesIO(archive), mode="rb") if archive[:2] == b"\x1f\x8b" else io.BytesIO(archive)
    n = limits.max_context_entries
    source = _Keeping(stream, UNPACKED_PER_UPLOADED * limits.max_context_bytes, "it unpacks to more than its limit")
    links: set[str] = set()
    size = None
    try:
        for entry in entries(source, Budget(n, HEADER_BYTES_PER_ENTRY * n, PAX_RECORDS_PER_ENTRY * n)):
            if entry.isglobal():
                continue
            name = posixpath.normpath(entry.name)
            if any(parent in links for parent in _parents(name)):
                raise Unreadable(f"the context writes {entry.name!r} through a symbolic link, which the daemon follows", "context")
            if entry.issym():
                links.add(name)
            if name == wanted:
                if not entry.isfile():
                    raise Unreadable(f"{path!r} is a link or a directory in the context, not a file", "dockerfile")
                if entry.size > MAX_DOCKERFILE_BYTES:
                    raise Unreadable(f"{path!r} is larger than {MAX_DOCKERFILE_BYTES} bytes", "dockerfile")
                source.keep, size = True, entry.size  # the last one wins, as when the daemon unpacks
            elif name in parents and not entry.isdir():
                raise Unreadable(f"{entry.name!r}, on the Dockerfile's path, is not a directory", "context")
    except (TarRefused, zlib.error, EOFError, OSError) as exc:
        raise Unreadable(f"the context cannot be read ({exc})", "context") from None
    if size is None:
        raise Unreadable(f"the context holds no file {path!r}", "dockerfile")
    return source.kept[:size]


def image_uses(archive: bytes, request: Mapping[str, Any], limits: Limits) -> list[ImageUse]:
    """Every image the build of ``request`` (its ``dockerfile`` and ``build_args``) reads."""
    dockerfile = read_dockerfile(archive, request["dockerfile"], limits)
    return dockerfile_image_uses(dockerfile, request.get("build_args") or {})


def refusal(client: Client, use: ImageUse) -> str | None:
    """Why ``client`` may not read the image of ``use``, judged by the name the Dockerfile
    gives it; None when it may, or when only the image it resolves to can tell (a full id)."""
    reference = use.reference
    if sources.is_image_id(reference):
        if _FULL_ID.fullmatch(reference):
            return None
        return "an image id prefix (or a name of hexadecimal digits alone) may stand for any image: name the image, or give its full id"
    if not SOURCE_RE.fullmatch(reference):
        raise Unreadable(f"line {use.line}: {use.instruction} {reference!r} is not an image reference", use.field)
    if may_use_image_name(client, reference):
        return None
    return f"client {client.name!r} may not read repository {sources.parse(reference).repository!r}"


def describe(use: ImageUse, why: str) -> str:
    return f"line {use.line}: {use.instruction} {use.reference}: {why}"


def require_build_sources(client: Client, archive: bytes, request: Mapping[str, Any], limits: Limits) -> None:
    """At submission: 403 ``forbidden`` naming each field (``dockerfile``, ``build_args.X``)
    whose image the client may not read; 422 ``unreadable_dockerfile`` when the Dockerfile
    cannot be read as the daemon will. Admins build from anything."""
    if is_admin(client):
        return
    try:
        refused = [
            {"field": use.field, "message": describe(use, why)}
            for use in image_uses(archive, request, limits)
            if (why := refusal(client, use))
        ]
    except RemoteSource as exc:
        raise Forbidden(str(exc), errors=[{"field": exc.field, "message": str(exc)}]) from None
    except Unreadable as exc:
        raise ValidationFailed(
            [{"field": exc.field, "message": str(exc)}], "the Dockerfile cannot be read as the Docker daemon will read it",
            code="unreadable_dockerfile",
        ) from None
    if refused:
        raise Forbidden("not allowed on the build's images: " + ", ".join(dict.fromkeys(e["field"] for e in refused)), errors=refused)
