"""Everything a job needs, built once per worker process from the settings.

Tasks take a job id and get their clients here, never from module imports, so a test can build a
``Deps`` around a real daemon and Redis and call the job functions directly.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

import redis

from service import config, errors
from service.config import Settings
from service.jobstore import JobStore
from service.queue import JobQueue

from .docker_engine import DockerEngine
from .registries import Target, build_targets


@dataclass
class Deps:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    engine: DockerEngine
    targets: Mapping[str, Target]
    queue: JobQueue

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
            queue=JobQueue.from_config(settings),
        )

    @contextlib.contextmanager
    def reference_lock(self, reference: str, check=lambda: None) -> Iterator[None]:
        """Serialise tag-and-push of one repository (``host/name``) across every worker: the
        daemon's tags are shared state, two jobs must never push each other's image under one
        name, and two pushes of one image must not upload its layers twice.
        ``check()`` runs while waiting (it raises when the job is cancelled)."""
        lock = self.redis.lock(f"imagepub:lock:ref:{reference}", timeout=self.settings.job_timeout_seconds, thread_local=False)
        deadline = time.monotonic() + self.settings.job_timeout_seconds
        while not lock.acquire(blocking_timeout=0.5):
            check()
            if time.monotonic() > deadline:
                raise errors.Timeout(f"{reference} stayed locked by another job")
        try:
            yield
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()


@functools.cache
def get_deps() -> Deps:
    """This process's dependencies (made lazily, after Celery has forked the pool)."""
    return Deps.from_config(config.load())
