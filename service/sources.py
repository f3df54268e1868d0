"""Which repository an image reference names, read the way the Docker daemon reads it.

A publish's source is authorised like its targets, by the repository it names, so that name
must be the one the daemon resolves, in every form the daemon accepts: ``app:1``,
``team-a/app``, ``localhost:5000/team-a/app:1``, ``docker.io/library/app``,
``name@sha256:…``, ``name:tag@sha256:…``.

The daemon resolves a reference in two steps (moby ``daemon/images/image.go``, ``GetImage``):
by name in its reference store, and when that finds nothing, as an image id or any unique
prefix of one, with or without ``sha256:`` (``81fd``, ``sha256:81fd``; the id store's digest
set has no minimum length). Only a reference that is hexadecimal alone, or ``sha256:`` and
hexadecimal, can take the second step: such a reference may stand for any image in the daemon
and names no repository here (:func:`parse` returns ``None``); it is authorised where the
image is resolved (``workers/publish.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
_LEGACY_HUB = "index.docker.io"  # the daemon reads it as docker.io
_OFFICIAL = "library/"
# What the daemon may read as an image id or an id prefix (see the module docstring).
_ID_FORM = re.compile(r"(?:sha256:)?[a-f0-9]+", re.ASCII)


@dataclass(frozen=True)
class ImageName:
    domain: str  # docker.io when none is written
    path: str  # as the daemon stores it: library/app for Docker Hub's app
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """The repository as clients' patterns and ``docker image ls`` spell it: Docker Hub's
        official images without ``library/`` (Docker's familiar name), any host's without it."""
        if self.domain == DOCKER_HUB and self.path.startswith(_OFFICIAL) and "/" not in self.path[len(_OFFICIAL):]:
            return self.path[len(_OFFICIAL):]
        return self.path

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every way a client may write this repository: Docker Hub's ``app`` is also
        ``library/app`` (a target on Docker Hub may be given either way)."""
        return tuple(dict.fromkeys((self.repository, self.path)))


def is_image_id(reference: str) -> bool:
    """True when the daemon may resolve ``reference`` as an image id or id prefix."""
    return bool(_ID_FORM.fullmatch(reference))


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's rule (distribution/reference ``splitDockerDomain``): the first component is a
    registry host only when it has a dot, a port or an upper-case letter, or is localhost."""
    first, slash, rest = name.partition("/")
    if slash and (any(c in first for c in ".:[") or first == "localhost" or first != first.lower()):
        domain, path = first, rest
    else:
        domain, path = DOCKER_HUB, name
    if domain == _LEGACY_HUB:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = _OFFICIAL + path
    return domain, path


def parse(reference: str) -> ImageName | None:
    """The name ``reference`` stands for, or ``None`` when it may be an image id."""
    if is_image_id(reference):
        return None
    name, _, digest = reference.partition("@")
    domain, remainder = _split_domain(name)
    path, _, tag = remainder.partition(":")  # the host's port went with the domain
    return ImageName(domain=domain, path=path, tag=tag or None, digest=digest or None)
