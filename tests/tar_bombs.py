"""Hostile build contexts, made byte by byte (tests/service/test_input_bounds.py and
tests/e2e/test_hostile_input.py).

Written by hand rather than with tarfile: a million headers are one block repeated, and the
headers tarfile would never write (chained pax headers, GNU sparse maps, digit runs) are the
point.
"""

from __future__ import annotations

import functools
import tarfile
import zlib

BLOCK = 512
DOCKERFILE = b"FROM scratch\n"


def header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info.tobuf(tarfile.USTAR_FORMAT)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str, data: bytes) -> bytes:
    return header(name, size=len(data)) + padded(data)


def extended(kind: bytes, body: bytes) -> bytes:
    """A pax (``x``, ``g``) or GNU long-name (``L``, ``K``) header with its body."""
    return header("././@Extended", kind, len(body)) + padded(body)


def pax_record(key: str, value: str) -> bytes:
    text = f" {key}={value}\n".encode()
    length = len(text) + len(str(len(text)))
    if len(str(length)) + len(text) > length:  # one more digit
        length += 1
    return str(length).encode() + text


def dockerfile() -> bytes:
    return member("Dockerfile", DOCKERFILE)


def gzipped(*parts: tuple[bytes, int]) -> bytes:
    """``(chunk, times)`` parts, gzipped as one stream without building it whole."""
    deflate = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = []
    for chunk, times in parts:
        batch = chunk * max(1, (1 << 20) // max(len(chunk), 1))
        whole, rest = divmod(times * len(chunk), len(batch))
        out += [deflate.compress(batch) for _ in range(whole)]
        out.append(deflate.compress(chunk * (rest // len(chunk))))
    out.append(deflate.flush())
    return b"".join(out)


def end() -> bytes:
    return bytes(2 * BLOCK)


@functools.cache
def million_empty_directories() -> bytes:
    """The finding: 1,048,576 empty directory entries, a 2.3 MB upload."""
    return gzipped((dockerfile(), 1), (header("d/", tarfile.DIRTYPE), 1 << 20), (end(), 1))
