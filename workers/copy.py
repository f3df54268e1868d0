"""Copy: an image from one configured registry to others, registry to registry, with no daemon.

The copy is exact. The source is resolved once to the digest its registry serves (later steps
name it by that digest, so a tag moved meanwhile changes nothing), and every manifest is written
byte for byte (skopeo ``--preserve-digests``): with ``platforms: "all"`` the destination serves
the source's own digest, index and all; a subset of platforms gets an index of just those
(written here, from the source's index with the other entries left out) or, for one platform,
that platform's own manifest. Each target's blobs are reported as they go (``copied``,
``exists``, ``mounted``, with bytes), cosign-style signature, attestation and SBOM tags of the
copied digests follow the image, and every tag is verified against its registry at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from service import audit, errors
from service.image_archive import INDEX_TYPES

from .publish import count_layers, prepare_targets
from .registries import Target
from .skopeo import FINAL, Endpoint, Scrubber, Session

if TYPE_CHECKING:
    from .deps import Deps
    from .jobs import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")

ARTIFACT_SUFFIXES = (".sig", ".att", ".sbom")  # cosign: sha256-<hex>.sig, .att, .sbom
# buildx's attestation manifests in an index name the image they describe in this annotation.
REFERENCE_DIGEST = "vnd.docker.reference.digest"


@dataclass
class Manifest:
    digest: str
    media_type: str
    platform: str | None
    raw: bytes
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size: the config and the layers


@dataclass
class Source:
    """What the copy copies: the source's manifest or index, and the images chosen from it."""

    endpoint: Endpoint  # at the resolved digest
    digest: str
    media_type: str
    raw: bytes
    images: list[Manifest]
    subset: bool  # fewer images than the index has: the destination gets an index of its own

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def sizes(self) -> dict[str, int]:
        return {digest: size for image in self.images for digest, size in image.blobs.items()}

    @property
    def platforms(self) -> list[str]:
        return [image.platform for image in self.images if image.platform]

    def written(self) -> tuple[str, bytes | None]:
        """The digest the destination's tags get, and the index to write for a subset (else None)."""
        if not self.subset:
            return self.digest, None
        if len(self.images) == 1:
            return self.images[0].digest, None
        index = json.loads(self.raw)
        chosen = {image.digest for image in self.images}
        index["manifests"] = [m for m in index["manifests"] if m["digest"] in chosen]
        raw = json.dumps(index, separators=(",", ":")).encode()
        return digest_of(raw), raw

    def signed_digests(self) -> list[str]:
        """The digests whose signatures the destination can use: those it will serve."""
        digests = [] if self.subset else [self.digest]
        return digests + [image.digest for image in self.images if image.digest not in digests]


