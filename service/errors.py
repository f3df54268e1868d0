"""imagepub's one exception hierarchy.

Every failure that reaches a caller is an :class:`ImagepubError` with a stable ``code``. The API
renders them as RFC 9457 problem details; the worker records them in the job. Whether a failure
is worth retrying is decided here, once, by the class (``transient``), never by scattered
``try`` blocks.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


# What a 500 says of itself: nothing of the exception, which is logged.
UNEXPECTED = "an unexpected error occurred; it has been logged"


def problem_document(status: int, code: str, title: str, detail: str) -> dict[str, Any]:
    """The RFC 9457 problem details every refusal of the API carries, whether Flask answers it
    (service/app.py) or gunicorn does before a request reaches the application
    (service/gunicorn_worker.py)."""
    return {"type": f"/problems/{code}", "title": title, "status": status, "detail": detail, "code": code}


class ImagepubError(Exception):
    code = "internal_error"
    status = 500
    title = "Internal error"
    transient = False

    def __init__(self, message: str | None = None, *, code: str | None = None, **extra: Any):
        super().__init__(message or self.title)
        self.message = message or self.title
        if code:
            self.code = code
        self.extra = extra

    def with_status(self, status: int) -> "ImagepubError":
        """This error, answered with another HTTP status. Its title follows: a class's title is
        written for the class's status (RFC 9457: a short summary of the problem type), and kept
        with another status it would misstate it (a 422 titled "Internal error")."""
        if status != type(self).status:
            self.title = status_title(status)
        self.status = status
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


# --- request errors (API) ---------------------------------------------------------------------


class BadRequest(ImagepubError):
    code, status, title = "bad_request", 400, "Bad request"

    def __init__(self, message: str | None = None, *, code: str | None = None, errors: list[dict[str, str]] | None = None):
        super().__init__(message, code=code)
        self.errors = errors  # the body or part that could not be read, when there is one


class ValidationFailed(ImagepubError):
    """The request body or parameters break the contract; ``errors`` names each field."""

    code, status, title = "validation_failed", 422, "Request validation failed"

    def __init__(self, errors: list[dict[str, str]], message: str | None = None, *, code: str | None = None):
        fields_ = ", ".join(e["field"] for e in errors)
        super().__init__(message or f"invalid fields: {fields_}", code=code)
        self.errors = errors


class Unauthorized(ImagepubError):
    code, status, title = "unauthorized", 401, "Unauthorized"

    def __init__(self, message: str, *, invalid: bool = False):
        super().__init__(message)
        challenge = 'Bearer realm="imagepub"'
        if invalid:
            challenge += ', error="invalid_token"'
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(ImagepubError):
    code, status, title = "forbidden", 403, "Forbidden"

    def __init__(self, message: str, *, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.errors = errors


class CsrfFailed(Forbidden):
    """A console request that changes something (sign in, sign out, cancel) did not come from a
    console page: another site's, or without the session's CSRF token (service/console/)."""

    code, title = "csrf_failed", "Cross-site request refused"


class TooManyRequests(ImagepubError):
    code, status, title = "too_many_requests", 429, "Too many requests"
    transient = True


class NotFound(ImagepubError):
    code, status, title = "not_found", 404, "Not found"


class Conflict(ImagepubError):
    code, status, title = "conflict", 409, "Conflict"


class PayloadTooLarge(ImagepubError):
    code, status, title = "payload_too_large", 413, "Payload too large"


class UnsupportedMediaType(ImagepubError):
    code, status, title = "unsupported_media_type", 415, "Unsupported media type"


class ServiceUnavailable(ImagepubError):
    code, status, title = "service_unavailable", 503, "Service unavailable"
    transient = True

    def __init__(self, message: str | None = None, *, code: str | None = None, retry_after: int | None = None):
        super().__init__(message, code=code)
        if retry_after is not None:
            self.headers = {"Retry-After": str(retry_after)}


# --- job failures (worker) --------------------------------------------------------------------


class JobFailed(ImagepubError):
    """A job cannot succeed as asked; retrying would give the same answer."""

    code, status, title = "job_failed", 422, "Job failed"


class ImageNotFound(JobFailed):
    code, title = "image_not_found", "Image not found"


class RegistryNotConfigured(JobFailed):
    code, title = "registry_not_configured", "Registry not configured"


class RepositoryNotFound(JobFailed):
    code, status, title = "repository_not_found", 404, "Repository not found"


class RepositoryExists(JobFailed):
    code, status, title = "repository_exists", 409, "Repository already exists"


class AccessDenied(JobFailed):
    code, status, title = "access_denied", 403, "Access denied"


class AuthFailed(JobFailed):
    code, status, title = "auth_failed", 502, "Registry refused the credentials"


class TagImmutable(JobFailed):
    code, status, title = "tag_immutable", 409, "Tag is immutable"


class PushFailed(JobFailed):
    code, status, title = "push_failed", 502, "Push failed"


class PullFailed(JobFailed):
    code, status, title = "pull_failed", 502, "Pull failed"


class BuildFailed(JobFailed):
    code, status, title = "build_failed", 422, "Build failed"


class ManifestNotFound(JobFailed):
    code, status, title = "manifest_not_found", 404, "Manifest not found"


class CopyFailed(JobFailed):
    """A copy between registries failed for a reason no other class names (skopeo's words)."""

    code, status, title = "copy_failed", 502, "Copy failed"


class RegistryTlsFailed(JobFailed):
    """The registry's certificate is not trusted (its ``ca_file`` is missing or wrong), or TLS
    failed otherwise: a configuration matter, not worth another attempt."""

    code, status, title = "registry_tls_failed", 502, "Registry TLS failed"


class Cancelled(ImagepubError):
    code, status, title = "cancelled", 409, "Cancelled"


class TransientError(ImagepubError):
    """Worth another attempt: throttling, timeouts, a daemon or network hiccup."""

    code, status, title = "transient_error", 503, "Temporary failure"
    transient = True


class Throttled(TransientError):
    code, status, title = "throttled", 429, "Throttled"


class DaemonUnavailable(TransientError):
    code, title = "daemon_unavailable", "Docker daemon unavailable"


class RegistryUnavailable(TransientError):
    code, status, title = "registry_unavailable", 502, "Registry unavailable"


class Timeout(TransientError):
    code, status, title = "timeout", 504, "Timed out"


class TokenRejected(TransientError):
    """The registry refused a cached token; fetch a fresh one and try once more."""

    code, status, title = "auth_failed", 502, AuthFailed.title  # one problem type, one title


class NotSupported(ImagepubError):
    """The registry cannot do this (repositories of a plain OCI registry are its own tools')."""

    code, status, title = "not_supported", 422, "Not supported by this registry"


# --- errors reported by another process ----------------------------------------------------


def status_title(status: int) -> str:
    """The reason phrase of an HTTP status (RFC 9110), the title of a problem no class of
    this hierarchy describes at that status."""
    return HTTPStatus(status).phrase


def _classes(cls: type[ImagepubError] = ImagepubError) -> list[type[ImagepubError]]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _classes(child)]


def title_for(code: str, status: int) -> str:
    """The title of problem ``code`` at ``status``: the title of the class with that code and
    status, when there is one; else the status's reason phrase."""
    for cls in _classes():
        if cls.code == code and cls.status == status:
            return cls.title
    return status_title(status)


def reported(code: str, message: str | None, status: Any) -> ImagepubError:
    """An error another process reported as data (a worker's answer on the control queue), to
    be raised again here. Its title is this hierarchy's for its code and status, never one that
    came along with it; a status that is not an HTTP error status becomes 502 (the worker's
    answer is what failed)."""
    code = code or "internal_error"
    try:
        status = int(status)
        title = title_for(code, status) if 400 <= status <= 599 else None
    except (TypeError, ValueError):  # not a number, or no status HTTP defines
        title = None
    if title is None:
        status, title = 502, title_for(code, 502)
    exc = ImagepubError(message or title, code=code)
    exc.status, exc.title = status, title
    return exc
