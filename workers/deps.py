"""Everything a job needs, built once per worker process from the settings.

Tasks take a job id and get their clients here, never from module imports, so a test can build a
``Deps`` around a real daemon and Redis and call the job functions directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping

import redis

from service import config
from service.config import Settings
from service.jobstore import JobStore
from service.queue import JobQueue

from .artifacts import Artifacts
from .artifacts import from_config as artifacts_from_config
from .docker_engine import DockerEngine
from .registries import Target, build_targets
from .skopeo import Skopeo


@dataclass
class Deps:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    engine: DockerEngine | None  # None on a worker without a daemon: it takes only daemonless jobs
    targets: Mapping[str, Target]
    queue: JobQueue
    skopeo: Skopeo = field(default_factory=Skopeo)  # copies between registries: no daemon
    artifacts: Artifacts | None = None  # uploads (archives, build contexts): workers/artifacts.py

    @classmethod
    def from_config(cls, settings: Settings) -> "Deps":
        from .ecr import EcrRegistry  # noqa: PLC0415 - keeps boto3 out of processes without ECR

        store = JobStore.from_config(settings)
        return cls(
            settings=settings,
            redis=store.redis,
            store=store,
            # docker-py asks the daemon its API version when the client is made: a worker without
            # a daemon makes none (copies need none)
            engine=DockerEngine.from_config(settings) if settings.daemon_name else None,
            targets=build_targets(settings, lambda cfg: EcrRegistry.from_config(cfg, store.redis, settings.recovery.lock_ttl_seconds)),
            queue=JobQueue.from_config(settings),
            skopeo=Skopeo.from_config(settings),
            artifacts=artifacts_from_config(settings),
        )


@functools.cache
def get_deps() -> Deps:
    """This process's dependencies (made lazily, after Celery has forked the pool)."""
    return Deps.from_config(config.load())
