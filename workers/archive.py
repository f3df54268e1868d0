"""Publish an uploaded image archive to every target, with no daemon: a peer of the daemon's
publish (workers/publish.py) and of the copy between registries (workers/copy.py), whose skopeo
machinery it shares.

The archive the API received and checked (service/image_archive.py) is fetched from the
artifact store and must have the sha256 the API recorded. It becomes an OCI image layout in the
job's private directory, once, whatever the number of targets:

- an ``oci-archive`` is unpacked as it is, so its manifests, and the digest the registry
  serves, are the archive's own (an index keeps every platform);
- a ``docker-archive`` has no manifest: skopeo makes one in converting it (Docker's manifest
  format, as ``docker push`` writes it: the image's config byte for byte, so its image id, and
  gzip-compressed layers), so every target gets that same digest.

Each target then gets the layout with ``skopeo copy --all --preserve-digests``
(``copy_image``: the first tag, then the others from the registry itself), blob by blob with
each one's outcome (``pushed``, ``exists``, ``mounted``) and bytes, and every tag is verified
against what its registry serves.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from service import audit, errors
from service.image_archive import DOCKER_ARCHIVE, INDEX_TYPES

from .copy import Manifest, Source, blob_recorder, copy_image, digest_of, registry_sides
from .publish import count_layers, prepare_targets
from .skopeo import Endpoint, Scrubber, Session

if TYPE_CHECKING:
    from .deps import Deps
    from .jobs import Progress

# skopeo's words for a blob, and a push's (what the job records, as for a daemon's push)
PUSH_WORDS = {"copying": "pushing", "copied": "pushed"}
DONE = frozenset({"pushed", "exists", "mounted"})
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def invalid(message: str) -> errors.JobFailed:
    return errors.JobFailed(message, code="invalid_archive")


def publish_archive(job: dict[str, Any], deps: "Deps", progress: "Progress") -> None:
    archive = job["archive"]
    targets = prepare_targets(job, deps, progress)
    sides = registry_sides(deps, [record["registry"] for record, _ in targets])
    with deps.skopeo.session(Scrubber()) as session:
        path = deps.artifacts.fetch(job["id"], session.dir)
        _check_upload(path, archive)
        source = _layout(session, path, archive["format"], progress.check)
        archive.update(digest=source.digest, media_type=source.media_type, platforms=source.platforms)
        progress.save()
        for record, target in targets:
            progress.check()
            if record["state"] == "succeeded":
                continue  # done on an earlier attempt
            # each tag the registry serves, or the push's failure, in the audit trail
            with audit.writes(deps.store, deps.settings, "push_tag", job, record) as written:
                _push_target(session, sides, source, record, target.repository_ref(record["repository"]), progress)
                for tag in record["tags"]:
                    written(tag, source.digest)
            count_layers(deps, record["registry"], record["layers"], "pushed", "imagepub_pushed_bytes")
            progress.save()


def _check_upload(path: Path, archive: dict[str, Any]) -> None:
    """The stored upload is the one the API received (and checked)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    if (digest.hexdigest(), size) != (archive["sha256"], archive["bytes"]):
        raise invalid(f"the stored upload is not the archive received (sha256 {digest.hexdigest()}, {size} bytes)")


# --- the archive as an OCI image layout ---------------------------------------------------


def _layout(session: Session, path: Path, format_: str, check: Callable[[], None]) -> Source:
    layout = session.dir / "layout"
    if format_ == DOCKER_ARCHIVE:
        _convert(session, _uncompressed(session, path), layout, check)
    else:
        _unpack(path, layout)
    if path.parent == session.dir:
        path.unlink()  # a downloaded copy: the layout is what is pushed now
    return _read_layout(layout)


def _uncompressed(session: Session, path: Path) -> Path:
    """skopeo reads a docker-archive only as a plain tar."""
    with path.open("rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return path
    plain = session.dir / "docker-archive.tar"
    try:
        with gzip.open(path, "rb") as src, plain.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError) as exc:
        raise invalid(f"the archive's gzip stream is damaged ({exc.__class__.__name__})") from None
    return plain


