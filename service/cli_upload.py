"""``imagepub publish … --upload`` and ``--archive``: the pipeline's own image, sent to the API
as an archive (``POST /v1/publish``, multipart), with an upload progress bar on a terminal and
plain lines in a CI log.

``--upload SOURCE`` reads the image from the Docker daemon this command reaches
(``DOCKER_HOST``, as the docker CLI would), as ``docker save`` writes it, and streams it on
as it comes: nothing is written to disk. ``--archive FILE`` sends a file (``docker save -o``,
``buildx --output type=oci,dest=…``), ``-`` for stdin. docker-py is imported only here, on the
client side: the API never loads it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

from .client import file_chunks

PLAIN_EVERY_SECONDS = 10.0
DOCKER_CHUNK = 1 << 20


class LocalArchiveError(Exception):
    """The archive to upload cannot be read here (no such file, image or daemon)."""


@dataclass
class LocalArchive:
    what: str  # for people: "app:1 from the Docker daemon", "image.tar"
    chunks: Iterator[bytes]
    size: int | None  # exact, when known (a file): the request gets a Content-Length
    estimate: int | None = None  # for the progress bar only


@contextlib.contextmanager
def local_archive(source: str | None, archive: str | None) -> Iterator[LocalArchive]:
    if archive is not None:
        with _file(archive) as found:
            yield found
    else:
        yield _from_daemon(source)


@contextlib.contextmanager
def _file(path: str) -> Iterator[LocalArchive]:
    if path == "-":
        yield LocalArchive("stdin", file_chunks(sys.stdin.buffer), None)
        return
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise LocalArchiveError(f"{path}: {exc.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size if os.path.isfile(path) else None  # a FIFO has no size
        yield LocalArchive(path, file_chunks(f), size)


def _from_daemon(source: str) -> LocalArchive:
    import docker  # noqa: PLC0415 - the client side only, and only for --upload

    try:
        api = docker.from_env().api
        size = api.inspect_image(source).get("Size")
        chunks = api.get_image(source, chunk_size=DOCKER_CHUNK)
    except docker.errors.ImageNotFound:
        raise LocalArchiveError(f"image_not_found: {source} is not in the Docker daemon at {_docker_host()}") from None
    except docker.errors.DockerException as exc:
        raise LocalArchiveError(f"daemon_unavailable: the Docker daemon at {_docker_host()} does not answer ({exc})") from None
    return LocalArchive(f"{source} from the Docker daemon", _daemon_chunks(chunks), None, size)


def _daemon_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The daemon's ``docker save`` stream; its failures as the read error they are."""
    import docker  # noqa: PLC0415

    try:
        yield from chunks
    except (docker.errors.DockerException, OSError) as exc:
        raise OSError(f"the Docker daemon's image stream broke off ({exc.__class__.__name__})") from None


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


# --- progress -----------------------------------------------------------------------------


class PlainUpload:
    """A line when the upload starts, one at most every ``PLAIN_EVERY_SECONDS``, one at the end."""

    def __init__(self, out: TextIO, what: str, total: int | None, exact: bool, size_text: Callable[[int], str]):
        self.out, self.what, self.total, self.exact, self.size_text = out, what, total, exact, size_text
        self.sent, self._last = 0, time.monotonic()
        estimate = f"{size_text(total)}{'' if exact else ', about'}" if total else ""
        self._print(f"uploading {what}" + (f" ({estimate})" if estimate else ""))

    def _print(self, text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {text}", file=self.out, flush=True)

    def sent_bytes(self, n: int) -> None:
        self.sent += n
        if time.monotonic() - self._last >= PLAIN_EVERY_SECONDS:
            self._last = time.monotonic()
            share = f" ({100 * self.sent // self.total}%)" if self.total and self.exact else ""
            self._print(f"uploaded {self.size_text(self.sent)}{share}")

    def close(self) -> None:
        self._print(f"uploaded {self.size_text(self.sent)}")


class RichUpload:
    """One progress bar: bytes sent, of the size when known, and the rate."""

    def __init__(self, out: TextIO, what: str, total: int | None, exact: bool, size_text: Callable[[int], str]):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.progress = Progress(TextColumn("uploading {task.description}"), BarColumn(complete_style="cyan"),
                                 DownloadColumn(), TransferSpeedColumn(), console=Console(file=out), transient=False)
        self.task = self.progress.add_task(what, total=total)
        self.progress.start()

    def sent_bytes(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        task = self.progress.tasks[0]
        self.progress.update(self.task, total=task.completed)  # a daemon's estimate, now exact
        self.progress.stop()


class QuietUpload:
    """--json: stdout is for the job document alone."""

    def sent_bytes(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def upload_view(json_output: bool, archive: LocalArchive, size_text: Callable[[int], str], out: TextIO | None = None) -> Any:
    """What shows the upload: nothing with --json, a bar on a terminal, lines otherwise."""
    out = out or sys.stdout
    if json_output:
        return QuietUpload()
    total, exact = (archive.size, True) if archive.size is not None else (archive.estimate, False)
    view = RichUpload if out.isatty() else PlainUpload
    return view(out, archive.what, total, exact, size_text)
