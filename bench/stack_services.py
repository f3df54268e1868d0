"""The processes a benchmark runs on the test stack (tests/stack.py): ``imagepub serve`` with its
defaults, ``imagepub worker``, the hello-world baseline under gunicorn, and a bulk loader that
writes finished jobs through service.jobstore.JobStore."""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import redis
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from service_process import imagepub_command  # noqa: E402  (tests/)
from stack import free_port  # noqa: E402  (tests/)

TOKEN = "imp_bench-" + secrets.token_urlsafe(16)
CLIENT = "bench"
TERMINAL = {"succeeded", "failed", "cancelled"}


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def bench_config(stack) -> dict[str, Any]:
    """A production-like configuration: a real API client (token, scopes), no anonymous access,
    and a queue cap high enough that submissions under load are never refused as queue_full."""
    return {
        "registries": {
            "local": {"type": "registry", "host": stack.registry},
            "secure": {"type": "registry", "host": stack.auth_registry, "username": stack.auth_user, "password_env": "BENCH_SECURE_PASSWORD"},
            "ecr": {"type": "ecr", "region": stack.ecr_region, "create_repositories": True},
        },
        "clients": [{"name": CLIENT, "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                     "scopes": ["publish", "pull", "read"]}],
        "limits": {"max_queued_jobs": 100_000_000},
    }


def gunicorn_defaults() -> dict[str, Any]:
    """What ``imagepub serve`` runs with when given no flags (service/gunicorn_conf.py)."""
    from service import gunicorn_conf

    return {"workers": gunicorn_conf.workers, "worker_class": gunicorn_conf.worker_class,
            "worker_connections": gunicorn_conf.worker_connections}


def _wait_http(url: str, what: str, stack, log_name: str, timeout: float = 60, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == status:
                return
        except requests.RequestException:
            pass
        proc = stack.proc(log_name)
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n" + stack.log(log_name)[-3000:])
        time.sleep(0.2)


class KeptAlive:
    """A kept-alive connection to a server on ``self.port`` with http.client, what the job phases
    follow their jobs on (bench/suite.py:follow)."""

    port: int
    _connection: http.client.HTTPConnection | None = None
    rested_since = 0.0  # when the connection's last exchange ended (follow sets it)

    def connection(self) -> http.client.HTTPConnection:
        """Connected before it is used, so that no measured request pays for it, and made anew
        once it has rested a second: gunicorn closes a connection idle for its keepalive
        (service/gunicorn_conf.py), and a request sent into that would fail."""
        if self._connection is None or time.monotonic() - self.rested_since > 1.0:
            if self._connection is not None:
                self._connection.close()
            self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            self._connection.connect()
        return self._connection


class Imagepub(KeptAlive):
    """``imagepub serve`` (defaults: no --workers) on a Redis database of its own, and on demand
    ``imagepub worker`` (defaults: no --concurrency)."""

    def __init__(self, stack, name: str, redis_db: int, env: dict[str, str] | None = None, marks: bool = False):
        self.stack, self.name = stack, name
        # bench/marks/sitecustomize.py in the worker: the moments of each job's hand-off
        self.marks = stack.tmp / f"{name}-marks" if marks else None
        self.redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"
        config_path = stack.tmp / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(bench_config(stack)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "IMAGEPUB_CONFIG": str(config_path),
            "IMAGEPUB_REDIS_URL": self.redis_url,
            # Keep this run's gunicorn control socket and worker liveness file to itself (the
            # defaults are machine-wide paths another test run may be using).
            "GUNICORN_CMD_ARGS": f"--control-socket {stack.tmp}/{name}-gunicorn.ctl",
            "IMAGEPUB_WORKER_ALIVE_FILE": str(stack.tmp / f"{name}-worker.alive"),
            "BENCH_SECURE_PASSWORD": stack.auth_password,  # the copy phase's destination
            **(env or {}),
        }
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.http = requests.Session()
        self.http.headers.update(auth_headers())

    def start_api(self) -> "Imagepub":
        self.stack.spawn(f"{self.name}-api", [imagepub_command(), "serve", "--bind", f"127.0.0.1:{self.port}"], env=self.env)
        _wait_http(self.url + "/healthz", f"imagepub serve ({self.name})", self.stack, f"{self.name}-api")
        return self

    @property
    def api_pid(self) -> int:
        return self.stack.proc(f"{self.name}-api").pid  # imagepub serve execs gunicorn: the arbiter

    def start_worker(self) -> None:
        name = f"{self.name}-worker"
        env = self.env
        if self.marks:
            self.marks.mkdir(exist_ok=True)
            env = {**env, "PYTHONPATH": str(REPO / "bench" / "marks"), "IMAGEPUB_BENCH_MARKS": str(self.marks)}
        self.stack.spawn(name, [imagepub_command(), "worker"], env=env)
        self.stack.wait_for_log(name, "ready", timeout=90)

    def stop(self) -> None:
        for suffix in ("worker", "api"):
            try:
                self.stack.stop(f"{self.name}-{suffix}")
            except KeyError:
                pass

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post(self.url + "/v1/publish", json=body, timeout=30)
        if resp.status_code != 202:
            raise RuntimeError(f"POST /v1/publish answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def get(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"{self.url}/v1/jobs/{job_id}", timeout=30)
        resp.raise_for_status()
        return resp.json()


class Hello:
    """The baseline: bench/hello.py under gunicorn with as many workers as ``imagepub serve``;
    by default with its worker class and connections, or with another class (``gthread``, its
    threads) so that the faster of the two is the baseline."""

    app, status = "bench.hello:app", 200

    def __init__(self, stack, worker_class: str | None = None, threads: int = 4, env: dict[str, str] | None = None):
        self.stack = stack
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = gunicorn_defaults()
        self.worker_class = worker_class or self.settings["worker_class"]
        self.threads = threads
        self.env = env
        self.name = self.app.split(".")[1].split(":")[0] + ("" if worker_class is None else f"-{worker_class}")

    @property
    def description(self) -> str:
        if self.worker_class == "gthread":
            return f"{self.settings['workers']} × gthread workers, {self.threads} threads each"
        return f"{self.settings['workers']} × {self.worker_class} workers, {self.settings['worker_connections']} connections each"

    def start(self) -> "Hello":
        s = self.settings
        shape = (["--threads", str(self.threads)] if self.worker_class == "gthread"
                 else ["--worker-connections", str(s["worker_connections"])])
        self.stack.spawn(self.name, [sys.executable, "-m", "gunicorn", "--chdir", str(REPO), "--worker-class", self.worker_class,
                                     "--workers", str(s["workers"]), *shape, "--no-control-socket",
                                     "--bind", f"127.0.0.1:{self.port}", self.app], env=self.env)
        _wait_http(self.url + "/", f"{self.app} under gunicorn ({self.worker_class})", self.stack, self.name, status=self.status)
        return self

    @property
    def pid(self) -> int:
        return self.stack.proc(self.name).pid

    def stop(self) -> None:
        self.stack.stop(self.name)


class Floor(Hello):
    """bench/floor.py (a submission's storage and nothing else) under gunicorn as the API runs,
    against the Redis database and configuration of ``svc``."""

    app, status = "bench.floor:app", 202

    def __init__(self, stack, svc: "Imagepub", body: str):
        super().__init__(stack, env={**svc.env, "GUNICORN_CMD_ARGS": None, "BENCH_TOKEN": TOKEN, "BENCH_BODY": body})

    @property
    def description(self) -> str:
        return f"bench/floor.py, {super().description}"


class Handoff(Hello, KeptAlive):
    """bench/handoff.py: its app under gunicorn as the API runs, and its worker process, on Redis
    database ``redis_db`` of the stack."""

    app, status = "bench.handoff:app", 200

    def __init__(self, stack, redis_db: int):
        super().__init__(stack, env={"GUNICORN_CMD_ARGS": None,
                                     "HANDOFF_REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"})

    def start(self) -> "Handoff":
        super().start()
        self.stack.spawn(f"{self.name}-worker", [sys.executable, "-m", "bench.handoff", "worker"], env=self.env, cwd=REPO)
        return self

    def stop(self) -> None:
        self.stack.stop(f"{self.name}-worker")
        super().stop()


# --- writing finished jobs straight into the store ------------------------------------------------


class _NoExecute:
    """What JobStore.create() gets for its MULTI pipeline: commands go to the loader's batch."""

    def __init__(self, batch):
        self._batch = batch

    def execute(self):
        return []

    def __getattr__(self, name):
        return getattr(self._batch, name)


class _Batched:
    """A Redis client for JobStore whose every command (create's pipeline, save's Lua script)
    lands in one non-transactional pipeline that the loader executes every few thousand jobs."""

    def __init__(self, batch):
        self._batch = batch

    def pipeline(self, transaction: bool = True):
        return _NoExecute(self._batch)

    def register_script(self, script):
        return self._batch.register_script(script)  # bound to the pipeline: EVALSHA is queued

    def __getattr__(self, name):
        return getattr(self._batch, name)


def load_finished_jobs(redis_url: str, count: int, request: dict[str, Any], host: str, batch_size: int = 1000) -> list[str]:
    """``count`` finished publish jobs, as a worker leaves them (three pushed layers, references,
    digest), written with JobStore.create() + JobStore.save() — the same keys, indexes, events and
    expiries as the service's own — pipelined. Returns their ids, oldest first."""
    from service.jobs import new_job
    from service.jobstore import JobStore, utcnow

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    batch = client.pipeline(transaction=False)
    store = JobStore(_Batched(batch))
    ids: list[str] = []
    for i in range(count):
        job = new_job("publish", request)
        job["client"] = CLIENT
        store.create(job)
        digest = "sha256:" + hashlib.sha256(job["id"].encode()).hexdigest()
        target = job["targets"][0]
        target.update(
            state="succeeded",
            references=[f"{host}/{target['repository']}:{tag}" for tag in target["tags"]],
            digest=digest,
            size=3 * 1_048_576,
            layers=[{"id": hashlib.sha256(f"{job['id']}{n}".encode()).hexdigest()[:12], "status": "pushed",
                     "current": 1_048_576, "total": 1_048_576} for n in range(3)],
        )
        job.update(state="succeeded", attempts=1, started_at=utcnow(), finished_at=utcnow(),
                   source_image_id="sha256:" + hashlib.sha256(digest.encode()).hexdigest())
        store.save(job, event="state")
        ids.append(job["id"])
        if len(batch) >= batch_size * 12:
            batch.execute()
    batch.execute()
    client.close()
    return ids


def expire_within(redis_url: str, seconds: int) -> int:
    """Remove every key that would expire within ``seconds`` (as the store will be that much
    later, without waiting); returns how many were removed."""
    client = redis.Redis.from_url(redis_url)
    removed = 0
    try:
        keys = list(client.scan_iter(count=5000))
        for i in range(0, len(keys), 5000):
            chunk = keys[i:i + 5000]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.ttl(key)
            doomed = [k for k, ttl in zip(chunk, pipe.execute()) if 0 <= ttl <= seconds]
            if doomed:
                client.unlink(*doomed)
                removed += len(doomed)
    finally:
        client.close()
    return removed


def redis_used_memory(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def cli_env(stack, config_dir: Path) -> dict[str, str]:
    """Environment for the docker CLI against the stack's private daemon, with its own config,
    as fast as the CLI goes: ``DOCKER_API_VERSION`` pinned to the daemon's, so that no
    invocation first pings the daemon to negotiate it (one round trip of each `docker tag` and
    `docker push` less: the fastest honest baseline)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("DOCKER_")}
    client = stack.docker()
    try:
        api_version = client.version()["ApiVersion"]
    finally:
        client.close()
    env.update({"DOCKER_HOST": stack.docker_host, "DOCKER_CONFIG": str(config_dir), "DOCKER_API_VERSION": api_version,
                "DOCKER_CLI_HINTS": "false"})
    return env
