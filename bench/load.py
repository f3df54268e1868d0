"""Load generation with wrk (Debian's ``wrk``) and the Lua scripts in ``bench/lua``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent / "lua"


@dataclass
class WrkResult:
    """One wrk run: requests/s, latency percentiles (ms), and every kind of failure."""

    name: str
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    raw: str = field(default="", repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failures(self) -> int:
        return self.non_2xx + self.socket_errors

    def brief(self) -> str:
        return (f"{self.name}: {self.rps:,.0f} req/s, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, "
                f"{self.requests} requests, {self.non_2xx} non-2xx, {self.socket_errors} socket errors")


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: `wrk` is not installed (Debian package wrk; scripts/bootstrap installs it)")
    return found


def wrk(name: str, url: str, *, script: str = "get.lua", duration: float = 6.0, connections: int = 32,
        threads: int = 1, env: dict[str, str] | None = None, timeout_s: int = 10, log=None) -> WrkResult:
    """Run wrk against ``url`` and parse the summary line that ``lua/common.lua`` prints."""
    argv = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            f"--timeout={timeout_s}s", "--latency", "-s", str(LUA_DIR / script), url]
    full_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    full_env.update({"BENCH_LUA_DIR": str(LUA_DIR), **(env or {})})
    out = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=duration + 60)
    if log is not None:
        log(f"$ {' '.join(argv)}\n{out.stdout}{out.stderr}")
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    data = json.loads(line.removeprefix("BENCH_RESULT "))
    lat = data["latency_us"]
    return WrkResult(
        name=name,
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        non_2xx=data["status_errors"],
        socket_errors=data["connect_errors"] + data["read_errors"] + data["write_errors"] + data["timeouts"],
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        mean_ms=lat["mean"] / 1000,
        raw=out.stdout,
    )


def merge(name: str, runs: list[WrkResult]) -> WrkResult:
    """Several runs of one load as one: total requests over total time; latency percentiles are
    the median of the runs' percentiles (wrk does not export its histogram)."""
    def median(values):
        values = sorted(values)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    return WrkResult(
        name=name,
        requests=sum(r.requests for r in runs),
        seconds=sum(r.seconds for r in runs),
        non_2xx=sum(r.non_2xx for r in runs),
        socket_errors=sum(r.socket_errors for r in runs),
        p50_ms=median([r.p50_ms for r in runs]),
        p90_ms=median([r.p90_ms for r in runs]),
        p99_ms=median([r.p99_ms for r in runs]),
        max_ms=max(r.max_ms for r in runs),
        mean_ms=sum(r.mean_ms * r.requests for r in runs) / max(1, sum(r.requests for r in runs)),
    )
