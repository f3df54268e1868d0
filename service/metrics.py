"""Prometheus metrics, kept in Redis and served by the API at ``/metrics``.

Jobs are counted where they happen — submissions in the API, outcomes, bytes and layers on the
workers, token fetches in the ECR module — by ``HINCRBY`` on one Redis hash. Every gunicorn
worker, every API replica and every Celery process on every machine adds to the same numbers,
and one scrape of any API replica sees all of them: no multiprocess directory, no scrape target
per worker, nothing lost when a process restarts. Gauges (queue depth, jobs per state, live
workers) are read at scrape time.

Fields are ``name|label=value,label=value``; a histogram is stored as per-bucket counts plus
``_sum`` and ``_count`` and rendered cumulatively.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


KEY = "imagepub:metrics"
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))

COUNTERS = {
    "imagepub_jobs_submitted": ("Jobs accepted by the API.", ("kind",)),
    "imagepub_jobs_finished": ("Jobs that reached a terminal state.", ("kind", "state", "code")),
    "imagepub_job_retries": ("Transient failures that scheduled another attempt.", ("kind", "code")),
    "imagepub_job_worker_losses": ("Deliveries whose worker died while running the job.", ("kind",)),
    "imagepub_layers": ("Layers handled, by what happened to them.", ("registry", "outcome")),
    "imagepub_pushed_bytes": ("Bytes of layers uploaded to registries.", ("registry",)),
    "imagepub_pulled_bytes": ("Bytes of layers downloaded from registries.", ("registry",)),
    "imagepub_ecr_token_fetches": ("GetAuthorizationToken calls.", ("registry",)),
    "imagepub_ecr_token_cache_hits": ("ECR tokens served from the shared cache.", ("registry",)),
    "imagepub_webhook_deliveries": ("Webhook delivery attempts, by outcome.", ("outcome",)),
}
HISTOGRAMS = {
    "imagepub_job_duration_seconds": ("Time from submission to the terminal state.", ("kind", "state"), DURATION_BUCKETS),
}


def metric_field(name: str, labels: Mapping[str, Any]) -> str:
    return name + "|" + ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def _parse(field: str) -> tuple[str, dict[str, str]]:
    name, _, rest = field.partition("|")
    return name, dict(item.split("=", 1) for item in rest.split(",") if item)


def counters(redis) -> list[tuple[str, dict[str, str], float]]:
    """Every counter as (name, labels, value), read in one command (the console's fleet page)."""
    return [(*_parse(field), float(value)) for field, value in redis.hgetall(KEY).items()]


class Metrics:
    """Writes the counters. Pass ``pipe`` to add the increment to a pipeline the caller executes."""

    def __init__(self, redis):
        self.redis = redis

    def incr(self, name: str, amount: float = 1, pipe=None, **labels: Any) -> None:
        target = pipe if pipe is not None else self.redis
        if isinstance(amount, float) and not amount.is_integer():
            target.hincrbyfloat(KEY, metric_field(name, labels), amount)
        else:
            target.hincrby(KEY, metric_field(name, labels), int(amount))

    def observe(self, name: str, value: float, pipe=None, **labels: Any) -> None:
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        bucket = next(b for b in HISTOGRAMS[name][2] if value <= b)
        pipe.hincrby(KEY, metric_field(name + "_bucket", {**labels, "le": bucket}), 1)
        pipe.hincrbyfloat(KEY, metric_field(name + "_sum", labels), value)
        pipe.hincrby(KEY, metric_field(name + "_count", labels), 1)
        if own:
            pipe.execute()


class _Collector:
    def __init__(self, values: Mapping[str, str], gauges: Iterable[GaugeMetricFamily]):
        self.values, self.gauges = values, list(gauges)

    def collect(self):
        series: dict[str, list[tuple[dict[str, str], float]]] = {}
        for field, value in self.values.items():
            name, labels = _parse(field)
            series.setdefault(name, []).append((labels, float(value)))
        for name, (help_text, label_names) in COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=label_names)
            for labels, value in series.get(name, []):
                family.add_metric([labels.get(k, "") for k in label_names], value)
            yield family
        for name, (help_text, label_names, buckets) in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, help_text, labels=label_names)
            groups: dict[tuple, dict[str, Any]] = {}
            for labels, value in series.get(name + "_bucket", []):
                key = tuple(labels.get(k, "") for k in label_names)
                groups.setdefault(key, {"buckets": {}, "sum": 0.0})["buckets"][float(labels["le"])] = value
            for labels, value in series.get(name + "_sum", []):
                key = tuple(labels.get(k, "") for k in label_names)
                groups.setdefault(key, {"buckets": {}, "sum": 0.0})["sum"] = value
            for key, group in sorted(groups.items()):
                running, cumulative = 0.0, []
                for bound in buckets:
                    running += group["buckets"].get(float(bound), 0.0)
                    cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
                family.add_metric(list(key), cumulative, group["sum"])
            yield family
        yield from self.gauges


def render(store) -> bytes:
    """The Prometheus text exposition of every counter, plus gauges read now."""
    from .fleet import Fleet  # the store, which the fleet uses, imports this module
    from .jobstore import WORKER_HEARTBEAT_MAX_AGE

    pipe = store.redis.pipeline(transaction=False)
    pipe.hgetall(KEY)
    states = ("queued", "running", "retrying")
    for state in states:
        pipe.zcard(store.index_key(state=state))
    pipe.zcard(store.webhooks_key)
    values, *per_state, webhooks = pipe.execute()
    # every queue (shared, the daemons', each daemon's) holds exactly the queued jobs
    queue = GaugeMetricFamily("imagepub_queue_depth", "Jobs waiting for a worker, on every queue.", value=per_state[0])
    active = GaugeMetricFamily("imagepub_jobs_active", "Unfinished jobs, by state.", labels=["state"])
    for state, count in zip(states, per_state):
        active.add_metric([state], count)
    workers = GaugeMetricFamily("imagepub_workers_alive", f"Workers with a heartbeat in the last {WORKER_HEARTBEAT_MAX_AGE:.0f} s.",
                                value=len(store.live_workers()))
    registry = CollectorRegistry(auto_describe=False)
    pending = GaugeMetricFamily("imagepub_webhooks_pending", "Webhooks owed by ended jobs: being delivered or waiting for a retry.",
                                value=webhooks)
    daemon_up = GaugeMetricFamily("imagepub_daemon_up", "1 while a worker of the Docker daemon sends heartbeats.", labels=["daemon"])
    daemon_depth = GaugeMetricFamily("imagepub_daemon_queue_depth", "Job messages waiting for a worker of the daemon.", labels=["daemon"])
    for daemon in Fleet(store.redis, store.prefix).daemons():
        daemon_up.add_metric([daemon.name], 1 if daemon.up else 0)
        daemon_depth.add_metric([daemon.name], daemon.queue_depth)
    registry.register(_Collector(values, [queue, active, workers, pending, daemon_up, daemon_depth]))
    return generate_latest(registry)
