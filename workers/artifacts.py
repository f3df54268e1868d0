"""The artifact store as the workers see it: they fetch uploads for their jobs, delete them,
sweep the leftovers, and for ``type: s3`` presign the API's uploads (the API holds no AWS
credentials: service/artifacts.py). ``type: directory`` is served by the API's own class; this
module adds the S3 bucket, through boto3 and the standard AWS credential chain (IRSA on
Kubernetes, as for ECR).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Protocol

from service import errors
from service.artifacts import DirectoryArtifacts
from service.config import Settings
from service.jobstore import is_job_id

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 3600  # a 5 GiB upload on a slow link has an hour to start


class Artifacts(Protocol):
    """What workers need of the artifact store."""

    def fetch(self, key: str, into: Path) -> Path:
        """The upload as a local file: the stored file itself when the store is a directory,
        else a copy written under ``into``. Raises ``upload_missing`` when it is not there."""

    def read(self, key: str) -> bytes | None:
        """A small upload (a build context), or None when it is not there."""

    def delete(self, key: str) -> None: ...

    def listing(self) -> Iterator[tuple[str, float]]:
        """Every stored upload: (key, age in seconds)."""

    def sweep_incoming(self) -> int:
        """Remove uploads left half-received by an API process that died; how many."""


def missing(key: str) -> errors.JobFailed:
    return errors.JobFailed(f"the upload of job {key} is not in the artifact store (deleted, or expired before the job ran)",
                            code="upload_missing")


class LocalArtifacts(DirectoryArtifacts):
    """``type: directory``, on a worker."""

    def fetch(self, key: str, into: Path) -> Path:
        path = self.file(key)
        if not path.is_file():
            raise missing(key)
        return path


class S3Artifacts:
    """``type: s3``: objects ``<prefix><job id>`` in one bucket."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix

    @classmethod
    def from_config(cls, settings: Settings) -> "S3Artifacts":
        import boto3  # noqa: PLC0415 - only workers with an s3 store load it

        config = settings.artifacts
        client = boto3.client("s3", region_name=config.region, endpoint_url=config.endpoint_url)
        return cls(client, config.bucket, config.prefix)

    def _key(self, key: str) -> str:
        if not is_job_id(key):  # only uploads named by a job id: never another object of the bucket
            raise errors.ValidationFailed([{"field": "key", "message": "not an upload key"}])
        return self.prefix + key

    def presign_put(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=PRESIGN_SECONDS
        )

    def fetch(self, key: str, into: Path) -> Path:
        path = into / f"upload-{key}"
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))  # ranged GETs, side by side
        except Exception as exc:
            raise _translate(exc, key) from None
        return path

    def read(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            error = _translate(exc, key)
            if error.code == "upload_missing":
                return None
            raise error from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            log.warning("upload not deleted: %s", exc.__class__.__name__, extra={"job_id": key})

    def listing(self) -> Iterator[tuple[str, float]]:
        now = time.time()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents") or []:
                key = item["Key"][len(self.prefix):]
                if is_job_id(key):
                    yield key, now - item["LastModified"].timestamp()

    def sweep_incoming(self) -> int:
        return 0  # a PUT that never finished leaves no object behind


def _translate(exc: Exception, key: str) -> errors.ImagepubError:
    """boto3's errors in our words: a missing object is permanent, anything else worth retrying."""
    from botocore.exceptions import ClientError  # noqa: PLC0415

    if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
        return missing(key)
    return errors.TransientError(f"the artifact store could not be read ({exc.__class__.__name__})", code="artifact_store_unavailable")


def from_config(settings: Settings) -> Artifacts:
    if settings.artifacts.type == "s3":
        return S3Artifacts.from_config(settings)
    return LocalArtifacts(settings.artifacts.path)
