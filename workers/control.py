"""Control-queue tasks: the registry operations the API answers synchronously, and what the
API needs done in an s3 artifact store (it holds no credentials for it).

Each returns ``{"ok": True, "value": …}`` or ``{"ok": False, "error": {code, message, status}}``;
errors travel as data so the API can render the very same problem+json.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from service import control, errors

from .artifacts import S3Artifacts
from .celery_app import app
from .deps import get_deps


def _ecr(registry: str):
    target = get_deps().targets.get(registry)
    if target is None:
        raise errors.NotFound(f"no registry named {registry!r} is configured", code="registry_not_configured")
    if not hasattr(target, "ecr"):
        raise errors.ImagepubError(
            f"registry {registry!r} is not an ECR registry; repositories are managed by its own tools",
            code="not_supported",
        ).with_status(422)
    return target


def _answer(fn: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> dict[str, Any]:
        try:
            return {"ok": True, "value": fn(*args)}
        except errors.ImagepubError as exc:
            return {"ok": False, "error": {"code": exc.code, "message": exc.message, "status": exc.status, "title": exc.title}}

    return wrapper


@app.task(name=control.CREATE_REPOSITORY, acks_late=False, ignore_result=False)
@_answer
def create_repository(registry: str, request: dict[str, Any]) -> dict[str, Any]:
    target = _ecr(registry)
    defaults = target.config.repository_defaults
    return target.ecr.create_repository(
        request["name"],
        tag_mutability=request.get("image_tag_mutability", defaults.image_tag_mutability),
        scan_on_push=request.get("scan_on_push", defaults.scan_on_push),
        encryption=request.get("encryption", defaults.encryption_type),
        kms_key=request.get("kms_key", defaults.kms_key),
        tags={**defaults.tags, **request.get("tags", {})},
    )


@app.task(name=control.DESCRIBE_REPOSITORY, acks_late=False, ignore_result=False)
@_answer
def describe_repository(registry: str, repository: str) -> dict[str, Any]:
    return _ecr(registry).ecr.describe_repository(repository)


@app.task(name=control.LIST_REPOSITORIES, acks_late=False, ignore_result=False)
@_answer
def list_repositories(registry: str, limit: int, cursor: str | None) -> dict[str, Any]:
    repositories, next_cursor = _ecr(registry).ecr.list_repositories(limit=limit, cursor=cursor)
    return {"repositories": repositories, "next_cursor": next_cursor}


@app.task(name=control.LIST_IMAGES, acks_late=False, ignore_result=False)
@_answer
def list_images(registry: str, repository: str, limit: int, cursor: str | None) -> dict[str, Any]:
    images, next_cursor = _ecr(registry).ecr.list_images(repository, limit=limit, cursor=cursor)
    return {"images": images, "next_cursor": next_cursor}


@app.task(name=control.PRESIGN_UPLOAD, acks_late=False, ignore_result=False)
@_answer
def presign_upload(key: str) -> str:
    """A URL the API may PUT one upload to, for ``type: s3`` (the API holds no AWS credentials)."""
    artifacts = get_deps().artifacts
    if not isinstance(artifacts, S3Artifacts):
        raise errors.ImagepubError("this worker's artifact store is not of type s3: the API and workers disagree",
                                   code="artifact_store_unavailable").with_status(503)
    return artifacts.presign_put(key)


@app.task(name=control.DELETE_UPLOAD, acks_late=False)
def delete_upload(key: str) -> None:
    """An upload whose job was cancelled before it ran (nobody waits for the answer)."""
    get_deps().artifacts.delete(key)
