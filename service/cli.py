"""The ``imagepub`` command: run the API or a worker, and the pipeline client that submits jobs
to the API and follows them to their end (progress bars on a terminal, plain lines in CI logs,
and an exit code that says how the job ended)."""

from __future__ import annotations

import argparse
import re
import json
import os
import sys
from typing import Any, Callable, Iterator, TextIO

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
STATE_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
DONE_LAYER = {"pushed", "exists", "mounted", "pulled", "copied"}
EPILOG = """\
client commands talk to $IMAGEPUB_URL (default http://127.0.0.1:8080) with $IMAGEPUB_TOKEN.

exit codes:
  0  the job succeeded (without --wait: the request was accepted)
  1  the job failed (its error code and message are printed)
  2  usage error
  3  the job was cancelled
  4  the API refused the request (error code, detail and offending fields on stderr)
  5  the API could not be reached or answered 5xx, or --timeout ran out while waiting
"""


def _serve(args: argparse.Namespace) -> None:
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf", "--bind", args.bind]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    argv.append("service.wsgi:app")
    os.execv(sys.executable, argv)


def _daemon_name(value: str) -> str:
    from .config import DAEMON_NAME

    if not DAEMON_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError("a DNS name: lowercase letters, digits, '-' and '.', at most 253")
    return value


def _worker(args: argparse.Namespace) -> None:
    from . import config
    from .queue import CONTROL_QUEUE, job_queues

    if args.no_daemon:
        os.environ["IMAGEPUB_DAEMON_NAME"] = ""  # the worker's settings say: no daemon
    elif args.daemon:
        os.environ["IMAGEPUB_DAEMON_NAME"] = args.daemon
    daemon = config.load().daemon_name
    chosen = {"jobs": job_queues(daemon), "control": [CONTROL_QUEUE]}
    chosen = [queue for name in args.queues.split(",") for queue in chosen[name]]
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "--quiet", "worker",
            "--queues", ",".join(chosen), "--loglevel", args.loglevel, "--without-mingle", "--without-gossip"]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    os.execv(sys.executable, argv)


# --- references on the command line ------------------------------------------------------------


def target_arg(value: str) -> dict[str, Any]:
    """``REGISTRY/REPOSITORY:TAG[,TAG…]``: the registry is the first path segment, the tags
    follow the last ``:``."""
    registry, slash, rest = value.partition("/")
    repository, colon, tags = rest.rpartition(":")
    if not (registry and slash and colon and repository and tags):
        raise argparse.ArgumentTypeError(f"{value!r} is not REGISTRY/REPOSITORY:TAG[,TAG…]")
    return {"registry": registry, "repository": repository, "tags": [t.strip() for t in tags.split(",")]}


