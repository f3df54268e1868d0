"""API clients the tests authenticate as (tokens and their configuration)."""

from __future__ import annotations

TOKENS = {name: f"imp_test-{name}-token" for name in ("admin", "ci", "team-b", "reader", "limited")}
CLIENTS = {
    "admin": {"scopes": ["admin"]},
    "ci": {"scopes": ["publish", "pull", "read"], "repositories": ["team/*", "python-lab"]},
    "team-b": {"scopes": ["publish", "pull", "read"], "repositories": ["team-b/*"]},
    "reader": {"scopes": ["read"]},
    "limited": {"scopes": ["publish"], "rate_limit": "3/minute"},
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}
