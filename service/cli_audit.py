"""``imagepub audit``: the audit trail from the command line.

- ``imagepub audit [--digest D] [--repository 'team/*'] … [--json]`` asks the API
  (``GET /v1/audit``, a token with the ``audit`` or ``admin`` scope), newest first;
- ``imagepub audit export --since …`` writes entries as JSON lines, oldest first, each with its
  hash, the form the ``audit`` logger writes (for long-term storage);
- ``imagepub audit verify`` recomputes the hash chain and names the entry where it breaks.

``export`` and ``verify`` read the store itself (Redis, as ``imagepub serve`` does: the
server's ``IMAGEPUB_CONFIG`` and ``IMAGEPUB_REDIS_URL``): they are the operator's, run where the
API runs, and a check of the store does not go through the code it checks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from .cli import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, _add_client_parser, _client, _table

ACTIONS = ("publish", "pull", "build", "copy", "cancel", "create_repository", "push_tag", "copy_tag")
OUTCOMES = ("accepted", "refused", "written", "failed")
_AGO = re.compile(r"([0-9]+)([smhdw])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def moment(value: str) -> datetime:
    """``7d`` / ``12h`` / ``30m`` ago, a date (``2025-01-31``, midnight UTC) or an RFC 3339 time."""
    ago = _AGO.match(value.strip())
    if ago:
        return datetime.now(timezone.utc) - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a time: 7d, 12h, 2025-01-31 or 2025-01-31T12:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _rfc3339(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value else None


def what(entry: dict[str, Any]) -> str:
    """What an entry is about, in one line: the place written, or the request's places."""
    def place(registry, repository, tag=None, digest=None) -> str:
        ref = f"{registry or '?'}/{repository}"
        return ref + (f"@{digest}" if digest and not tag else f":{tag}" if tag else "")

    targets = ", ".join(place(t["registry"], t["repository"], ",".join(t.get("tags") or [])) for t in entry.get("targets") or [])
    if entry.get("action") in ("push_tag", "copy_tag"):
        return place(entry.get("registry"), entry.get("repository"), entry.get("tag"))
    own = place(entry["registry"], entry["repository"], entry.get("tag"), entry.get("digest")) if entry.get("repository") else ""
    source = entry.get("source") or own
    if source and targets:
        return f"{source} → {targets}"
    return source or targets or (f"job {entry['job_id']}" if entry.get("job_id") else "")


def _query(args: argparse.Namespace) -> int:
    filters = {"client": args.client, "registry": args.registry, "repository": args.repository, "digest": args.digest,
               "action": args.action, "outcome": args.outcome, "job": args.job,
               "since": _rfc3339(args.since), "until": _rfc3339(args.until)}
    entries = _client(args).audit(limit=args.limit, **filters)
    if args.json:
        print(json.dumps({"entries": entries}, indent=2))
        return EXIT_OK
    rows = [["TIME", "CLIENT", "ACTION", "OUTCOME", "WHAT", "DIGEST / CODE", "JOB", "REQUEST"]]
    for e in entries:
        result = e.get("digest") or e.get("code") or ""
        rows.append([e["time"][:19] + "Z", e.get("client") or "-", e["action"], e["outcome"], what(e), result,
                     e.get("job_id") or "", e.get("request_id") or ""])
    print(_table(rows))
    return EXIT_OK


def _store():
    from . import config
    from .audit import AuditLog

    return AuditLog.from_config(config.load())


def _on_store(command):
    """Run a store command: the configuration or Redis failing is an ``error:`` line and a code."""
    def run(args: argparse.Namespace) -> int:
        import redis

        from .config import ConfigError

        try:
            return command(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except redis.RedisError as exc:
            print(f"error: store_unavailable: Redis: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE

    return run


def _export(args: argparse.Namespace) -> int:
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for entry in _store().export(args.since, args.until):
            out.write(json.dumps(entry, separators=(",", ":")) + "\n")
    finally:
        if args.output:
            out.close()
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    verdict = _store().verify()
    print(verdict, file=sys.stdout if verdict.ok else sys.stderr)
    return EXIT_OK if verdict.ok else EXIT_FAILED


def add_parser(sub) -> None:
    audit = _add_client_parser(sub, "audit", "the audit trail, newest first: who asked for what, who was refused, "
                                             "which digest went where (a token with the audit or admin scope)", _query, waits=False)
    audit.add_argument("--digest", metavar="sha256:…", help="entries of this digest (tags written with it, pulls and copies of it)")
    audit.add_argument("--repository", metavar="PATTERN", help="entries naming a repository matching this glob, e.g. 'team/*'")
    audit.add_argument("--registry", metavar="NAME", help="entries naming this configured registry")
    audit.add_argument("--client", metavar="NAME", help="entries of this client")
    audit.add_argument("--action", choices=ACTIONS)
    audit.add_argument("--outcome", choices=OUTCOMES)
    audit.add_argument("--job", metavar="ID", help="entries of this job (its acceptance, its writes)")
    audit.add_argument("--since", type=moment, metavar="TIME", help="7d, 12h, a date or an RFC 3339 time")
    audit.add_argument("--until", type=moment, metavar="TIME")
    audit.add_argument("--limit", type=int, default=50, metavar="N", help="at most N entries (default %(default)s)")
    commands = audit.add_subparsers(dest="audit_command", metavar="{export,verify}")
    export = commands.add_parser("export", help="every entry as a JSON line, oldest first, with its hash (reads the store: "
                                                "run it with the server's IMAGEPUB_CONFIG / IMAGEPUB_REDIS_URL)")
    export.add_argument("--since", type=moment, metavar="TIME", help="7d, 12h, a date or an RFC 3339 time (default: the oldest entry)")
    export.add_argument("--until", type=moment, metavar="TIME")
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    export.set_defaults(func=_on_store(_export))
    verify = commands.add_parser("verify", help="recompute the hash chain; exit 1 naming the entry where it breaks (reads the "
                                                "store, as export does)")
    verify.set_defaults(func=_on_store(_verify))