def group_targets(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One target per registry and repository, tags in the order given, without repeats."""
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for t in targets:
        entry = grouped.setdefault((t["registry"], t["repository"]), {"registry": t["registry"], "repository": t["repository"], "tags": []})
        entry["tags"] += [tag for tag in t["tags"] if tag not in entry["tags"]]
    return list(grouped.values())


def pull_arg(value: str) -> dict[str, Any]:
    """``REGISTRY/REPOSITORY[:TAG|@DIGEST]``."""
    registry, slash, rest = value.partition("/")
    name, at, digest = rest.partition("@")
    request: dict[str, Any] = {"registry": registry}
    if not at and ":" in name:
        name, _, request["tag"] = name.rpartition(":")
    if not (registry and slash and name) or (at and not digest):
        raise argparse.ArgumentTypeError(f"{value!r} is not REGISTRY/REPOSITORY[:TAG|@DIGEST]")
    request["repository"] = name
    if at:
        request["digest"] = digest
    return request


def build_arg(value: str) -> tuple[str, str]:
    """``KEY=VALUE``, or ``KEY`` alone to take the value from this environment (as docker does)."""
    key, eq, val = value.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE")
    if not eq:
        if key not in os.environ:
            raise argparse.ArgumentTypeError(f"--build-arg {key}: not set in the environment")
        val = os.environ[key]
    return key, val


# --- what a job looks like in a log or on a terminal ------------------------------------------


def size_text(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _when(job: dict[str, Any]) -> str:
    """The job's own time of this snapshot, to the second."""
    stamp = job.get("updated_at") or ""
    return stamp[:19] + "Z" if len(stamp) >= 19 else stamp


def summary(job: dict[str, Any]) -> str:
    request = job.get("request") or {}
    targets = ", ".join(f"{t['registry']}/{t['repository']}:{','.join(t['tags'])}" for t in request.get("targets") or [])
    if job.get("kind") == "publish" and job.get("archive"):
        archive = job["archive"]
        return f"publish {archive.get('format')} sha256:{str(archive.get('sha256'))[:12]} ({size_text(archive.get('bytes'))}) → {targets}"
    if job.get("kind") == "publish":
        return f"publish {request.get('source')} → {targets}"
    if job.get("kind") == "pull":
        ref = request.get("digest") and "@" + request["digest"] or (":" + request["tag"] if request.get("tag") else "")
        return f"pull {request.get('registry')}/{request.get('repository')}{ref}"
    if job.get("kind") == "copy":
        source = request.get("source") or {}
        ref = source.get("digest") and "@" + source["digest"] or ":" + str(source.get("tag"))
        platforms = request.get("platforms")
        which = f" [{', '.join(platforms)}]" if isinstance(platforms, list) else ""
        return f"copy {source.get('registry')}/{source.get('repository')}{ref}{which} → {targets}"
    return f"{job.get('kind')} → {targets}"


def state_line(job: dict[str, Any]) -> str:
    state, head = job["state"], f"job {job['id']} {job['state']}"
    error = job.get("error") or {}
    if state == "running":
        return f"{head} (attempt {job.get('attempts')})"
    if state == "retrying":
        last = job.get("last_error") or {}
        nxt = f"; next attempt at {job['next_attempt_at'][:19]}Z" if job.get("next_attempt_at") else ""
        return f"{head} after attempt {job.get('attempts')}: {last.get('code')}: {last.get('message')}{nxt}"
    if state == "failed":
        return f"{head}: {error.get('code')}: {error.get('message')}"
    return head


def layers(job: dict[str, Any]) -> Iterator[tuple[tuple[Any, str], str, dict[str, Any]]]:
    """``(key, where, layer)`` for every layer of the job: its targets' (publish) and its
    result's (pull); ``where`` names the target when there are several."""
    targets = job.get("targets") or []
    for i, target in enumerate(targets):
        where = f"{target['registry']}/{target['repository']}" if len(targets) > 1 else ""
        for layer in target.get("layers") or []:
            yield (i, layer["id"]), where, layer
    for layer in (job.get("result") or {}).get("layers") or []:
        yield ("result", layer["id"]), "", layer


def short_id(layer_id: str) -> str:
    return layer_id.removeprefix("sha256:")[:12]


def outcome_lines(job: dict[str, Any]) -> list[str]:
    """What a succeeded job produced: every reference with its digest."""
    if job["state"] != "succeeded":
        return []
    lines = []
    for target in job.get("targets") or []:
        if target.get("repository_created"):
            lines.append(f"created repository {target['repository']} in {target['registry']}")
        verb = "copied" if job.get("kind") == "copy" else "pushed"
        for ref in target.get("references") or []:
            lines.append(f"{verb} {ref} {target.get('digest')}" + (f" ({size_text(target['size'])})" if target.get("size") else ""))
        for artifact in target.get("signatures") or []:  # a copy's cosign tags
            lines.append(f"copied {target['registry']}/{target['repository']}:{artifact['tag']} {artifact['digest']}")
    result = job.get("result") or {}
    if result.get("digest"):
        lines.append(f"pulled {result.get('reference')} {result['digest']}" + (f" (image {result['image_id']})" if result.get("image_id") else ""))
    return lines


class PlainView:
    """Timestamped lines: one per state change and per layer status change, never per byte."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out, self.err = out, err
        self.seen_state: tuple[str, Any] | None = None
        self.seen_layers: dict[tuple[Any, str], str] = {}

    def _print(self, job: dict[str, Any], text: str) -> None:
        print(f"{_when(job)} {text}", file=self.out, flush=True)

    def update(self, job: dict[str, Any]) -> None:
        state = (job["state"], job.get("attempts"))
        if state != self.seen_state:
            self._print(job, state_line(job) + ("" if self.seen_state else f": {summary(job)}"))
            self.seen_state = state
        for key, where, layer in layers(job):
            if self.seen_layers.get(key) == layer["status"]:
                continue
            self.seen_layers[key] = layer["status"]
            size = layer.get("total") if layer["status"] not in DONE_LAYER else (layer.get("total") or layer.get("current"))
            noun = "blob" if job.get("kind") == "copy" else "layer"  # a copy's include the image config
            self._print(job, " ".join(filter(None, [noun, short_id(layer["id"]), layer["status"], size_text(size), where and f"({where})"])))

    def finish(self, job: dict[str, Any]) -> None:
        self.update(job)
        for line in outcome_lines(job):
            self._print(job, line)

    def close(self) -> None:
        pass


class JsonView:
    """Nothing while it runs; the final job as one JSON document on stdout."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out, self.err = out, err

    def update(self, job: dict[str, Any]) -> None:
        pass

    def finish(self, job: dict[str, Any]) -> None:
        print(json.dumps(job, indent=2), file=self.out, flush=True)
        if job["state"] == "failed":
            error = job.get("error") or {}
            print(f"error: {error.get('code')}: {error.get('message')}", file=self.err, flush=True)

    def close(self) -> None:
        pass


class RichView:
    """A progress bar per layer on a terminal, state changes printed above the bars."""

    def __init__(self, out: TextIO, err: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = Console(file=out)
        # Named colours: the theme's RGB ones come out grey (finished) on a 16-colour terminal.
        bar = BarColumn(complete_style="cyan", finished_style="green", pulse_style="cyan")
        self.progress = Progress(TextColumn("{task.description}"), bar, TextColumn("{task.fields[size]}"),
                                 console=self.console, transient=False)
        self.tasks: dict[tuple[Any, str], Any] = {}
        self.seen_state: tuple[str, Any] | None = None
        self.progress.start()

    def _print(self, text: str, style: str = "") -> None:
        from rich.text import Text

        # A Text keeps the style to this line (a print style would tint the bars drawn with it);
        # soft wrap keeps references whole for copying.
        self.console.print(Text(text, style=style), highlight=False, soft_wrap=True)

    def update(self, job: dict[str, Any]) -> None:
        state = (job["state"], job.get("attempts"))
        if state != self.seen_state:
            style = {"succeeded": "green", "failed": "bold red", "cancelled": "yellow"}.get(job["state"], "")
            self._print(state_line(job) + ("" if self.seen_state else f": {summary(job)}"), style)
            self.seen_state = state
        for key, where, layer in layers(job):
            current, total = layer.get("current") or 0, layer.get("total") or None
            if layer["status"] in DONE_LAYER:
                total = total or current or 1
                current = total
            size = f"{size_text(current)}/{size_text(total)}" if total and total > 1 else ""
            description = f"{where + ' ' if where else ''}{short_id(layer['id'])} {layer['status']:<11}"
            if key not in self.tasks:
                self.tasks[key] = self.progress.add_task(description, total=total, completed=current, size=size)
            else:
                self.progress.update(self.tasks[key], description=description, total=total, completed=current, size=size)

    def finish(self, job: dict[str, Any]) -> None:
        self.update(job)
        self.close()
        for line in outcome_lines(job):
            self._print(line)

    def close(self) -> None:
        self.progress.stop()


def make_view(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None):
    out, err = out or sys.stdout, err or sys.stderr
    if args.json:
        return JsonView(out, err)
    return RichView(out, err) if out.isatty() else PlainView(out, err)


# --- client commands --------------------------------------------------------------------------


def _client(args: argparse.Namespace):
    from .client import ImagepubClient

    # The client's settings: its own command line, else its environment (never the server's config).
    url = args.url or os.environ.get("IMAGEPUB_URL") or DEFAULT_URL
    token = args.token or os.environ.get("IMAGEPUB_TOKEN")
    return ImagepubClient(url, token)


def _follow(args: argparse.Namespace, client, job: dict[str, Any]) -> int:
    """Show ``job`` and, with --wait/--follow, every change until it ends; the exit code."""
    view = make_view(args)
    try:
        if not (getattr(args, "wait", False) or getattr(args, "follow", False)):
            view.finish(job)
            # a submission answers for the request; `imagepub job ID` for the job
            return STATE_EXIT.get(job["state"], EXIT_OK) if args.command == "job" else EXIT_OK
        view.update(job)
        for job in client.follow(job["id"], timeout=args.timeout):
            view.update(job)
        view.finish(job)
        return STATE_EXIT.get(job["state"], EXIT_OK)
    except KeyboardInterrupt:
        view.close()
        print(f"\ninterrupted: job {job['id']} goes on; follow it with: imagepub job {job['id']} --follow", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        view.close()


def _submission_options(args: argparse.Namespace) -> dict[str, Any]:
    """What every submission command may add: --create-repository, --callback-url."""
    return {**({"create_repository": True} if args.create_repository else {}),
            **({"callback_url": args.callback_url} if args.callback_url else {})}


def _publish(args: argparse.Namespace) -> int:
    if args.upload or args.archive is not None:
        return _publish_upload(args)
    if args.source is None:
        print("error: give SOURCE (an image in the daemons imagepub drives), SOURCE --upload, or --archive FILE", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"source": args.source, "targets": group_targets(args.to)}
    if args.daemon:
        request["daemon"] = args.daemon
    request.update(_submission_options(args))
    client = _client(args)
    return _follow(args, client, client.publish(request, args.idempotency_key))


def _publish_upload(args: argparse.Namespace) -> int:
    """The image as an archive from here: SOURCE from this machine's Docker daemon (--upload),
    or a file (--archive); the job needs no daemon of imagepub's."""
    from .cli_upload import LocalArchiveError, local_archive, upload_view
    from .client import ArchiveUpload, UploadFailed

    if (args.source is None) == (args.archive is None) or (args.archive is not None and args.upload) or args.daemon:
        print("error: give SOURCE --upload (an image in the Docker daemon DOCKER_HOST names) or --archive FILE "
              "(- for stdin), not both; --daemon is for an image in imagepub's daemons", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"targets": group_targets(args.to)}
    request.update(_submission_options(args))
    client = _client(args)
    try:
        with local_archive(args.source, args.archive) as archive:
            progress = upload_view(args.json, archive, size_text)
            try:
                upload = ArchiveUpload(request, archive.chunks, archive.size, progress.sent_bytes,
                                       filename=os.path.basename(args.archive) if args.archive not in (None, "-") else "image.tar")
                job = client.publish_archive(upload, args.idempotency_key)
            finally:
                progress.close()
    except (LocalArchiveError, UploadFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _follow(args, client, job)


def _pull(args: argparse.Namespace) -> int:
    client = _client(args)
    request = {**args.reference, "daemon": args.daemon} if args.daemon else args.reference
    return _follow(args, client, client.pull(request, args.idempotency_key))


def copy_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"source": args.source, "targets": group_targets(args.to)}
    if args.platform:
        request["platforms"] = list(dict.fromkeys(args.platform))
    if args.no_signatures:
        request["signatures"] = False
    request.update(_submission_options(args))
    return request


def _copy(args: argparse.Namespace) -> int:
    client = _client(args)
    return _follow(args, client, client.copy(copy_request(args), args.idempotency_key))


def build_request(args: argparse.Namespace, dockerfile: str) -> dict[str, Any]:
    request: dict[str, Any] = {"targets": group_targets(args.to), "dockerfile": dockerfile, "build_args": dict(args.build_arg)}
    request.update(_submission_options(args))
    return request


def _build(args: argparse.Namespace) -> int:
    from .client import context_archive

    if not os.path.isdir(args.context):
        print(f"error: {args.context}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    archive, dockerfile = context_archive(args.context, args.file)
    with archive:
        client = _client(args)
        size, limit = archive.seek(0, os.SEEK_END), client.limits().get("max_context_bytes")
        archive.seek(0)
        if limit and size > limit:  # say so now, not after uploading it
            print(f"error: context_too_large: the build context is {size_text(size)} (gzipped); the server takes at most "
                  f"{size_text(limit)} (limits.max_context_bytes): leave files out with .dockerignore", file=sys.stderr)
            return EXIT_REFUSED
        job = client.build(archive, build_request(args, dockerfile), args.idempotency_key)
    return _follow(args, client, job)


def _job(args: argparse.Namespace) -> int:
    client = _client(args)
    return _follow(args, client, client.job(args.job_id))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _jobs(args: argparse.Namespace) -> int:
    jobs = _client(args).jobs(state=args.state, kind=args.kind, limit=args.limit)
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=2))
        return EXIT_OK
    rows = [["ID", "KIND", "STATE", "ATTEMPTS", "CREATED", "WHAT", "ERROR"]]
    for job in jobs:
        error = (job.get("error") or {}).get("code") or ""
        rows.append([job["id"], job["kind"], job["state"], str(job.get("attempts", "")), job["created_at"][:19] + "Z", summary(job), error])
    print(_table(rows))
    return EXIT_OK


def _images(args: argparse.Namespace) -> int:
    answer = _client(args).images(args.reference, args.daemon)
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    rows = [["DAEMON", "IMAGE ID", "TAGS", "SIZE", "CREATED"]]
    for image in answer.get("images") or []:
        tags = image.get("tags") or image.get("repo_tags") or []
        rows.append([image.get("daemon") or "", short_id(image.get("id") or ""), ",".join(tags) or "<none>",
                     size_text(image.get("size")), str(image.get("created") or "")])
    print(_table(rows))
    return EXIT_OK


def _daemons(args: argparse.Namespace) -> int:
    answer = _client(args).daemons()
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    rows = [["DAEMON", "STATE", "WORKERS", "QUEUED", "DOCKER"]]
    for daemon in answer["daemons"]:
        alive = sum(1 for worker in daemon["workers"] if worker.get("alive"))
        rows.append([daemon["name"], daemon["state"], f"{alive}/{len(daemon['workers'])}", str(daemon["queue_depth"]),
                     daemon.get("docker_version") or ""])
    print(_table(rows))
    return EXIT_OK


def _client_command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a client command; errors that reach here become an ``error:`` line and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from .client import ApiRefused, ApiUnavailable, WaitTimeout

        try:
            return func(args)
        except ApiRefused as exc:
            print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
            for field in exc.errors:
                print(f"  {field.get('field')}: {field.get('message')}", file=sys.stderr)
            return EXIT_REFUSED
        except WaitTimeout as exc:
            print(f"error: timeout: {exc} (after --timeout {args.timeout:g} s)", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except ApiUnavailable as exc:
            print(f"error: api_unavailable: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return run


def _add_client_parser(sub, name: str, help: str, func, waits: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="the imagepub API (default: $IMAGEPUB_URL, else %s)" % DEFAULT_URL)
    p.add_argument("--token", help="API token, sent as Authorization: Bearer (default: $IMAGEPUB_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the job (or list) as JSON on stdout, and nothing else there")
    if waits:
        p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop waiting after this long (exit 5; the job goes on)")
    p.set_defaults(func=_client_command(func))
    return p


def _add_submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--idempotency-key", metavar="KEY", help="the same key and request give the original job again")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends; the exit code says how")


def _token_new(args: argparse.Namespace) -> int:
    """The token is shown once, here; the server keeps only its SHA-256."""
    import yaml

    from .auth import hash_token, new_token
    from .config import SCOPES

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", args.name):
        print(f"error: {'unknown scopes ' + ', '.join(unknown) if unknown else 'invalid client name'}", file=sys.stderr)
        return EXIT_USAGE
    token = new_token()
    entry = {"name": args.name, "token_sha256": hash_token(token), "scopes": scopes,
             "repositories": [p.strip() for p in args.repositories.split(",") if p.strip()]}
    if args.rate_limit:
        entry["rate_limit"] = args.rate_limit
    print(f"token (give it to the client; it is not stored anywhere):\n  {token}\n")
    print("add to the `clients:` list of the configuration:")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagepub", description="Publish container images to ECR and OCI registries.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API under gunicorn")
    serve.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT to listen on (default %(default)s)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default: cores + 1, at most 9)")
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="run a Celery worker next to a Docker daemon")
    worker.add_argument("--concurrency", type=int, help="jobs at once (default: number of cores)")
    worker.add_argument("--loglevel", default="INFO")
    which = worker.add_mutually_exclusive_group()
    which.add_argument("--daemon", metavar="NAME", type=_daemon_name,
                       help="the name of the Docker daemon this worker drives (DOCKER_HOST); jobs that need its images "
                            "are routed here (default: IMAGEPUB_DAEMON_NAME, else 'default')")
    which.add_argument("--no-daemon", action="store_true",
                       help="a worker without a daemon: only daemonless jobs (copies, uploaded archives) and control calls")
    worker.add_argument("--queues", default="jobs,control", choices=["jobs,control", "jobs", "control"],
                        help="what to consume: jobs (publish, pull, build), control (registry operations); "
                             "every worker also delivers webhooks, on threads of their own")
    worker.set_defaults(func=_worker)

    token = sub.add_parser("token", help="API tokens for the clients section of the configuration")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser("new", help="print a fresh token and the configuration entry holding its hash")
    new.add_argument("name", help="the client's name (lowercase letters, digits, '-', '_')")
    new.add_argument("--scopes", default="publish,pull,read", help="comma-separated: publish, pull, build, read, admin, audit (default %(default)s)")
    new.add_argument("--repositories", default="*", help="comma-separated glob patterns, e.g. 'team-a/*' (default: all)")
    new.add_argument("--rate-limit", help="e.g. 20/second")
    new.set_defaults(func=_token_new)

    to_help = "REGISTRY/REPOSITORY:TAG[,TAG…] (a configured registry's name); repeat for more targets or tags"
    publish = _add_client_parser(sub, "publish", "publish an image from the daemon, or uploaded from here, to one or more targets", _publish)
    publish.add_argument("source", metavar="SOURCE", nargs="?",
                         help="an image in imagepub's daemons (name[:tag], name@digest or an image id); with --upload, in this machine's")
    publish.add_argument("--upload", action="store_true",
                         help="send SOURCE from the Docker daemon this command reaches (DOCKER_HOST), as docker save writes it: "
                              "no daemon of imagepub's is involved")
    publish.add_argument("--archive", metavar="FILE",
                         help="send this image archive instead of SOURCE: docker save -o FILE, or an OCI layout tar "
                              "(buildx --output type=oci,dest=FILE), gzipped or not; - for stdin")
    publish.add_argument("--to", type=target_arg, action="append", required=True, metavar="TARGET", help=to_help)
    publish.add_argument("--create-repository", action="store_true", help="create missing ECR repositories (when the registry allows it)")
    publish.add_argument("--callback-url", metavar="URL", help="POST the finished job here")
    publish.add_argument("--daemon", metavar="NAME", type=_daemon_name, help="the daemon that holds SOURCE (default: the one that does)")
    _add_submit_options(publish)

    pull = _add_client_parser(sub, "pull", "pull an image from a configured registry into the daemon", _pull)
    pull.add_argument("reference", metavar="REGISTRY/REPOSITORY[:TAG|@DIGEST]", type=pull_arg)
    pull.add_argument("--daemon", metavar="NAME", type=_daemon_name, help="the daemon to pull into (default: any that is up)")
    _add_submit_options(pull)

    copy = _add_client_parser(sub, "copy", "copy an image from one configured registry to others, without a daemon", _copy)
    copy.add_argument("source", metavar="REGISTRY/REPOSITORY[:TAG|@DIGEST]", type=pull_arg, help="the image to copy (default tag: latest)")
    copy.add_argument("--to", type=target_arg, action="append", required=True, metavar="TARGET", help=to_help)
    copy.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                      help="copy only this platform of a multi-platform image; repeat for more (default: all, same digest)")
    copy.add_argument("--no-signatures", action="store_true", help="leave the source's cosign signature, attestation and SBOM tags behind")
    copy.add_argument("--create-repository", action="store_true", help="create missing ECR repositories (when the registry allows it)")
    copy.add_argument("--callback-url", metavar="URL", help="POST the finished job here")
    _add_submit_options(copy)

    build = _add_client_parser(sub, "build", "build an image from a local context and publish it", _build)
    build.add_argument("context", metavar="CONTEXT_DIR", help="the build context (.dockerignore is honoured)")
    build.add_argument("--to", type=target_arg, action="append", required=True, metavar="TARGET", help=to_help)
    build.add_argument("--file", "-f", metavar="DOCKERFILE", help="the Dockerfile (default: CONTEXT_DIR/Dockerfile)")
    build.add_argument("--build-arg", type=build_arg, action="append", default=[], metavar="KEY=VALUE", help="a build-time variable; repeat for more")
    build.add_argument("--create-repository", action="store_true", help="create missing ECR repositories (when the registry allows it)")
    build.add_argument("--callback-url", metavar="URL", help="POST the finished job here")
    _add_submit_options(build)

    jobs = _add_client_parser(sub, "jobs", "list jobs, newest first", _jobs, waits=False)
    jobs.add_argument("--state", choices=["queued", "running", "retrying", "succeeded", "failed", "cancelled"])
    jobs.add_argument("--kind", choices=["publish", "pull", "build", "copy"])
    jobs.add_argument("--limit", type=int, default=20, metavar="N", help="at most N jobs (default %(default)s)")

    job = _add_client_parser(sub, "job", "show one job; its exit code says how it ended", _job)
    job.add_argument("job_id", metavar="ID")
    job.add_argument("--follow", action="store_true", help="follow the job until it ends")

    images = _add_client_parser(sub, "images", "images in the fleet's Docker daemons", _images, waits=False)
    images.add_argument("--reference", metavar="R", help="only images matching this reference (e.g. 'team/*': the host may be left out)")
    images.add_argument("--daemon", metavar="NAME", type=_daemon_name, help="only this daemon's images")
    _add_client_parser(sub, "daemons", "the fleet's Docker daemons: state, workers, queue", _daemons, waits=False)
    from .cli_audit import add_parser as add_audit_parser  # it builds on this module's helpers

    add_audit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
