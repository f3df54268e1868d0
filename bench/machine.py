"""What the numbers were measured on: CPU, cores, memory, load, and every version that matters."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flask", "werkzeug", "gunicorn", "marshmallow", "flask-limiter", "celery", "kombu", "redis", "docker", "boto3", "moto")


def _run(argv: list[str], env: dict | None = None) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)', text, re.M)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def describe(stack=None) -> dict[str, str]:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _memory(),
        "os": f"{_os_release()}, Linux {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "service", "workers"])
    info["imagepub"] = f"{commit or 'unknown'}{' + uncommitted changes in service/ or workers/' if dirty else ''}"
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    info["python packages"] = ", ".join(versions)
    tools = []
    wrk = _run(["wrk", "-v"]).splitlines()
    if wrk:
        tools.append(wrk[0].split(" Copyright")[0].strip())
    tools.append(_run(["redis-server", "--version"]).split(" sha=")[0])
    docker = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    if docker:
        tools.append("docker CLI " + _run([docker, "version", "--format", "{{.Client.Version}}"], env={"DOCKER_HOST": "unix:///nonexistent", "PATH": os.environ.get("PATH", "")}).splitlines()[0])
    if stack is not None:
        try:
            client = stack.docker(timeout=10)
            tools.append(f"dockerd {client.version().get('Version')} (vfs)")
            client.close()
        except Exception:  # noqa: BLE001 - description only
            pass
    registry = _run(["docker-registry", "--version"])
    if registry:
        tools.append(registry.replace("github.com/docker/distribution ", ""))
    spy = Path(sys.executable).parent / "py-spy"
    if spy.exists():
        tools.append(_run([str(spy), "--version"]))
    info["tools"] = ", ".join(t for t in tools if t)
    info["load average at start"] = load_average()
    return info
