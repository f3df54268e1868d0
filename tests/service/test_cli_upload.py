"""The client side of an upload, without the stack: the multipart body the CLI streams (the
request first, then the archive as it is read; a length only when the size is known) and how
the upload is shown: a bar on a terminal, a line at start, every 10 s and at the end in a CI
log, nothing with --json. The whole path is tests/e2e/test_upload.py."""

from __future__ import annotations

import io
import json

import pytest
from werkzeug.sansio.multipart import Data, Field, File, MultipartDecoder, NEED_DATA

from service import cli, cli_upload
from service.cli import size_text
from service.client import ArchiveUpload, UploadFailed


def _parts(body: bytes, content_type: str) -> dict[str, bytes]:
    decoder = MultipartDecoder(content_type.split("boundary=", 1)[1].encode())
    decoder.receive_data(body)
    decoder.receive_data(None)
    parts, name = {}, None
    while (event := decoder.next_event()) is not NEED_DATA:
        if isinstance(event, (Field, File)):
            name, parts[event.name] = event.name, b""
        elif isinstance(event, Data):
            parts[name] += event.data
        if decoder.state.name == "COMPLETE":
            break
    return parts


def test_the_request_goes_first_then_the_archive_as_it_is_read():
    sent = []
    upload = ArchiveUpload({"targets": []}, iter([b"abc", b"", b"defg"]), size=7, on_sent=sent.append)
    body = b"".join(iter(lambda: upload.read(5), b""))
    assert upload.len == len(body)  # a Content-Length for a file
    assert list(_parts(body, upload.content_type)) == ["request", "image"]
    assert _parts(body, upload.content_type) == {"request": json.dumps({"targets": []}).encode(), "image": b"abcdefg"}
    assert sent == [3, 4]


def test_without_a_size_the_body_is_chunked():
    upload = ArchiveUpload({"targets": []}, iter([b"x" * 10]))
    assert upload.len is None  # requests sends an iterator chunked
    assert _parts(b"".join(upload), upload.content_type)["image"] == b"x" * 10


def test_a_source_that_breaks_off_is_an_upload_failure():
    def broken():
        yield b"abc"
        raise OSError("the Docker daemon's image stream broke off")

    with pytest.raises(UploadFailed, match="broke off"):
        b"".join(ArchiveUpload({"targets": []}, broken()))


def test_plain_lines_at_start_every_ten_seconds_and_at_the_end(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(cli_upload.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    archive = cli_upload.LocalArchive("image.tar", iter(()), 100 * 1024 * 1024)
    view = cli_upload.upload_view(False, archive, size_text, out)
    for _ in range(10):
        clock[0] += 3
        view.sent_bytes(10 * 1024 * 1024)
    view.close()
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    # 10 MiB every 3 s: a line at 12 s and 24 s, and the last one
    assert lines == ["uploading image.tar (100.0 MiB)", "uploaded 40.0 MiB (40%)", "uploaded 80.0 MiB (80%)", "uploaded 100.0 MiB"]


def test_a_daemons_size_is_an_estimate(monkeypatch):
    out = io.StringIO()
    view = cli_upload.upload_view(False, cli_upload.LocalArchive("app:1 from the Docker daemon", iter(()), None, 5 * 1024), size_text, out)
    view.close()
    assert "uploading app:1 from the Docker daemon (5.0 KiB, about)" in out.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_json_gets_nothing():
    out = _Terminal()
    view = cli_upload.upload_view(False, cli_upload.LocalArchive("image.tar", iter(()), 2048), size_text, out)
    view.sent_bytes(2048)
    view.close()
    assert "uploading image.tar" in out.getvalue() and "2.0" in out.getvalue()
    quiet = io.StringIO()
    view = cli_upload.upload_view(True, cli_upload.LocalArchive("image.tar", iter(()), 2048), size_text, quiet)
    view.sent_bytes(2048)
    view.close()
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("argv", [
    ["publish", "--to", "local/app:1"],                                          # nothing to publish
    ["publish", "app:1", "--archive", "x.tar", "--to", "local/app:1"],           # both
    ["publish", "--archive", "x.tar", "--upload", "--to", "local/app:1"],         # --upload needs SOURCE
    ["publish", "app:1", "--upload", "--daemon", "a", "--to", "local/app:1"],     # no daemon of imagepub's
])
def test_usage_errors(argv, capsys):
    assert cli.main(argv + ["--url", "http://127.0.0.1:9"]) == cli.EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_a_missing_file_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["publish", "--archive", str(tmp_path / "nope.tar"), "--to", "local/app:1", "--url", "http://127.0.0.1:9"]) == cli.EXIT_USAGE
    assert "nope.tar" in capsys.readouterr().err