def _convert(session: Session, archive: Path, layout: Path, check: Callable[[], None]) -> None:
    try:
        # Docker's own manifest format, as `docker push` writes: the config is kept byte for
        # byte (the image id stays the image's), the layers gzip-compressed
        session.copy(Endpoint(f"docker-archive:{archive}"), Endpoint(f"oci:{layout}"), all_images=False,
                     preserve_digests=False, manifest_format="v2s2", check=check)
    except errors.JobFailed as exc:
        raise invalid(f"skopeo cannot read the docker-archive: {exc.message}") from None


def _unpack(path: Path, layout: Path) -> None:
    try:
        with tarfile.open(path, "r:*") as tar:
            tar.extractall(layout, filter="data")  # nothing outside, no devices, no set-id bits
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise invalid(f"the archive cannot be unpacked: {exc}") from None


def _blob(layout: Path, digest: Any) -> bytes:
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise invalid(f"the layout names a blob by {digest!r}, not a sha256 digest")
    try:
        raw = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    except OSError:
        raise invalid(f"the archive lacks blob {digest}") from None
    if digest_of(raw) != digest:
        raise invalid(f"blob {digest} of the archive has other content")
    return raw


def _read_layout(layout: Path) -> Source:
    """The layout's one image, as a copy's source; ``index.json`` rewritten to name it alone
    (``docker save`` lists it once per tag), so that skopeo needs no name for it."""
    try:
        descriptor = json.loads((layout / "index.json").read_text())["manifests"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise invalid("the layout's index.json names no image") from None
    raw = _blob(layout, descriptor.get("digest"))
    document = _document(raw, descriptor["digest"])
    media_type = document.get("mediaType") or descriptor.get("mediaType") or ""
    if media_type in INDEX_TYPES or "manifests" in document:
        media_type = media_type or OCI_INDEX
        images = [_image(layout, entry) for entry in document.get("manifests") or []]
    else:
        images = [Manifest(descriptor["digest"], media_type, None, raw, _blobs(layout, document))]
    named = {"mediaType": media_type, "digest": descriptor["digest"], "size": len(raw)}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [named]}))
    return Source(Endpoint(f"oci:{layout}"), descriptor["digest"], media_type, raw, images, subset=False)


def _document(raw: bytes, digest: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise invalid(f"{digest} is not a manifest or an index")
    return document


def _image(layout: Path, entry: Any) -> Manifest:
    if not isinstance(entry, dict):
        raise invalid("the index lists something other than a manifest")
    raw = _blob(layout, entry.get("digest"))
    platform = entry.get("platform") or {}
    name = "/".join(filter(None, [platform.get("os"), platform.get("architecture"), platform.get("variant")])) or None
    return Manifest(entry["digest"], entry.get("mediaType", ""), name, raw, _blobs(layout, _document(raw, entry["digest"])))


def _blobs(layout: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """The config's and the layers' sizes, each blob present in the layout with that size."""
    blobs = {}
    for descriptor in [manifest.get("config") or {}] + list(manifest.get("layers") or []):
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise invalid("a manifest of the archive names a blob without a sha256 digest")
        try:
            size = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).stat().st_size
        except OSError:
            raise invalid(f"the archive lacks blob {digest}") from None
        blobs[digest] = size
    return blobs


# --- a target -----------------------------------------------------------------------------


def _push_target(session: Session, sides, source: Source, record: dict[str, Any], repository_ref: str, progress: "Progress") -> None:
    record["state"] = "pushing"
    on_blob = blob_recorder(record, progress, source.sizes, words=PUSH_WORDS, final=DONE)
    progress.save()

    def destination() -> Endpoint:
        return sides.endpoint(record["registry"], record["repository"], record["tags"][0])

    sides.fresh(lambda: copy_image(session, source, destination(), record["tags"], on_blob, progress.check))
    sides.fresh(lambda: _verify(session, destination(), record["tags"], source.digest))
    record.update(state="succeeded", digest=source.digest, size=sum(source.sizes.values()),
                  references=[f"{repository_ref}:{tag}" for tag in record["tags"]])


def _verify(session: Session, destination: Endpoint, tags: list[str], digest: str) -> None:
    """The registry itself serves ``digest`` for every tag."""
    for tag in tags:
        served = digest_of(session.inspect_raw(destination.at(tag)))
        if served != digest:
            raise errors.PushFailed(f"{destination.repository.removeprefix('docker://')}:{tag}: the registry serves {served}, not {digest}")
