"""The entries of an untrusted tar archive, read one at a time, as the Docker daemon reads them.

Python's ``tarfile`` is not used for this: it keeps every member it has read (``members``,
stream mode included), reads a GNU sparse map of any length into a list before it returns the
entry, recurses once per chained extended header, and before CPython 3.11.10 searches pax
headers with a regular expression that is quadratic in a run of digits (CVE-2024-6232). This
reader keeps nothing but the entry at hand and reads no more than a limit allows.

It follows Go's ``archive/tar``, which the daemon unpacks contexts with: ustar, pax and GNU
headers; a pax header's ``path``, ``linkpath`` and ``size`` and GNU long names apply to the
entry that follows (the last of each wins); a global pax header is an entry of its own that
applies to nothing (moby ignores it); header-only types (directories, links, devices) carry no
data whatever their size field says. Sparse files are refused rather than read: Docker never
writes them into a context.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Longer pax or GNU long-name headers are refused: 64 KiB is sixteen times the longest path
# Linux allows (PATH_MAX, 4 KiB), room for a path, a link target and extended attributes.
MAX_EXTENDED_HEADER = 64 * 1024
REGULAR, DIRECTORY, SYMLINK, HARDLINK, GLOBAL_HEADER = b"0", b"5", b"2", b"1", b"g"
_FILE_TYPES = {b"0", b"\0", b"7"}  # regular and contiguous files
_DEVICE_TYPES = {b"3", b"4", b"6"}
# Types whose entries never have data, whatever their size field says (Go's isHeaderOnlyType).
_HEADER_ONLY_TYPES = {HARDLINK, SYMLINK, DIRECTORY, *_DEVICE_TYPES}
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(r"[0-9]+", re.ASCII)
_PAX_LENGTH = re.compile(rb"[0-9]{1,10} ")


class TarRefused(ValueError):
    """The archive is not one this reader accepts (damaged, or beyond a limit)."""


class Source:
    """The archive's bytes, read forward only; every read counts against ``limit``, so a
    stream that expands (gzip) is refused when it passes it, not after."""

    def __init__(self, stream: BinaryIO, limit: int, what: str):
        self.stream, self.limit, self.what, self.count = stream, limit, what, 0

    def _take(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        if self.count > self.limit:
            raise TarRefused(self.what)
        return data

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the stream. Refused up front when
        ``n`` alone would pass the limit: a header announcing it needs no reading to refuse."""
        if self.count + n > self.limit:
            raise TarRefused(self.what)
        parts, wanted = [], n
        while wanted:
            data = self._take(min(wanted, 1 << 16))
            if not data:
                break
            parts.append(data)
            wanted -= len(data)
        return b"".join(parts)

    def skip(self, n: int) -> bool:
        """Pass ``n`` bytes; False when the stream ended first."""
        if self.count + n > self.limit:
            raise TarRefused(self.what)
        while n:
            data = self._take(min(n, 1 << 16))
            if not data:
                return False
            n -= len(data)
        return True

    def drain(self) -> None:
        """Read what follows the end of the archive: the daemon reads it too."""
        while self._take(1 << 16):
            pass


@dataclass
class Entry:
    name: str
    linkname: str
    type: bytes
    size: int

    def isfile(self) -> bool:
        return self.type in _FILE_TYPES

    def isdir(self) -> bool:
        return self.type == DIRECTORY

    def issym(self) -> bool:
        return self.type == SYMLINK

    def islnk(self) -> bool:
        return self.type == HARDLINK

    def isdevice(self) -> bool:
        return self.type in _DEVICE_TYPES

    def isglobal(self) -> bool:
        return self.type == GLOBAL_HEADER


