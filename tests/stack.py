"""Test stack: the real components imagepub talks to, started per test session.

Everything runs on loopback, on ports chosen at start, inside a fresh temporary
folder, and is torn down at the end (see /work/shared/TESTBED.md for the recipe):

* Redis (AOF on, so a restart loses nothing),
* a private Docker daemon (vfs, no bridge, no iptables) started in a private
  mount namespace where a private /etc/hosts maps the emulated ECR host name to
  a loopback address and a private /etc/docker holds certs.d/<ecr host>/ca.crt,
* a plain distribution registry, a basic-auth registry, and an emulated ECR
  registry (basic auth AWS/<moto's token>, plain HTTP on 127.0.0.1:<port>) behind
  ``stack.ecr_registry``, a TLS reverse proxy on <random 127.X.Y.Z>:443 running in
  this process (tests/registry_proxy.py) that logs every request and can answer
  with ECR's own errors (immutable tag, expired token, ...) instead of forwarding,
* moto_server for the ECR API.

Usage::

    with start_stack() as stack:
        client = stack.docker()
        image_id = stack.build_image("demo:1")
        ...

Requires root (mount namespaces, port 443).  Nothing on the machine is changed
persistently, except that an empty /etc/docker directory is created if it does
not exist (it is the mount point for the daemon's private /etc/docker).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

from registry_proxy import RegistryProxy

__all__ = ["Stack", "StackError", "start_stack", "free_port"]

ECR_ACCOUNT = "123456789012"
ECR_REGION = "us-east-1"
ECR_HOST = f"{ECR_ACCOUNT}.dkr.ecr.{ECR_REGION}.amazonaws.com"
# What moto's GetAuthorizationToken returns, base64-decoded: "AWS:<password>".
ECR_USER = "AWS"
ECR_PASSWORD = f"{ECR_ACCOUNT}-auth-token"

START_TIMEOUT = 30.0

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)

# First characters of the line written to a log before each (re)start of its process.
_LOG_HEADER = "=== stack: start "

_PROXY_VARS = (
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
)


class StackError(RuntimeError):
    """A component of the test stack failed to start or misbehaved."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on *host* right now (chosen by the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _which(name: str) -> str:
    # Prefer the interpreter's own bin dir (a venv's moto_server, say).
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"required program {name!r} not found on PATH (run scripts/bootstrap)")
    return found


def _clean_infra_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for infrastructure processes: no proxies, no DOCKER_*/REGISTRY_*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _PROXY_VARS and not k.startswith(("DOCKER_", "REGISTRY_"))
    }
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for d in ("/usr/sbin", "/sbin"):
        if d not in env["PATH"].split(":"):
            env["PATH"] += ":" + d
    if extra:
        env.update(extra)
    return env


# A tiny watchdog process: if the test process dies without tearing down (SIGKILL,
# a CI timeout), it kills every process group recorded in PGIDS and removes TMP.
_WATCHDOG = textwrap.dedent(
    r"""
    import os, signal, sys, time, shutil, subprocess
    parent, tmp = int(sys.argv[1]), sys.argv[2]
    pgids = os.path.join(tmp, ".pgids")
    def stat(pid):  # (state, start time) or None once the process is gone
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return fields[0], fields[19]
        except (OSError, IndexError):
            return None
    born = stat(parent)
    while True:
        time.sleep(1)
        if not os.path.isdir(tmp):
            sys.exit(0)
        now = stat(parent)
        if now is None or now[0] in "ZX" or now[1] != born[1]:
            break
    def groups():
        try:
            with open(pgids) as f:
                return [int(x) for x in f.read().split() if x.strip()]
        except OSError:
            return []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups():
            try:
                os.killpg(g, sig)
            except OSError:
                pass
        time.sleep(3)
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if tmp.encode() in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    time.sleep(0.5)
    subprocess.run(["rm", "-rf", "--one-file-system", tmp])
    """
)


