"""What a client may do with repositories and the daemon's images: plain rules over its
configuration, with no request or Flask in sight, because the API (``service/auth.py``) and
the workers (an image known only by id is checked where it is resolved) apply the same rules.

A client's repository patterns (``team-a/*``) decide which targets it may push to, which
sources it may publish, and which of the daemon's images and names it sees. An image is named
by its tags and digests (``RepoTags``, ``RepoDigests``); its repositories are read as the daemon
reads them (``service/sources.py``), whatever registry host they carry.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Iterable

from . import sources
from .config import SCOPES, Client, Settings

ANONYMOUS = Client(name="anonymous", token_sha256="", scopes=frozenset(SCOPES), repositories=("*",))
# imagepub's own name for a build's output (``imagepub-build:<job id>``, workers/build.py): it
# belongs to whichever client built it, so no repository pattern lets anyone else use or see it.
RESERVED_REPOSITORIES = frozenset({"imagepub-build"})
# Labels imagepub writes itself (the build's job id): bookkeeping for operators only.
INTERNAL_LABEL_PREFIX = "org.imagepub."


def is_admin(client: Client) -> bool:
    return "admin" in client.scopes


def may_use_repository(client: Client, repository: str) -> bool:
    return is_admin(client) or any(fnmatchcase(repository, pattern) for pattern in client.repositories)


def may_use_image_name(client: Client, reference: str) -> bool:
    """Whether ``reference`` (a source, or one of an image's tags or digests) names a
    repository of the client's. An image id names none."""
    if is_admin(client):
        return True
    name = sources.parse(reference)
    if name is None or name.repository in RESERVED_REPOSITORIES:
        return False
    return any(may_use_repository(client, spelling) for spelling in name.spellings)


def may_publish_image(client: Client, names: Iterable[str]) -> bool:
    """An image in the daemon may be published by a client when one of its names, at the
    moment it is resolved, is in the client's repositories; by an admin, always."""
    return is_admin(client) or any(may_use_image_name(client, name) for name in names)


def client_named(settings: Settings, name: str | None) -> Client | None:
    """The configured client a job belongs to (``None`` once it has been removed)."""
    if settings.anonymous and not settings.clients:
        return ANONYMOUS if name == ANONYMOUS.name else None
    return next((client for client in settings.clients if client.name == name), None)


def image_for(client: Client, image: dict[str, Any]) -> dict[str, Any] | None:
    """An entry of ``docker image ls`` as the client may see it: only its names in the client's
    repositories, and not imagepub's own labels; ``None`` when no name is the client's.
    Another client's tags, digests and build jobs are not this client's business."""
    if is_admin(client):
        return image
    tags = [t for t in image.get("tags") or [] if may_use_image_name(client, t)]
    digests = [d for d in image.get("digests") or [] if may_use_image_name(client, d)]
    if not tags and not digests:
        return None
    labels = {k: v for k, v in (image.get("labels") or {}).items() if not k.startswith(INTERNAL_LABEL_PREFIX)}
    return {**image, "tags": tags, "digests": digests, "labels": labels}
