"""Synchronous registry operations (create, list and describe repositories, list images), and
the artifact store's operations that need credentials (presigning an upload, deleting one).

The API never talks to ECR itself: it asks a worker over the control queue and waits for the
answer, a few seconds at most. Only the workers hold cloud credentials, and the API image needs
no boto3. Errors travel back as data (code, message, status) and are raised here again as the
same :class:`~service.errors.ImagepubError`, so callers get the same problem+json either way.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from . import errors
from .queue import CONTROL_QUEUE

CREATE_REPOSITORY = "imagepub.control.create_repository"
DESCRIBE_REPOSITORY = "imagepub.control.describe_repository"
LIST_REPOSITORIES = "imagepub.control.list_repositories"
LIST_IMAGES = "imagepub.control.list_images"
# The artifact store of type s3 (service/artifacts.py): only workers hold its credentials.
PRESIGN_UPLOAD = "imagepub.control.presign_upload"
DELETE_UPLOAD = "imagepub.control.delete_upload"


def raise_from_answer(answer: dict[str, Any]) -> Any:
    """The value of a control answer, or the error it carries, raised again."""
    if answer.get("ok"):
        return answer["value"]
    err = answer.get("error") or {}
    raise errors.reported(err.get("code", "internal_error"), err.get("message"), err.get("status", 502))


class RegistryControl:
    def __init__(self, celery: Celery, timeout: float = 30.0):
        self.celery = celery
        self.timeout = timeout

    def call(self, task: str, *args: Any) -> Any:
        try:
            result = self.celery.send_task(task, args=list(args), queue=CONTROL_QUEUE, ignore_result=False, expires=self.timeout)
        except Exception:
            raise errors.ServiceUnavailable("the job queue is unavailable", code="queue_unavailable") from None
        try:
            answer = result.get(timeout=self.timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeout:
            raise errors.ServiceUnavailable(
                f"no worker answered within {self.timeout:.0f} s", code="workers_unavailable"
            ) from None
        finally:
            result.forget()
        if not isinstance(answer, dict):
            raise errors.ImagepubError("a worker failed to answer the registry operation")
        return raise_from_answer(answer)

    def send(self, task: str, *args: Any) -> None:
        """Ask a worker to do ``task`` without waiting for it (nobody needs the answer)."""
        try:
            self.celery.send_task(task, args=list(args), queue=CONTROL_QUEUE, ignore_result=True)
        except Exception:
            raise errors.ServiceUnavailable("the job queue is unavailable", code="queue_unavailable") from None
