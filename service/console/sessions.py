"""Signed-in console sessions, kept in Redis.

Signing in exchanges an API token for a session: the browser holds only a random session id (in
an HttpOnly cookie); Redis holds, under the SHA-256 of that id, the client's name, the SHA-256
of the token it signed in with (never the token) and the session's CSRF token. A copy of Redis
therefore gives no cookie that works, and no token. A session ends when it is signed out, when
it has been idle for ``session_idle_seconds``, after ``session_lifetime_seconds`` in any case,
and as soon as its token no longer names that client in the configuration (a revoked or
rotated token ends the sessions made with it).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

import redis

from ..config import Client, Console


@dataclass(frozen=True)
class Session:
    id: str
    client: str
    token_sha256: str
    csrf: str


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Sessions:
    def __init__(self, client: redis.Redis, prefix: str, settings: Console):
        self.redis, self.prefix, self.settings = client, prefix, settings

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}console:session:{_digest(session_id)}"

    def create(self, client: Client) -> Session:
        session = Session(id=secrets.token_urlsafe(32), client=client.name, token_sha256=client.token_sha256,
                          csrf=secrets.token_urlsafe(32))
        record = {"client": session.client, "token_sha256": session.token_sha256, "csrf": session.csrf,
                  "expires_at": time.time() + self.settings.session_lifetime_seconds}
        self.redis.set(self._key(session.id), json.dumps(record), ex=self._ttl(record["expires_at"]))
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id, its idle time restarted; None if there is none."""
        if not session_id or len(session_id) > 128:
            return None
        key = self._key(session_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.expire(key, self.settings.session_idle_seconds, xx=True)  # one round trip: read and touch
        raw, _ = pipe.execute()
        if not raw:
            return None
        record = json.loads(raw)
        if record["expires_at"] <= time.time():
            self.redis.delete(key)
            return None
        ttl = self._ttl(record["expires_at"])
        if ttl < self.settings.session_idle_seconds:
            self.redis.expire(key, ttl)  # the last stretch: never past its lifetime
        return Session(id=session_id, client=record["client"], token_sha256=record["token_sha256"], csrf=record["csrf"])

    def delete(self, session_id: str) -> None:
        self.redis.delete(self._key(session_id))

    def _ttl(self, expires_at: float) -> int:
        return max(1, min(self.settings.session_idle_seconds, int(expires_at - time.time())))