class Stack:
    """The running test stack. Build with :func:`start_stack` or ``Stack().start()``."""

    ecr_host = ECR_HOST
    ecr_region = ECR_REGION
    ecr_account = ECR_ACCOUNT
    ecr_user = ECR_USER
    ecr_password = ECR_PASSWORD

    def __init__(self, base_dir: str | os.PathLike | None = None):
        self._base_dir = base_dir
        self.tmp: Path | None = None
        self.redis_port = 0
        self.redis_url = ""
        self.docker_host = ""
        self.registry = ""
        self.auth_registry = ""
        self.auth_user = "imagepub"
        self.auth_password = ""
        self.ecr_ip = ""
        self.ecr_ca: Path | None = None
        # The TLS proxy on ecr_ip:443 in front of the ECR registry (fault-injection seam),
        # and the registry's own plain-HTTP address behind it.
        self.ecr_registry: RegistryProxy | None = None
        self.ecr_upstream = ""
        self.moto_url = ""
        self._procs: dict[str, subprocess.Popen] = {}
        self._infra: dict[str, subprocess.Popen] = {}
        self._watchdog: subprocess.Popen | None = None
        self._docker_client = None
        self._lock = threading.RLock()
        self._closed = False
        self._started = False
        self._ports: set[int] = set()

    def _port(self) -> int:
        """A free port not yet handed out by this stack."""
        while True:
            port = free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port

    # ------------------------------------------------------------------ start

    def start(self) -> "Stack":
        if self._started:
            return self
        self._started = True
        if os.geteuid() != 0:
            raise StackError(
                "the test stack needs root (mount namespace for dockerd, port 443 for the "
                "emulated ECR registry); run the tests as root"
            )
        for prog in ("dockerd", "docker-registry", "redis-server", "htpasswd", "openssl",
                     "unshare", "mount"):
            _which(prog)
        self.tmp = Path(tempfile.mkdtemp(prefix="imagepub-stack-", dir=self._base_dir))
        (self.tmp / "logs").mkdir()
        try:
            self._start_watchdog()
            self._start_all()
        except BaseException:
            self.close()
            raise
        return self

    def _start_all(self) -> None:
        t0 = time.monotonic()
        pending: list[tuple[str, float, Callable[[], bool]]] = []

        # Redis
        self.redis_port = self._port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        (self.tmp / "redis").mkdir()
        self._spawn_redis()
        pending.append(("redis", time.monotonic(), self._redis_ready))

        # moto (slowest Python import: start early)
        moto_port = self._port()
        self.moto_url = f"http://127.0.0.1:{moto_port}"
        self._spawn_infra("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(moto_port)])
        pending.append(("moto", time.monotonic(), lambda: self._http_ready(self.moto_url + "/moto-api/")))

        # Plain and basic-auth registries
        port = self._port()
        self.registry = f"127.0.0.1:{port}"
        self._spawn_registry("registry", self.registry)
        pending.append(("registry", time.monotonic(), lambda: self._http_ready(f"http://{self.registry}/v2/")))

        self.auth_password = secrets.token_urlsafe(16)
        htpasswd = self._htpasswd("auth-registry", self.auth_user, self.auth_password)
        port = self._port()
        self.auth_registry = f"127.0.0.1:{port}"
        self._spawn_registry("auth-registry", self.auth_registry, htpasswd=htpasswd)
        pending.append(("auth-registry", time.monotonic(),
                        lambda: self._http_ready(f"http://{self.auth_registry}/v2/")))

        # Emulated ECR registry: plain HTTP on 127.0.0.1, behind the TLS proxy on
        # <random loopback>:443. The proxy binds first, since the daemon's /etc/hosts
        # needs the address it really got.
        self._start_ecr_registry()
        pending.append(("ecr", time.monotonic(), self._ecr_ready))

        # Private dockerd in its own mount namespace.
        self._spawn_dockerd()
        pending.append(("dockerd", time.monotonic(), self._dockerd_ready))

        for name, started, ready in pending:
            self._wait(name, ready, started)
        self._startup_seconds = time.monotonic() - t0

    def _start_watchdog(self) -> None:
        (self.tmp / ".pgids").touch()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.tmp)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )

    def _record_pgid(self, pgid: int) -> None:
        with open(self.tmp / ".pgids", "a") as f:
            f.write(f"{pgid}\n")

    def _popen(self, name: str, argv: list[str], env: dict[str, str], cwd=None) -> subprocess.Popen:
        log_path = self.tmp / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"{_LOG_HEADER}{time.strftime('%H:%M:%S')}: {shlex.join(argv)}\n"
                      .encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=cwd, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                raise StackError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        proc.log_path = log_path  # type: ignore[attr-defined]
        proc.stack_name = name  # type: ignore[attr-defined]
        self._record_pgid(proc.pid)
        return proc

    def _spawn_infra(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = self._popen(name, argv, env or _clean_infra_env())
        self._infra[name] = proc
        return proc

    def _wait(self, name: str, ready, started: float, timeout: float = START_TIMEOUT) -> None:
        proc = self._infra.get(name)
        deadline = started + timeout
        last_exc = None
        while True:
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{name} exited with code {proc.returncode} during start-up; "
                    f"tail of {proc.log_path}:\n{_tail(proc.log_path)}"
                )
            try:
                if ready():
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling
                last_exc = exc
            if time.monotonic() > deadline:
                log = self.tmp / "logs" / f"{name}.log"
                raise StackError(
                    f"{name} not ready after {timeout:.0f}s"
                    + (f" (last error: {last_exc!r})" if last_exc else "")
                    + f"; tail of {log}:\n{_tail(log)}"
                )
            time.sleep(0.1)

    @staticmethod
    def _http_ready(url: str, **kw) -> bool:
        import urllib3

        http = urllib3.PoolManager(retries=False, timeout=2.0, **kw)
        http.request("GET", url)  # any HTTP answer (200, 401, 404) means it is serving
        return True

    # ----------------------------------------------------------------- redis

    def _spawn_redis(self) -> None:
        self._spawn_infra("redis", [
            _which("redis-server"),
            "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "yes", "--dir", str(self.tmp / "redis"),
            "--daemonize", "no", "--protected-mode", "no", "--loglevel", "notice",
        ])

    def _redis_ready(self) -> bool:
        import redis

        r = redis.Redis.from_url(self.redis_url, socket_timeout=1, socket_connect_timeout=1)
        try:
            # LOADING replies (AOF replay after a restart) raise BusyLoadingError.
            return bool(r.ping())
        finally:
            r.close()

    def stop_redis(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop Redis. SIGTERM (default) fsyncs the AOF, so nothing is lost."""
        with self._lock:
            proc = self._infra.get("redis")
            if proc is None or proc.poll() is not None:
                return
            self._stop_proc(proc, sig, timeout)

    def start_redis(self) -> None:
        """Start Redis again on the same port and data dir; wait until it answers PING."""
        with self._lock:
            proc = self._infra.get("redis")
            if proc is not None and proc.poll() is None:
                return
            started = time.monotonic()
            self._spawn_redis()
            self._wait("redis", self._redis_ready, started)

    def restart_redis(self, sig: int = signal.SIGTERM) -> None:
        self.stop_redis(sig)
        self.start_redis()

    # ------------------------------------------------------------- registries

    def _htpasswd(self, name: str, user: str, password: str) -> Path:
        out = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True)
        if out.returncode != 0:
            raise StackError(f"htpasswd failed: {out.stderr.strip()}")
        path = self.tmp / name / "htpasswd"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out.stdout.strip() + "\n")
        return path

    def _spawn_registry(self, name: str, addr: str, *, htpasswd: Path | None = None,
                        tls: tuple[Path, Path] | None = None, host_url: str | None = None) -> None:
        root = self.tmp / name
        (root / "data").mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(root / 'data'))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {json.dumps(addr)}",
            f"  secret: {json.dumps(secrets.token_hex(16))}",
            *([f"  host: {json.dumps(host_url)}"] if host_url else []),
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if tls:
            lines += ["  tls:", f"    certificate: {json.dumps(str(tls[0]))}",
                      f"    key: {json.dumps(str(tls[1]))}"]
        if htpasswd:
            lines += ["auth:", "  htpasswd:", f"    realm: {json.dumps(name)}",
                      f"    path: {json.dumps(str(htpasswd))}"]
        config = root / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        self._spawn_infra(name, [_which("docker-registry"), "serve", str(config)])

    def _make_ecr_cert(self) -> None:
        d = self.tmp / "ecr"
        d.mkdir(exist_ok=True)
        crt, key = d / "ecr.crt", d / "ecr.key"
        out = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
             "-days", "7", "-keyout", str(key), "-out", str(crt),
             "-subj", f"/CN={self.ecr_host}",
             "-addext", f"subjectAltName=DNS:{self.ecr_host},IP:{self.ecr_ip}"],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise StackError(f"openssl req failed: {out.stderr.strip()}")
        self.ecr_ca = crt

    def _pick_ecr_ip(self) -> str:
        rng = random.SystemRandom()
        for _ in range(50):
            ip = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
            if _port_free(ip, 443):
                return ip
        raise StackError("no free 127.X.Y.Z:443 found (is something listening on 0.0.0.0:443?)")

    def _start_ecr_registry(self) -> None:
        """The ECR registry on 127.0.0.1:<port> (plain HTTP), and the TLS proxy on
        ``ecr_ip:443`` in front of it. ``http.host`` makes the registry's Location
        headers (blob uploads) absolute URLs on https://<ecr host>, so the daemon
        follows them back through the proxy."""
        htpasswd = self._htpasswd("ecr", self.ecr_user, self.ecr_password)
        port = self._port()
        self.ecr_upstream = f"127.0.0.1:{port}"
        self._spawn_registry("ecr", self.ecr_upstream, htpasswd=htpasswd,
                             host_url=f"https://{self.ecr_host}")
        last: Exception | None = None
        for _attempt in range(5):
            self.ecr_ip = self._pick_ecr_ip()
            self._make_ecr_cert()
            try:
                proxy = RegistryProxy((self.ecr_ip, 443), ("127.0.0.1", port), self.ecr_ca,
                                      self.tmp / "ecr" / "ecr.key", registry_host=self.ecr_host,
                                      log_path=self.tmp / "logs" / "ecr-proxy.log")
            except OSError as exc:  # lost a race for the address? try another one
                last = exc
                continue
            self.ecr_registry = proxy.start()
            return
        raise StackError(f"cannot listen on a 127.X.Y.Z:443 for the ECR proxy: {last}")

    def _ecr_ready(self) -> bool:
        # Through the proxy (TLS, ECR host name) to the registry: 401 = it answers.
        r = self._registry_request("GET", self.ecr_host, "/v2/", tls=True, ip=self.ecr_ip,
                                   auth=None)
        return r.status in (200, 401)

    # ---------------------------------------------------------------- dockerd

    def _spawn_dockerd(self) -> None:
        ns = self.tmp / "ns"
        etc_docker = ns / "etc-docker"
        certs = etc_docker / "certs.d" / self.ecr_host
        certs.mkdir(parents=True)
        shutil.copyfile(self.ecr_ca, certs / "ca.crt")
        hosts = ns / "hosts"
        try:
            base_hosts = Path("/etc/hosts").read_text()
        except OSError:
            base_hosts = "127.0.0.1 localhost\n"
        hosts.write_text(base_hosts.rstrip("\n") + f"\n{self.ecr_ip} {self.ecr_host}\n")
        daemon_json = self.tmp / "daemon.json"
        daemon_json.write_text("{}\n")
        # The mount point for the private /etc/docker (holds certs.d and the daemon's
        # key.json, so the machine's own /etc/docker is neither read nor written).
        os.makedirs("/etc/docker", exist_ok=True)

        probe = subprocess.run(
            [_which("unshare"), "--mount", "--propagation", "private", "sh", "-c",
             f"mount --bind {shlex.quote(str(hosts))} /etc/hosts"],
            capture_output=True, text=True, env=_clean_infra_env(),
        )
        if probe.returncode != 0:
            raise StackError(
                "cannot give dockerd a private mount namespace: `unshare --mount --propagation "
                f"private` + `mount --bind` failed (exit {probe.returncode}): "
                f"{(probe.stderr or probe.stdout).strip()}\n(the test stack needs root with "
                "CAP_SYS_ADMIN, i.e. not an unprivileged container)"
            )

        self.docker_host = f"unix://{self.tmp / 'docker.sock'}"
        self._dockerd_argv = self._dockerd_command(self.tmp, self.docker_host)
        self._spawn_infra("dockerd", self._dockerd_argv)

    def _dockerd_command(self, root: Path, host: str) -> list[str]:
        """dockerd with its state under ``root``, started in a private mount namespace that sees
        the stack's hosts file and /etc/docker (the emulated ECR's name and CA)."""
        ns = self.tmp / "ns"
        dockerd = [
            _which("dockerd"),
            "--host", host,
            "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "docker.pid"),
            "--config-file", str(self.tmp / "daemon.json"),
            "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=none", "--storage-driver=vfs",
        ]
        q = shlex.quote
        script = (
            "set -e; "
            f"mount --bind {q(str(ns / 'hosts'))} /etc/hosts; "
            f"mount --bind {q(str(ns / 'etc-docker'))} /etc/docker; "
            f"exec {shlex.join(dockerd)}"
        )
        return [_which("unshare"), "--mount", "--propagation", "private", "sh", "-c", script]

    def add_dockerd(self, name: str) -> str:
        """Another private daemon beside the first (its own socket, data root, exec root and
        pidfile: images built in one are invisible to the other), as a second host of a fleet
        would have. Returns its DOCKER_HOST; stopped at teardown like the rest."""
        root = self.tmp / f"dockerd-{name}"
        root.mkdir()
        host = f"unix://{root / 'docker.sock'}"
        component = f"dockerd-{name}"
        started = time.monotonic()
        self._spawn_infra(component, self._dockerd_command(root, host))

        def ready() -> bool:
            if not (root / "docker.sock").exists():
                return False
            import docker

            client = docker.DockerClient(base_url=host, version="auto", timeout=5)
            try:
                return bool(client.ping())
            finally:
                client.close()

        self._wait(component, ready, started, timeout=60)
        return host

    def in_ecr_hosts_namespace(self, argv: list[str]) -> list[str]:
        """*argv* run in a private mount namespace with the daemon's /etc/hosts bind-mounted."""
        hosts = shlex.quote(str(self.tmp / "ns" / "hosts"))
        return [_which("unshare"), "--mount", "--propagation", "private", "sh", "-c",
                f'set -e; mount --bind {hosts} /etc/hosts; exec "$@"', "sh", *argv]

    def stop_dockerd(self, timeout: float = 20.0) -> None:
        """Stop the daemon (SIGTERM: it stops its containerd and cancels pushes and pulls)."""
        with self._lock:
            proc = self._infra.get("dockerd")
            if proc is not None and proc.poll() is None:
                self._stop_proc(proc, signal.SIGTERM, timeout)

    def start_dockerd(self) -> None:
        """Start the daemon again with the same data root, namespace and socket; wait for it."""
        with self._lock:
            proc = self._infra.get("dockerd")
            if proc is not None and proc.poll() is None:
                return
            (self.tmp / "docker.sock").unlink(missing_ok=True)
            started = time.monotonic()
            self._spawn_infra("dockerd", self._dockerd_argv)
            self._wait("dockerd", self._dockerd_ready, started, timeout=60)
            self._docker_client = None

    def _dockerd_ready(self) -> bool:
        if not (self.tmp / "docker.sock").exists():
            return False
        import docker

        client = docker.DockerClient(base_url=self.docker_host, version="auto", timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    @property
    def dockerd_pid(self) -> int:
        """PID of the private dockerd (unshare and sh exec into it)."""
        return self._infra["dockerd"].pid

    def docker(self, timeout: int = 300, base_url: str | None = None):
        """A docker.DockerClient for the private daemon, or another at *base_url* (caller may close it)."""
        import docker

        return docker.DockerClient(base_url=base_url or self.docker_host, version="auto", timeout=timeout)

    def _client(self):
        if self._docker_client is None:
            self._docker_client = self.docker()
        return self._docker_client

    def build_image(self, tag: str, layers: int = 3, layer_bytes: int = 64 * 1024,
                    labels: Mapping[str, str] | None = None, docker_host: str | None = None) -> str:
        """Build ``FROM scratch`` + *layers* COPY steps of random bytes; return the image id.

        Uses the legacy builder, in the stack's daemon or the one at *docker_host*. Every call
        gives new content (so new digests).
        """
        ctx = Path(tempfile.mkdtemp(prefix="build-", dir=self.tmp))
        try:
            lines = ["FROM scratch"]
            for i in range(layers):
                (ctx / f"layer{i}.bin").write_bytes(os.urandom(layer_bytes))
                lines.append(f"COPY layer{i}.bin /layer{i}.bin")
            for k, v in (labels or {}).items():
                lines.append(f"LABEL {json.dumps(k)}={json.dumps(v)}")
            (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
            api = self._client().api if docker_host is None else self.docker(base_url=docker_host).api
            image_id = None
            errors = []
            for chunk in api.build(path=str(ctx), tag=tag, rm=True, forcerm=True, decode=True):
                if "error" in chunk or "errorDetail" in chunk:
                    errors.append(chunk.get("error") or json.dumps(chunk["errorDetail"]))
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    image_id = aux["ID"]
            if errors:
                raise StackError(f"docker build {tag} failed: {'; '.join(errors)}")
            if image_id is None:
                image_id = api.inspect_image(tag)["Id"]
            return image_id
        finally:
            shutil.rmtree(ctx, ignore_errors=True)

    # --------------------------------------------------------------- registry checks

    def _registry_defaults(self, host, auth, tls, ip):
        if host == self.ecr_host:
            tls = True if tls is None else tls
            ip = ip or self.ecr_ip
            auth = (self.ecr_user, self.ecr_password) if auth is None else auth
        elif host == self.auth_registry and auth is None:
            auth = (self.auth_user, self.auth_password)
        return auth, bool(tls), ip

    def _registry_request(self, method: str, host: str, path: str, *, auth=None, tls=False,
                          ip=None, headers=None, body=None):
        """One HTTP request to a registry; returns the urllib3 response.

        For TLS, connects to *ip* (or *host*) and verifies the certificate against
        ``ecr_ca`` with SNI and hostname check = *host* (the port-less host name).
        """
        import urllib3

        hostname, _, port = host.partition(":")
        hdrs = {"Host": host}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            hdrs["Authorization"] = f"Basic {token}"
        hdrs.update(headers or {})
        if tls:
            pool = urllib3.HTTPSConnectionPool(
                ip or hostname, int(port or 443), cert_reqs="CERT_REQUIRED",
                ca_certs=str(self.ecr_ca), server_hostname=hostname, assert_hostname=hostname,
                retries=False, timeout=10.0,
            )
        else:
            pool = urllib3.HTTPConnectionPool(ip or hostname, int(port or 80), retries=False,
                                              timeout=10.0)
        try:
            return pool.request(method, path, headers=hdrs, body=body, redirect=False)
        finally:
            pool.close()

    def registry_request(self, method: str, host: str, path: str, *, auth=None, tls=None,
                         ip=None, headers=None, body=None):
        """HTTP request to one of the stack's registries (defaults as in registry_digest)."""
        auth, tls, ip = self._registry_defaults(host, auth, tls, ip)
        return self._registry_request(method, host, path, auth=auth, tls=tls, ip=ip,
                                      headers=headers, body=body)

    def registry_digest(self, host: str, repository: str, tag: str, *, auth=None, tls=None,
                        ip=None) -> str | None:
        """The manifest digest the registry reports for repository:tag (None if 404).

        Defaults: for ``ecr_host`` -> TLS to ``ecr_ip:443`` verified against ``ecr_ca``
        with AWS credentials; for ``auth_registry`` -> the stack's credentials.
        """
        for attempt in range(4):
            r = self.registry_request("HEAD", host, f"/v2/{repository}/manifests/{tag}", auth=auth,
                                      tls=tls, ip=ip, headers={"Accept": MANIFEST_ACCEPT})
            # the registry (distribution 2.8, filesystem storage) has answered a 500 now and then
            # while other pushes of the same image to the same repository were writing (seen in
            # tests/e2e/test_fleet.py's 20 at once); asked again, it answers
            if r.status < 500 or attempt == 3:
                break
            time.sleep(0.2)
        if r.status == 404:
            return None
        if r.status != 200:
            raise StackError(f"HEAD {host}/v2/{repository}/manifests/{tag}: HTTP {r.status}")
        digest = r.headers.get("Docker-Content-Digest")
        if not digest:
            raise StackError(f"{host} sent no Docker-Content-Digest for {repository}:{tag}")
        return digest

    def registry_tags(self, host: str, repository: str, **kw) -> list[str]:
        """Tags the registry lists for *repository* ([] if the repository is unknown)."""
        r = self.registry_request("GET", host, f"/v2/{repository}/tags/list", **kw)
        if r.status == 404:
            return []
        if r.status != 200:
            raise StackError(f"GET {host}/v2/{repository}/tags/list: HTTP {r.status}")
        return sorted(json.loads(r.data).get("tags") or [])

    def skopeo_digest(self, ref: str, creds: str | tuple[str, str] | None = None,
                      tls_verify: bool | None = None) -> str:
        """Digest as reported by ``skopeo inspect docker://REF`` (independent of our code).

        For refs on ``ecr_host``, skopeo runs inside the private dockerd's mount
        namespace (same /etc/hosts and certs.d), TLS verified, AWS credentials by default.
        For ``auth_registry`` the stack's credentials are the default.
        """
        ref = ref.removeprefix("docker://")
        host = ref.split("/", 1)[0]
        prefix: list[str] = []
        if host == self.ecr_host:
            prefix = [_which("nsenter"), "--target", str(self.dockerd_pid), "--mount"]
            tls_verify = True if tls_verify is None else tls_verify
            creds = (self.ecr_user, self.ecr_password) if creds is None else creds
        elif host == self.auth_registry and creds is None:
            creds = (self.auth_user, self.auth_password)
        if isinstance(creds, tuple):
            creds = f"{creds[0]}:{creds[1]}"
        argv = prefix + [_which("skopeo"), "inspect",
                         f"--tls-verify={'true' if tls_verify else 'false'}"]
        argv += [f"--creds={creds}"] if creds else ["--no-creds"]
        argv.append(f"docker://{ref}")
        auth_file = self.tmp / "skopeo-auth.json"
        if not auth_file.exists():
            auth_file.write_text("{}\n")
        env = _clean_infra_env({"REGISTRY_AUTH_FILE": str(auth_file)})
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        if out.returncode != 0:
            raise StackError(f"skopeo inspect {ref} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)["Digest"]

    # ----------------------------------------------------------- imagepub processes

    def env(self, **overrides: str | None) -> dict[str, str]:
        """Environment for imagepub processes (inherits PATH etc.)."""
        env = dict(os.environ)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "DOCKER_TLS_VERIFY",
                  "DOCKER_CERT_PATH", "DOCKER_CONTEXT"):
            env.pop(k, None)
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"),
                                          "127.0.0.1", "localhost", self.ecr_host]))
        (self.tmp / "docker-config").mkdir(exist_ok=True)
        env.update({
            "IMAGEPUB_REDIS_URL": self.redis_url,
            "DOCKER_HOST": self.docker_host,
            "DOCKER_CONFIG": str(self.tmp / "docker-config"),
            "AWS_ENDPOINT_URL_ECR": self.moto_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": self.ecr_region,
            "AWS_DEFAULT_REGION": self.ecr_region,
            "AWS_CONFIG_FILE": str(self.tmp / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.tmp / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            "PYTHONUNBUFFERED": "1",
            # what the processes leave behind when a test kills them (billiard's pymp-* folders,
            # the worker's alive file) goes with the stack's folder
            "TMPDIR": str(self.tmp / "proc-tmp"),
            "IMAGEPUB_WORKER_ALIVE_FILE": str(self.tmp / "proc-tmp" / "imagepub-worker.alive"),
        })
        (self.tmp / "proc-tmp").mkdir(exist_ok=True)
        for k, v in overrides.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str | None] | None = None,
              cwd: str | os.PathLike | None = None, ecr_hosts: bool = False) -> subprocess.Popen:
        """Start a managed process (own process group, output to ``tmp/logs/<name>.log``).

        The environment is ``self.env()`` updated with *env* (a value of None removes
        a variable). The process is killed at teardown. A name may be reused once its
        previous process has exited (the log is appended to).

        With *ecr_hosts*, the process runs in a private mount namespace whose /etc/hosts is
        the daemon's (the ECR host name resolves to the emulated registry), as a daemonless
        client in a worker must reach it; unlike the daemon's, its /etc/docker is the
        machine's: it trusts the test CA only when told to (a registry's ``ca_file``).
        """
        with self._lock:
            old = self._procs.get(name)
            if old is not None and old.poll() is None:
                raise StackError(f"a process named {name!r} is still running (pid {old.pid})")
            full_env = self.env(**dict(env or {}))
            argv = [str(a) for a in argv]
            if ecr_hosts:
                argv = self.in_ecr_hosts_namespace(argv)
            proc = self._popen(name, argv, full_env, cwd=cwd)
            self._procs[name] = proc
            return proc

    def proc(self, name: str) -> subprocess.Popen:
        return self._procs.get(name) or self._infra[name]

    def log_path(self, name: str) -> Path:
        return self.tmp / "logs" / f"{name}.log"

    def log(self, name: str, current: bool = False) -> str:
        """Log text of a spawned process or a component (redis, dockerd, registry, ecr,
        auth-registry, moto; ecr-proxy: one line per request through the ECR proxy).
        Each (re)start begins with a ``=== stack: start`` line;
        with ``current=True`` only the output of the latest start is returned."""
        try:
            text = self.log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if current:
            at = text.rfind(_LOG_HEADER)
            if at >= 0:
                nl = text.find("\n", at)
                text = "" if nl < 0 else text[nl + 1:]
        return text

    def wait_for_log(self, name: str, text: str, timeout: float = 30.0) -> str:
        """Wait until *text* appears in the output of the latest start of *name*
        (the start line itself and earlier runs are not searched); returns that output."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log(name, current=True)
            if text in log:
                return log
            proc = self._procs.get(name) or self._infra.get(name)
            if proc is not None and proc.poll() is not None:
                raise StackError(f"{name} exited ({proc.returncode}) before logging {text!r}; "
                                 f"tail:\n{_tail(self.log_path(name))}")
            if time.monotonic() > deadline:
                raise StackError(f"{text!r} not in log of {name} after {timeout}s; "
                                 f"tail:\n{_tail(self.log_path(name))}")
            time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send *sig* to the process group of a spawned process (or component)."""
        proc = self.proc(name)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL after *timeout*; returns the exit code."""
        proc = self.proc(name)
        self._stop_proc(proc, signal.SIGTERM, timeout)
        return proc.returncode

    @staticmethod
    def _stop_proc(proc: subprocess.Popen, sig: int, timeout: float) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Kill whatever is left of the group (children that outlived the leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        """Stop everything, unmount what is left, remove the temporary folder. Idempotent."""
        with self._lock:
            if self._closed or self.tmp is None:
                self._closed = True
                return
            self._closed = True
        errors: list[str] = []

        # 1. imagepub processes first (they talk to everything else).
        procs = [p for p in self._procs.values() if p.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            self._stop_proc(p, signal.SIGTERM, 5)

        # 2. dockerd: kill containers quickly, then a graceful stop (it stops containerd).
        dockerd = self._infra.pop("dockerd", None)
        if dockerd is not None and dockerd.poll() is None:
            with contextlib.suppress(Exception):
                client = self.docker(timeout=10)
                for c in client.containers.list():
                    with contextlib.suppress(Exception):
                        c.kill()
                client.close()
            self._stop_proc(dockerd, signal.SIGTERM, 20)
        if self._docker_client is not None:
            with contextlib.suppress(Exception):
                self._docker_client.close()

        # 3. the other components (the ECR proxy first: it talks to the ECR registry).
        if self.ecr_registry is not None:
            try:
                self.ecr_registry.close()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(f"ECR proxy: {exc!r}")
        for name, p in list(self._infra.items()):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for name, p in list(self._infra.items()):
            self._stop_proc(p, signal.SIGTERM, 10)

        # 4. strays (containerd-shims, ...) that name our folder on their command line.
        self._kill_strays()

        # 5. unmount anything left under the folder (in our namespace), then remove it.
        self._unmount_all(errors)
        if self._watchdog is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._watchdog.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self._watchdog.wait(5)
        if os.environ.get("IMAGEPUB_KEEP_STACK"):
            sys.stderr.write(f"IMAGEPUB_KEEP_STACK set: leaving {self.tmp}\n")
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.tmp.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.tmp)], check=False)
        if self.tmp.exists():
            errors.append(f"could not remove {self.tmp}")
        if errors:
            sys.stderr.write("stack teardown: " + "; ".join(errors) + "\n")

    def _kill_strays(self) -> None:
        needle = str(self.tmp).encode()
        me = os.getpid()
        for _ in range(2):
            found = False
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) in (me, getattr(self._watchdog, "pid", -1)):
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if needle in cmdline:
                    found = True
                    with contextlib.suppress(OSError):
                        os.kill(int(entry), signal.SIGKILL)
            if not found:
                return
            time.sleep(0.3)

    def _unmount_all(self, errors: list[str]) -> None:
        prefix = str(self.tmp)
        try:
            with open("/proc/self/mountinfo") as f:
                points = [line.split()[4] for line in f]
        except OSError:
            return
        points = [p for p in points if p == prefix or p.startswith(prefix + "/")]
        for p in sorted(points, key=len, reverse=True):
            r = subprocess.run(["umount", "-l", p], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"umount {p}: {r.stderr.strip()}")

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Stack(tmp={self.tmp}, redis={self.redis_url}, docker={self.docker_host}, "
                f"registry={self.registry}, auth_registry={self.auth_registry}, "
                f"ecr={self.ecr_host}@{self.ecr_ip} -> {self.ecr_upstream}, moto={self.moto_url})")


@contextlib.contextmanager
def start_stack(base_dir: str | os.PathLike | None = None) -> Iterator[Stack]:
    """Start a Stack, yield it, and tear it down (also on error or Ctrl-C).

    While the stack runs, SIGTERM is turned into KeyboardInterrupt (if it had its
    default action), so that a terminated test run still tears down.
    """
    stack = Stack(base_dir)
    previous = None
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            def _on_term(signum, frame):
                raise KeyboardInterrupt(f"signal {signum}")

            previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        stack.start()
        yield stack
    finally:
        try:
            stack.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # manual use: python tests/stack.py  (Ctrl-C to stop)
    with start_stack() as s:
        print(repr(s), f"\nstarted in {s._startup_seconds:.1f}s", flush=True)
        for k, v in s.env().items():
            if k.startswith(("IMAGEPUB_", "DOCKER_", "AWS_")):
                print(f"export {k}={shlex.quote(v)}")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
