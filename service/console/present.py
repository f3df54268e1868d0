"""Jobs as the console shows them: a row of the list, a job's progress, its timeline, and what
to do about its error. Plain functions of the job record (service/jobs.py), no store reads."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Iterable

ACTIVE_STATES = ("queued", "running", "retrying")
# Layer outcomes that are complete whatever their byte counts say (service/jobs.py, workers/publish.py).
DONE_LAYERS = frozenset({"pushed", "exists", "mounted", "pulled", "copied", "skipped"})

# What a person can do about each error code (README, "The API").
ADVICE = {
    "image_not_found": "Check the source's name and tag: the daemon (or the registry) has no such image.",
    "registry_not_configured": "Use one of the configured registries (Registries page), or ask an operator to add it.",
    "repository_not_found": "Create the repository first, or publish with create_repository on a registry that allows it.",
    "access_denied": "The registry or ECR refused the action: ask an operator to check the registry's permissions.",
    "forbidden": "This client may not publish that image: its tags must be in the client's repositories.",
    "auth_failed": "The registry refused imagepub's credentials: ask an operator to check the registry's password or role.",
    "tag_immutable": "The tag exists in an immutable repository and holds another image: publish under a new tag.",
    "push_failed": "The registry refused the push or the digest did not verify: retry, and if it persists, check the registry.",
    "pull_failed": "The registry refused the pull or the digest did not verify: check the reference and retry.",
    "manifest_not_found": "The registry does not serve that tag or digest: check the reference.",
    "build_failed": "The build failed at the step named: fix the Dockerfile or the context (the log is below).",
    "worker_lost": "The job's worker died on every attempt: an operator should look at the workers' logs.",
    "throttled": "The registry throttled imagepub; the job was retried with backoff. Submit it again later.",
    "registry_unavailable": "The registry did not answer; the job was retried. Check that it is up, then submit again.",
    "daemon_unavailable": "The Docker daemon did not answer; the job was retried. An operator should check the daemon.",
    "timeout": "The job ran longer than job_timeout_seconds: submit it again, or ask for a longer limit.",
    "cancelled": "The job was cancelled; submit it again if it is still wanted.",
    "copy_failed": "The copy between registries failed: the message has the registry's words.",
    "registry_tls_failed": "The registry's certificate is not trusted: an operator should set its ca_file.",
}
DEFAULT_ADVICE = "Read the message; submit the job again once its cause is fixed."


def advice(code: str | None) -> str:
    return ADVICE.get(code or "", DEFAULT_ADVICE)


def places(job: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (registry, repository) a job names: its targets, a pull's or a copy's source."""
    found = [(t.get("registry") or "", t.get("repository") or "") for t in job.get("targets") or []]
    asked = job.get("request") or {}
    if job.get("kind") == "pull":
        found.append((asked.get("registry") or "", asked.get("repository") or ""))
    source = asked.get("source")
    if isinstance(source, dict):
        found.append((source.get("registry") or "", source.get("repository") or ""))
    return found


def matches(job: dict[str, Any], registry: str | None, repository: str | None) -> bool:
    """Whether a job names ``registry`` and a repository matching ``repository`` (a glob pattern
    such as ``team-a/*``), in one place."""
    return any((not registry or r == registry) and (not repository or fnmatchcase(repo, repository))
               for r, repo in places(job))


def layers(job: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for target in job.get("targets") or []:
        yield from target.get("layers") or []
    yield from (job.get("result") or {}).get("layers") or []


def layer_fraction(layer: dict[str, Any]) -> float | None:
    """How far a layer has got (0..1), None when the daemon has not said."""
    if layer.get("status") in DONE_LAYERS:
        return 1.0
    current, total = layer.get("current"), layer.get("total")
    if total:
        return max(0.0, min(1.0, (current or 0) / total))
    return None


def percent(job: dict[str, Any]) -> int | None:
    """The job's progress over every layer, weighted by size where sizes are known."""
    if job.get("state") == "succeeded":
        return 100
    known = [(layer_fraction(layer), layer.get("total") or 0) for layer in layers(job)]
    known = [(fraction, size) for fraction, size in known if fraction is not None]
    if not known:
        return None
    weight = sum(size for _, size in known)
    done = sum(fraction * size for fraction, size in known) / weight if weight else sum(f for f, _ in known) / len(known)
    return int(done * 100)


def summary(job: dict[str, Any]) -> str:
    """One line saying what a job moves where."""
    asked = job.get("request") or {}
    targets = ", ".join(f"{t['registry']}/{t['repository']}:{','.join(t.get('tags') or [])}" for t in job.get("targets") or [])
    kind = job.get("kind")
    if kind == "publish":
        source = asked.get("source") or ("uploaded archive" if job.get("archive") else "?")
        return f"{source} → {targets}"
    if kind == "pull":
        ref = asked.get("tag") or asked.get("digest") or ""
        return f"{asked.get('registry')}/{asked.get('repository')}:{ref}"
    if kind == "copy":
        source = asked.get("source") or {}
        ref = source.get("tag") or source.get("digest") or ""
        return f"{source.get('registry')}/{source.get('repository')}:{ref} → {targets}"
    return f"build → {targets}"


def row(job: dict[str, Any]) -> dict[str, Any]:
    """A row of the jobs list, as the page renders it and its live updates redraw it."""
    error = job.get("error") or job.get("last_error") or {}
    return {
        "id": job["id"], "kind": job["kind"], "state": job["state"], "client": job.get("client") or "",
        "summary": summary(job), "created_at": job.get("created_at") or "", "percent": percent(job),
        "error_code": error.get("code") if job["state"] in ("failed", "retrying") else None,
    }


def timeline(job: dict[str, Any]) -> list[tuple[str, str]]:
    """(time, what happened), oldest first, from what the record keeps."""
    events = [(job.get("created_at"), "submitted: queued")]
    if job.get("started_at"):
        events.append((job["started_at"], "started: running"))
    if job.get("attempts", 0) > 1:
        last = job.get("last_error") or {}
        events.append((job.get("updated_at"), f"attempt {job['attempts']} (after {last.get('code') or 'a transient failure'})"))
    if job.get("next_attempt_at"):
        events.append((job["next_attempt_at"], "next attempt due"))
    if job.get("finished_at"):
        events.append((job["finished_at"], f"ended: {job['state']}"))
    return [(when or "", what) for when, what in events]
