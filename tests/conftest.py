"""Session-wide fixtures shared by every test package.

`stack` starts the real components (Redis, a private dockerd, registries, an emulated
ECR, moto) once per session; see tests/stack.py and /work/shared/TESTBED.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import Stack, start_stack  # noqa: E402


@pytest.fixture(scope="session")
def stack() -> Stack:
    # start_stack() tears everything down on normal exit, on failure and on Ctrl-C
    # (pytest runs session finalizers on KeyboardInterrupt); a watchdog process
    # cleans up if this process is killed outright.
    with start_stack() as s:
        yield s
