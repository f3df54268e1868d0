"""The WSGI entry point for gunicorn: ``gunicorn service.wsgi:app``."""

from .app import create_app
from .config import load
from .logs import configure_logging

settings = load()
configure_logging(settings.log_level)
app = create_app(settings)
