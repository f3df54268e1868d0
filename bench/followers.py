"""A thousand followers (issue 14, target 8): pipelines that all ``--wait`` on their jobs.

1,000 clients follow ``GET /v1/jobs/{id}/events`` (SSE) of 50 running jobs, 20 each, on the API
as ``imagepub serve`` starts it (defaults). The bench plays the jobs' worker: it writes their
snapshots with ``JobStore.save`` as a worker does (running, a progress snapshot a second, then
succeeded, one job every 20 ms), so what is measured is the API's side alone. Measured: every
follower's answer (no 503), how long after its job's terminal snapshot was written each follower
read it, the RSS of the API's processes (the gunicorn arbiter and its workers) with the streams
open, and submission and status throughput (wrk) while the streams are open against the same
loads without them, measured in the same phase.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .load import merge, wrk
from .stack_services import TOKEN, Imagepub

TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Follower:
    job_id: str
    status: int | None = None
    connected_at: float | None = None
    terminal_at: float | None = None
    events: int = 0
    error: str = ""


@dataclass
class Crowd:
    """The followers, on an asyncio loop in a thread of their own."""

    host: str
    port: int
    followers: list[Follower] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None

    async def _follow(self, f: Follower) -> None:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            writer.write((f"GET /v1/jobs/{f.job_id}/events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n").encode())
            await writer.drain()
            status_line = await reader.readline()
            f.status = int(status_line.split()[1]) if status_line else None
            f.connected_at = time.time()
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    f.events += 1
                    if json.loads(line[6:])["state"] in TERMINAL:
                        f.terminal_at = time.time()
                        break
            writer.close()
        except Exception as exc:  # noqa: BLE001 - counted and shown, never raised
            f.error = f"{exc.__class__.__name__}: {exc}"

    def start(self, job_ids: list[str], per_job: int) -> None:
        self.followers = [Follower(job_id) for job_id in job_ids for _ in range(per_job)]
        ready = threading.Event()

        async def everyone() -> None:
            await asyncio.gather(*(self._connect_slowly(i, f) for i, f in enumerate(self.followers)))

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            ready.set()
            self.loop.run_until_complete(everyone())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait()

    async def _connect_slowly(self, i: int, f: Follower) -> None:
        await asyncio.sleep(i * 0.002)  # 1,000 connections over 2 s, as pipelines arrive
        await self._follow(f)

    def wait_connected(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = sum(1 for f in self.followers if f.events or f.error or f.status not in (None, 200))
            if done == len(self.followers):
                return done
            time.sleep(0.1)
        return sum(1 for f in self.followers if f.events)

    def join(self, timeout: float) -> None:
        if self.thread:
            self.thread.join(timeout)


def api_rss_bytes(arbiter_pid: int) -> tuple[int, int]:
    """RSS of the gunicorn arbiter and its children (bytes), and how many processes."""
    pids = [arbiter_pid]
    for task in Path(f"/proc/{arbiter_pid}/task").iterdir():
        children = Path(f"/proc/{arbiter_pid}/task/{task.name}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total, len(pids)


def _loads(svc: Imagepub, body_json: str, ids_file: Path, args, log) -> dict[str, Any]:
    post_env = {"BENCH_TOKEN": TOKEN, "BENCH_BODY": body_json}
    return {
        "post": lambda: wrk("POST /v1/publish", svc.url + "/v1/publish", script="post.lua", env=post_env,
                            duration=args.duration, connections=args.connections, log=log.raw),
        "get": lambda: wrk("GET /v1/jobs/{id}", svc.url + "/", script="jobs.lua",
                           env={"BENCH_TOKEN": TOKEN, "BENCH_IDS": str(ids_file)}, duration=args.duration,
                           connections=args.connections, log=log.raw),
    }


def followers_phase(stack, args, res, log, svc: Imagepub, publish_body, seed_ids, median) -> None:
    from service.jobstore import JobStore, utcnow  # the worker's way of writing snapshots

    n_jobs, per_job = args.follow_jobs, args.followers // args.follow_jobs
    store = JobStore(svc.redis)
    body = publish_body(stack, repository="bench/followed")
    ids_file = stack.tmp / "ids-followers.txt"
    seed_ids(svc, body, 500, ids_file)
    loads = _loads(svc, json.dumps(body), ids_file, args, log)
    rounds = max(1, args.rounds // 2)

    def measure(label: str) -> dict[str, list]:
        out: dict[str, list] = {"post": [], "get": []}
        for r in range(rounds):
            for name in (("post", "get") if r % 2 == 0 else ("get", "post")):
                result = loads[name]()
                out[name].append(result)
                log(f"followers phase, {label}, round {r + 1}/{rounds}: {result.brief()}")
        return out

    # The rounds without streams bracket those with them (before and after: A-B-A), so that the
    # machine's drift over the phase, which on this shared machine is often larger than the
    # effect measured, falls on both sides of each ratio.
    before = measure("no followers, before")
    rss_before, _ = api_rss_bytes(svc.api_pid)

    # 50 running jobs, as a worker leaves them
    jobs = [svc.submit(body) for _ in range(n_jobs)]
    for job in jobs:
        job = store.get(job["id"])
        job.update(state="running", started_at=utcnow(), attempt=1)
        store.save(job, event="state")
    crowd = Crowd("127.0.0.1", svc.port)
    crowd.start([j["id"] for j in jobs], per_job)
    connected = crowd.wait_connected(timeout=60)
    log(f"followers: {connected} of {len(crowd.followers)} receiving")

    # progress snapshots while the loads run, as pushes report layers
    stop = threading.Event()

    def progress() -> None:
        while not stop.wait(1.0):
            for job in jobs:
                current = store.get(job["id"])
                current["progress"] = {"note": f"layer bytes at {time.time():.0f}"}
                store.save(current)

    ticker = threading.Thread(target=progress, daemon=True)
    ticker.start()
    with_followers = measure(f"{connected} followers open")
    rss_open, processes = api_rss_bytes(svc.api_pid)
    stop.set()
    ticker.join()

    # the end: one job every 20 ms; each follower's delay from its job's terminal write
    ended: dict[str, float] = {}
    for job in jobs:
        current = store.get(job["id"])
        current.update(state="succeeded", finished_at=utcnow())
        ended[job["id"]] = time.time()
        store.save(current, event="state")
        time.sleep(0.02)
    crowd.join(timeout=30)
    after = measure("no followers, after")

    followers = crowd.followers
    statuses: dict[str, int] = {}
    for f in followers:
        key = str(f.status) if f.status is not None else (f.error.split(":")[0] or "no answer")
        statuses[key] = statuses.get(key, 0) + 1
    delays = sorted(f.terminal_at - ended[f.job_id] for f in followers if f.terminal_at is not None)
    missing = len(followers) - len(delays)
    worst = delays[-1] if delays else float("inf")
    p99 = delays[int(0.99 * (len(delays) - 1))] if delays else float("inf")

    alone = {k: before[k] + after[k] for k in before}
    m_alone = {k: merge(v[0].name, v) for k, v in alone.items()}
    m_with = {k: merge(v[0].name + f" ({connected} followers open)", v) for k, v in with_followers.items()}

    def ratio(key: str) -> float:
        """Each round with the streams against the mean of the rounds without them that bracket
        it: the first with the first before and the last after, and so on inwards."""
        return median([w.rps / ((b.rps + a.rps) / 2)
                       for w, b, a in zip(with_followers[key], before[key], reversed(after[key]))])

    r_post, r_get = ratio("post"), ratio("get")
    n = len(followers)
    res.add("8 followers", f"{n:,} SSE followers of {n_jobs} running jobs: answers", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
            "—", None, "all 200", statuses.get("200", 0) == n)
    res.add("8 followers", "terminal event read after the job's end: slowest follower (p99)", f"{worst * 1000:.0f} ms ({p99 * 1000:.0f} ms)",
            "—", None, "≤ 1 s, none missing", worst <= 1.0 and missing == 0)
    res.add("8 followers", f"API RSS with {n:,} streams open ({processes} processes)", f"{rss_open / 2**20:.0f} MiB",
            f"{rss_before / 2**20:.0f} MiB (no streams)", None, "< 400 MiB", rss_open < 400 * 2**20)
    res.add("8 followers", "POST /v1/publish throughput with the streams open", f"{m_with['post'].rps:,.0f} req/s",
            f"{m_alone['post'].rps:,.0f} req/s (no streams)", r_post, "≥ 0.80×", r_post >= 0.8)
    res.add("8 followers", "GET /v1/jobs/{id} throughput with the streams open", f"{m_with['get'].rps:,.0f} req/s",
            f"{m_alone['get'].rps:,.0f} req/s (no streams)", r_get, "≥ 0.80×", r_get >= 0.8)
    lines = [f"{n:,} clients (asyncio, one connection each, opened over 2 s) follow `GET /v1/jobs/{{id}}/events` of {n_jobs} "
             f"running jobs, {per_job} each, on `imagepub serve` with its defaults. The bench writes the jobs' snapshots as a worker "
             "does (`JobStore.save`): running, then one progress snapshot per job a second while wrk loads the API, then "
             "`succeeded`, one job every 20 ms. A follower's delay is from just before its job's terminal snapshot was written "
             "to the moment it read that event (one machine, one clock).", "",
             "| | value |", "| --- | ---: |",
             f"| followers receiving before the loads | {connected:,} of {n:,} |",
             f"| terminal event received | {len(delays):,} of {n:,} |",
             f"| delay: median / p99 / max | {median(delays) * 1000 if delays else 0:.0f} ms / {p99 * 1000:.0f} ms / {worst * 1000:.0f} ms |",
             f"| API RSS: no streams → {n:,} open | {rss_before / 2**20:.0f} MiB → {rss_open / 2**20:.0f} MiB |", "",
             "Throughput without the streams is measured before they open and again after they close, "
             f"{rounds} round(s) of each load each time; each round with the streams open is divided by the mean of the "
             "rounds without them that bracket it, and the ratio is the median of those.", "",
             "| load | req/s (no streams) | req/s (streams open) | p99 (no streams) | p99 (streams open) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for key in ("post", "get"):
        a, w = m_alone[key], m_with[key]
        lines.append(f"| {a.name} | {a.rps:,.0f} | {w.rps:,.0f} | {a.p99_ms:.1f} ms | {w.p99_ms:.1f} ms |")
    errors = sorted({f.error for f in followers if f.error})[:5]
    if errors:
        lines += ["", "Errors seen by followers (first 5 kinds): " + "; ".join(errors)]
    res.detail("A thousand followers (target 8)", *lines)
