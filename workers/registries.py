"""Where images go: one object per configured registry, all with the same small interface.

A :class:`Target` knows its host (what image references start with), the credentials to hand the
daemon for one call, and how to make sure a repository exists. ``type: registry`` is any OCI
registry; ``type: ecr`` (workers/ecr.py) gets host and credentials from the ECR API.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from service.config import Registry, Settings
from service.logs import register_secret

DOCKER_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


class Target(Protocol):
    name: str
    config: Registry  # its configuration (TLS for daemonless clients among it)

    def host(self) -> str:
        """The registry part of image references, e.g. ``localhost:5000`` or ``docker.io``."""

    def auth_config(self) -> dict[str, str]:
        """Credentials for one daemon call (sent as ``X-Registry-Auth``); ``{}`` for none."""

    def invalidate_auth(self) -> None:
        """Forget cached credentials after the registry refused them."""

    def ensure_repository(self, repository: str, create: bool) -> bool:
        """Make sure ``repository`` can be pushed to; True when it was created now."""

    def repository_ref(self, repository: str) -> str:
        """``host/repository``, the name the daemon pushes to."""


class OciRegistry:
    """Docker Hub or any registry that speaks the distribution API, with optional basic auth."""

    def __init__(self, config: Registry):
        self.config = config
        self.name = config.name

    def host(self) -> str:
        return "docker.io" if self.config.host in DOCKER_HUB_HOSTS else self.config.host

    def repository_ref(self, repository: str) -> str:
        return f"{self.host()}/{repository}"

    def auth_config(self) -> dict[str, str]:
        if not self.config.username:
            return {}
        server = "https://index.docker.io/v1/" if self.host() == "docker.io" else self.host()
        password = self.config.password() or ""
        register_secret(password)
        return {"username": self.config.username, "password": password, "serveraddress": server}

    def invalidate_auth(self) -> None:
        """Static credentials: nothing cached to drop."""

    def ensure_repository(self, repository: str, create: bool) -> bool:
        # Distribution registries create repositories on first push; there is nothing to check
        # that the push itself would not report.
        return False


def build_targets(settings: Settings, ecr_factory=None) -> Mapping[str, Target]:
    """One target per configured registry. ``ecr_factory(registry_config)`` makes ECR targets."""
    targets: dict[str, Target] = {}
    for name, config in settings.registries.items():
        if config.type == "ecr":
            if ecr_factory is None:
                raise RuntimeError("ECR registries need an ECR factory")
            targets[name] = ecr_factory(config)
        else:
            targets[name] = OciRegistry(config)
    return targets
