"""The web console (``/ui``): server-rendered pages over the API's own functions, signed into
with an API token. See views.py (the pages), sessions.py (signing in), security.py (what keeps
it safe in a browser), present.py and numbers.py (what the pages show)."""

from .views import authenticate, console  # noqa: F401
