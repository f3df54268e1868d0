"""Where a gunicorn worker's CPU goes: ``py-spy record`` on the arbiter and its workers while wrk
drives one endpoint, then the samples folded into shares per function (inclusive and self) and
per area of the request path."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^():]+):\d+\)$")

# Areas of a request, matched against "file:function" of every frame of a sample (inclusive:
# a sample counts for every area one of its frames belongs to). Order = display order.
AREAS: list[tuple[str, re.Pattern]] = [
    ("gunicorn: accept, parse, write, keep-alive", re.compile(r"^gunicorn/(workers|http)/")),
    ("gunicorn: access log line", re.compile(r"^gunicorn/glogging\.py:Logger\.access$")),
    ("flask/werkzeug request dispatch (whole app)", re.compile(r"^flask/app\.py:Flask\.wsgi_app$")),
    ("auth: token hash + compare (service/auth.py)", re.compile(r"^service/auth\.py:authenticate_request$")),
    ("flask-limiter hooks", re.compile(r"^flask_limiter/")),
    ("request JSON + marshmallow validation (service/http.py:load, json_body)", re.compile(r"^service/http\.py:(load|json_body)$")),
    ("queue-depth check (LLEN)", re.compile(r"^service/views\.py:_check_queue_depth$")),
    ("job record build (service/jobs.py:new_job)", re.compile(r"^service/jobs\.py:new_job$")),
    ("store.create: one Redis transaction (service/jobstore.py:create)", re.compile(r"^service/jobstore\.py:JobStore\.create$")),
    ("enqueue (service/queue.py:enqueue)", re.compile(r"^service/queue\.py:JobQueue\.enqueue$")),
    ("store.get: Redis GET + json.loads", re.compile(r"^service/jobstore\.py:JobStore\.get$")),
    ("application logging (log.info JSON line)", re.compile(r"^logging/__init__\.py:Logger\.(info|_log)$")),
    ("response: jsonify + url_for", re.compile(r"^(flask/json/__init__\.py:jsonify|flask/helpers\.py:url_for|service/views\.py:_accepted)$")),
    ("redis-py: socket send/recv (all Redis calls)", re.compile(r"^redis/(connection|_parsers)/?")),
]


@dataclass
class Profile:
    name: str
    samples: int
    inclusive: Counter = field(default_factory=Counter)
    self_time: Counter = field(default_factory=Counter)
    areas: Counter = field(default_factory=Counter)
    errors: str = ""
    description: str = ""

    def share(self, count: int) -> float:
        return 100.0 * count / self.samples if self.samples else 0.0

    def top(self, counter: Counter, n: int, only=None) -> list[tuple[str, float]]:
        rows = [(k, self.share(v)) for k, v in counter.most_common() if only is None or only(k)]
        return rows[:n]


def _short(path: str) -> str:
    """``/x/.venv/lib/python3.11/site-packages/flask/app.py`` → ``flask/app.py``."""
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    return path


def fold(name: str, raw: str, repo: Path) -> Profile:
    prof = Profile(name=name, samples=0)
    repo_prefix = str(repo) + "/"
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = []
        for part in stack.split(";"):
            if part.startswith(("process ", "thread ")):
                continue
            m = _FRAME.match(part)
            if not m:
                continue
            path = m["file"]
            path = path[len(repo_prefix):] if path.startswith(repo_prefix) else _short(path)
            frames.append(f"{path}:{m['func']}")
        if not frames:
            continue
        prof.samples += n
        for key in set(frames):
            prof.inclusive[key] += n
        prof.self_time[frames[-1]] += n
        for area, pattern in AREAS:
            if any(pattern.search(f) for f in frames):
                prof.areas[area] += n
    return prof


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 97) -> subprocess.Popen:
    """Start ``py-spy record`` on ``pid`` and its subprocesses (gunicorn's workers); returns the
    process (wait for it). Only samples of threads on CPU are kept (no --idle)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (bench/run installs bench/requirements.txt)")
    argv = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", str(rate),
            "--duration", str(max(1, round(seconds))), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def render(prof: Profile, n: int = 12) -> list[str]:
    """Markdown lines: areas, then the heaviest imagepub and library functions."""
    what = prof.description or f"{prof.samples} on-CPU samples of every gunicorn worker (py-spy, no idle threads)."
    lines = [what, "", "| area of the request path | share (inclusive) |", "| --- | ---: |"]
    for area, _ in AREAS:
        if prof.areas.get(area):
            lines.append(f"| {area} | {prof.share(prof.areas[area]):.1f} % |")
    lines += ["", "| heaviest functions (inclusive) | share |", "| --- | ---: |"]
    skip = re.compile(r"^(threading\.py|concurrent/futures/|gunicorn/workers/gthread\.py:ThreadWorker\.(handle|handle_request)$|"
                      r"flask/app\.py:Flask\.(__call__|wsgi_app|full_dispatch_request|dispatch_request)$|bench/|"
                      r"werkzeug/test\.py|flask/testing\.py|<frozen runpy>|gunicorn/(arbiter|app/|__main__))")
    for key, share in prof.top(prof.inclusive, n + 10, only=lambda k: not skip.search(k))[:n]:
        lines.append(f"| `{key}` | {share:.1f} % |")
    lines += ["", "| heaviest functions (self time) | share |", "| --- | ---: |"]
    for key, share in prof.top(prof.self_time, n):
        lines.append(f"| `{key}` | {share:.1f} % |")
    return lines


# --- in process: the app alone (Flask's test client, no gunicorn), with pyinstrument -------------


def _fold_pyinstrument(name: str, root, repo: Path, requests: int) -> Profile:
    """pyinstrument's call tree folded like py-spy's samples: shares of wall time per function."""
    prof = Profile(name=name, samples=0)
    repo_prefix = str(repo) + "/"
    scale = 1_000_000  # microseconds as "samples"

    def key(frame) -> str | None:
        path = frame.file_path or ""
        if not path or frame.is_synthetic:
            return None
        path = _short(path) if "site-packages/" in path or not path.startswith(repo_prefix) else path[len(repo_prefix):]
        qual = f"{frame.class_name}.{frame.function}" if getattr(frame, "class_name", None) else frame.function
        return f"{path}:{qual}"

    def walk(frame, on_path: tuple[str, ...]) -> None:
        k = key(frame)
        path = on_path + ((k,) if k and k not in on_path else ())
        if k and k not in on_path:
            prof.inclusive[k] += int(frame.time * scale)
        children = list(frame.children)
        self_us = int(max(0.0, frame.time - sum(c.time for c in children)) * scale)
        if self_us and path:
            prof.self_time[k or path[-1]] += self_us
            for area, pattern in AREAS:
                if any(pattern.search(f) for f in path):
                    prof.areas[area] += self_us
        for child in children:
            walk(child, path)

    if root is not None:
        prof.samples = int(root.time * scale)
        walk(root, ())
    prof.errors = f"{requests} requests"
    return prof


def inprocess(name: str, app, method: str, path: str, requests: int, repo: Path, **kw) -> tuple[Profile, float]:
    """Profile ``requests`` calls of one endpoint through Flask's test client with pyinstrument;
    returns the folded profile and the mean wall time per request (seconds)."""
    import time

    from pyinstrument import Profiler

    client = app.test_client()
    call = getattr(client, method.lower())
    for _ in range(max(20, requests // 10)):  # warm-up: connections, caches, lazy imports
        resp = call(path, **kw)
        assert resp.status_code < 300, (name, resp.status_code, resp.get_data(as_text=True)[:300])
    t0 = time.perf_counter()
    for _ in range(requests):
        call(path, **kw)
    per_request = (time.perf_counter() - t0) / requests
    profiler = Profiler(interval=0.0001)
    profiler.start()
    for _ in range(requests):
        call(path, **kw)
    profiler.stop()
    prof = _fold_pyinstrument(name, profiler.last_session.root_frame(), repo, requests)
    prof.description = (f"pyinstrument, {requests} sequential requests through Flask's test client in one process (no "
                        f"gunicorn, no other load): {per_request * 1e6:,.0f} µs per request unprofiled; shares of wall time, "
                        f"Redis round trips included.")
    return prof, per_request