def digest_of(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _platform(entry: dict[str, Any]) -> str | None:
    p = entry.get("platform") or {}
    if not p.get("os") or not p.get("architecture"):
        return None
    return "/".join(filter(None, [p["os"], p["architecture"], p.get("variant")]))


def platform_matches(asked: str, offered: str | None) -> bool:
    """``linux/arm64`` takes any variant of it; ``linux/arm/v7`` that variant only."""
    if offered is None:
        return False
    return offered == asked or (asked.count("/") == 1 and offered.startswith(asked + "/"))


# --- the source -------------------------------------------------------------------------------


def resolve(session: Session, endpoint: Endpoint, platforms: str | list[str]) -> Source:
    """The source as its registry serves it now, and the images of it to copy."""
    try:
        raw = session.inspect_raw(endpoint)
    except (errors.ManifestNotFound, errors.RepositoryNotFound) as exc:
        raise errors.ImageNotFound(f"{endpoint.reference.removeprefix('docker://')} is not in its registry: {exc.message}") from None
    digest = digest_of(raw)
    document = json.loads(raw)
    media_type = document.get("mediaType") or ("application/vnd.oci.image.index.v1+json" if "manifests" in document else "")
    pinned = endpoint.at(digest)
    if media_type in INDEX_TYPES:
        entries = _choose(document["manifests"], platforms, endpoint)
        images = _children(session, pinned, entries)
        subset = len(entries) < len(document["manifests"])
    else:
        images = [_single(session, pinned, raw, digest, media_type, platforms)]
        subset = False
    return Source(pinned, digest, media_type, raw, images, subset)


def _choose(entries: list[dict[str, Any]], platforms: str | list[str], endpoint: Endpoint) -> list[dict[str, Any]]:
    if platforms == "all":
        return entries
    chosen: list[dict[str, Any]] = []
    offered = sorted({p for p in map(_platform, entries) if p and p != "unknown/unknown"})
    for asked in platforms:
        matching = [e for e in entries if platform_matches(asked, _platform(e))]
        if not matching:
            raise errors.ImageNotFound(
                f"{endpoint.reference.removeprefix('docker://')} has no {asked} image; it has {', '.join(offered) or 'none'}"
            )
        chosen += [e for e in matching if e not in chosen]
    # buildx's attestation manifests go with the images they describe
    picked = {e["digest"] for e in chosen}
    chosen += [e for e in entries if (e.get("annotations") or {}).get(REFERENCE_DIGEST) in picked and e not in chosen]
    return [e for e in entries if e in chosen]  # in the index's own order


def _children(session: Session, pinned: Endpoint, entries: list[dict[str, Any]]) -> list[Manifest]:
    """Each chosen image's manifest (for its blobs and their sizes), fetched side by side."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        raws = list(pool.map(lambda e: session.inspect_raw(pinned.at(e["digest"])), entries))
    images = []
    for entry, raw in zip(entries, raws):
        if digest_of(raw) != entry["digest"]:
            raise errors.CopyFailed(f"{pinned.repository}: the registry served other bytes for {entry['digest']}")
        images.append(Manifest(entry["digest"], entry.get("mediaType", ""), _platform(entry), raw, _blobs(json.loads(raw))))
    return images


def _single(session: Session, pinned: Endpoint, raw: bytes, digest: str, media_type: str, platforms: str | list[str]) -> Manifest:
    document = json.loads(raw)
    platform = None
    if platforms != "all":
        config = json.loads(session.inspect_raw(pinned, config=True))
        platform = "/".join(filter(None, [config.get("os"), config.get("architecture"), config.get("variant")]))
        missing = [asked for asked in platforms if not platform_matches(asked, platform)]
        if missing:
            raise errors.ImageNotFound(
                f"{pinned.repository.removeprefix('docker://')}@{digest} is a single {platform} image, not {', '.join(missing)}"
            )
    return Manifest(digest, media_type, platform, raw, _blobs(document))


def _blobs(manifest: dict[str, Any]) -> dict[str, int]:
    blobs = {}
    for descriptor in [manifest.get("config") or {}] + (manifest.get("layers") or []):
        if descriptor.get("digest"):
            blobs[descriptor["digest"]] = descriptor.get("size")
    return blobs


# --- a target ---------------------------------------------------------------------------------


def blob_recorder(record: dict[str, Any], progress: "Progress", sizes: dict[str, int], words: dict[str, str] | None = None,
                  final: frozenset[str] = FINAL) -> Callable[[str, str, int | None, int | None], None]:
    """Keeps ``record["layers"]`` current (every blob of the copy, as a push's layers), starting
    with each one ``waiting``; what happened to a blob first stands (two platforms may share
    one). ``words``: skopeo's outcomes said otherwise (an upload's are a push's); ``final``:
    the outcomes, in those words."""
    record["layers"] = [{"id": digest, "status": "waiting", "current": None, "total": size} for digest, size in sizes.items()]
    index = {layer["id"]: layer for layer in record["layers"]}

    def on_blob(digest: str, status: str, current: int | None, total: int | None) -> None:
        status = (words or {}).get(status, status)
        layer = index.get(digest)
        if layer is None:
            layer = index[digest] = {"id": digest, "status": status, "current": None, "total": None}
            record["layers"].append(layer)
        elif layer["status"] in final:
            return
        layer.update(status=status, current=current, total=total or layer["total"])
        progress.save(force=status in final)

    return on_blob


class _Sides:
    """Endpoints of the source and a target, made afresh after a registry refused a token."""

    def __init__(self, deps: "Deps", names: list[str]):
        self.deps = deps
        self.targets = {name: _target(deps, name) for name in names}

    def endpoint(self, registry: str, repository: str, reference: str) -> Endpoint:
        target, config = self.targets[registry], self.deps.settings.registries[registry]
        return Endpoint(f"docker://{target.repository_ref(repository)}", target.auth_config() or None, config.ca_file,
                        config.tls_verify).at(reference)

    def fresh(self, call: Callable[[], T]) -> T:
        """``call()``; when a registry refuses a cached token (ECR's expired token; a refusal
        without a word, as to a HEAD, when a side's token is cached), drop the copy's cached
        tokens and call once more: skopeo does not say which side refused."""
        refreshable = [target for target in self.targets.values() if getattr(target, "refreshable_auth", False)]
        try:
            return call()
        except (errors.TokenRejected, errors.AuthFailed, errors.AccessDenied) as first:
            if not isinstance(first, errors.TokenRejected) and not refreshable:
                raise
            for target in refreshable or self.targets.values():
                log.info("registry %s may have refused its token; fetching a fresh one", target.name)
                target.invalidate_auth()
        try:
            return call()
        except errors.TokenRejected as second:
            raise errors.AuthFailed(f"the registry refused a freshly fetched token: {second.message}") from None


def registry_sides(deps: "Deps", names: list[str]) -> _Sides:
    """skopeo endpoints of these configured registries, with the token refresh of a copy (for
    the other daemonless steps: workers/archive.py)."""
    return _Sides(deps, names)


def _target(deps: "Deps", name: str) -> Target:
    target = deps.targets.get(name)
    if target is None:
        raise errors.RegistryNotConfigured(f"registry {name!r} is no longer configured")
    return target


def _write_tag(session: Session, source: Endpoint, destination: Endpoint, expected: str, **options) -> None:
    """One tag written; an immutable tag that already holds ``expected`` is as good."""
    try:
        session.copy(source, destination, **options)
    except errors.TagImmutable:
        served = digest_of(session.inspect_raw(destination))
        if served != expected:
            raise errors.TagImmutable(
                f"{destination.reference.removeprefix('docker://')} already exists and the repository is immutable: "
                f"it holds {served}, not {expected}"
            ) from None
        log.info("immutable tag already holds this image", extra={"reference": destination.reference, "digest": expected})


def copy_image(session: Session, source: Source, destination: Endpoint, tags: list[str], on_blob, check) -> list[str]:
    """The chosen images, then every tag; the digests written (the images', then the tags')."""
    digest, index = source.written()
    blobs = {"on_blob": on_blob, "sizes": source.sizes, "check": check}
    if not source.subset:  # the whole thing, by its digest: one copy
        _write_tag(session, source.endpoint, destination.at(tags[0]), digest, **blobs)
        again = destination.at(digest)
    elif index is None:  # one platform: its own manifest under the tags
        _write_tag(session, source.endpoint.at(digest), destination.at(tags[0]), digest, all_images=False, **blobs)
        again = destination.at(digest)
    else:  # some platforms: each image by its digest (no tag shows a part meanwhile), then their index
        for image in source.images:
            check()
            session.copy(source.endpoint.at(image.digest), destination.at(image.digest), all_images=False, **blobs)
        again = _index_layout(session, index)
        _write_tag(session, again, destination.at(tags[0]), digest, index_only=True, check=check)
    for tag in tags[1:]:  # everything is at the destination now: its manifests under one more tag
        _write_tag(session, again, destination.at(tag), digest, index_only=index is not None, check=check)
    return [image.digest for image in source.images if image.digest != digest] + [digest]


def _index_layout(session: Session, index: bytes) -> Endpoint:
    """An OCI layout holding just ``index``: the source of an ``index-only`` copy."""
    directory = session.dir / "layout"
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "blobs" / "sha256").mkdir(parents=True)
    digest = digest_of(index)
    (directory / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(index)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descriptor = {"mediaType": json.loads(index).get("mediaType", "application/vnd.oci.image.index.v1+json"),
                  "digest": digest, "size": len(index), "annotations": {"org.opencontainers.image.ref.name": "index"}}
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    return Endpoint(f"oci:{directory}:index")


def _verify(session: Session, destination: Endpoint, tags: list[str], digest: str) -> None:
    """The registry itself serves ``digest`` for every tag."""
    for tag in tags:
        served = digest_of(session.inspect_raw(destination.at(tag)))
        if served != digest:
            raise errors.PushFailed(f"{destination.repository.removeprefix('docker://')}:{tag}: the registry serves {served}, not {digest}")


def _artifact_tags(tags: list[str], digests: list[str]) -> list[str]:
    """The cosign tags (``sha256-<hex>.sig``, ``.att``, ``.sbom``) among ``tags`` for ``digests``."""
    wanted = {d.replace(":", "-") + suffix for d in digests for suffix in ARTIFACT_SUFFIXES}
    return [tag for tag in tags if tag in wanted]


def copy_signatures(session: Session, source: Source, destination: Endpoint, artifact_tags: list[str], check) -> list[dict[str, str]]:
    copied = []
    for tag in artifact_tags:
        check()
        origin = source.endpoint.at(tag)
        result_digest = digest_of(session.inspect_raw(origin))
        _write_tag(session, origin.at(result_digest), destination.at(tag), result_digest, check=check)
        copied.append({"tag": tag, "digest": result_digest})
    return copied


# --- the step ---------------------------------------------------------------------------------


def copy(job: dict[str, Any], deps: "Deps", progress: "Progress") -> None:
    request = job["request"]
    wanted = request["source"]
    sides = _Sides(deps, [wanted["registry"]] + [t["registry"] for t in request["targets"]])
    targets = prepare_targets(job, deps, progress)
    scrub = Scrubber()
    with deps.skopeo.session(scrub) as session, ThreadPoolExecutor(max_workers=1) as lookup:
        def resolve_source() -> Source:
            return resolve(session, sides.endpoint(wanted["registry"], wanted["repository"], wanted.get("digest") or wanted["tag"]),
                           request.get("platforms", "all"))

        source = sides.fresh(resolve_source)
        job["source"] = {
            "reference": source.endpoint.reference.removeprefix("docker://"), "digest": source.digest,
            "media_type": source.media_type, "platforms": source.platforms,
        }
        progress.save()
        # The source's tags, for its signatures: asked while the first target copies.
        artifacts: Future | None = (
            lookup.submit(lambda: sides.fresh(lambda: session.list_tags(source.endpoint))) if request.get("signatures", True) else None
        )
        for record, target in targets:
            progress.check()
            if record["state"] == "succeeded":
                continue  # done on an earlier attempt
            with audit.writes(deps.store, deps.settings, "copy_tag", job, record) as written:
                _copy_target(session, sides, source, record, target, artifacts, progress, written)
            count_layers(deps, record["registry"], record["layers"], "copied", "imagepub_pushed_bytes")
            progress.save()


def _copy_target(session: Session, sides: _Sides, source: Source, record: dict[str, Any], target: Target,
                 artifacts: Future | None, progress: "Progress", written: Callable[[str, str], None]) -> None:
    """``written(tag, digest)``: for the audit trail, each tag the registry serves as copied."""
    record["state"] = "copying"
    on_blob = blob_recorder(record, progress, source.sizes)
    progress.save()

    def destination() -> Endpoint:
        return sides.endpoint(record["registry"], record["repository"], record["tags"][0])

    digest = source.written()[0]
    record["manifests"] = sides.fresh(lambda: copy_image(session, source, destination(), record["tags"], on_blob, progress.check))
    sides.fresh(lambda: _verify(session, destination(), record["tags"], digest))
    for tag in record["tags"]:
        written(tag, digest)
    repository_ref = target.repository_ref(record["repository"])
    record["references"] = [f"{repository_ref}:{tag}" for tag in record["tags"]]
    if artifacts is not None:
        found = _artifact_tags(artifacts.result(), source.signed_digests())
        record["signatures"] = sides.fresh(lambda: copy_signatures(session, source, destination(), found, progress.check))
        for artifact in record["signatures"]:
            written(artifact["tag"], artifact["digest"])
    record.update(state="succeeded", digest=digest, size=sum(size or 0 for size in source.sizes.values()))
