"""The ``imagepub`` command: run the API or a worker."""

from __future__ import annotations

import argparse
import os
import sys


def _serve(args: argparse.Namespace) -> None:
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf", "--bind", args.bind]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    argv.append("service.wsgi:app")
    os.execv(sys.executable, argv)


def _worker(args: argparse.Namespace) -> None:
    from .queue import CONTROL_QUEUE, JOBS_QUEUE

    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "--queues", f"{JOBS_QUEUE},{CONTROL_QUEUE}", "--loglevel", args.loglevel, "--without-mingle", "--without-gossip"]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    os.execv(sys.executable, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagepub", description="Publish container images to ECR and OCI registries.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API under gunicorn")
    serve.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT to listen on (default %(default)s)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default: 2 × cores + 1, at most 9)")
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="run a Celery worker next to a Docker daemon")
    worker.add_argument("--concurrency", type=int, help="jobs at once (default: number of cores)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=_worker)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
