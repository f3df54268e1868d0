"""Build contexts: a tar (optionally gzipped) that the worker hands to the Docker daemon.

Every entry is checked before a job is accepted: no absolute paths, no ``..`` that climbs out,
no symbolic or hard link whose target lies outside the context, no devices, FIFOs or types the
daemon would not unpack. The Dockerfile named by the request must be in it. Nothing is
extracted: the check reads the headers only, as a stream (service/tar_headers.py), and refuses
at the first entry past a limit, whatever follows:

- entries: ``limits.max_context_entries``. An empty entry costs a few bytes compressed and its
  header (at least 512 bytes) unpacked, and every one costs the API, then the daemon, time;
- header bytes (every header block, pax and GNU long-name headers included):
  ``HEADER_BYTES_PER_ENTRY`` times that, and pax records ``PAX_RECORDS_PER_ENTRY`` times that;
  together they bound the time the headers take (an attacker's best was under a second here);
- unpacked bytes: ``UNPACKED_PER_UPLOADED`` times ``limits.max_context_bytes``, counted as the
  archive is decompressed (a small gzip can expand enormously), what follows its end included.
"""

from __future__ import annotations

import gzip
import io
import zlib

from .config import Limits
from .tar_headers import Budget, Entry, Source, TarRefused, entries, escape, inside


class ContextRefused(ValueError):
    """The context cannot be built; the message names the offending entry or limit."""


# A context may unpack to this many times the largest upload allowed (limits.max_context_bytes).
UNPACKED_PER_UPLOADED = 4
# The headers of a context may take this many bytes per entry allowed, on average: a header
# block, a pax header with its records and a little more (a PAX-format archive of short names
# needs 1,536).
HEADER_BYTES_PER_ENTRY = 2048
# ...and this many pax records (GNU tar's posix format writes 2 or 3 per entry: atime, ctime,
# a long path).
PAX_RECORDS_PER_ENTRY = 8


def _check_entry(entry: Entry, name: str | None) -> None:
    problem = escape(entry, name, "context")
    if problem:
        raise ContextRefused(problem)
    if entry.isdevice():
        raise ContextRefused(f"entry {entry.name!r} is a device or FIFO")
    if not (entry.isfile() or entry.isdir() or entry.issym() or entry.islnk()):
        raise ContextRefused(f"entry {entry.name!r} has a type the daemon does not unpack ({entry.type!r})")


def _limits(limits: Limits) -> tuple[Budget, int]:
    entries_ = limits.max_context_entries
    budget = Budget(max_entries=entries_, max_header_bytes=HEADER_BYTES_PER_ENTRY * entries_, max_pax_records=PAX_RECORDS_PER_ENTRY * entries_)
    return budget, UNPACKED_PER_UPLOADED * limits.max_context_bytes


def _refusal(exc: TarRefused, budget: Budget, max_unpacked: int) -> ContextRefused:
    """The reader's refusal, naming the setting that bounds it."""
    message = str(exc)
    if budget.entries > budget.max_entries:
        message += " (limits.max_context_entries)"
    elif budget.header_bytes > budget.max_header_bytes:
        message += f" ({HEADER_BYTES_PER_ENTRY} per entry of limits.max_context_entries)"
    elif budget.pax_records > budget.max_pax_records:
        message += f" ({PAX_RECORDS_PER_ENTRY} per entry of limits.max_context_entries)"
    elif message.startswith("it unpacks"):
        message += f" ({UNPACKED_PER_UPLOADED} times limits.max_context_bytes)"
    return ContextRefused(f"the context is refused: {message}")


def check_context(data: bytes, dockerfile: str, limits: Limits) -> bool:
    """Raise :class:`ContextRefused` unless ``data`` is a safe build context holding
    ``dockerfile``, within ``limits``. Returns True when it is gzip-compressed."""
    wanted = inside(dockerfile)
    if not wanted:
        raise ContextRefused(f"Dockerfile path {dockerfile!r} is outside the context")
    compressed = data[:2] == b"\x1f\x8b"
    stream = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") if compressed else io.BytesIO(data)
    budget, max_unpacked = _limits(limits)
    source = Source(stream, max_unpacked, f"it unpacks to more than {max_unpacked} bytes")
    found, first = False, True
    try:
        for entry in entries(source, budget):
            first = False
            if entry.isglobal():
                continue  # a global pax header: the daemon ignores it
            name = inside(entry.name)
            _check_entry(entry, name)
            found = found or (name == wanted and entry.isfile())
        source.drain()
    except TarRefused as exc:
        if first and not budget.header_bytes:
            raise ContextRefused("not a tar or tar.gz archive") from None
        raise _refusal(exc, budget, max_unpacked) from None
    except (zlib.error, EOFError, OSError) as exc:  # gzip.BadGzipFile is an OSError
        if first:
            raise ContextRefused("not a tar or tar.gz archive") from None
        raise ContextRefused(f"the archive is damaged ({exc.__class__.__name__})") from None
    if not found:
        raise ContextRefused(f"the context holds no file {dockerfile!r}")
    return compressed
