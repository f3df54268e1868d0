"""Everything a job needs, built once per worker process from the settings.

Tasks take a job id and get their clients here, never from module imports, so a test can build a
``Deps`` around a real daemon and Redis and call the job functions directly.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Mapping

import redis

from service import config
from service.config import Settings
from service.jobstore import JobStore

from .docker_engine import DockerEngine
from .registries import Target, build_targets


@dataclass
class Deps:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    engine: DockerEngine
    targets: Mapping[str, Target]

    @classmethod
    def from_config(cls, settings: Settings) -> "Deps":
        from .ecr import EcrRegistry  # noqa: PLC0415 - keeps boto3 out of processes without ECR

        store = JobStore.from_config(settings)
        return cls(
            settings=settings,
            redis=store.redis,
            store=store,
            engine=DockerEngine.from_config(settings),
            targets=build_targets(settings, lambda cfg: EcrRegistry.from_config(cfg, store.redis)),
        )

    @contextlib.contextmanager
    def reference_lock(self, reference: str) -> Iterator[None]:
        """Serialise tag-and-push of one reference across every worker: the daemon's tag is
        shared state, and two jobs must never push each other's image under one name."""
        lock = self.redis.lock(
            f"imagepub:lock:ref:{reference}",
            timeout=self.settings.job_timeout_seconds,
            blocking_timeout=self.settings.job_timeout_seconds,
        )
        if not lock.acquire():
            from service.errors import Timeout

            raise Timeout(f"{reference} stayed locked by another job")
        try:
            yield
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()


@functools.cache
def get_deps() -> Deps:
    """This process's dependencies (made lazily, after Celery has forked the pool)."""
    return Deps.from_config(config.load())
