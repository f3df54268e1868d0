"""Structured logs: one JSON object per line, with secrets scrubbed at the last moment.

Secrets that could reach a message (registry passwords, ECR tokens) are registered with
:func:`register_secret` where they enter the process; the filter replaces them, and the
``X-Registry-Auth``/``Authorization`` shapes, wherever they appear.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time

from flask import g, has_request_context
from pythonjsonlogger.orjson import OrjsonFormatter as JsonFormatter

_secrets: set[str] = set()
_lock = threading.Lock()
_PATTERNS = [
    re.compile(r"(?i)(authorization:\s*(?:basic|bearer)\s+)\S+"),
    re.compile(r"(?i)(x-registry-auth[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9+/=_-]+"),
    re.compile(r"(?i)([\"']?password[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
]


def register_secret(value: str | None) -> None:
    if value and len(value) >= 6:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    for pattern in _PATTERNS:
        text = pattern.sub(r"\1[REDACTED]", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


class RequestIdFilter(logging.Filter):
    """A line written while the API serves a request carries the request's id (service/request_ids.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context() and "request_id" in g:
            record.request_id = g.request_id
        return True


class JsonLines(JsonFormatter):
    """One schema for every line the API and the workers write — the app's, Celery's,
    gunicorn's error log and its access log alike, as a log pipeline expects: ``time`` (RFC 3339,
    UTC, milliseconds), ``level``, ``logger``, ``message``, then the line's own fields, numbers
    as numbers. gunicorn hands its access logger the request's atoms (``record.args``); they
    become ``remote``, ``method``, ``path``, ``status``, ``bytes``, ``duration_us`` and
    ``request_id``."""

    def __init__(self, *args, **kwargs):
        super().__init__("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
                         timestamp=False, *args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "gunicorn.access" and isinstance(record.args, dict):
            record.access = _access_fields(record.args)
            record.msg, record.args = f"{record.access['method']} {record.access['path']} {record.access['status']}", None
        return super().format(record)

    def add_fields(self, log_record, record, message_dict) -> None:
        log_record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        super().add_fields(log_record, record, message_dict)
        log_record.update(log_record.pop("access", None) or {})


def _access_fields(atoms: dict) -> dict:
    def number(value):
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    request_id = atoms.get("{x-request-id}o")
    return {
        "remote": atoms.get("h"), "method": atoms.get("m"), "path": atoms.get("U"), "status": number(atoms.get("s")),
        "bytes": number(atoms.get("B")) or 0, "duration_us": number(atoms.get("D")),
        **({"request_id": request_id} if request_id and request_id != "-" else {}),
    }


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    handler.addFilter(RedactingFilter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # What no line here shows is not gathered for each record (the logging HOWTO's
    # "Optimization"): the caller's file and line (a walk up the stack), and the thread and
    # process (under gevent, a lookup per greenlet). A line costs about a quarter less.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.captureWarnings(True)  # library warnings become JSON lines too
    sys.unraisablehook = _log_unraisable  # and errors Python can only report (in __del__, say)


def _log_unraisable(unraisable) -> None:
    """An exception Python cannot raise (one in a finaliser: Celery's AsyncResult.__del__ has
    been seen) as a JSON line like every other, not as free text on stderr."""
    logging.getLogger("python.unraisable").warning(
        "%s in %r", unraisable.err_msg or "Exception ignored", unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback) if unraisable.exc_value else None,
    )
