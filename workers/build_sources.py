"""A build's sources, checked again where they are: in the daemon that is about to build.

The API judged the names in the Dockerfile (``service/build_sources.py``); here every image the
build reads is resolved, immediately before the build, and must carry a name in the client's
repositories (admins: any image), as a publish's source must. This is where a full image id
is judged, and where the ONBUILD triggers of a base image, which the API cannot see, are read:
a ``COPY --from`` among them reads an image too.

A client's build reads only images the daemon has: with ``pull=False`` the legacy builder
pulls a missing base image from whatever registry host its name carries, and callers never
point the daemon at hosts (they pull through ``POST /v1/pull``, from a configured registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service import errors
from service.access import client_named, is_admin, may_publish_image
from service.build_sources import describe, image_uses, refusal
from service.config import Client
from service.dockerfile import ImageUse, RemoteSource, Unreadable, trigger_uses

if TYPE_CHECKING:
    from .deps import Deps
    from .docker_engine import DockerEngine


def _authorise(client: Client, engine: "DockerEngine", use: ImageUse) -> None:
    why = refusal(client, use)
    if why:
        raise errors.Forbidden(describe(use, why))
    try:
        image = engine.inspect(use.reference)
    except errors.ImageNotFound:
        raise errors.ImageNotFound(describe(use, "not in the daemon; a build reads only the daemon's images (pull it first)")) from None
    if not may_publish_image(client, image.repo_tags + image.repo_digests):
        raise errors.Forbidden(describe(use, f"the image has no name in client {client.name!r}'s repositories"))
    if use.instruction == "FROM":  # its ONBUILD triggers run with it
        for triggered in trigger_uses(image.on_build, use.earlier, use.line):
            _authorise(client, engine, triggered)


def authorise_build_sources(job: dict[str, Any], deps: "Deps", context: bytes) -> None:
    """Raise unless the job's client may read every image its build reads."""
    client = client_named(deps.settings, job.get("client"))
    if client is None:
        raise errors.Forbidden(f"client {job.get('client')!r} is no longer configured")
    if is_admin(client):
        return
    try:
        for use in image_uses(context, job["request"], deps.settings.limits):
            _authorise(client, deps.engine, use)
    except RemoteSource as exc:  # an ONBUILD ADD of a base image's
        raise errors.Forbidden(str(exc)) from None
    except Unreadable as exc:
        raise errors.JobFailed(f"{exc.field}: {exc}", code="unreadable_dockerfile") from None
