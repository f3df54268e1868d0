"""imagepub's benchmark suite (issue 7): ``python -m bench`` or ``bench/run``.

Everything runs on the test stack (tests/stack.py: private dockerd, registries, emulated ECR, moto,
Redis), started here and torn down at the end. Every target is a ratio against a baseline
measured in the same run, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import machine, profile
from .copy_phase import copy_phase
from .followers import followers_phase
from workers.registry_http import ManifestHead
from .load import WrkResult, merge, wrk
from .meter import Cost, Meter
from .stack_services import (REPO, TERMINAL, TOKEN, Floor, Handoff, Hello, Imagepub, auth_headers, cli_env, gunicorn_defaults,
                             expire_within, load_finished_jobs, redis_used_memory)

DOCKER = "/usr/bin/docker"
MiB = 1024 * 1024
PHASES = ("http", "scale", "followers", "jobs", "fresh", "burst", "copy")


@dataclass
class Row:
    section: str
    what: str
    measured: str
    baseline: str
    ratio: float | None
    target: str
    met: bool | None  # None: reported, no target

    def cells(self) -> list[str]:
        ratio = "—" if self.ratio is None else f"{self.ratio:.2f}×"
        met = "—" if self.met is None else ("yes" if self.met else "**no**")
        return [self.section, self.what, self.measured, self.baseline, ratio, self.target, met]


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, list[str]] = field(default_factory=dict)  # section title -> markdown lines
    profiles: dict[str, profile.Profile] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, *args, **kw) -> None:
        self.rows.append(Row(*args, **kw))

    def detail(self, section: str, *lines: str) -> None:
        self.details.setdefault(section, []).extend(lines)


class Log:
    """Progress on stderr; the whole story (wrk output included) in a log file."""

    def __init__(self):
        self.path = Path(tempfile.gettempdir()) / f"imagepub-bench-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.file = self.path.open("w")
        self.t0 = time.monotonic()

    def __call__(self, text: str, *, quiet: bool = False) -> None:
        stamp = f"[{time.monotonic() - self.t0:6.1f}s]"
        self.file.write(f"{stamp} {text}\n")
        self.file.flush()
        if not quiet:
            print(f"{stamp} {text}", file=sys.stderr, flush=True)

    def raw(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# --- phase: HTTP throughput and latency (targets 1–3), and the scale comparison (target 5) -------


def publish_body(stack, repository: str = "bench/app", tags: list[str] | None = None) -> dict[str, Any]:
    return {"source": "bench-source:latest", "targets": [{"registry": "local", "repository": repository, "tags": tags or ["v1"]}]}


def seed_ids(svc: Imagepub, body: dict[str, Any], count: int, path: Path) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = [job["id"] for job in pool.map(lambda _: svc.submit(body), range(count))]
    path.write_text("\n".join(ids) + "\n")
    return ids


def http_phase(stack, args, res: Results, log: Log, services: dict[str, Any]) -> None:
    hello: Hello = services["hello"]
    hello_threads: Hello = services["hello-gthread"]
    empty: Imagepub = services["empty"]
    floor: Floor = services["floor"]
    full: Imagepub | None = services.get("full")
    body = publish_body(stack)
    body_json = json.dumps(body)
    tmp = stack.tmp
    ids_empty = tmp / "ids-empty.txt"
    ids_full = tmp / "ids-full.txt"
    seed_ids(empty, body, 500, ids_empty)
    if full is not None:
        seed_ids(full, body, 500, ids_full)

    # Every endpoint answers what it should before it is loaded (wrk counts only >= 400 as errors).
    assert empty.http.post(empty.url + "/v1/publish", json=body).status_code == 202
    assert empty.http.get(empty.url + "/v1/jobs/" + ids_empty.read_text().split()[0]).status_code == 200

    post_env = {"BENCH_TOKEN": TOKEN, "BENCH_BODY": body_json}
    c = args.connections
    loads: list[tuple[str, int, Callable[[float], WrkResult]]] = [
        ("hello", hello.pid, lambda d: wrk("hello-world GET /", hello.url + "/", duration=d, connections=c, log=log.raw)),
        ("hello-gthread", hello_threads.pid, lambda d: wrk("hello-world GET / (gthread)", hello_threads.url + "/", duration=d,
                                                           connections=c, log=log.raw)),
        ("post-empty", empty.api_pid, lambda d: wrk("POST /v1/publish", empty.url + "/v1/publish", script="post.lua",
                                                    env=post_env, duration=d, connections=c, log=log.raw)),
        ("floor", floor.pid, lambda d: wrk("a submission's storage alone (bench/floor.py)", floor.url + "/v1/publish",
                                           script="post.lua", env=post_env, duration=d, connections=c, log=log.raw)),
    ]
    if full is not None:
        loads += [
            ("post-full", full.api_pid, lambda d: wrk("POST /v1/publish (100k jobs)", full.url + "/v1/publish", script="post.lua",
                                                      env=post_env, duration=d, connections=c, log=log.raw)),
        ]
    loads += [
        ("get-empty", empty.api_pid, lambda d: wrk("GET /v1/jobs/{id}", empty.url + "/", script="jobs.lua",
                                                   env={"BENCH_TOKEN": TOKEN, "BENCH_IDS": str(ids_empty)}, duration=d,
                                                   connections=c, log=log.raw)),
    ]
    if full is not None:
        loads += [
            ("get-full", full.api_pid, lambda d: wrk("GET /v1/jobs/{id} (100k jobs)", full.url + "/", script="jobs.lua",
                                                     env={"BENCH_TOKEN": TOKEN, "BENCH_IDS": str(ids_full)}, duration=d,
                                                     connections=c, log=log.raw)),
        ]
    log(f"warm-up: {len(loads)} loads × {args.warmup:.0f} s")
    for _, _, run in loads:
        run(args.warmup)
    runs: dict[str, list[WrkResult]] = {name: [] for name, _, _ in loads}
    costs: dict[str, Cost] = {name: Cost() for name, _, _ in loads}
    for r in range(args.rounds):
        order = loads if r % 2 == 0 else list(reversed(loads))  # interleaved, alternating order
        for name, pid, run in order:
            meter = Meter(pid, stack.redis_url)
            meter.start()
            result = run(args.duration)
            costs[name].add(meter.stop(result.requests))
            runs[name].append(result)
            log(f"round {r + 1}/{args.rounds}: {result.brief()}")
    # The baseline of each round is the faster hello-world of the round: the same worker class as
    # the API's (gevent), or gthread (the fastest honest way to answer these requests).
    runs["hello-best"] = [max(a, b, key=lambda x: x.rps) for a, b in zip(runs["hello"], runs["hello-gthread"])]
    faster = {"gevent" if b in runs["hello"] else "gthread" for b in runs["hello-best"]}
    m = {name: merge(runs[name][0].name, runs[name]) for name in runs}
    m["hello-best"] = merge(f"hello-world GET / (the faster per round: {', '.join(sorted(faster))})", runs["hello-best"])
    hello_r, post, get = m["hello-best"], m["post-empty"], m["get-empty"]

    def ratio(name: str, base: str, attr: str = "rps") -> float:
        """The median over rounds of the round's ratio: a round that a neighbour slowed down
        as a whole moves it less than it moves the totals."""
        return median([getattr(x, attr) / getattr(b, attr) for x, b in zip(runs[name], runs[base])])
    s = gunicorn_defaults()
    res.settings["gunicorn"] = f"{s['workers']} × {s['worker_class']} workers, {s['worker_connections']} connections each"
    res.settings["hello-world baseline"] = f"the faster per round of {hello.description} and {hello_threads.description}"
    res.settings["load"] = (f"wrk, 1 thread, {args.connections} connections, {args.rounds} interleaved rounds of "
                            f"{args.duration:.0f} s per load after a {args.warmup:.0f} s warm-up")

    r_post, r_get = ratio("post-empty", "hello-best"), ratio("get-empty", "hello-best")
    r_post99, r_get99 = ratio("post-empty", "hello-best", "p99_ms"), ratio("get-empty", "hello-best", "p99_ms")
    res.add("1 submission", "POST /v1/publish throughput", f"{post.rps:,.0f} req/s", f"{hello_r.rps:,.0f} req/s (hello-world)",
            r_post, "≥ 0.50×", r_post >= 0.5)
    fl, r_floor = m["floor"], ratio("floor", "hello-best")
    res.add("1 submission", "the floor: a bare WSGI app that only stores a submission, with the service's own script "
            "(bench/floor.py)", f"{fl.rps:,.0f} req/s", f"{hello_r.rps:,.0f} req/s (hello-world)", r_floor,
            "— (no front end over this storage can pass it)", None)
    res.add("1 submission", "POST /v1/publish responses not 2xx (incl. socket errors)", f"{post.failures} of {post.requests:,}",
            f"{hello_r.failures} of {hello_r.requests:,}", None, "0", post.failures == 0)
    res.add("2 status", "GET /v1/jobs/{id} throughput", f"{get.rps:,.0f} req/s", f"{hello_r.rps:,.0f} req/s (hello-world)",
            r_get, "≥ 0.75×", r_get >= 0.75)
    res.add("2 status", "GET /v1/jobs/{id} responses not 2xx", f"{get.failures} of {get.requests:,}", "—", None, "0", get.failures == 0)
    res.add("3 tail latency", "p99 of POST /v1/publish", f"{post.p99_ms:.1f} ms", f"{hello_r.p99_ms:.1f} ms (hello-world)",
            r_post99, "≤ 3×", r_post99 <= 3)
    res.add("3 tail latency", "p99 of GET /v1/jobs/{id}", f"{get.p99_ms:.1f} ms", f"{hello_r.p99_ms:.1f} ms (hello-world)",
            r_get99, "≤ 3×", r_get99 <= 3)
    table = ["| load | req/s | p50 | p90 | p99 | max | requests | not 2xx | socket errors | req/s per round |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name in runs:
        x = m[name]
        per_round = ", ".join(f"{r.rps:,.0f}" for r in runs[name])
        table.append(f"| {x.name} | {x.rps:,.0f} | {x.p50_ms:.1f} ms | {x.p90_ms:.1f} ms | {x.p99_ms:.1f} ms | {x.max_ms:.0f} ms | "
                     f"{x.requests:,} | {x.non_2xx} | {x.socket_errors} | {per_round} |")
    table += ["", "What one request costs, measured around the same runs: CPU of the gunicorn arbiter and workers "
              "(/proc), Redis CPU and the Redis commands it executed (INFO cpu, commandstats), and how busy the whole "
              "machine was meanwhile (/proc/stat: other processes included — the load generator, Redis, and anything "
              "else running on this shared machine).", "",
              "| load | server CPU per request | Redis CPU per request | Redis commands per request | command mix per request | machine busy | Redis forks |",
              "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name in costs:
        cost = costs[name]
        busy = 100 * cost.machine_busy / cost.machine_total if cost.machine_total else 0
        table.append(f"| {m[name].name} | {cost.per_request_us(cost.server_cpu):,.0f} µs | {cost.per_request_us(cost.redis_cpu):,.0f} µs | "
                     f"{cost.commands_per_request():.1f} | {cost.command_mix(limit=20)} | {busy:.0f} % | {cost.forks} |")
        log(f"cost {m[name].name}: server {cost.per_request_us(cost.server_cpu):,.0f} µs/req, redis "
            f"{cost.per_request_us(cost.redis_cpu):,.0f} µs/req, {cost.commands_per_request():.1f} cmds/req ({cost.command_mix()}), "
            f"machine busy {busy:.0f} %")
    table += ["", "Ratios in the summary are the median over rounds of each round's ratio (the loads of a round run back to "
              "back, in alternating order); the req/s and latencies here are over all rounds."]
    res.detail("HTTP load (targets 1–3, and 5's throughput)", *table)
    if full is not None:
        pf, gf = m["post-full"], m["get-full"]
        r_pf, r_gf = ratio("post-full", "post-empty"), ratio("get-full", "get-empty")
        res.add("5 scale", "POST /v1/publish with 100k finished jobs", f"{pf.rps:,.0f} req/s", f"{post.rps:,.0f} req/s (empty store)",
                r_pf, "≥ 0.90×", r_pf >= 0.9)
        res.add("5 scale", "GET /v1/jobs/{id} with 100k finished jobs", f"{gf.rps:,.0f} req/s", f"{get.rps:,.0f} req/s (empty store)",
                r_gf, "≥ 0.90×", r_gf >= 0.9)

    if args.profile:
        try:
            inprocess_profiles(stack, args, res, log)
        except Exception as exc:  # noqa: BLE001 - the loads above are measured; say what broke
            res.errors.append(f"in-process profile: {exc.__class__.__name__}: {exc}")
            log("in-process profile failed:\n" + "".join(traceback.format_exception(exc)))
        for name, url, script, env in (
            ("POST /v1/publish", empty.url + "/v1/publish", "post.lua", post_env),
            ("GET /v1/jobs/{id}", empty.url + "/", "jobs.lua", {"BENCH_TOKEN": TOKEN, "BENCH_IDS": str(ids_empty)}),
            ("hello-world GET /", hello.url + "/", "get.lua", {}),
        ):
            pid = hello.pid if name.startswith("hello") else empty.api_pid
            out = tmp / f"profile-{len(res.profiles)}.txt"
            spy = profile.record(pid, args.profile_seconds, out)
            time.sleep(0.5)
            loaded = wrk(name + " (profiled)", url, script=script, env=env, duration=args.profile_seconds,
                         connections=args.connections, log=log.raw)
            spy_out, _ = spy.communicate(timeout=60)
            log.raw(spy_out)
            prof = profile.fold(name, out.read_text() if out.exists() else "", REPO)
            res.profiles[name + ", under gunicorn"] = prof
            log.raw("\n".join(profile.render(prof, n=25)))
            log(f"profiled {name}: {prof.samples} samples while serving {loaded.rps:,.0f} req/s under py-spy")


def inprocess_profiles(stack, args, res: Results, log: Log) -> None:
    """The app alone, in this process, through Flask's test client, profiled with pyinstrument:
    where a request's time goes without gunicorn or the scheduler in the picture."""
    import logging
    import os

    from service.app import create_app
    from service.config import parse
    from service.logs import configure_logging

    from . import hello as hello_module
    from .stack_services import bench_config

    settings = parse(bench_config(stack), {"IMAGEPUB_REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + "/3"})
    saved, devnull = sys.stderr, open(os.devnull, "w")
    sys.stderr = devnull  # the app logs JSON lines at INFO, as under gunicorn: into the void here
    try:
        configure_logging(settings.log_level)
        app = create_app(settings)
        headers = auth_headers()
        body = publish_body(stack)
        first = app.test_client().post("/v1/publish", json=body, headers=headers)
        if first.status_code != 202:
            raise RuntimeError(f"in process, POST /v1/publish answered {first.status_code}: {first.get_data(as_text=True)[:300]}")
        job_id = first.get_json()["id"]
        n = 500 if args.quick else 2000
        times = {}
        for name, target, method, path, kw in (
            ("POST /v1/publish, in process", app, "POST", "/v1/publish", {"json": body, "headers": headers}),
            ("GET /v1/jobs/{id}, in process", app, "GET", f"/v1/jobs/{job_id}", {"headers": headers}),
            ("hello-world GET /, in process", hello_module.app, "GET", "/", {}),
        ):
            prof, per_request = profile.inprocess(name, target, method, path, n, REPO, **kw)
            res.profiles[name] = prof
            times[name] = per_request
            log.raw(f"### {name}\n" + "\n".join(profile.render(prof, n=30)))
    finally:
        sys.stderr = saved
        devnull.close()
        logging.getLogger().handlers[:] = []
    hello_t = times["hello-world GET /, in process"]
    lines = ["The app alone (Flask test client, one thread, no gunicorn, no concurrent load), mean time per request:", "",
             "| endpoint | per request | × hello-world |", "| --- | ---: | ---: |"]
    for name, t in times.items():
        lines.append(f"| {name.removesuffix(', in process')} | {t * 1e6:,.0f} µs | {t / hello_t:.1f}× |")
        log(f"in process: {name}: {t * 1e6:,.0f} µs per request")
    res.detail("HTTP load (targets 1–3, and 5's throughput)", "", *lines)


# --- phase: a store with 100k finished jobs (target 5) ---------------------------------------------


def scale_phase(stack, args, res: Results, log: Log, services: dict[str, Any]) -> None:
    empty: Imagepub = services["empty"]
    full: Imagepub = services["full"]
    template = empty.submit(publish_body(stack))["request"]  # the normalised request, as the API stores it
    empty.redis.flushdb()

    # the same jobs, 100 of them, in the (otherwise empty) store for the listing comparison
    load_finished_jobs(empty.redis_url, 100, template, stack.registry)
    before = redis_used_memory(full.redis_url)
    t0 = time.monotonic()
    ids = load_finished_jobs(full.redis_url, args.jobs, template, stack.registry)
    took = time.monotonic() - t0
    after = redis_used_memory(full.redis_url)
    per_job = (after - before) / args.jobs
    log(f"wrote {args.jobs:,} finished jobs in {took:.1f} s; Redis used_memory +{(after - before) / MiB:.1f} MiB = {per_job:,.0f} B/job")

    sample = ids[len(ids) // 2]
    breakdown = {}
    for label, key in (("record `job:{id}`", f"imagepub:job:{sample}"), ("events stream `job:{id}:events`", f"imagepub:job:{sample}:events")):
        breakdown[label] = full.redis.memory_usage(key, samples=0) or 0
    stored_len = full.redis.strlen(f"imagepub:job:{sample}")
    from service.jobstore import JobStore

    json_len = len(json.dumps(JobStore(full.redis).get(sample), separators=(",", ":")))
    indexes = sorted(k for k in full.redis.scan_iter("imagepub:jobs*", count=1000))
    index_bytes = sum(full.redis.memory_usage(k, samples=0) or 0 for k in indexes if full.redis.zcard(k) >= args.jobs // 2)
    lines = [f"{args.jobs:,} finished publish jobs written with JobStore.create() + JobStore.save(state=succeeded), "
             f"pipelined, in {took:.1f} s. `INFO memory` used_memory grew by {(after - before) / MiB:.1f} MiB: "
             f"**{per_job:,.0f} bytes per job**.", "",
             "| where a finished job's bytes are | bytes per job |", "| --- | ---: |"]
    for label, size in breakdown.items():
        lines.append(f"| {label} (MEMORY USAGE of one job) | {size:,} |")
    lines.append(f"| the listing indexes (sorted sets holding every job: {sum(1 for k in indexes if full.redis.zcard(k) >= args.jobs // 2)}) | "
                 f"{index_bytes / args.jobs:,.0f} |")
    lines.append(f"| (the record is {json_len:,} characters of JSON, stored compact in {stored_len:,}: "
                 f"service/jobstore.py) | |")
    # What stays for the retention period: keys that expire within a day (a finished job's event
    # history, say) are gone a day later; the store of 100k finished jobs is mostly that old.
    time.sleep(0.5)
    removed = expire_within(full.redis_url, 86400)
    later = redis_used_memory(full.redis_url)
    steady = (later - before) / args.jobs
    log(f"a day later ({removed:,} keys that expire within 24 h removed): {steady:,.0f} B/job")
    res.add("5 scale", "Redis memory per finished job, a day after it ended", f"{steady:,.0f} B",
            f"{per_job:,.0f} B right after it ended", None, "≤ 2048 B", steady <= 2048)
    lines += ["", f"A day later: the keys that expire within 24 hours ({removed:,}: the finished jobs' event histories, "
                  f"kept an hour after the end) removed without waiting, used_memory is {(later - before) / MiB:.1f} MiB above "
                  f"the empty store: **{steady:,.0f} bytes per job** for the rest of the retention period."]
    res.detail("Store size (target 5)", *lines)

    # A page of the job list: 100 jobs in the store vs 100k (first page, a page deep in the
    # middle, a filtered page, and a page of 10 to show the cost follows the page size).
    deep = ids[len(ids) // 2]
    pages = [
        ("first page of 100, store of 100 jobs", empty, "/v1/jobs?limit=100"),
        ("first page of 100, store of 100k jobs", full, "/v1/jobs?limit=100"),
        ("page of 100 at job 50,000 (cursor), 100k jobs", full, f"/v1/jobs?limit=100&cursor={deep}"),
        ("first page of 100, state=succeeded, 100k jobs", full, "/v1/jobs?limit=100&state=succeeded"),
        ("first page of 10, store of 100k jobs", full, "/v1/jobs?limit=10"),
    ]
    env = {"BENCH_TOKEN": TOKEN}
    for label, svc, path in pages:
        r = svc.http.get(svc.url + path)
        assert r.status_code == 200 and len(r.json()["jobs"]) in (10, 100), (label, r.status_code, r.text[:300])
        wrk(label, svc.url + path, duration=1, connections=1, env=env, log=log.raw)  # warm-up
    per_page: dict[str, list[WrkResult]] = {label: [] for label, _, _ in pages}
    for r in range(args.rounds):
        for label, svc, path in (pages if r % 2 == 0 else list(reversed(pages))):
            result = wrk(label, svc.url + path, duration=args.list_seconds, connections=1, env=env, log=log.raw)
            if result.failures:
                raise RuntimeError(f"listing {label}: {result.non_2xx} responses not 2xx, {result.socket_errors} socket errors")
            per_page[label].append(result)
    lat = {label: merge(label, results) for label, results in per_page.items()}
    for label, result in lat.items():
        log(f"listing: {label}: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms")
    small = lat[pages[0][0]].p50_ms
    for label in (pages[1][0], pages[2][0]):
        x = lat[label].p50_ms
        q = median([a.p50_ms / b.p50_ms for a, b in zip(per_page[label], per_page[pages[0][0]])])
        res.add("5 scale", f"GET /v1/jobs: {label} (median latency)", f"{x:.2f} ms", f"{small:.2f} ms (100 jobs)",
                q, "≤ 1.20× (O(page size))", q <= 1.2)
    table = [f"| page (one connection, sequential requests; {args.rounds} interleaved rounds of {args.list_seconds:.0f} s) | p50 | p99 | req/s |",
             "| --- | ---: | ---: | ---: |"]
    for label, result in lat.items():
        table.append(f"| {label} | {result.p50_ms:.2f} ms | {result.p99_ms:.2f} ms | {result.rps:,.0f} |")
    res.detail("Store size (target 5)", "", *table)
    empty.redis.flushdb()  # "empty store" for the HTTP phase


# --- phase: job overhead of a pure tag push (target 4) -------------------------------------------


def follow(svc: Imagepub, body: dict[str, Any], path: str = "/v1/publish") -> tuple[float, dict[str, Any]]:
    """POST, then follow the job's SSE stream to its terminal event, on one kept-alive connection
    with http.client: (seconds, final job)."""
    conn = svc.connection()
    wall0 = time.time()
    t0 = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body).encode(), headers={**auth_headers(), "Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = resp.read()
    if resp.status != 202:
        raise RuntimeError(f"POST {path} answered {resp.status}: {answer[:300]!r}")
    job_id = json.loads(answer)["id"]
    conn.request("GET", f"/v1/jobs/{job_id}/events", headers=auth_headers())
    events = conn.getresponse()
    if events.status != 200:
        raise RuntimeError(f"GET /v1/jobs/{job_id}/events answered {events.status}: {events.read()[:300]!r}")
    while line := events.readline():
        if line.startswith(b"data: "):
            job = json.loads(line[6:])
            if job["state"] in TERMINAL:
                seconds = time.perf_counter() - t0
                events.read()  # the stream ends after the terminal event: the connection is ready for the next job
                svc.rested_since = time.monotonic()
                job["_client"] = {"posted": wall0, "seen": wall0 + seconds}
                return seconds, job
    raise RuntimeError(f"job {job_id}: the event stream closed before a terminal state")


WAKE_GAP = 0.05  # s of rest before a round trip that finds its server idle


def wake_up_cost(server, n: int = 150) -> tuple[list[float], list[float]]:
    """Round trips of ``GET /`` on a kept-alive connection: right after the previous one (the
    server's process and CPU busy a moment ago) and after WAKE_GAP of rest, alternating."""
    conn = server.connection()
    warm, idle = [], []

    def trip() -> float:
        t0 = time.perf_counter()
        conn.request("GET", "/")
        conn.getresponse().read()
        return time.perf_counter() - t0

    trip()
    for _ in range(n):
        time.sleep(WAKE_GAP)
        idle.append(trip())
        warm.append(trip())
    server.rested_since = time.monotonic()
    return warm, idle


def _epoch(stamp: str) -> float:
    from datetime import datetime, timezone

    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def daemon_calls(stack, image: str, repository: str, n: int) -> dict[str, list[float]]:
    """The daemon calls of one pure tag push, as the worker makes them, each timed."""
    client = stack.docker()
    api = client.api
    repo = f"{stack.registry}/{repository}"
    image_id = api.inspect_image(image)["Id"]
    head = ManifestHead(stack.registry, verify=False, plain_http_allowed=True)  # as workers/publish.py:served_digest
    out: dict[str, list[float]] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        if name.startswith("push"):
            result = list(result)
        out.setdefault(name, []).append(time.perf_counter() - t0)
        return result

    try:
        for i in range(n):
            tag = f"calls-{i}"
            timed("tag (POST /images/{id}/tag)", api.tag, image_id, repo, tag, force=True)
            timed("push, whole stream (POST /images/{name}/push)", api.push, repo, tag=tag, stream=True, decode=True, auth_config={})
            timed("inspect (GET /images/{id}/json)", api.inspect_image, image_id)
            timed("registry digest, from the worker (HEAD /v2/{name}/manifests/{tag}, kept-alive)", head.digest, repository, tag, {})
            timed("registry digest, through the daemon (GET /distribution/{ref}/json; no longer called)",
                  api.inspect_distribution, f"{repo}:{tag}", auth_config={})
            timed("untag (DELETE /images/{ref}?noprune=1)", api.remove_image, f"{repo}:{tag}", noprune=True)
    finally:
        client.close()
    return out


HANDOFF = {
    "created_at → the worker's main process reads the message (the API's storing, the wake-up)": ("created", "read"),
    "→ kombu records it as delivered (in memory)": ("read", "held"),
    "→ Celery's task request is made": ("held", "received"),
    "→ a pool process starts the task (the prefork hand-off: a pipe, a wake-up)": ("received", "prerun"),
    "→ the job's lease and record are taken: started_at (one Redis round trip)": ("prerun", "started"),
}


def handoff_segments(marks: Path, jobs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each job's hand-off, from the worker's marks (bench/marks/sitecustomize.py) between its
    created_at and started_at: the jobs ran one at a time, so each mark of that window is the
    job's. Jobs missing a mark (none when all goes well) are left out."""
    moments = sorted((float(t), what) for path in marks.iterdir() for t, what in (line.split() for line in path.read_text().splitlines()))
    out: dict[str, list[float]] = {name: [] for name in HANDOFF}
    for job in jobs:
        created, started = _epoch(job["created_at"]), _epoch(job["started_at"])
        seen = {"created": created, "started": started}
        for t, what in moments:
            if created <= t <= started:
                seen.setdefault(what, t)
        if all(a in seen and b in seen for a, b in HANDOFF.values()):
            for name, (a, b) in HANDOFF.items():
                out[name].append(seen[b] - seen[a])
    return out if all(out.values()) else {}


def job_timeline(svc: Imagepub, job: dict[str, Any]) -> list[str]:
    entries = svc.redis.xrange(f"imagepub:job:{job['id']}:events")
    if not entries:
        return []
    start = _epoch(job["created_at"])
    lines = ["| ms after created_at | event | state | target | layers | references |", "| ---: | --- | --- | --- | --- | ---: |"]
    for _, fields in entries:
        snap = json.loads(fields["job"])
        target = (snap.get("targets") or [{}])[0]
        layers: dict[str, int] = {}
        for layer in target.get("layers") or []:
            layers[layer["status"]] = layers.get(layer["status"], 0) + 1
        lines.append(f"| {(_epoch(snap['updated_at']) - start) * 1000:.1f} | {fields['type']} | {snap['state']} | "
                     f"{target.get('state', '')} | {', '.join(f'{n} {k}' for k, n in layers.items())} | {len(target.get('references') or [])} |")
    return lines


def cli_push(env: dict[str, str], image: str, ref: str) -> float:
    """``docker tag IMAGE REF && docker push REF`` with the CLI: seconds."""
    t0 = time.perf_counter()
    for argv in ([DOCKER, "tag", image, ref], [DOCKER, "push", ref]):
        out = subprocess.run(argv, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return time.perf_counter() - t0


def jobs_phase(stack, args, res: Results, log: Log, svc: Imagepub) -> None:
    env = cli_env(stack, stack.tmp / "bench-docker-cli")
    stack.build_image("bench-tagpush:src", layers=3, layer_bytes=1 * MiB)
    repo = f"{stack.registry}/bench/tagpush"
    cli_push(env, "bench-tagpush:src", f"{repo}:seed")  # the layers are now in the target
    floor = Handoff(stack, redis_db=3).start()
    svc_times, cli_times, outside, push_times, floor_outside = [], [], [], [], []
    segments: dict[str, list[float]] = {"POST sent → job stored (created_at)": [], "created_at → started_at (queue, Celery dispatch, worker pick-up)": [],
                                        "started_at → finished_at (the push, verification, bookkeeping)": [],
                                        "finished_at → client sees the terminal event (SSE)": []}
    footprint = None
    last_job = None
    measured_jobs = []
    total = args.tag_pushes + 3
    for i in range(total):
        warm = i < 3
        pair = []
        for who in (("svc", "cli") if i % 2 == 0 else ("cli", "svc")):
            if who == "svc":
                seconds, job = follow(svc, {"source": "bench-tagpush:src",
                                            "targets": [{"registry": "local", "repository": "bench/tagpush", "tags": [f"svc-{i}"]}]})
                if job["state"] != "succeeded":
                    raise RuntimeError(f"tag-push job failed: {job.get('error')}")
                layers = {layer["status"] for layer in job["targets"][0]["layers"]}
                if layers - {"exists"}:
                    raise RuntimeError(f"not a pure tag push: layer statuses {layers}")
                push = _epoch(job["finished_at"]) - _epoch(job["started_at"])
                pair.append(f"service {ms(seconds)} (push {ms(push)})")
                last_job = job
                if not warm:
                    measured_jobs.append(job)
                    svc_times.append(seconds)
                    push_times.append(push)
                    outside.append(seconds - push)
                    marks = [job["_client"]["posted"], _epoch(job["created_at"]), _epoch(job["started_at"]),
                             _epoch(job["finished_at"]), job["_client"]["seen"]]
                    for name, a, b in zip(segments, marks, marks[1:]):
                        segments[name].append(b - a)
                    if footprint is None:
                        key = f"imagepub:job:{job['id']}"
                        footprint = (svc.redis.memory_usage(key, samples=0), svc.redis.memory_usage(key + ":events", samples=0),
                                     svc.redis.xlen(key + ":events"))
            else:
                seconds = cli_push(env, "bench-tagpush:src", f"{repo}:cli-{i}")
                pair.append(f"CLI {ms(seconds)}")
                if not warm:
                    cli_times.append(seconds)
        seconds, job = follow(floor, {})
        floor_seconds = seconds - (_epoch(job["finished_at"]) - _epoch(job["started_at"]))
        pair.append(f"floor {ms(seconds)} (outside {ms(floor_seconds)})")
        if not warm:
            floor_outside.append(floor_seconds)
        log(f"tag push {i + 1}/{total}{' (warm-up)' if warm else ''}: " + ", ".join(pair), quiet=warm)
    warm_trips, idle_trips = wake_up_cost(floor)
    floor.stop()
    handoff = handoff_segments(svc.marks, measured_jobs) if svc.marks else {}
    timeline = job_timeline(svc, last_job) if last_job else []
    calls = daemon_calls(stack, "bench-tagpush:src", "bench/tagpush", max(5, args.tag_pushes // 2))
    s, c, o = median(svc_times), median(cli_times), median(outside)
    res.add("4 job overhead", "pure tag push: POST → terminal state seen (SSE), median", ms(s),
            f"{ms(c)} (docker tag && docker push)", s / c, "≤ 0.70×", s / c <= 0.7)
    res.add("4 job overhead", "time outside the push (total − (finished_at − started_at)), median", f"{o * 1000:.1f} ms", "—",
            None, "≤ 5 ms", o <= 0.005)
    fo = median(floor_outside)
    res.add("4 job overhead", "the floor: the same, for a job that does nothing, through a bare API, a Redis list and a bare "
            "worker process (bench/handoff.py), median", f"{fo * 1000:.1f} ms", "—", None,
            "— (no design with an API, a queue and a worker process passes it on this machine)", None)
    res.detail("Job overhead (target 4)",
               f"{len(svc_times)} alternating pairs after 3 warm-up pairs; a 3-layer image (3 × 1 MiB) whose layers are already "
               f"in the plain registry; every service job reported every layer `exists`. The client posts the job and follows "
               f"`GET /v1/jobs/{{id}}/events` (SSE) until the terminal event, both on one kept-alive connection with "
               f"http.client (with requests, which this bench used until 2026-12-01, the client's own Python added ~2 ms "
               f"a job here: 8.8 against 11.0 ms outside the push, medians of 20 jobs each, alternating). "
               f"The CLI baseline runs `/usr/bin/docker tag` then `/usr/bin/docker push` against the same private daemon. "
               f"After each pair, the floor: the same client follows a job through `bench/handoff.py` (a bare WSGI app under "
               f"the same gunicorn that pushes the job's id onto a Redis list and streams the job's Redis stream, and a bare "
               f"worker process blocked on that list that writes `running`, then `succeeded`: the hand-offs of any design "
               f"with an API, a queue and a worker process, and no work).", "",
               "| | median | min | max |", "| --- | ---: | ---: | ---: |",
               f"| service: POST → terminal event | {ms(s)} | {ms(min(svc_times))} | {ms(max(svc_times))} |",
               f"| service: the job's own push (finished_at − started_at) | {ms(median(push_times))} | {ms(min(push_times))} | {ms(max(push_times))} |",
               f"| service: outside the push | {ms(o)} | {ms(min(outside))} | {ms(max(outside))} |",
               f"| the floor (bench/handoff.py): outside its empty push | {ms(fo)} | {ms(min(floor_outside))} | "
               f"{ms(max(floor_outside))} |",
               f"| CLI: docker tag && docker push | {ms(c)} | {ms(min(cli_times))} | {ms(max(cli_times))} |", "",
               "Where a service job's time goes (the client's clock and the job's timestamps: one machine, one clock):", "",
               "| segment | median | min | max |", "| --- | ---: | ---: | ---: |",
               *[f"| {name} | {ms(median(v))} | {ms(min(v))} | {ms(max(v))} |" for name, v in segments.items()])
    res.detail("Job overhead (target 4)", "",
               f"What a hand-off between processes costs on this machine: a round trip of `GET /` to the floor's bare app "
               f"(same client, kept-alive connection), {len(warm_trips)} times right after the previous one and "
               f"{len(idle_trips)} times after {WAKE_GAP * 1000:.0f} ms of rest (as each hand-off of a job finds the process "
               f"it wakes: a CPU that was idle, caches that other processes used): medians {ms(median(warm_trips))} and "
               f"{ms(median(idle_trips))}.")
    if handoff:
        res.detail("Job overhead (target 4)", "", "Inside created_at → started_at: the moments of the hand-off, marked in the "
                   "worker's processes by bench/marks/sitecustomize.py (one write to an open file each), for "
                   f"{len(next(iter(handoff.values())))} of the measured jobs:", "",
                   "| segment | median | min | max |", "| --- | ---: | ---: | ---: |",
                   *[f"| {name} | {ms(median(v))} | {ms(min(v))} | {ms(max(v))} |" for name, v in handoff.items()])
    if calls:
        res.detail("Job overhead (target 4)", "", "The Docker Engine API calls a pure tag push makes in the worker "
                   "(workers/publish.py:_push_tag, docker_engine.py), timed one by one with docker-py against the same daemon "
                   "and registry (medians):", "", "| call | median |", "| --- | ---: |",
                   *[f"| {name} | {ms(median(v))} |" for name, v in calls.items()])
    if timeline:
        res.detail("Job overhead (target 4)", "", "The last measured job's own record of its run (the snapshots in its events "
                   "stream, each written by the worker with `updated_at`):", "", *timeline)
    if footprint:
        # here, not under "Store size": a run of this phase alone replaces only its own sections
        res.detail("Job overhead (target 4)", "",
                   f"A real finished tag-push job from this phase takes {footprint[0]:,} bytes for its record and "
                   f"{footprint[1]:,} bytes for its events stream ({footprint[2]} snapshots), besides its index entries.")


def fresh_phase(stack, args, res: Results, log: Log, svc: Imagepub) -> None:
    env = cli_env(stack, stack.tmp / "bench-docker-cli")
    layers, size = 3, args.fresh_mib * MiB // 3
    svc_times, cli_times = [], []
    log(f"building {2 * args.fresh_pushes} images of {args.fresh_mib} MiB (fresh content each)")
    for i in range(args.fresh_pushes):
        stack.build_image(f"bench-fresh-svc{i}:src", layers=layers, layer_bytes=size)
        stack.build_image(f"bench-fresh-cli{i}:src", layers=layers, layer_bytes=size)
    for i in range(args.fresh_pushes):
        for who in (("svc", "cli") if i % 2 == 0 else ("cli", "svc")):
            if who == "svc":
                seconds, job = follow(svc, {"source": f"bench-fresh-svc{i}:src",
                                            "targets": [{"registry": "local", "repository": f"bench/fresh-svc{i}", "tags": ["v1"]}]})
                if job["state"] != "succeeded":
                    raise RuntimeError(f"fresh push job failed: {job.get('error')}")
                pushed = sum(1 for layer in job["targets"][0]["layers"] if layer["status"] == "pushed")
                if pushed != layers:
                    raise RuntimeError(f"not a fresh push: {pushed} of {layers} layers pushed")
                svc_times.append(seconds)
            else:
                cli_times.append(cli_push(env, f"bench-fresh-cli{i}:src", f"{stack.registry}/bench/fresh-cli{i}:v1"))
        log(f"fresh {args.fresh_mib} MiB push {i + 1}/{args.fresh_pushes}: service {svc_times[-1]:.2f} s, CLI {cli_times[-1]:.2f} s")
    s, c = median(svc_times), median(cli_times)
    res.add("4 job overhead", f"fresh {args.fresh_mib} MiB push (3 layers), median", f"{s:.2f} s", f"{c:.2f} s (docker tag && docker push)",
            s / c, "≤ 1.02×", s / c <= 1.02)
    res.detail("Job overhead (target 4)", "",
               f"Fresh push: {args.fresh_pushes} alternating pairs, each side pushing an image of its own with new random "
               f"content ({layers} layers, {args.fresh_mib} MiB) to a new repository of the plain registry. "
               f"Service: {', '.join(f'{x:.2f} s' for x in svc_times)}; CLI: {', '.join(f'{x:.2f} s' for x in cli_times)}.")


# --- phase: 50 concurrent publishes to ECR (target 6) --------------------------------------------


def burst_phase(stack, args, res: Results, log: Log, svc: Imagepub, proxy) -> None:
    import boto3

    n = args.burst
    ecr = boto3.client("ecr", endpoint_url=stack.moto_url, region_name=stack.ecr_region,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    for name in ("bench/burst", "bench/burst-cli"):
        ecr.create_repository(repositoryName=name)  # straight to moto: not counted by the proxy
    stack.build_image("bench-burst:src", layers=3, layer_bytes=4 * MiB)
    stack.build_image("bench-burst-cli:src", layers=3, layer_bytes=4 * MiB)
    for key in svc.redis.scan_iter("imagepub:ecr-token:*"):
        svc.redis.delete(key)
    proxy.reset()
    proxy.expires_in = 12 * 3600  # as real ECR answers
    stack.ecr_registry.reset()

    bodies = [{"source": "bench-burst:src", "targets": [{"registry": "ecr", "repository": "bench/burst", "tags": [f"t{i}"]}]}
              for i in range(n)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        ids = [job["id"] for job in pool.map(svc.submit, bodies)]
    submitted = time.perf_counter() - t0
    pending, done = set(ids), {}
    while pending:
        for job_id in list(pending):
            job = svc.get(job_id)
            if job["state"] in TERMINAL:
                done[job_id] = job
                pending.discard(job_id)
        if time.perf_counter() - t0 > 600:
            raise RuntimeError(f"{len(pending)} burst jobs unfinished after 600 s")
        if pending:
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    states = {job["state"] for job in done.values()}
    token_fetches = proxy.calls["GetAuthorizationToken"]
    pushed: dict[str, int] = {}
    for job in done.values():
        for layer in job["targets"][0]["layers"]:
            if layer["status"] == "pushed":
                pushed[layer["id"]] = pushed.get(layer["id"], 0) + 1
    uploads = [(m, p, s) for m, p, s in stack.ecr_registry.requests() if "/v2/bench/burst/blobs/uploads/" in p]
    completed = sum(1 for m, p, s in uploads if m == "PUT" and s == 201)
    started = sum(1 for m, p, s in uploads if m == "POST")
    image = stack.docker().api.inspect_image("bench-burst:src")
    blobs = len(image["RootFS"]["Layers"]) + 1  # the layers and the image config
    twice = sum(c - 1 for c in pushed.values() if c > 1)
    log(f"burst: {n} jobs in {wall:.2f} s (submitted in {submitted:.2f} s), states {sorted(states)}, "
        f"{token_fetches} GetAuthorizationToken, layers pushed {pushed}, blob uploads started {started} / completed {completed} "
        f"for {blobs} blobs")

    cli = cli_env(stack, stack.tmp / "bench-docker-cli-ecr")
    t1 = time.perf_counter()
    login = subprocess.run([DOCKER, "login", "--username", stack.ecr_user, "--password-stdin", f"https://{stack.ecr_host}"],
                           input=stack.ecr_password, env=cli, capture_output=True, text=True)
    if login.returncode != 0:
        raise RuntimeError(f"docker login to the emulated ECR failed: {login.stderr.strip()}")
    for i in range(n):
        cli_push(cli, "bench-burst-cli:src", f"{stack.ecr_host}/bench/burst-cli:t{i}")
    cli_wall = time.perf_counter() - t1
    log(f"burst baseline: docker login + {n} sequential docker tag && docker push: {cli_wall:.2f} s")

    res.add("6 concurrency", f"{n} concurrent publishes to ECR: all succeeded", ", ".join(sorted(states)), "—", None,
            "succeeded", states == {"succeeded"})
    res.add("6 concurrency", "GetAuthorizationToken calls (at the ECR API seam)", str(token_fetches), "—", None, "1", token_fetches == 1)
    res.add("6 concurrency", "layers uploaded twice: extra `pushed` in job records; blob uploads at the ECR registry seam",
            f"{twice} extra; {completed} uploads for {blobs} blobs", "—", None, "0 extra; uploads = blobs",
            twice == 0 and completed <= blobs)
    res.add("6 concurrency", f"wall time of {n} publishes submitted at once", f"{wall:.2f} s",
            f"{cli_wall:.2f} s ({n} sequential CLI pushes)", wall / cli_wall, "reported", None)
    res.detail("Concurrency (target 6)",
               f"{n} `POST /v1/publish` of one 3-layer image (3 × 4 MiB, not yet in ECR) to {n} tags of one ECR repository, "
               f"sent at once from {n} threads (all accepted in {submitted:.2f} s), with one `imagepub worker` at its default "
               f"concurrency; the ECR API proxy (tests/ecr_api_proxy.py) answers GetAuthorizationToken with expiresAt = now + 12 h "
               f"as real ECR does, and counts calls. The wall time runs from the first POST to the client seeing the last job "
               f"end (polling GET /v1/jobs/{{id}} every 50 ms). Baseline: `docker login` to the emulated ECR, then {n} sequential "
               f"`docker tag && docker push` of another image of the same size to another repository.", "",
               f"- ECR API calls: {dict(proxy.calls)}",
               f"- layers reported `pushed` across all {n} jobs: {sum(pushed.values())} (per layer: {sorted(pushed.values())}); "
               f"blob uploads at the ECR registry seam: {started} started, {completed} completed, for {blobs} blobs "
               f"(3 layers + config)")


# --- the run -------------------------------------------------------------------------------------


def render_table(rows: list[Row]) -> list[str]:
    head = ["target", "what", "measured", "baseline (same run)", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 4 + [" ---: ", " --- ", " --- "]) + "|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return lines


def print_table(rows: list[Row]) -> None:
    cells = [["target", "what", "measured", "baseline", "ratio", "target", "met"]] + [r.cells() for r in rows]
    cells = [[c.replace("**", "") for c in row] for row in cells]
    widths = [min(max(len(row[i]) for row in cells), 70) for i in range(len(cells[0]))]
    for n, row in enumerate(cells):
        print("  ".join(c[:70].ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


DOCUMENT = REPO / "docs" / "benchmarks.md"  # what a run rewrites unless told otherwise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short smoke run (fewer rounds and pushes; numbers are rough)")
    p.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {','.join(PHASES)} (default: all)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per HTTP load (default 4)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 5)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--jobs", type=int, default=100_000, help="finished jobs in the big store (default 100000)")
    p.add_argument("--tag-pushes", type=int, help="measured tag-push pairs (default 15)")
    p.add_argument("--fresh-pushes", type=int, help="fresh-push pairs (default 8)")
    p.add_argument("--fresh-mib", type=int, default=150, help="size of the fresh image (default 150)")
    p.add_argument("--burst", type=int, default=50, help="concurrent publishes to ECR (default 50)")
    p.add_argument("--copies", type=int, help="rounds of the copy phase, each copying one image three ways (default 3)")
    p.add_argument("--copy-mib", type=int, default=150, help="size of the copied image (default 150)")
    p.add_argument("--followers", type=int, default=1000, help="SSE followers in the followers phase (default 1000)")
    p.add_argument("--follow-jobs", type=int, default=50, help="running jobs they follow (default 50)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy profiles")
    p.add_argument("--output", default=str(DOCUMENT), help="where to write the results (default docs/benchmarks.md)")
    p.add_argument("--no-write", dest="write", action="store_false", help="print the table only")
    p.add_argument("--worker-pool", choices=("prefork", "solo", "threads"), default="prefork",
                   help="an experiment: the jobs phases' worker on another Celery pool (default prefork, as imagepub runs); "
                        "its rows are not imagepub's, so it needs --output or --no-write")
    args = p.parse_args(argv)
    if args.worker_pool != "prefork" and args.write and Path(args.output).resolve() == DOCUMENT.resolve():
        p.error("--worker-pool is an experiment: its rows do not go into docs/benchmarks.md; give --output PATH or --no-write")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 4)
    args.duration = args.duration or (2.0 if quick else 5.0)
    args.warmup = 1.0 if quick else 2.0
    args.tag_pushes = args.tag_pushes or (5 if quick else 15)
    args.fresh_pushes = args.fresh_pushes or (1 if quick else 8)
    args.copies = args.copies or (1 if quick else 3)
    args.list_seconds = 1.0 if quick else 2.0
    args.profile_seconds = 4.0 if quick else 8.0
    if quick and args.jobs == 100_000:
        args.jobs = 20_000
    args.phases = [x.strip() for x in args.only.split(",") if x.strip()]
    if {"jobs", "fresh"} & set(args.phases):  # one target (4), one section of the report: measured together
        args.phases = [x for x in PHASES if x in set(args.phases) | {"jobs", "fresh"}]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stack import start_stack  # tests/ (put on sys.path by stack_services)
    from ecr_api_proxy import EcrApiProxy

    from . import report

    log = Log()
    res = Results()
    log(f"imagepub benchmarks: phases {', '.join(args.phases)}; log {log.path}")
    t_start = time.monotonic()
    with start_stack() as stack:
        res.machine = machine.describe(stack)
        log(f"stack up: {stack!r}")
        # The stack's Redis keeps an append-only file (its reliability tests restart Redis). With
        # 100k jobs written, Redis rewrites that file in a forked child that takes one of the two
        # cores for seconds, halving whatever load runs meanwhile. The benchmark measures imagepub,
        # so persistence is off, as TESTBED.md runs Redis for tests.
        import redis as redis_py

        infra = redis_py.Redis.from_url(stack.redis_url)
        infra.config_set("appendonly", "no")
        infra.config_set("save", "")
        infra.close()
        res.settings["redis"] = "persistence off for the run (CONFIG SET appendonly no, save \"\")"
        services: dict[str, Any] = {}

        def phase(name: str, fn, *fn_args) -> bool:
            """Run one phase; a failure is recorded (and logged) and the next phase still runs."""
            try:
                fn(*fn_args)
                return True
            except Exception as exc:  # noqa: BLE001 - keep what was measured, say what broke
                res.errors.append(f"phase {name}: {exc.__class__.__name__}: {exc}")
                log(f"phase {name} failed:\n" + "".join(traceback.format_exception(exc)))
                return False

        def start_http_services() -> None:
            services["hello"] = Hello(stack).start()
            services["hello-gthread"] = Hello(stack, "gthread").start()
            services["empty"] = Imagepub(stack, "empty", 0).start_api()
            if {"http", "scale"} & set(args.phases):  # the loads' floor (http_phase)
                services["floor"] = Floor(stack, services["empty"], json.dumps(publish_body(stack))).start()
            if "scale" in args.phases:
                services["full"] = Imagepub(stack, "full", 1).start_api()

        if {"http", "scale", "followers"} & set(args.phases) and phase("start", start_http_services):
            if "scale" in args.phases:
                log("phase scale: store of 100k finished jobs, memory, listing")
                if not phase("scale", scale_phase, stack, args, res, log, services):
                    services.pop("full").stop()  # its store is not what the comparison needs
            if {"http", "scale"} & set(args.phases):  # scale's comparisons are made by the HTTP loads
                log("phase http: throughput and latency against hello-world")
                phase("http", http_phase, stack, args, res, log, services)
            if "followers" in args.phases:
                log(f"phase followers: {args.followers} SSE followers of {args.follow_jobs} running jobs")
                phase("followers", followers_phase, stack, args, res, log, services["empty"], publish_body, seed_ids, median)
        for name in ("hello", "hello-gthread", "empty", "floor", "full"):
            if name in services:
                services.pop(name).stop()
        if {"jobs", "fresh", "burst", "copy"} & set(args.phases):
            proxy = EcrApiProxy(stack.moto_url)
            try:
                pool = {} if args.worker_pool == "prefork" else {"IMAGEPUB_BENCH_WORKER_POOL": args.worker_pool}
                if pool:
                    res.settings["worker pool"] = f"{args.worker_pool} (an experiment: imagepub's worker runs prefork)"
                svc = Imagepub(stack, "jobs", 2, env={"AWS_ENDPOINT_URL_ECR": proxy.url, **pool}, marks=True)

                def start_jobs_service() -> None:
                    svc.start_api()
                    svc.start_worker()

                if phase("start", start_jobs_service):
                    if "jobs" in args.phases:
                        log("phase jobs: overhead of a pure tag push")
                        phase("jobs", jobs_phase, stack, args, res, log, svc)
                    if "fresh" in args.phases:
                        log(f"phase fresh: {args.fresh_mib} MiB push")
                        phase("fresh", fresh_phase, stack, args, res, log, svc)
                    if "burst" in args.phases:
                        log(f"phase burst: {args.burst} concurrent publishes to ECR")
                        phase("burst", burst_phase, stack, args, res, log, svc, proxy)
                    if "copy" in args.phases:
                        log(f"phase copy: {args.copy_mib} MiB registry to registry, three ways")
                        phase("copy", copy_phase, stack, args, res, log, svc, follow, cli_env, _epoch)
                svc.stop()
            finally:
                proxy.close()
        res.machine["load average at end"] = machine.load_average()
    res.settings["duration"] = f"{time.monotonic() - t_start:.0f} s"
    res.rows.sort(key=lambda row: int(row.section.split()[0]))  # by target number (phases run in another order)
    print()
    print_table(res.rows)
    for error in res.errors:
        print(f"\nERROR: {error}", file=sys.stderr)
    if args.write:
        path = report.write(Path(args.output), res, args)
        log(f"results written to {path}")
    log(f"log: {log.path}")
    return 1 if res.errors else 0
