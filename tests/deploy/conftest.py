"""Fixtures shared by the chart and image tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the tests import their helpers by module name (pytest imports test files with importlib: see
# pyproject.toml, so that two packages may hold test files of the same name)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploytools import build_renderer  # noqa: E402


@pytest.fixture(scope="session")
def renderer() -> Path:
    """tools/helm-render (Go text/template + sprig, the engine Helm uses), built once."""
    return build_renderer()
