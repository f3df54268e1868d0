"""The numbers the fleet page shows at a glance, each a constant number of Redis commands
whatever the number of jobs: jobs by state created in the last hour (counted in the listing
indexes), and from the metrics counters (service/metrics.py) pushes per registry and retries."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from ..jobstore import STATES, JobStore
from ..metrics import counters


def first_id_since(epoch: float) -> str:
    """The smallest job id created at or after ``epoch``: ids are UUIDv7 (service/jobstore.py),
    whose text starts with the creation time in hexadecimal milliseconds, so in the listing
    indexes (sorted by text) the jobs since then are the ids from this one on."""
    ms = f"{int(epoch * 1000) & ((1 << 48) - 1):012x}"
    return f"{ms[:8]}-{ms[8:]}-0000-0000-000000000000"


def jobs_by_state_since(store: JobStore, epoch: float, client: str | None) -> dict[str, int]:
    """Jobs created since ``epoch`` in each state (a client's own, or everyone's): one ZLEXCOUNT
    per state, in one round trip."""
    pipe = store.redis.pipeline(transaction=False)
    for state in STATES:
        pipe.zlexcount(store.index_key(client=client, state=state), f"[{first_id_since(epoch)}", "+")
    return dict(zip(STATES, pipe.execute()))


def registry_numbers(store: JobStore) -> dict[str, Any]:
    """Since the counters began: per registry the layers pushed (and found there already or
    mounted) and the bytes uploaded; per kind and code the retries; per state the finished jobs."""
    registries: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    retries: dict[tuple[str, str], float] = defaultdict(float)
    losses = 0.0
    for name, labels, value in counters(store.redis):
        if name == "imagepub_layers":
            registries[labels.get("registry", "")][labels.get("outcome", "")] += value
        elif name == "imagepub_pushed_bytes":
            registries[labels.get("registry", "")]["bytes"] += value
        elif name == "imagepub_job_retries":
            retries[(labels.get("kind", ""), labels.get("code", ""))] += value
        elif name == "imagepub_job_worker_losses":
            losses += value
    return {
        "registries": {name: dict(values) for name, values in sorted(registries.items())},
        "retries": sorted(((kind, code, int(n)) for (kind, code), n in retries.items()), key=lambda r: -r[2]),
        "worker_losses": int(losses),
    }


def last_hour(store: JobStore, client: str | None) -> dict[str, int]:
    return jobs_by_state_since(store, time.time() - 3600, client)
