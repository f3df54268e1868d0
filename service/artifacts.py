"""The artifact store: uploads (image archives, build contexts) wait there for the worker that
runs their job, never in Redis. Each is named by its job's id and deleted when the job ends
(workers/jobs.py), when a queued job is cancelled (here), and otherwise by the sweeper
(workers/supervisor.py: its job ended or expired without deleting it).

``type: directory`` is a path the API and the workers share (one host, or a volume every pod
mounts); this module serves both sides of it. ``type: s3`` is a bucket that only workers hold
credentials for (workers/artifacts.py, boto3): the API never signs a request itself. It spools
an upload to a file (so its size is known, as a single PUT needs), asks a worker over the
control queue for a URL presigned for that one key, and streams the file to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Protocol

import requests

from . import control, errors
from .config import Settings
from .jobstore import is_job_id, new_job_id

log = logging.getLogger(__name__)

# Spooled uploads still being received (directory type), kept apart from stored ones.
INCOMING = ".incoming"
# An upload whose job does not exist (yet) is left alone this long: the API stores the upload
# first and the job a moment later.
ORPHAN_GRACE_SECONDS = 3600
PUT_TIMEOUT = (10.0, 300.0)  # connect, then each read of S3's answer


def has_upload(job: dict[str, Any]) -> bool:
    """Does the job have an upload in the artifact store (a build's context, an archive)?"""
    return job["kind"] == "build" or "archive" in job


class Artifacts(Protocol):
    """What the API needs of the artifact store."""

    def spool(self) -> IO[bytes]:
        """A new file, on disk, to receive an upload into (its ``name`` is its path)."""

    def put_file(self, key: str, path: str, size: int) -> None:
        """Store the spooled file ``path`` as ``key``; the spool file is gone afterwards."""

    def delete(self, key: str) -> None:
        """Remove ``key`` if it is there; failures are logged, the sweeper tries again."""


class DirectoryArtifacts:
    """``type: directory``: one file per upload, ``<path>/<job id>``."""

    def __init__(self, path: str):
        self.root = Path(path)

    def file(self, key: str) -> Path:
        if not is_job_id(key):  # a job id, never a path a caller could shape
            raise ValueError(f"not an upload key: {key!r}")
        return self.root / key

    def spool(self) -> IO[bytes]:
        incoming = self.root / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        # in the store's own file system, so that storing it is a rename
        return tempfile.NamedTemporaryFile(dir=incoming, prefix=f"{os.getpid()}-", delete=False)

    def put_file(self, key: str, path: str, size: int) -> None:
        os.replace(path, self.file(key))

    def read(self, key: str) -> bytes | None:
        try:
            return self.file(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        try:
            self.file(key).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("upload not deleted: %s", exc.strerror, extra={"job_id": key})

    def listing(self) -> Iterator[tuple[str, float]]:
        """Every stored upload: (key, seconds since it was written)."""
        now = time.time()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            if is_job_id(entry.name):
                try:
                    yield entry.name, now - entry.stat().st_mtime
                except FileNotFoundError:
                    continue

    def sweep_incoming(self, max_age: float = ORPHAN_GRACE_SECONDS) -> int:
        """Remove spool files no API process has written to for ``max_age`` (its process died
        mid-upload)."""
        removed, now = 0, time.time()
        try:
            entries = list(os.scandir(self.root / INCOMING))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if now - entry.stat().st_mtime > max_age:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class PresignedS3Artifacts:
    """``type: s3`` as the API sees it: it holds no AWS credentials, so a worker presigns."""

    def __init__(self, control_: control.RegistryControl, spool_dir: str | None = None):
        self.control = control_
        self.spool_dir = spool_dir

    def spool(self) -> IO[bytes]:
        return tempfile.NamedTemporaryFile(dir=self.spool_dir, prefix="imagepub-upload-", delete=False)

    def put_file(self, key: str, path: str, size: int) -> None:
        try:
            url = self.control.call(control.PRESIGN_UPLOAD, key)
            with open(path, "rb") as body:
                resp = requests.put(url, data=body, headers={"Content-Length": str(size)}, timeout=PUT_TIMEOUT)
        except requests.RequestException as exc:
            # never the URL: it carries a signature that lets anyone write the object meanwhile
            raise _store_unavailable(f"the artifact store could not be reached ({exc.__class__.__name__})") from None
        finally:
            _unlink(path)
        if resp.status_code >= 300:
            raise _store_unavailable(f"the artifact store refused the upload (HTTP {resp.status_code})")

    def delete(self, key: str) -> None:
        try:
            self.control.send(control.DELETE_UPLOAD, key)
        except errors.ImagepubError as exc:
            log.warning("upload not deleted: %s", exc.message, extra={"job_id": key})


def _store_unavailable(message: str) -> errors.ServiceUnavailable:
    return errors.ServiceUnavailable(f"{message}; nothing was queued, try again", code="artifact_store_unavailable", retry_after=5)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def for_api(settings: Settings, control_: control.RegistryControl) -> Artifacts:
    if settings.artifacts.type == "s3":
        return PresignedS3Artifacts(control_)
    return DirectoryArtifacts(settings.artifacts.path)


@dataclass
class Upload:
    """An upload in the artifact store, waiting for the job it is named after."""

    store: Artifacts
    job_id: str
    sha256: str
    size: int
    fields: dict[str, Any] = field(default_factory=dict)  # what the job records of it ({"archive": …})

    def discard(self) -> None:
        """The upload will have no job (refused, or a replayed request's): remove it."""
        self.store.delete(self.job_id)


def store_bytes(store: Artifacts, data: bytes) -> Upload:
    """A small upload held in memory already (a build context, checked before): stored now."""
    job_id = new_job_id()
    spool = store.spool()
    try:
        with spool:
            spool.write(data)
        store.put_file(job_id, spool.name, len(data))
    except BaseException:
        _unlink(spool.name)
        raise
    return Upload(store, job_id, hashlib.sha256(data).hexdigest(), len(data))
