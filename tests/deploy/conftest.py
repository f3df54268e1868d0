"""Fixtures shared by the chart and image tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploytools import build_renderer


@pytest.fixture(scope="session")
def renderer() -> Path:
    """tools/helm-render (Go text/template + sprig, the engine Helm uses), built once."""
    return build_renderer()
