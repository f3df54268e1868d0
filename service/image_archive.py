"""Image archives a pipeline uploads: what the API can tell of one from its tar headers alone,
as it streams past (service/uploads.py), before a job is queued.

Two formats, as their tools write them (optionally gzipped):

- ``docker-archive``: ``docker save`` — ``manifest.json`` (a list of images: exactly one is
  taken), each image's config and layer tars;
- ``oci-archive``: an OCI image layout in a tar — ``oci-layout``, ``index.json`` and
  ``blobs/sha256/…`` — as ``docker buildx build --output type=oci`` writes it: ``index.json``
  names one image, a manifest or an index of its platforms (Docker 25's ``docker save`` writes
  both layouts: it is taken as OCI, whose digests are kept).

The archive is read with the build context's streaming tar reader (service/tar_headers.py),
bounded the same way: entries, header bytes and pax records (``MAX_ENTRIES``), and the bytes it
unpacks to (``UNPACKED_PER_UPLOADED`` times ``limits.max_archive_bytes``: a gzip can expand
enormously). Entries must stay inside the archive (no absolute paths, no ``..`` climbing out, no
link pointing outside) and be files, directories or links. Only ``manifest.json``,
``index.json`` and ``oci-layout`` are read, at most ``MAX_METADATA_BYTES`` each. What only the
blobs can tell (a manifest's layers, their digests) the worker finds out (workers/archive.py).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from .build_context import HEADER_BYTES_PER_ENTRY, PAX_RECORDS_PER_ENTRY
from .tar_headers import Budget, Entry, Source, TarRefused, entries, escape, inside

DOCKER_ARCHIVE, OCI_ARCHIVE = "docker-archive", "oci-archive"
# docker save writes 3 or 4 entries per layer, an OCI layout one per blob: 10,000 is far more
# than any image has.
MAX_ENTRIES = 10_000
MAX_METADATA_BYTES = 1024 * 1024
UNPACKED_PER_UPLOADED = 4
METADATA = ("manifest.json", "index.json", "oci-layout")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}", re.ASCII)


class ArchiveRefused(ValueError):
    """Not an image archive imagepub can push; the message says why."""


@dataclass
class ArchiveInfo:
    format: str  # docker-archive or oci-archive
    compressed: bool  # gzip


class _Capturing(Source):
    """The tar reader's source, keeping the data of the one entry asked for (``want`` bytes of
    it) instead of skipping it."""

    want: int | None = None
    captured: bytes = b""

    def skip(self, n: int) -> bool:
        if self.want is None:
            return super().skip(n)
        data = self.read(n)  # the entry and its padding
        self.captured, self.want = data[:self.want], None
        return len(data) == n


def _check_entry(entry: Entry, name: str | None) -> None:
    problem = escape(entry, name, "archive")
    if problem:
        raise ArchiveRefused(problem)
    if not (entry.isfile() or entry.isdir() or entry.issym() or entry.islnk()):
        raise ArchiveRefused(f"entry {entry.name!r} is neither a file, a directory nor a link")


def check_archive(stream: BinaryIO, max_archive_bytes: int) -> ArchiveInfo:
    """Read ``stream`` (with ``peek``: a buffered reader) up to the end of the tar and raise
    :class:`ArchiveRefused` unless it is one image archive. What follows the tar's end is left
    in the stream."""
    compressed = stream.peek(2)[:2] == b"\x1f\x8b"
    data = gzip.GzipFile(fileobj=stream, mode="rb") if compressed else stream
    max_unpacked = UNPACKED_PER_UPLOADED * max_archive_bytes
    source = _Capturing(data, max_unpacked, f"it unpacks to more than {max_unpacked} bytes ({UNPACKED_PER_UPLOADED} × limits.max_archive_bytes)")
    budget = Budget(max_entries=MAX_ENTRIES, max_header_bytes=HEADER_BYTES_PER_ENTRY * MAX_ENTRIES,
                    max_pax_records=PAX_RECORDS_PER_ENTRY * MAX_ENTRIES)
    names: set[str] = set()
    metadata: dict[str, bytes] = {}
    wanted: str | None = None
    first = True
    try:
        for entry in entries(source, budget):
            if wanted is not None:  # the entry before this one was read, not skipped
                metadata[wanted], wanted = source.captured, None
            first = False
            if entry.isglobal():
                continue
            name = inside(entry.name)
            _check_entry(entry, name)
            names.add(name)
            if name in METADATA and entry.isfile():
                if entry.size > MAX_METADATA_BYTES:
                    raise ArchiveRefused(f"{name} is larger than {MAX_METADATA_BYTES} bytes")
                wanted, source.want = name, entry.size
        if wanted is not None:
            metadata[wanted] = source.captured
    except TarRefused as exc:
        if first and not budget.header_bytes:
            raise ArchiveRefused("not a tar or tar.gz archive") from None
        raise ArchiveRefused(f"the archive is refused: {exc}") from None
    except (zlib.error, EOFError, OSError) as exc:  # gzip.BadGzipFile is an OSError
        if first:
            raise ArchiveRefused("not a tar or tar.gz archive") from None
        raise ArchiveRefused(f"the archive is damaged ({exc.__class__.__name__})") from None
    return ArchiveInfo(_format(names, metadata), compressed)


def _format(names: set[str], metadata: dict[str, bytes]) -> str:
    if "oci-layout" in metadata and "index.json" in metadata:
        _check_oci(names, metadata)
        return OCI_ARCHIVE
    if "manifest.json" in metadata:
        _check_docker(names, metadata["manifest.json"])
        return DOCKER_ARCHIVE
    raise ArchiveRefused(
        "neither an OCI image layout (oci-layout, index.json and blobs/: buildx --output type=oci) "
        "nor a docker save archive (manifest.json)"
    )


def _json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ArchiveRefused(f"{name} is not JSON") from None


def _check_oci(names: set[str], metadata: dict[str, bytes]) -> None:
    layout = _json("oci-layout", metadata["oci-layout"])
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        raise ArchiveRefused("oci-layout has no imageLayoutVersion")
    index = _json("index.json", metadata["index.json"])
    descriptors = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(descriptors, list) or not descriptors or not all(isinstance(d, dict) for d in descriptors):
        raise ArchiveRefused("index.json lists no image")
    digests = {d.get("digest") for d in descriptors}
    if len(digests) > 1:
        raise ArchiveRefused(
            f"index.json names {len(digests)} images; an archive holds one image (an index of its platforms, for several)"
        )
    digest, media_type = descriptors[0].get("digest"), descriptors[0].get("mediaType")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ArchiveRefused("index.json names its image by no sha256 digest")
    if media_type not in INDEX_TYPES + MANIFEST_TYPES:
        raise ArchiveRefused(f"index.json names a {media_type!r}, neither an image manifest nor an index")
    if f"blobs/sha256/{digest.split(':', 1)[1]}" not in names:
        raise ArchiveRefused(f"the blob of {digest}, which index.json names, is not in the archive")


def _check_docker(names: set[str], data: bytes) -> None:
    images = _json("manifest.json", data)
    if not isinstance(images, list) or not images:
        raise ArchiveRefused("manifest.json lists no image")
    if len(images) > 1:
        raise ArchiveRefused(f"manifest.json lists {len(images)} images; save one image per archive (docker save IMAGE)")
    image = images[0]
    config, layers = (image.get("Config"), image.get("Layers")) if isinstance(image, dict) else (None, None)
    if not isinstance(config, str) or not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
        raise ArchiveRefused("manifest.json does not name the image's config and layers")
    missing = [path for path in [config, *layers] if inside(path) not in names]
    if missing:
        raise ArchiveRefused(f"manifest.json names {missing[0]!r}, which is not in the archive")
