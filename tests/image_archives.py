"""Image archives for upload tests, written here: an OCI image layout in a tar (what
``buildx --output type=oci,dest=…`` writes; tests/oci_layout.py makes the layout, a
multi-platform index included), a ``docker save`` archive made by hand (the real one comes from
the stack's daemon), tars of any shape for the refusals, and a generated archive of any size
that costs the test no memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import oci_layout

BLOCK = 512


def tar_of_directory(directory: Path, *, gz: bool = False) -> bytes:
    """The directory's content at the tar's root, as buildx writes an OCI layout."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    data = raw.getvalue()
    return gzip.compress(data, mtime=0) if gz else data


def oci_archive(directory: Path, platforms=("linux/amd64", "linux/arm64"), *, gz: bool = False,
                layer_sizes=(4096, 2048)) -> tuple[bytes, oci_layout.Image]:
    """An OCI layout tar holding one image (an index of ``platforms`` when there are several)."""
    image = oci_layout.write_image(directory, "latest", platforms, layer_sizes)
    return tar_of_directory(directory, gz=gz), image


def tar(entries: list[tuple[str, bytes | tarfile.TarInfo]], *, gz: bool = False) -> bytes:
    """A tar of ``(name, data)`` files, or ready TarInfo entries (links, devices) as given."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as out:
        for name, data in entries:
            if isinstance(data, tarfile.TarInfo):
                data.name = name
                out.addfile(data)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0) if gz else raw.getvalue()


def link(kind: bytes, target: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo("x")
    info.type, info.linkname, info.mode = kind, target, mode
    return info


def docker_archive_entries(images: int = 1) -> list[tuple[str, bytes]]:
    """``docker save`` of ``images`` one-layer images, made by hand: configs, layer tars and
    ``manifest.json``."""
    entries, manifest = [], []
    for i in range(images):
        layer = tar([(f"file-{i}.bin", os.urandom(1024))])
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        entries += [(config_name, config), (f"layer{i}/layer.tar", layer)]
        manifest.append({"Config": config_name, "RepoTags": [f"app-{i}:1"], "Layers": [f"layer{i}/layer.tar"]})
    return entries + [("manifest.json", json.dumps(manifest).encode())]


def multipart(request: dict, image: bytes | None, *, boundary: str = "imagepub-test", request_first: bool = True) -> tuple[bytes, str]:
    """A multipart/form-data body with the JSON ``request`` and the ``image`` part."""
    parts = [("request", "application/json", json.dumps(request).encode(), None)]
    if image is not None:
        parts.append(("image", "application/x-tar", image, "image.tar"))
    if not request_first:
        parts.reverse()
    out = b""
    for name, content_type, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def tar_header(name: str, size: int) -> bytes:
    """The header of a file entry of ``size`` bytes (its data to follow)."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def padded_oci_archive_stream(directory: Path, padding: int, chunk: int = 1 << 20) -> tuple[int, Iterator[bytes]]:
    """A valid one-platform OCI archive followed, inside the tar, by a file of ``padding``
    zero bytes: its size, and its bytes as a generator that reuses one zero chunk (a gigabyte
    costs the test a megabyte)."""
    oci_layout.write_image(directory, "latest", ("linux/amd64",), (1024,))
    full = tar_of_directory(directory)
    with tarfile.open(fileobj=io.BytesIO(full)) as members:
        members.getmembers()
        head = full[: members.offset]  # without the end-of-archive blocks
    header = tar_header("padding.bin", padding)
    tail = bytes(-padding % BLOCK) + bytes(2 * BLOCK)
    zeros = bytes(chunk)

    def stream() -> Iterator[bytes]:
        yield head + header
        left = padding
        while left:
            n = min(left, chunk)
            yield zeros if n == chunk else zeros[:n]
            left -= n
        yield tail

    return len(head) + len(header) + padding + len(tail), stream()



def multipart_around(request: dict, *, boundary: str = "imagepub-test") -> tuple[bytes, bytes, str]:
    """What goes before and after the archive's bytes in a multipart body (``request``
    first), for streaming an archive between them; and the content type."""
    body, content_type = multipart(request, b"", boundary=boundary)
    end = f"\r\n--{boundary}--\r\n".encode()
    return body[: -len(end)], end, content_type