@dataclass
class Budget:
    """What the headers may cost in all: the entries, the bytes of every header block and
    extended header (pax, GNU long names) together, and the pax records (each costs time to
    read, however short)."""

    max_entries: int
    max_header_bytes: int
    max_pax_records: int
    entries: int = 0
    header_bytes: int = 0
    pax_records: int = 0

    def header(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > self.max_header_bytes:
            raise TarRefused(f"its headers take more than {self.max_header_bytes} bytes")

    def pax_record(self) -> None:
        self.pax_records += 1
        if self.pax_records > self.max_pax_records:
            raise TarRefused(f"its pax headers hold more than {self.max_pax_records} records")

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise TarRefused(f"it has more than {self.max_entries} entries")


def _string(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric field: octal padded with spaces or NULs, or base-256 (GNU), as Go reads it."""
    if field[:1] and field[0] & 0x80:
        if field[0] == 0xFF:
            raise TarRefused("a header has a negative number")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.strip(b" \0").split(b"\0", 1)[0]
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        raise TarRefused("a header has a malformed number")
    return int(text, 8)


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except TarRefused:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 0x7F)  # bytes as int8
    return stored in (unsigned, signed)


def _name(block: bytes) -> str:
    """The name field, with the ustar prefix where the format has one (ustar/pax, star)."""
    name = _string(block[:100])
    if block[257:263] == b"ustar\0":
        prefix = _string(block[345:476] if block[508:512] == b"tar\0" else block[345:500])
        if prefix:
            name = f"{prefix}/{name}"
    return name


def _pax_records(body: bytes, budget: Budget) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records, each checked as Go checks it."""
    records, pos = {}, 0
    while pos < len(body):
        budget.pax_record()
        match = _PAX_LENGTH.match(body, pos)
        length = int(match.group()[:-1]) if match else 0
        record = body[match.end():pos + length] if match else b""
        if length < 5 or pos + length > len(body) or not record.endswith(b"\n") or b"=" not in record:
            raise TarRefused("a pax header is malformed")
        key, _, value = record[:-1].partition(b"=")
        if not key:
            raise TarRefused("a pax header is malformed")
        key_text = key.decode("utf-8", "surrogateescape")
        if key_text in ("path", "linkpath") and b"\0" in value:
            raise TarRefused("a pax header is malformed")
        records[key_text] = value.decode("utf-8", "surrogateescape")
        pos += length
    if any(key.startswith("GNU.sparse.") for key in records):
        raise TarRefused("it holds a sparse file (not supported in build contexts)")
    return records


def _extended(source: Source, budget: Budget, size: int) -> bytes:
    if size > MAX_EXTENDED_HEADER:
        raise TarRefused(f"an extended header (pax or GNU long name) is longer than {MAX_EXTENDED_HEADER} bytes")
    padded = -(-size // BLOCK) * BLOCK
    budget.header(padded)
    body = source.read(padded)
    if len(body) < padded:
        raise TarRefused("it ends inside a header")
    return body[:size]


def _header(source: Source) -> bytes | None:
    """The next header block; None at the end of the archive."""
    block = source.read(BLOCK)
    if not block:
        return None
    if len(block) < BLOCK:
        raise TarRefused("it ends inside a header")
    if block == ZERO_BLOCK:
        following = source.read(BLOCK)
        if following and following != ZERO_BLOCK:
            raise TarRefused("a zero block is followed by more entries")
        return None
    if not _checksum_ok(block):
        raise TarRefused("a header's checksum is wrong")
    return block


def entries(source: Source, budget: Budget) -> Iterator[Entry]:
    """Each entry in turn, its data skipped; nothing is kept once the next one is read."""
    pax: dict[str, str] = {}
    long_name = long_link = None
    while (block := _header(source)) is not None:
        budget.header(BLOCK)
        kind, size = block[156:157], _number(block[124:136])
        if kind == b"x":
            pax = _pax_records(_extended(source, budget, size), budget)
            continue
        if kind in (b"L", b"K"):
            value = _string(_extended(source, budget, size))
            long_name, long_link = (value, long_link) if kind == b"L" else (long_name, value)
            continue
        budget.entry()
        if kind == b"S":
            raise TarRefused("it holds a sparse file (not supported in build contexts)")
        if kind == GLOBAL_HEADER:
            _pax_records(_extended(source, budget, size), budget)  # applies to nothing: checked, then dropped
            pax, long_name, long_link = {}, None, None  # Go starts afresh after it too
            yield Entry(_name(block), "", kind, 0)
            continue
        entry = Entry(_name(block), _string(block[157:257]), kind, size)
        if "path" in pax:
            entry.name = pax["path"]
        if "linkpath" in pax:
            entry.linkname = pax["linkpath"]
        if "size" in pax:
            if not _DECIMAL.fullmatch(pax["size"]):
                raise TarRefused("a pax header has a malformed size")
            entry.size = int(pax["size"])
        entry.name = long_name if long_name is not None else entry.name
        entry.linkname = long_link if long_link is not None else entry.linkname
        if kind == b"\0" and entry.name.endswith("/"):
            entry.type = DIRECTORY  # a pre-POSIX directory
        pax, long_name, long_link = {}, None, None
        yield entry
        if entry.type not in _HEADER_ONLY_TYPES and not source.skip(-(-entry.size // BLOCK) * BLOCK):
            raise TarRefused(f"it ends inside entry {entry.name!r}")


def inside(path: str) -> str | None:
    """``path`` normalised relative to the archive's root, or None when it leaves it (absolute,
    a backslash, or ``..`` above the root at any step)."""
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


def escape(entry: Entry, name: str | None, what: str) -> str | None:
    """How ``entry`` (named ``name`` by :func:`inside`) leads out of the ``what`` it is in — its
    name, or a link pointing outside — or None when it stays inside."""
    if name is None:
        return f"entry {entry.name!r} is outside the {what}"
    if entry.issym():
        target = entry.linkname if entry.linkname.startswith("/") else posixpath.join(posixpath.dirname(name), entry.linkname)
        if entry.linkname.startswith("/") or inside(target) is None:
            return f"symbolic link {entry.name!r} points outside the {what} ({entry.linkname!r})"
    elif entry.islnk() and inside(entry.linkname) is None:
        return f"hard link {entry.name!r} points outside the {what} ({entry.linkname!r})"
    return None
