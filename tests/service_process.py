"""The whole imagepub service as separate processes on the test stack: ``imagepub serve``
(gunicorn) and ``imagepub worker`` (Celery), and a small HTTP client for its API."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import requests
import yaml

from stack import free_port

TERMINAL = {"succeeded", "failed", "cancelled"}


def imagepub_command() -> str:
    """The installed console script next to this interpreter (the one the README installs)."""
    candidate = Path(sys.executable).parent / "imagepub"
    return str(candidate) if candidate.exists() else shutil.which("imagepub")


class Api:
    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = requests.Session()

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.base_url + path, timeout=30, **kw)

    def post(self, path: str, json=None, **kw) -> requests.Response:
        return self.http.post(self.base_url + path, json=json, timeout=30, **kw)

    def submit(self, path: str, body: dict) -> dict:
        resp = self.post(path, json=body)
        assert resp.status_code == 202, resp.text
        return resp.json()

    def wait(self, job_id: str, timeout: float = 120, states=TERMINAL) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
            time.sleep(0.1)


class Service:
    def __init__(self, stack, config: dict, name: str, env: dict | None = None, redis_db: int = 0):
        self.stack, self.name = stack, name
        self.redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"
        self.config_path = stack.tmp / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.env = {
            "IMAGEPUB_CONFIG": str(self.config_path),
            "SECURE_REGISTRY_PASSWORD": stack.auth_password,
            "WRONG_REGISTRY_PASSWORD": "not-the-password",
            "IMAGEPUB_REDIS_URL": self.redis_url,
            **(env or {}),
        }
        self.api = Api(f"http://127.0.0.1:{self.port}")

    def start_api(self, suffix: str = "api", port: int | None = None) -> Api:
        """``imagepub serve`` (another one beside the first with another ``suffix``)."""
        port = port or self.port
        api = self.api if port == self.port else Api(f"http://127.0.0.1:{port}")
        self.stack.spawn(f"{self.name}-{suffix}", [imagepub_command(), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2"], env=self.env)
        deadline = time.monotonic() + 30
        while True:
            try:
                if api.get("/healthz").status_code == 200:
                    return api
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("API did not start:\n" + self.stack.log(f"{self.name}-{suffix}")[-3000:])
            time.sleep(0.2)

    def start_worker(self, concurrency: int = 2, suffix: str = "worker", args: tuple[str, ...] = (), env: dict | None = None,
                     ecr_hosts: bool = False) -> None:
        """``imagepub worker`` (``args``: more of its options, e.g. ``--daemon b``; ``env``:
        e.g. another ``DOCKER_HOST``; ``ecr_hosts``: resolving the emulated ECR's host name as
        the daemon does, for a daemonless client in the worker: see Stack.spawn)."""
        name = f"{self.name}-{suffix}"
        self.stack.spawn(name, [imagepub_command(), "worker", "--concurrency", str(concurrency), *args], env={**self.env, **(env or {})},
                         ecr_hosts=ecr_hosts)
        self.stack.wait_for_log(name, "ready", timeout=60)

    def kill_worker(self, suffix: str = "worker") -> None:
        """kill -9 of the whole worker (main process and pool), as when its machine dies."""
        name = f"{self.name}-{suffix}"
        self.stack.kill(name)
        self.stack.proc(name).wait(10)

    def stop_worker(self, suffix: str = "worker") -> None:
        self.stack.stop(f"{self.name}-{suffix}")


def base_config(stack) -> dict:
    return {
        "registries": {
            "local": {"type": "registry", "host": stack.registry},
            "secure": {"type": "registry", "host": stack.auth_registry, "username": stack.auth_user, "password_env": "SECURE_REGISTRY_PASSWORD"},
            "wrong-password": {"type": "registry", "host": stack.auth_registry, "username": stack.auth_user, "password_env": "WRONG_REGISTRY_PASSWORD"},
            "ecr": {"type": "ecr", "region": stack.ecr_region, "create_repositories": True},
            "ecr-no-create": {"type": "ecr", "region": stack.ecr_region, "account_id": stack.ecr_account},
        },
        "retry": {"max_attempts": 3, "backoff_base_seconds": 0.2, "backoff_max_seconds": 1.0},
        "auth": {"anonymous": True},  # tests/e2e/test_security.py runs a service with clients
        # a section a later version adds: must not break loading
        "webhooks": {"secret_env": "IMAGEPUB_WEBHOOK_SECRET"},
    }
