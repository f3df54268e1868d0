"""Build contexts: a tar (optionally gzipped) that the worker hands to the Docker daemon.

Every entry is checked before a job is accepted: no absolute paths, no ``..`` that climbs out,
no symbolic or hard link whose target lies outside the context, no devices or FIFOs, and a
bound on the unpacked size (a small gzip can expand enormously). The Dockerfile named by the
request must be in it. Nothing is extracted: the checks read the headers only.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zlib


class ContextRefused(ValueError):
    """The context cannot be built; the message names the offending entry."""


def _inside(path: str) -> str | None:
    """``path`` normalised relative to the context root, or None when it leaves the context."""
    if path.startswith("/") or "\\" in path:
        return None
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


# A context may unpack to this many times the largest upload allowed (limits.max_context_bytes).
UNPACKED_PER_UPLOADED = 4


def check_context(data: bytes, dockerfile: str, *, max_context_bytes: int) -> bool:
    """Raise :class:`ContextRefused` unless ``data`` is a safe build context holding
    ``dockerfile``. Returns True when it is gzip-compressed."""
    max_unpacked_bytes = UNPACKED_PER_UPLOADED * max_context_bytes
    compressed = data[:2] == b"\x1f\x8b"
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz" if compressed else "r:")
    except (tarfile.TarError, zlib.error, EOFError, OSError):
        raise ContextRefused("not a tar or tar.gz archive") from None
    wanted = _inside(dockerfile)
    if not wanted:
        raise ContextRefused(f"Dockerfile path {dockerfile!r} is outside the context")
    found, total = False, 0
    try:
        with archive:
            for member in archive:
                name = _inside(member.name)
                if name is None:
                    raise ContextRefused(f"entry {member.name!r} is outside the context")
                if member.issym():
                    target = member.linkname if member.linkname.startswith("/") else posixpath.join(posixpath.dirname(name), member.linkname)
                    if member.linkname.startswith("/") or _inside(target) is None:
                        raise ContextRefused(f"symbolic link {member.name!r} points outside the context ({member.linkname!r})")
                elif member.islnk():
                    if _inside(member.linkname) is None:
                        raise ContextRefused(f"hard link {member.name!r} points outside the context ({member.linkname!r})")
                elif not (member.isfile() or member.isdir()):
                    raise ContextRefused(f"entry {member.name!r} is a device or FIFO")
                total += member.size
                if total > max_unpacked_bytes:
                    raise ContextRefused(f"the context unpacks to more than {max_unpacked_bytes} bytes")
                if name == wanted and member.isfile():
                    found = True
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ContextRefused(f"the archive is damaged ({exc.__class__.__name__})") from None
    if not found:
        raise ContextRefused(f"the context holds no file {dockerfile!r}")
    return compressed
