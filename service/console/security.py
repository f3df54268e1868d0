"""What keeps the console's pages safe in a browser: the response headers every page carries,
the session cookie's attributes, and the checks on every request that changes something.

- A strict Content-Security-Policy: scripts and styles only from the console's own files (no
  inline script, no inline style), no frames around it, forms and connections only to itself.
- The session cookie is HttpOnly and SameSite=Strict, and Secure (with the ``__Host-`` prefix,
  which browsers bind to this origin alone) when the browser came over TLS. Behind reverse
  proxies that terminate TLS the API sees plain HTTP: ``console.trusted_proxies`` says how many
  there are, and only then is their ``X-Forwarded-Proto`` believed (gunicorn is told to believe
  no such header itself: service/gunicorn_conf.py).
- A request that changes something (sign in, sign out, cancel) must come from a console page:
  its Origin (and Sec-Fetch-Site, which browsers send) must be this site's, and it must carry
  the session's CSRF token (for sign-in, which has no session yet, the token of the sign-in
  form, double-submitted in a short-lived cookie).
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from flask import Request, Response

from ..errors import CsrfFailed

CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
))
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
SESSION_COOKIE = "imagepub_console"
SIGN_IN_COOKIE = "imagepub_console_sign_in"


def browser_used_tls(request: Request, trusted_proxies: int) -> bool:
    """Whether the browser's connection was TLS: the server's own scheme, or, behind
    ``trusted_proxies`` proxies, what the outermost of them wrote in X-Forwarded-Proto (each
    proxy appends; a client's own value comes before theirs and is never read)."""
    if request.environ.get("wsgi.url_scheme") == "https":
        return True
    if not trusted_proxies:
        return False
    values = [v.strip().lower() for v in ",".join(request.headers.getlist("X-Forwarded-Proto")).split(",") if v.strip()]
    return len(values) >= trusted_proxies and values[-trusted_proxies] == "https"


def cookie_name(base: str, secure: bool) -> str:
    # __Host-: the browser keeps it only if Secure, Path=/ and without Domain — this origin's alone
    return f"__Host-{base}" if secure else base


def set_cookie(response: Response, base: str, value: str, *, secure: bool, max_age: int | None) -> None:
    response.set_cookie(cookie_name(base, secure), value, max_age=max_age, path="/" if secure else "/ui",
                        secure=secure, httponly=True, samesite="Strict")


def clear_cookie(response: Response, base: str, *, secure: bool) -> None:
    response.delete_cookie(cookie_name(base, secure), path="/" if secure else "/ui", secure=secure, httponly=True,
                           samesite="Strict")


def add_headers(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "text/html":
        response.headers["Cache-Control"] = "no-store"  # a signed-in page stays out of shared caches
    return response


def check_origin(request: Request) -> None:
    """403 unless a state-changing request comes from one of this site's own pages. Browsers
    send Origin with every POST and Sec-Fetch-Site with every request; a request with neither
    is no browser's, and the CSRF token still has to match."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise CsrfFailed(f"a request from another site ({site}) may not change anything here")
    origin = request.headers.get("Origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc != request.host):
        raise CsrfFailed("a request from another origin may not change anything here")


def check_token(presented: str | None, expected: str | None) -> None:
    if not presented or not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise CsrfFailed("the form is stale or did not come from this console; reload the page and try again")
