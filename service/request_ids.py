"""Every request gets an id: the caller's ``X-Request-Id`` when it is well-formed, else a fresh
one. It is answered in ``X-Request-Id``, logged with the request (the access log and the API's
own lines) and recorded in the audit trail, so one id follows a request from a pipeline's log
to imagepub's."""

from __future__ import annotations

import re
import secrets

from flask import Flask, g, request

from .auth import TOKEN_PREFIX

HEADER = "X-Request-Id"
# What proxies and tracers send (UUIDs, hex, AWS trace ids, W3C trace parents) fits; nothing
# that could break a log line or a header. An id that looks like an API token is never taken:
# a token pasted into the wrong header must not end up in logs and the audit trail.
WELL_FORMED = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=+/-]{0,63}", re.ASCII)


def chosen(incoming: str | None) -> str:
    if incoming and WELL_FORMED.fullmatch(incoming) and not incoming.startswith(TOKEN_PREFIX):
        return incoming
    return secrets.token_hex(12)


def install(app: Flask) -> None:
    """Before any other hook (authentication, the rate limiter), so that every answer has one."""

    @app.before_request
    def _assign() -> None:
        g.request_id = chosen(request.headers.get(HEADER))

    @app.after_request
    def _answer(response):
        response.headers[HEADER] = g.get("request_id") or chosen(None)
        return response
