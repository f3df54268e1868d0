"""The Docker engine, through docker-py's low-level API.

The daemon reports registry failures *inside* a 200 stream (``error`` / ``errorDetail``), not as
HTTP errors (docker-py #1772, #3161): every line of a push or pull stream is read here and a
failure becomes one of our typed errors. Credentials go with each call (``X-Registry-Auth``):
no ``docker login`` state, no config.json, nothing on a command line. An empty auth config is
sent rather than none, so docker-py never falls back to a config.json it happens to find.
"""

from __future__ import annotations

import io
import logging
import re
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import docker
import requests
import urllib3
from docker import errors as docker_errors

from service import errors

from .registry_errors import REGISTRY_ERRORS, classify

log = logging.getLogger(__name__)

# (layer id, status, bytes done, bytes total) — status is one of LAYER_STATES.
LayerCallback = Callable[[str, str, int | None, int | None], None]

_PUSH_STATUS = {
    "Preparing": "preparing",
    "Waiting": "waiting",
    "Pushing": "pushing",
    "Pushed": "pushed",
    "Layer already exists": "exists",
}
_PULL_STATUS = {
    "Pulling fs layer": "waiting",
    "Waiting": "waiting",
    "Downloading": "downloading",
    "Verifying Checksum": "downloading",
    "Download complete": "downloaded",
    "Extracting": "extracting",
    "Pull complete": "pulled",
    "Already exists": "exists",
}

# How the daemon words registry failures: the table it shares with skopeo (workers/registry_errors.py).
_STREAM_ERRORS = REGISTRY_ERRORS


def classify_stream_error(message: str, default: type[errors.ImagepubError]) -> errors.ImagepubError:
    return classify(message, default)


@dataclass
class ImageInfo:
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    on_build: list[str] = field(default_factory=list)  # its ONBUILD triggers: a build FROM it runs them


@dataclass
class PushResult:
    digest: str
    manifest_size: int | None
    layers: dict[str, str] = field(default_factory=dict)


@dataclass
class PullResult:
    digest: str | None
    image_id: str
    layers: dict[str, str] = field(default_factory=dict)


# Everything talking to the daemon can raise: its API errors, and the transport's (the daemon went
# away: a refused or reset connection, or a stream cut mid-body, which urllib3 raises as a
# ProtocolError while docker-py iterates it, outside requests' own exception types).
_DAEMON_ERRORS = (docker_errors.DockerException, requests.exceptions.RequestException, urllib3.exceptions.HTTPError)


def _translate_api_error(exc: Exception, not_found: type[errors.ImagepubError], what: str) -> errors.ImagepubError:
    if isinstance(exc, docker_errors.APIError):
        explanation = str(exc.explanation or exc)
        for pattern, cls in _STREAM_ERRORS:
            if pattern.search(explanation):
                return cls(f"{what}: {explanation}")
        if isinstance(exc, docker_errors.NotFound):
            return not_found(f"{what}: {explanation}")
        return errors.JobFailed(f"{what}: the Docker daemon answered {exc.status_code}: {explanation}", code="daemon_error")
    if isinstance(exc, requests.exceptions.Timeout):
        return errors.DaemonUnavailable(f"{what}: the Docker daemon did not answer in time")
    return errors.DaemonUnavailable(f"{what}: cannot reach the Docker daemon ({exc.__class__.__name__})")


_STEP = re.compile(r"Step (\d+)/(\d+) : ")


def _as_written(line: str, added_steps: int) -> str:
    """A build log line numbered as the user's Dockerfile is: the legacy builder counts the
    LABEL step it adds for the build's labels (imagepub's job label) in every ``Step N/M``, so a
    two-line Dockerfile read ``Step 2/3``; that added step is shown as imagepub's own."""
    match = _STEP.match(line)
    if not match or not added_steps:
        return line
    number, total = int(match.group(1)), int(match.group(2)) - added_steps
    if number > total:
        return "imagepub: " + line[match.end():]
    return f"Step {number}/{total} : " + line[match.end():]


