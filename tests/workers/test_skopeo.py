"""workers/skopeo.py without registries: reading skopeo's output (its debug log and its
progress bars, as skopeo 1.9.3 writes them: the lines below were captured from it), sorting its
failures by their real words, scrubbing credentials, and the private session a job's runs share
(a stand-in binary records what it was given)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from service import errors
from workers.skopeo import CopyOutput, Endpoint, Scrubber, Skopeo, SKOPEO_ERRORS
from workers.registry_errors import classify

A, B, C, D = ("sha256:" + c * 64 for c in "abcd")
HEX = {d: d.removeprefix("sha256:") for d in (A, B, C, D)}


def debug(message: str, level: str = "debug") -> bytes:
    return (f'time="2026-12-01T14:14:28Z" level={level} msg="' + json.dumps(message)[1:-1] + '"\n').encode()


def feed_log(output: CopyOutput, *lines: bytes) -> None:
    for line in lines:
        output.log(line)
    output.close()


# --- outcomes and bytes ------------------------------------------------------------------------


def test_each_blob_gets_its_outcome_from_the_debug_log():
    seen = []
    output = CopyOutput(lambda *change: seen.append(change), sizes={A: 10, B: 20, C: 30})
    feed_log(
        output,
        debug(f"Checking if we can reuse blob {A}: general substitution = false, compression for MIME type \"x\" = true"),
        debug(f"Checking if we can reuse blob {B}: general substitution = false"),
        debug(f"Checking if we can reuse blob {C}: general substitution = false"),
        debug("... not present"),  # concurrent goroutines: these name no blob, and are not read
        debug(f"Trying to reuse cached location {B} compressed with gzip in 127.0.0.1:5000/other/app"),
        debug(f"Trying to mount /v2/dst/app/blobs/uploads/?from=other%2Fapp&mount=sha256%3A{HEX[B]}"),
        debug("... mount OK"),
        debug("... already exists"),
        debug(f"Skipping blob {B} (already present):"),
        debug(f"Skipping blob {A} (already present):"),
        debug(f"Downloading /v2/src/app/blobs/{D}"),  # a config: read from the source...
        debug(f"Upload of layer {C} complete"),
        b"Writing manifest to image destination\n",
    )
    assert output.finish() == {A: "exists", B: "mounted", C: "copied", D: "exists"}  # ...and found at the destination
    final = {digest: (status, current, total) for digest, status, current, total in seen if status in {"exists", "mounted", "copied"}}
    assert final == {A: ("exists", 10, 10), B: ("mounted", 20, 20), C: ("copied", 30, 30), D: ("exists", None, None)}
    assert seen[0] == (A, "waiting", None, 10)


def test_byte_progress_comes_from_the_bars_on_the_terminal():
    seen = []
    output = CopyOutput(lambda *change: seen.append(change), sizes={C: 62914560 + 123})
    output.log(debug(f"Checking if we can reuse blob {C}: general substitution = false"))
    output.log(debug(f"Checking if we can reuse blob {D}: general substitution = false"))
    terminal = (
        "Getting image source signatures\r\n"
        f"Copying blob {HEX[C][:12]} [==========>---------------------------] 17.5MiB / 60.0MiB\r\n"
        f"Copying blob {HEX[D][:12]} [======================================] 1.2KiB / 1.2KiB\r\n"
        f"\x1b[2A\x1b[JCopying blob {HEX[C][:12]} [=======================>--------------] 37.7MiB / 60.0MiB\r\n"
        f"Copying blob {HEX[D][:12]} done  \r\n"
    ).encode()
    for i in range(len(terminal)):  # however the bytes arrive
        output.terminal(terminal[i:i + 1])
    copying = [(digest, current, total) for digest, status, current, total in seen if status == "copying"]
    assert copying == [
        (C, int(17.5 * 2**20), 62914560 + 123),  # the exact size when the manifest told it
        (D, int(1.2 * 2**10), int(1.2 * 2**10)),
        (C, int(37.7 * 2**20), 62914560 + 123),
    ]


def test_a_final_outcome_stands():
    """A blob two platforms share: uploaded for the first, found for the second; and a late bar."""
    output = CopyOutput()
    feed_log(output, debug(f"Upload of layer {A} complete"), debug(f"Skipping blob {A} (already present):"))
    output.terminal(f"Copying blob {HEX[A][:12]} [===>--] 1.0MiB / 2.0MiB\r\n".encode())
    assert output.finish() == {A: "copied"}


# --- failures ----------------------------------------------------------------------------------


def failure(*lines: bytes) -> errors.ImagepubError:
    output = CopyOutput()
    feed_log(output, *lines)
    return classify(output.error_message(), errors.CopyFailed, first=SKOPEO_ERRORS)


# skopeo 1.9.3's last words, as captured from it against distribution 2.8 and the ECR seam
@pytest.mark.parametrize("message, code, transient", [
    ('initializing source docker://127.0.0.1:5000/src/app:nope: reading manifest nope in 127.0.0.1:5000/src/app: manifest unknown: manifest unknown',
     "manifest_not_found", False),
    ('Error parsing image name "docker://127.0.0.1:5001/x/app:1": reading manifest 1 in 127.0.0.1:5001/x/app: unauthorized: authentication required',
     "auth_failed", False),
    ('copying system image from manifest list: trying to reuse blob sha256:cf9d at destination: checking whether a blob sha256:cf9d exists in '
     '127.0.0.1:5001/x/app: unauthorized: authentication required', "auth_failed", False),
    ('choosing an image from manifest list docker://127.0.0.1:5000/src/app:1: no image found in image index for architecture s390x, variant "", OS linux',
     "image_not_found", False),
    ('initializing source docker://127.0.0.1:1/src/app:1: pinging container registry 127.0.0.1:1: Get "http://127.0.0.1:1/v2/": dial tcp '
     '127.0.0.1:1: connect: connection refused', "registry_unavailable", True),
    ('initializing source docker://r.example/app:1: reading manifest 1 in r.example/app: toomanyrequests: Rate exceeded', "throttled", True),
    ('writing manifest: uploading manifest 1 to r.example/app: received unexpected HTTP status: 503 Service Unavailable', "registry_unavailable", True),
    ('copying image 1/3 from manifest list: trying to reuse blob sha256:4dbb at destination: failed to read from destination repository '
     'team/app: 403 (Forbidden)', "access_denied", False),
    ('reading manifest 1 in 1234.dkr.ecr.us-east-1.amazonaws.com/app: denied: Your authorization token has expired. Reauthenticate and try again.',
     "auth_failed", True),  # TokenRejected: the caller fetches a fresh token once
    ('pinging container registry 1234.dkr.ecr.us-east-1.amazonaws.com: Get "https://1234.dkr.ecr.us-east-1.amazonaws.com/v2/": x509: '
     'certificate signed by unknown authority', "registry_tls_failed", False),
    ('pinging container registry 127.0.0.1:5000: Get "https://127.0.0.1:5000/v2/": http: server gave HTTP response to HTTPS client',
     "registry_tls_failed", False),
    ('writing manifest: uploading manifest 1 to r.example/app: manifest invalid: manifest invalid', "push_failed", False),
    ('something skopeo never said before', "copy_failed", False),
])
def test_failures_by_their_real_words(message, code, transient):
    exc = failure(debug("GET https://r.example/v2/"), debug(message, "fatal"))
    assert exc.code == code and exc.transient is transient and exc.message == message


def test_a_refused_manifest_is_the_reason_not_the_conversion_skopeo_tried_next():
    exc = failure(
        debug("Trying to use manifest list type application/vnd.oci.image.index.v1+json…"),
        debug("Upload of manifest list type application/vnd.oci.image.index.v1+json failed: uploading manifest 1.0 to "
              "r.example/team/app: tag invalid: The image tag '1.0' already exists in the 'team/app' repository and cannot be "
              "overwritten because the repository is immutable."),
        debug("Trying to use manifest list type application/vnd.docker.distribution.manifest.list.v2+json…"),
        debug('Manifest list must be converted to type "application/vnd.docker.distribution.manifest.list.v2+json" to be written '
              'to destination, but we cannot modify it: "Instructed to preserve digests"', "fatal"),
    )
    assert exc.code == "tag_immutable" and "cannot be overwritten" in exc.message


def test_the_daemon_and_skopeo_share_one_table():
    from workers.docker_engine import classify_stream_error

    message = "toomanyrequests: You have reached your pull rate limit."
    assert type(classify_stream_error(message, errors.PushFailed)) is type(failure(debug(message, "fatal"))) is errors.Throttled


# --- credentials ---------------------------------------------------------------------------------


def test_scrubbing_takes_every_form_of_a_secret():
    scrub = Scrubber()
    scrub.add("s3cret-pass", "ci-user")
    text = ('auth failed for ci-user with s3cret-pass; file had {"auth":"Y2ktdXNlcjpzM2NyZXQtcGFzcw=="} '
            '"password": "other"  Authorization: Basic Zm9vOmJhcg== --dest-creds=u:p '
            'PATCH /v2/x/blobs/uploads/1?_state=abcDEF&digest=sha256%3Aa')
    clean = scrub(text)
    assert "s3cret-pass" not in clean and "Y2ktdXNlcjpzM2NyZXQtcGFzcw==" not in clean and "Zm9vOmJhcg==" not in clean
    assert "u:p" not in clean and '"other"' not in clean and "abcDEF" not in clean
    assert "ci-user" in clean and "digest=sha256%3Aa" in clean  # what is not secret stays readable


FAKE = r'''#!{python}
import json, os, sys
record = os.environ["FAKE_RECORD"]
files = {{}}
for arg in sys.argv:
    for flag in ("--authfile=", "--src-authfile=", "--dest-authfile="):
        if arg.startswith(flag):
            path = arg.split("=", 1)[1]
            files[path] = {{"mode": os.stat(path).st_mode & 0o777, "dir_mode": os.stat(os.path.dirname(path)).st_mode & 0o777,
                           "content": json.load(open(path))}}
    if arg.startswith("--digestfile="):
        open(arg.split("=", 1)[1], "w").write("sha256:" + "e" * 64)
with open(record, "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "env": dict(os.environ), "files": files}}) + "\n")
if "sleep" in os.environ.get("FAKE_MODE", ""):
    import time; time.sleep(30)
if "fail" in os.environ.get("FAKE_MODE", ""):
    sys.stderr.write('time="x" level=fatal msg="reading manifest 1 in r/app: unauthorized: authentication required for {secret}"\n')
    sys.exit(1)
if "inspect" in sys.argv:
    sys.stdout.write('{{"schemaVersion":2}}')
'''


@pytest.fixture
def fake(tmp_path):
    """A stand-in skopeo that records its argv, environment and auth files."""
    binary = tmp_path / "skopeo"
    binary.write_text(FAKE.format(python=sys.executable, secret="s3cret-pass"))
    binary.chmod(0o755)
    record = tmp_path / "record.jsonl"

    def make(mode: str = "") -> Skopeo:
        return Skopeo(str(binary), {"PATH": "/usr/bin:/bin", "FAKE_RECORD": str(record), "FAKE_MODE": mode}, data_home=str(tmp_path / "cache"))

    make.calls = lambda: [json.loads(line) for line in record.read_text().splitlines()]
    return make


SOURCE = Endpoint("docker://src.example/team/app:1", {"username": "ci-user", "password": "s3cret-pass", "serveraddress": "src.example"})


def test_nothing_but_paths_on_the_command_line_and_a_private_auth_file(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("SECURE_REGISTRY_PASSWORD", "worker-secret")  # the worker's own environment
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    destination = Endpoint("docker://127.0.0.1:5000/team/app:1", tls_verify=False)
    ecr = Endpoint("docker://1234.dkr.ecr.us-east-1.amazonaws.com/team/app:1", {"username": "AWS", "password": "ecr-token-xyz"}, str(ca))
    with fake().session() as session:
        directory = session.dir
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert session.copy(SOURCE, destination).digest == "sha256:" + "e" * 64
        session.inspect_raw(ecr)
    first, second = fake.calls()
    argv = " ".join(first["argv"] + second["argv"])
    for secret in ("s3cret-pass", "ecr-token-xyz", "worker-secret"):
        assert secret not in argv and secret not in json.dumps(first["env"]) + json.dumps(second["env"])
    assert "--src-tls-verify=true" in first["argv"] and "--dest-tls-verify=false" in first["argv"] and "--dest-no-creds" in first["argv"]
    assert "--preserve-digests" in first["argv"] and "--all" in first["argv"]
    (path, auth), = first["files"].items()
    assert auth["mode"] == 0o600 and auth["dir_mode"] == 0o700 and Path(path).parent == directory
    assert auth["content"] == {"auths": {"src.example": {"auth": "Y2ktdXNlcjpzM2NyZXQtcGFzcw=="}}}
    assert first["env"]["HOME"].startswith(str(directory)) and first["env"]["XDG_DATA_HOME"] == str(tmp_path / "cache")
    assert "SECURE_REGISTRY_PASSWORD" not in first["env"]
    cert_dir = next(a.split("=", 1)[1] for a in second["argv"] if a.startswith("--cert-dir="))
    assert Path(cert_dir).parent == directory and "--tls-verify=true" in second["argv"]
    assert not directory.exists()  # gone with the session


def test_the_session_goes_away_when_the_job_fails_and_the_error_names_no_secret(fake):
    with pytest.raises(errors.AuthFailed) as raised:
        with fake("fail").session() as session:
            directory = session.dir
            session.copy(SOURCE, Endpoint("docker://dst.example/app:1"))
    assert "s3cret-pass" not in raised.value.message and "***" in raised.value.message
    assert not directory.exists()


def test_a_stop_request_kills_skopeo_and_removes_the_session(fake):
    class Stop(Exception):
        pass

    calls = []

    def check():
        calls.append(time.monotonic())
        if len(calls) > 2:
            raise Stop

    started = time.monotonic()
    with pytest.raises(Stop):
        with fake("sleep").session() as session:
            directory = session.dir
            session.copy(SOURCE, Endpoint("docker://dst.example/app:1"), check=check)
    assert time.monotonic() - started < 5  # not the 30 s the stand-in sleeps
    assert not directory.exists()
    assert subprocess.run(["pgrep", "-f", str(directory)], capture_output=True).stdout == b""


def test_a_killed_workers_sessions_are_swept_by_the_next(fake):
    dead = subprocess.Popen(["true"])
    dead.wait()
    base = Path(tempfile.gettempdir())
    abandoned = base / f"imagepub-copy-{dead.pid}-abandoned"
    live = base / f"imagepub-copy-{os.getpid()}-busy"
    abandoned.mkdir(mode=0o700)
    live.mkdir(mode=0o700)
    try:
        (abandoned / "auth-x.json").write_text("{}")
        with fake().session():
            pass
        assert not abandoned.exists() and live.exists()
    finally:
        for path in (abandoned, live):
            if path.exists():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()


def test_no_skopeo_installed_is_a_clear_failure(tmp_path):
    with pytest.raises(errors.CopyFailed, match="skopeo is not installed"):
        with Skopeo(str(tmp_path / "missing-skopeo"), {"PATH": "/usr/bin"}).session() as session:
            session.copy(SOURCE, Endpoint("docker://dst.example/app:1"))


def test_endpoint_names():
    endpoint = Endpoint("docker://127.0.0.1:5000/team/app:1")
    assert endpoint.host == "127.0.0.1:5000" and endpoint.repository == "docker://127.0.0.1:5000/team/app"
    assert endpoint.at("sha256:" + "a" * 64).reference == "docker://127.0.0.1:5000/team/app@sha256:" + "a" * 64
    assert endpoint.at("sha256:" + "a" * 64).at("2").reference == "docker://127.0.0.1:5000/team/app:2"
