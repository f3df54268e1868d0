"""Publish: tag the source image for every target reference, push, and verify each digest."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from service import audit, errors
from service.access import client_named, may_publish_image

from .docker_engine import DockerEngine, ImageInfo
from .registries import Target
from .registry_http import ManifestHead, Unreachable

if TYPE_CHECKING:
    from .deps import Deps
    from .jobs import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")


def with_fresh_auth(target: Target, call: Callable[[dict[str, str]], T]) -> T:
    """Run ``call(auth)``; when the registry refuses a cached token, drop it and try once more."""
    try:
        return call(target.auth_config())
    except (errors.TokenRejected, errors.AuthFailed) as first:
        if not getattr(target, "refreshable_auth", False) and not isinstance(first, errors.TokenRejected):
            raise
        log.info("registry %s refused its token; fetching a fresh one", target.name)
        target.invalidate_auth()
        try:
            return call(target.auth_config())
        except errors.TokenRejected as second:
            raise errors.AuthFailed(f"the registry refused a freshly fetched token: {second.message}") from None


# A registry the worker could not reach itself is asked through the daemon for this long.
DAEMON_ROUTE_SECONDS = 300.0
_heads: dict[tuple[str, str], ManifestHead] = {}
_daemon_route_until: dict[tuple[str, str], float] = {}


def served_digest(engine: DockerEngine, target: Target, repository_ref: str, tag: str) -> str:
    """The digest the registry serves for ``repository_ref:tag``: one HEAD from this worker
    (workers/registry_http.py), or through the daemon when this worker cannot reach the
    registry the daemon pushed to."""
    host = target.host()
    key = (target.name, host)
    if time.monotonic() >= _daemon_route_until.get(key, 0.0):
        head = _heads.get(key)
        if head is None:
            config = target.config
            head = _heads[key] = ManifestHead(host, verify=config.ca_file or config.tls_verify, plain_http_allowed=config.insecure)
        repository = repository_ref[len(host) + 1:]
        if host == "docker.io" and "/" not in repository:
            repository = f"library/{repository}"
        try:
            return with_fresh_auth(target, lambda auth: head.digest(repository, tag, auth))
        except Unreachable as exc:
            log.warning("registry %s: this worker cannot reach it itself (%s); verifying pushes through the daemon for %.0f s",
                        target.name, exc, DAEMON_ROUTE_SECONDS)
            _daemon_route_until[key] = time.monotonic() + DAEMON_ROUTE_SECONDS
    return with_fresh_auth(target, lambda auth: engine.registry_digest(f"{repository_ref}:{tag}", auth))


def layer_recorder(record: dict[str, Any], progress: "Progress") -> Callable[[str, str, int | None, int | None], None]:
    """A daemon progress callback that keeps ``record["layers"]`` current."""
    index = {layer["id"]: layer for layer in record["layers"]}
    final = {"pushed", "exists", "mounted", "pulled"}

    def on_layer(layer_id: str, state: str, current: int | None, total: int | None) -> None:
        layer = index.get(layer_id)
        if layer is None:
            layer = index[layer_id] = {"id": layer_id, "status": state, "current": None, "total": None}
            record["layers"].append(layer)
        elif layer["status"] in final and state in {"exists", "preparing", "waiting"}:
            return  # a later tag of the same target re-announces the layer: keep what happened first
        layer["status"] = state
        if total:
            layer["current"], layer["total"] = current, total
        elif state in final and layer["total"]:
            layer["current"] = layer["total"]
        # at most one snapshot every Progress.interval: a push whose layers all exist would
        # otherwise write one per layer within a millisecond; the job's last word has them all
        progress.save(force=False)

    return on_layer


def count_layers(deps: "Deps", registry: str, layers: list[dict[str, Any]], transferred: str, bytes_metric: str) -> None:
    """Layers by outcome, and the bytes of those that crossed the network, into the metrics."""
    pipe = deps.redis.pipeline(transaction=False)
    for layer in layers:
        deps.store.metrics.incr("imagepub_layers", pipe=pipe, registry=registry, outcome=layer["status"])
        if layer["status"] == transferred and layer.get("total"):
            deps.store.metrics.incr(bytes_metric, layer["total"], pipe=pipe, registry=registry)
    pipe.execute()


def _familiar(repository_ref: str) -> set[str]:
    """The names the daemon may use for ``repository_ref`` in RepoDigests."""
    names = {repository_ref}
    if repository_ref.startswith("docker.io/"):
        short = repository_ref.removeprefix("docker.io/")
        names |= {short, short.removeprefix("library/")}
    return names


def _existing_immutable_tag(target: Target, image: ImageInfo, repository_ref: str, tag: str, known_digests: set[str]) -> str:
    """An immutable tag refused the push: fine when it already holds this very image."""
    repository = repository_ref.split("/", 1)[1]
    existing = target.digest_of_tag(repository, tag) if hasattr(target, "digest_of_tag") else None
    ours = set(known_digests) | {d.split("@", 1)[1] for d in image.repo_digests if d.split("@", 1)[0] in _familiar(repository_ref)}
    if existing and (existing in ours or getattr(target, "config_digest_of_tag", lambda *_: None)(repository, tag) == image.id):
        log.info("immutable tag already holds this image", extra={"reference": f"{repository_ref}:{tag}", "digest": existing})
        return existing
    raise errors.TagImmutable(
        f"{repository_ref}:{tag} already exists and the repository is immutable: "
        f"it holds {existing or 'another image'}, not the source image"
    )


def _push_tag(engine: DockerEngine, target: Target, image: ImageInfo, repository_ref: str, tag: str, on_layer, known_digests: set[str]) -> str:
    reference = f"{repository_ref}:{tag}"
    engine.tag(image.id, repository_ref, tag)
    try:
        try:
            result = with_fresh_auth(target, lambda auth: engine.push(repository_ref, tag, auth, on_layer))
        except errors.TagImmutable:
            return _existing_immutable_tag(target, image, repository_ref, tag, known_digests)
        # Verify: the daemon recorded this digest for *our* image under that name, and the
        # registry itself serves that digest for the tag.
        pushed = engine.inspect(image.id)
        if not any(f"{name}@{result.digest}" in pushed.repo_digests for name in _familiar(repository_ref)):
            raise errors.PushFailed(f"{reference}: the daemon did not record {result.digest} for the source image")
        served = served_digest(engine, target, repository_ref, tag)
        if served != result.digest:
            raise errors.PushFailed(f"{reference}: the registry serves {served}, the push reported {result.digest}")
        return result.digest
    finally:
        # Leave the daemon's tags as they were. Only when the source has names of its own: an
        # image known by id alone keeps the target names, so that no untag (ours, or another
        # job's at the same moment) can ever remove an image's last name and with it the image.
        if image.repo_tags and reference not in image.repo_tags:
            engine.untag(reference)


def authorise_source(job: dict[str, Any], settings, image: ImageInfo) -> None:
    """The image the source resolved to must be one the job's client may publish: checked here,
    where it is resolved, because an image id (or a prefix of one) names no repository the API
    could check. What is pushed is this very image (by its id), so nothing can change between
    this check and the push."""
    client = client_named(settings, job.get("client"))
    if client is None or not may_publish_image(client, image.repo_tags + image.repo_digests):
        raise errors.Forbidden(
            f"client {job.get('client')!r} may not publish {job['request']['source']!r}: "
            "the image has no name in the client's repositories"
        )


def publish(job: dict[str, Any], deps: "Deps", progress: "Progress") -> None:
    source = job["request"]["source"]
    try:
        image = deps.engine.inspect(source)
    except errors.ImageNotFound:  # one sentence, not the daemon's words three times over
        raise errors.ImageNotFound(f"the Docker daemon {deps.settings.daemon_name} has no image {source}") from None
    authorise_source(job, deps.settings, image)
    job["source_image_id"] = image.id
    push_targets(job, deps, progress, image, prepare_targets(job, deps, progress))


def prepare_targets(job: dict[str, Any], deps: "Deps", progress: "Progress") -> list[tuple[dict[str, Any], Target]]:
    """Each target record with its registry; every repository checked (or created) before the
    first byte is pushed anywhere."""
    targets: list[tuple[dict[str, Any], Target]] = []
    for record in job["targets"]:
        target = deps.targets.get(record["registry"])
        if target is None:
            raise errors.RegistryNotConfigured(f"registry {record['registry']!r} is no longer configured")
        targets.append((record, target))
    created = False
    for record, target in targets:
        if target.ensure_repository(record["repository"], job["request"].get("create_repository", False)):
            record["repository_created"] = created = True
    progress.save(force=created)
    return targets


def push_targets(job: dict[str, Any], deps: "Deps", progress: "Progress", image: ImageInfo, targets) -> None:
    for record, target in targets:
        progress.check()
        if record["state"] == "succeeded":
            continue  # done on an earlier attempt
        record["state"] = "pushing"
        repository_ref = target.repository_ref(record["repository"])
        on_layer = layer_recorder(record, progress)
        digests = set()
        for tag in record["tags"]:
            # One push per repository at a time, fleet-wide: the daemon's tags are shared state,
            # and concurrent pushes of one image to one repository would upload its layers twice.
            # Each tag, once the registry serves its digest (or its push failed), in the audit trail.
            with progress.exclusive(deps.store.repository_lock_key(repository_ref), f"another push to {repository_ref}"), \
                    audit.writes(deps.store, deps.settings, "push_tag", job, record, tag) as written:
                digest = _push_tag(deps.engine, target, image, repository_ref, tag, on_layer, digests)
                written(tag, digest)
            digests.add(digest)
            record["references"] = list(dict.fromkeys(record["references"] + [f"{repository_ref}:{tag}"]))
            progress.save(force=False)
        if len(digests) != 1:
            raise errors.PushFailed(f"{repository_ref}: tags of one image got different digests {sorted(digests)}")
        record.update(state="succeeded", digest=digests.pop(), size=image.size)
        count_layers(deps, record["registry"], record["layers"], "pushed", "imagepub_pushed_bytes")
        # written with the next snapshot: at the latest the job's end (a worker that dies before
        # leaves the target to the next attempt, which pushes it again: the same digest)
        progress.save(force=False)