class DockerEngine:
    def __init__(self, client: docker.APIClient):
        self.api = client

    @classmethod
    def from_config(cls, settings) -> "DockerEngine":
        # No environment lookups here: DOCKER_HOST was read by service.config.
        base_url = settings.docker_host or "unix:///var/run/docker.sock"
        return cls(docker.APIClient(base_url=base_url, version="auto", timeout=120))

    def _call(self, what: str, fn, *args, not_found=errors.ImageNotFound, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _DAEMON_ERRORS as exc:
            raise _translate_api_error(exc, not_found, what) from None

    def ping(self) -> bool:
        return bool(self._call("ping", self.api.ping))

    def inspect(self, reference: str) -> ImageInfo:
        data = self._call(f"image {reference}", self.api.inspect_image, reference)
        return ImageInfo(
            id=data["Id"], repo_tags=data.get("RepoTags") or [], repo_digests=data.get("RepoDigests") or [], size=data.get("Size", 0),
            on_build=(data.get("Config") or {}).get("OnBuild") or [],
        )

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        self._call(f"tag {repository}:{tag}", self.api.tag, image_id, repository, tag, force=True)

    def untag(self, reference: str) -> None:
        try:
            self.api.remove_image(reference, noprune=True)
        except _DAEMON_ERRORS as exc:  # tidying up only: never fail a job for it
            log.warning("could not remove tag %s: %s", reference, exc.__class__.__name__)

    def push(self, repository: str, tag: str, auth: dict[str, str], on_layer: LayerCallback | None = None) -> PushResult:
        """Push ``repository:tag`` and return the manifest digest the daemon reports."""
        stream = self._call(
            f"push {repository}:{tag}", self.api.push, repository, tag=tag, stream=True, decode=True, auth_config=auth or {}
        )
        digest, size, layers = None, None, {}
        for line in self._read(stream, f"push {repository}:{tag}", errors.PushFailed):
            status = line.get("status") or ""
            aux = line.get("aux")
            if aux and aux.get("Digest"):
                digest, size = aux["Digest"], aux.get("Size")
                continue
            layer = line.get("id")
            if not layer or not status:
                continue
            state = "mounted" if status.startswith("Mounted from") else _PUSH_STATUS.get(status)
            if state is None:
                continue
            layers[layer] = state
            if on_layer:
                detail = line.get("progressDetail") or {}
                on_layer(layer, state, detail.get("current"), detail.get("total"))
        if not digest:
            raise errors.PushFailed(f"push {repository}:{tag}: the daemon reported no manifest digest")
        return PushResult(digest=digest, manifest_size=size, layers=layers)

    def pull(self, repository: str, reference: str, auth: dict[str, str], on_layer: LayerCallback | None = None) -> PullResult:
        """Pull ``repository:tag`` or ``repository@digest``; ``reference`` is the tag or digest."""
        full = f"{repository}@{reference}" if reference.startswith("sha256:") else f"{repository}:{reference}"
        stream = self._call(
            f"pull {full}", self.api.pull, full, stream=True, decode=True, auth_config=auth or {}, not_found=errors.ImageNotFound
        )
        digest, layers = None, {}
        for line in self._read(stream, f"pull {full}", errors.PullFailed):
            status = line.get("status") or ""
            if status.startswith("Digest: "):
                digest = status.removeprefix("Digest: ").strip()
                continue
            layer = line.get("id")
            state = _PULL_STATUS.get(status)
            if not layer or state is None:
                continue
            layers[layer] = state
            if on_layer:
                detail = line.get("progressDetail") or {}
                on_layer(layer, state, detail.get("current"), detail.get("total"))
        info = self.inspect(full)
        if digest is None:
            digest = next((d.split("@", 1)[1] for d in info.repo_digests if d.startswith(repository + "@")), None)
        return PullResult(digest=digest, image_id=info.id, layers=layers)

    def build(self, context: bytes, *, compressed: bool, dockerfile: str, build_args: dict[str, str],
              labels: dict[str, str], tag: str, network: str, memory_bytes: int | None,
              on_line: Callable[[str], None]) -> str:
        """Build from a context archive, its RUN steps on ``network`` with at most
        ``memory_bytes`` each (service.config.Builds); every output line goes to ``on_line``.
        Returns the image id, or raises :class:`~service.errors.BuildFailed` naming the failing
        step."""
        limits = {"memory": memory_bytes, "memswap": memory_bytes} if memory_bytes else None  # swap: none beyond
        stream = self._call(
            "build", self.api.build, fileobj=io.BytesIO(context), custom_context=True,
            encoding="gzip" if compressed else None, dockerfile=dockerfile, buildargs=build_args or None,
            labels=labels, tag=tag, network_mode=network, container_limits=limits, rm=True, forcerm=True, pull=False,
            decode=True,
        )
        image_id, step = None, None
        try:
            for line in stream:
                if "errorDetail" in line or "error" in line:
                    detail = line.get("errorDetail") or {}
                    message = detail.get("message") or line.get("error") or "unknown error"
                    if detail.get("code") == 137 and memory_bytes:  # SIGKILL: the OOM killer's, most often
                        message += (f" (killed: most likely the step passed the build's memory limit, "
                                    f"{memory_bytes // 1024**2} MiB, builds.memory_bytes)")
                    on_line(message)
                    raise errors.BuildFailed(f"{step}: {message}" if step else message)
                text = line.get("stream") or line.get("status") or ""
                for part in text.splitlines():
                    if part.strip():
                        part = _as_written(part, added_steps=1 if labels else 0)
                        on_line(part)
                        if part.startswith("Step "):
                            step = part.strip()
                aux = line.get("aux") or {}
                if aux.get("ID"):
                    image_id = aux["ID"]
        except _DAEMON_ERRORS as exc:
            raise _translate_api_error(exc, errors.BuildFailed, "build") from None
        if image_id is None:
            raise errors.BuildFailed(f"{step or 'build'}: the daemon reported no image")
        return image_id

    def version(self) -> str:
        return self._call("version", self.api.version).get("Version", "unknown")

    def image_events(self) -> Iterator[dict[str, Any]]:
        """The daemon's image events as they happen (tag, untag, pull, delete, load, …); the
        stream ends with an exception when the daemon goes away."""
        return self.api.events(filters={"type": "image"}, decode=True)

    def list_images(self, reference: str | None = None) -> list[dict[str, Any]]:
        """``docker image ls`` (optionally ``--filter reference=…``), newest first."""
        filters = {"reference": reference} if reference else None
        images = self._call("list images", self.api.images, filters=filters, not_found=errors.ImageNotFound)
        out = [
            {
                "id": image["Id"],
                "tags": [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"],
                "digests": [d for d in image.get("RepoDigests") or [] if not d.startswith("<none>")],
                "size": image.get("Size"),
                "created": datetime.fromtimestamp(image.get("Created", 0), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "labels": image.get("Labels") or {},
            }
            for image in images
        ]
        return sorted(out, key=lambda image: image["created"], reverse=True)

    def registry_digest(self, reference: str, auth: dict[str, str]) -> str:
        """The manifest digest the registry itself serves for ``reference`` (asked through the daemon)."""
        data = self._call(
            f"inspect {reference} in its registry",
            self.api.inspect_distribution,
            reference,
            auth_config=auth or {},
            not_found=errors.ManifestNotFound,
        )
        return data["Descriptor"]["digest"]

    def _read(self, stream: Iterable[dict[str, Any]], what: str, default: type[errors.ImagepubError]) -> Iterator[dict[str, Any]]:
        try:
            for line in stream:
                if "errorDetail" in line or "error" in line:
                    message = (line.get("errorDetail") or {}).get("message") or line.get("error") or "unknown error"
                    raise classify_stream_error(message, default)
                yield line
        except _DAEMON_ERRORS as exc:
            raise _translate_api_error(exc, default, what) from None
