"""Cost accounting around a load run: CPU seconds of the gunicorn workers (from /proc), Redis CPU
and the Redis commands it executed (INFO cpu / commandstats), and how busy the whole machine was
(/proc/stat) — so a ratio can be explained by what one request costs, and a noisy neighbour shows."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (gunicorn's arbiter and workers)."""
    return _cpu_seconds(pid) + sum(_cpu_seconds(c) for c in _children(pid))


def _machine_busy() -> tuple[float, float]:
    """(busy seconds, total seconds) of all CPUs since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / TICK, total / TICK


@dataclass
class Cost:
    requests: int = 0
    server_cpu: float = 0.0
    redis_cpu: float = 0.0
    machine_busy: float = 0.0
    machine_total: float = 0.0
    forks: int = 0
    commands: Counter = field(default_factory=Counter)

    def add(self, other: "Cost") -> None:
        self.requests += other.requests
        self.server_cpu += other.server_cpu
        self.redis_cpu += other.redis_cpu
        self.machine_busy += other.machine_busy
        self.machine_total += other.machine_total
        self.forks += other.forks
        self.commands.update(other.commands)

    def per_request_us(self, seconds: float) -> float:
        return 1e6 * seconds / self.requests if self.requests else 0.0

    def commands_per_request(self) -> float:
        return sum(self.commands.values()) / self.requests if self.requests else 0.0

    def command_mix(self, limit: int = 8) -> str:
        if not self.requests:
            return ""
        return ", ".join(f"{name} {count / self.requests:.2f}" for name, count in self.commands.most_common(limit)
                         if count / self.requests >= 0.01)


class Meter:
    def __init__(self, server_pid: int, redis_url: str):
        self.pid = server_pid
        self.redis = redis.Redis.from_url(redis_url)

    def _snapshot(self):
        info = self.redis.info("cpu")
        stats = self.redis.info("commandstats")
        forks = int(self.redis.info("stats").get("total_forks", 0))
        commands = Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})
        return _tree_cpu(self.pid), info["used_cpu_sys"] + info["used_cpu_user"], commands, _machine_busy(), forks

    def start(self) -> None:
        self._before = self._snapshot()

    def stop(self, requests: int) -> Cost:
        after = self._snapshot()
        before = self._before
        commands = after[2] - before[2]
        # the meter's own INFO calls are not the load's
        for name in ("info",):
            commands.pop(name, None)
        return Cost(requests=requests, server_cpu=after[0] - before[0], redis_cpu=after[1] - before[1],
                    machine_busy=after[3][0] - before[3][0], machine_total=after[3][1] - before[3][1],
                    forks=after[4] - before[4], commands=commands)
