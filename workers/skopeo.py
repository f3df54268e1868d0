"""skopeo: images copied between registries (or from an image archive) without a daemon.

One module for the external tool, as Quay's repository mirroring has
(``util/repomirror/skopeomirror.py``): it runs skopeo and returns result values — the digest it
wrote, what happened to every blob — or raises one of imagepub's typed errors, worded from
skopeo's own last line with every credential scrubbed from it.

Nothing goes on a command line but references and paths. A :class:`Session` is one job's
private directory (0700, removed when the job ends, however it ends; a worker that was killed
leaves it behind for the next session on its machine to sweep): each side's credentials are an
auth file in it (0600), its CA a cert dir in it, and skopeo runs with ``HOME`` pointing there, so
no ``~/.docker/config.json`` or ``containers/auth.json`` of the worker's is ever read. Only its
blob-info cache (where skopeo remembers which repositories hold a blob, to mount rather than
upload it) lives outside, shared by every job on the machine.

What skopeo 1.9 prints without a terminal says nothing about a blob's outcome. So it runs with
``--debug`` on a pipe (full digests: ``Skipping blob … (already present)``, ``Trying to mount
…``, ``Upload of layer … complete``) and with its report on a pseudo-terminal, where it draws a
progress bar per blob (``Copying blob 4a0c025675b9 [==>--] 17.5MiB / 60.0MiB``): the first gives
each blob's outcome, the second its bytes. See README, Design: "Copies between registries".
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pty
import re
import selectors
import shutil
import struct
import subprocess
import tempfile
import termios
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from service import errors

from .registry_errors import classify

log = logging.getLogger(__name__)

# (blob digest, status, bytes done, bytes total); status: waiting, copying, copied, exists, mounted
BlobCallback = Callable[[str, str, int | None, int | None], None]
FINAL = frozenset({"copied", "exists", "mounted"})
SESSION_PREFIX = "imagepub-copy-"
QUICK_TIMEOUT = 120.0  # an inspect or a tag listing: a few requests
TERMINAL_COLUMNS = 400  # wide enough that no progress line is cut
# Anything c/image's signature policy would check is not what a copy is for (cosign signatures
# are copied as the artifacts they are): every image is accepted, as skopeo's own default does.
POLICY = {"default": [{"type": "insecureAcceptAnything"}]}

# skopeo's own words, before the table shared with the daemon (workers/registry_errors.py).
SKOPEO_ERRORS: list[tuple[re.Pattern, type[errors.ImagepubError]]] = [
    (re.compile(r"no image found in (image index|manifest list) for architecture", re.I), errors.ImageNotFound),
    (re.compile(r"x509: |certificate (is not valid|signed by unknown|has expired)|tls: |gave HTTP response to HTTPS client", re.I),
     errors.RegistryTlsFailed),
    (re.compile(r"manifest invalid|manifest blob unknown|unsupported manifest|MANIFEST_INVALID", re.I), errors.PushFailed),
    # a HEAD has no body to say why: ECR answers an expired token so (the caller fetches a fresh one)
    (re.compile(r"\b403 \(Forbidden\)"), errors.AccessDenied),
]


@dataclass(frozen=True)
class Endpoint:
    """One side of a copy: a skopeo image reference (``docker://host/repo:tag``,
    ``docker://host/repo@sha256:…``, ``oci:DIR:TAG``, ``oci-archive:FILE``,
    ``docker-archive:FILE``) and how to reach its registry."""

    reference: str
    auth: Mapping[str, str] | None = None  # {"username", "password", "serveraddress"}: Target.auth_config()
    ca_file: str | None = None
    tls_verify: bool = True

    @property
    def is_registry(self) -> bool:
        return self.reference.startswith("docker://")

    @property
    def host(self) -> str:
        return self.reference.removeprefix("docker://").split("/", 1)[0]

    @property
    def repository(self) -> str:
        """``docker://host/repository`` without the tag or digest."""
        name = self.reference.split("@", 1)[0]
        head, _, last = name.rpartition("/")
        return f"{head}/{last.split(':', 1)[0]}"

    def at(self, tag_or_digest: str) -> "Endpoint":
        """The same repository at another tag or digest."""
        separator = "@" if tag_or_digest.startswith("sha256:") else ":"
        return Endpoint(self.repository + separator + tag_or_digest, self.auth, self.ca_file, self.tls_verify)


@dataclass
class CopyResult:
    digest: str  # of the manifest (or index) written at the destination
    blobs: dict[str, str] = field(default_factory=dict)  # blob digest -> copied | exists | mounted


# --- scrubbing --------------------------------------------------------------------------------

_GENERIC_SECRETS = [
    (re.compile(r"(?i)(authorization:?\s*)(basic|bearer)\s+\S+"), r"\1\2 ***"),
    (re.compile(r"(?i)(--(?:src-|dest-)?(?:creds|password|registry-token)[= ])\S+"), r"\1***"),
    (re.compile(r'(?i)("?(?:password|auth|identitytoken|registrytoken|access_token|token)"?\s*[:=]\s*)"[^"]*"'), r'\1"***"'),
    (re.compile(r"([?&](?:_state|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|token)=)[^&\s\"]+"), r"\1***"),
]


class Scrubber:
    """Removes credentials from text: every secret it was given (as written, and in the base64
    forms an auth header or auth file carries), and what looks like one anyway."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None, username: str | None = None) -> None:
        if not secret or len(secret) < 4:
            return
        forms = {secret, base64.b64encode(secret.encode()).decode()}
        if username:
            forms.add(base64.b64encode(f"{username}:{secret}".encode()).decode())
        self.secrets |= forms

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        for pattern, replacement in _GENERIC_SECRETS:
            text = pattern.sub(replacement, text)
        return text


# --- reading skopeo's output ------------------------------------------------------------------

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(r"^Copying (?:blob|config) ([0-9a-f]{10,64})\b(.*)$")
_BYTES = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|b|B)\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|b|B)")
_UNITS = {"b": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_MSG = re.compile(r'\bmsg="((?:[^"\\]|\\.)*)"')
_LEVEL = re.compile(r"\blevel=(\w+)")
_DIGEST = r"sha256:([0-9a-f]{64})"
_SEEN = re.compile(rf"(?:Checking if we can reuse blob|Downloading /v2/.+/blobs/) ?{_DIGEST}")
_MOUNT = re.compile(r"Trying to mount .*[?&]mount=sha256%3A([0-9a-f]{64})")
_SKIPPED = re.compile(rf"Skipping blob {_DIGEST} \(already present\)")
_UPLOADED = re.compile(rf"Upload of layer {_DIGEST} complete")
# The destination refused a manifest: skopeo goes on to try another manifest type, which
# --preserve-digests forbids, and its last word is about that; the refusal is the reason.
_REFUSED = re.compile(r"Upload of manifest (?:list )?type \S+ failed: (.+)")


def _size(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def _unquote(message: str) -> str:
    try:
        return json.loads(f'"{message}"')
    except ValueError:
        return message


@dataclass
class _Blob:
    status: str = "waiting"
    current: int | None = None
    total: int | None = None
    mount_tried: bool = False


class CopyOutput:
    """Follows one ``skopeo --debug copy``: blob outcomes from the debug log, byte progress from
    the bars on the terminal. ``on_blob`` hears every change."""

    def __init__(self, on_blob: BlobCallback | None = None, sizes: Mapping[str, int] | None = None):
        self.on_blob = on_blob
        self.sizes = dict(sizes or {})
        self.blobs: dict[str, _Blob] = {}
        self.messages: list[str] = []  # what skopeo said that was not debug detail (the error, at the end)
        self.refusals: list[str] = []  # why the destination refused a manifest, when it did
        self._terminal = ""
        self._log = ""

    # raw bytes as they arrive
    def terminal(self, data: bytes) -> None:
        self._terminal = _ESCAPES.sub("", self._terminal + data.decode("utf-8", "replace"))
        *lines, self._terminal = re.split(r"[\r\n]+", self._terminal)
        for line in lines:
            self.bar_line(line.strip())

    def log(self, data: bytes) -> None:
        self._log += data.decode("utf-8", "replace")
        *lines, self._log = self._log.split("\n")
        for line in lines:
            self.log_line(line)

    def close(self) -> None:
        if self._log.strip():
            self.log_line(self._log)
        self._log = ""

    # one line of either
    def log_line(self, line: str) -> None:
        found = _MSG.search(line)
        level = _LEVEL.search(line)
        if not found:
            if line.strip():
                self._keep(line.strip())
            return
        message = _unquote(found.group(1))
        if level and level.group(1) != "debug":
            self._keep(message)
            return
        if match := _REFUSED.search(message):
            self.refusals.append(match.group(1))
        elif match := _UPLOADED.search(message):
            self._final("sha256:" + match.group(1), "copied")
        elif match := _SKIPPED.search(message):
            digest = "sha256:" + match.group(1)
            self._final(digest, "mounted" if self._blob(digest).mount_tried else "exists")
        elif match := _MOUNT.search(message):
            self._blob("sha256:" + match.group(1)).mount_tried = True
        elif match := _SEEN.search(message):
            self._blob("sha256:" + match.group(1))

    def bar_line(self, line: str) -> None:
        match = _BAR.match(line)
        if not match:
            return
        digest = self._known(match.group(1))
        if digest is None or self.blobs[digest].status in FINAL:
            return
        amounts = _BYTES.search(match.group(2))
        if amounts:
            blob = self.blobs[digest]
            total = self.sizes.get(digest) or _size(amounts.group(3), amounts.group(4))
            current = min(_size(amounts.group(1), amounts.group(2)), total)
            if (blob.status, blob.current, blob.total) != ("copying", current, total):
                blob.status, blob.current, blob.total = "copying", current, total
                self._tell(digest)

    def finish(self) -> dict[str, str]:
        """Every blob's outcome once skopeo succeeded: one it neither uploaded nor reused under
        our eyes (an image config already at the destination) was there before."""
        for digest, blob in self.blobs.items():
            if blob.status not in FINAL:
                self._final(digest, "exists")
        return {digest: blob.status for digest, blob in self.blobs.items()}

    def error_message(self) -> str:
        """Why skopeo failed: its last word, or the destination's refusal of a manifest that
        led to it."""
        if self.refusals:
            return self.refusals[0]
        fatal = [m for m in self.messages if m]
        return fatal[-1] if fatal else "skopeo failed without a message"

    def _keep(self, message: str) -> None:
        self.messages = (self.messages + [message])[-20:]

    def _blob(self, digest: str) -> _Blob:
        if digest not in self.blobs:
            self.blobs[digest] = _Blob(total=self.sizes.get(digest))
            self._tell(digest)
        return self.blobs[digest]

    def _known(self, prefix: str) -> str | None:
        for digest in self.blobs:
            if digest[7:].startswith(prefix):
                return digest
        return None

    def _final(self, digest: str, status: str) -> None:
        blob = self._blob(digest)
        if blob.status in FINAL:
            return  # a blob two platforms share: what happened first stands
        blob.status = status
        if blob.total:
            blob.current = blob.total
        self._tell(digest)

    def _tell(self, digest: str) -> None:
        if self.on_blob:
            blob = self.blobs[digest]
            self.on_blob(digest, blob.status, blob.current, blob.total)


# --- running it -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skopeo:
    """How to run skopeo on this worker: the binary, the environment it gets (proxies and trust
    settings only: never the worker's secrets), and where its blob-info cache lives."""

    binary: str = "skopeo"
    environment: Mapping[str, str] = field(default_factory=dict)
    data_home: str | None = None

    @classmethod
    def from_config(cls, settings) -> "Skopeo":
        return cls(settings.skopeo.binary, settings.skopeo.environment, settings.skopeo.data_home)

    @contextlib.contextmanager
    def session(self, scrub: Scrubber | None = None) -> Iterator["Session"]:
        """A private directory for one job's copies, removed afterwards however they end."""
        _sweep_abandoned()
        directory = Path(tempfile.mkdtemp(prefix=f"{SESSION_PREFIX}{os.getpid()}-"))
        try:
            yield Session(self, directory, scrub or Scrubber())
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _sweep_abandoned() -> None:
    """Remove the session directories of workers that died (kill -9 leaves no finally)."""
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            pid = entry.name.removeprefix(SESSION_PREFIX).split("-", 1)[0]
            if entry.name.startswith(SESSION_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Session:
    """One job's runs of skopeo, sharing its private directory."""

    def __init__(self, skopeo: Skopeo, directory: Path, scrub: Scrubber):
        self.skopeo, self.dir, self.scrub = skopeo, directory, scrub
        self._files: dict[str, Path] = {}
        self._copies = 0
        (directory / "home").mkdir(mode=0o700)
        (directory / "tmp").mkdir(mode=0o700)
        (directory / "registries.d").mkdir(mode=0o700)
        (directory / "registries.conf").write_text("")  # no mirrors or rewrites of the machine's
        (directory / "policy.json").write_text(json.dumps(POLICY))

    # the files a side needs
    def _private(self, name: str, content: bytes) -> Path:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return path

    def auth_file(self, endpoint: Endpoint) -> Path | None:
        auth = endpoint.auth
        if not auth or not auth.get("username"):
            return None
        self.scrub.add(auth.get("password"), auth.get("username"))
        token = base64.b64encode(f"{auth['username']}:{auth.get('password') or ''}".encode()).decode()
        content = json.dumps({"auths": {endpoint.host: {"auth": token}}}).encode()
        key = "auth-" + hashlib.sha256(content).hexdigest()[:16] + ".json"
        if key not in self._files:
            self._files[key] = self._private(key, content)
        return self._files[key]

    def cert_dir(self, endpoint: Endpoint) -> Path | None:
        if not endpoint.ca_file:
            return None
        key = "certs-" + hashlib.sha256(endpoint.ca_file.encode()).hexdigest()[:16]
        if key not in self._files:
            try:
                pem = Path(endpoint.ca_file).read_bytes()
            except OSError as exc:
                raise errors.JobFailed(
                    f"cannot read the ca_file configured for {endpoint.host}: {exc.strerror}", code="registry_misconfigured"
                ) from None
            directory = self.dir / key
            directory.mkdir(mode=0o700)
            (directory / "ca.crt").write_bytes(pem)
            self._files[key] = directory
        return self._files[key]

    def _side(self, endpoint: Endpoint, prefix: str) -> list[str]:
        """``--{prefix}authfile`` etc. for one side (``src-``, ``dest-``, or ``""``)."""
        if not endpoint.is_registry:
            return []
        args = [f"--{prefix}tls-verify={'true' if endpoint.tls_verify else 'false'}"]
        auth = self.auth_file(endpoint)
        args += [f"--{prefix}authfile={auth}"] if auth else [f"--{prefix}no-creds"]
        certs = self.cert_dir(endpoint)
        if certs:
            args.append(f"--{prefix}cert-dir={certs}")
        return args

    def _env(self) -> dict[str, str]:
        env = dict(self.skopeo.environment)
        home = str(self.dir / "home")
        env.update(HOME=home, XDG_RUNTIME_DIR=home, XDG_CONFIG_HOME=home, TMPDIR=str(self.dir / "tmp"),
                   CONTAINERS_REGISTRIES_CONF=str(self.dir / "registries.conf"))
        if self.skopeo.data_home:
            env["XDG_DATA_HOME"] = self.skopeo.data_home  # the blob-info cache, shared by the machine's jobs
        return env

    def _global(self) -> list[str]:
        return [self.skopeo.binary, f"--policy={self.dir / 'policy.json'}", f"--registries.d={self.dir / 'registries.d'}",
                f"--tmpdir={self.dir / 'tmp'}"]

    # the commands
    def inspect_raw(self, endpoint: Endpoint, config: bool = False) -> bytes:
        """The manifest (or, with ``config``, the image config) exactly as the registry serves it."""
        argv = self._global() + ["inspect", "--raw"] + (["--config"] if config else []) + self._side(endpoint, "")
        return self._quick(argv + [endpoint.reference], f"inspect {endpoint.reference}")

    def list_tags(self, endpoint: Endpoint) -> list[str]:
        argv = self._global() + ["list-tags"] + self._side(endpoint, "") + [endpoint.repository]
        return json.loads(self._quick(argv, f"list tags of {endpoint.repository}")).get("Tags") or []

    def copy(self, source: Endpoint, destination: Endpoint, *, all_images: bool = True, index_only: bool = False,
             on_blob: BlobCallback | None = None, sizes: Mapping[str, int] | None = None,
             check: Callable[[], None] | None = None, preserve_digests: bool = True,
             manifest_format: str | None = None) -> CopyResult:
        """``skopeo copy --preserve-digests``: the destination gets the very bytes of the source's
        manifests (or the copy fails). ``all_images`` copies every image of an index;
        ``index_only`` the index alone (its images must be at the destination already).
        ``check`` is called a few times a second and may raise to stop the copy. Without
        ``preserve_digests`` skopeo may rewrite manifests (compress the layers of a
        ``docker-archive``, whose manifest it makes), in ``manifest_format`` (``--format``:
        ``v2s2``, ``oci``) when given."""
        self._copies += 1
        digest_file = self.dir / f"digest-{self._copies}"
        argv = self._global() + ["--debug", "copy"] + (["--preserve-digests"] if preserve_digests else [])
        argv += ([f"--format={manifest_format}"] if manifest_format else []) + [f"--digestfile={digest_file}"]
        if index_only:
            argv.append("--multi-arch=index-only")
        elif all_images:
            argv.append("--all")
        argv += self._side(source, "src-") + self._side(destination, "dest-") + [source.reference, destination.reference]
        output = CopyOutput(on_blob, sizes)
        what = f"copy {source.reference} to {destination.reference}"
        code = self._stream(argv, output, check)
        output.close()
        if code != 0:
            raise self._error(output.error_message())
        try:
            written = digest_file.read_text().strip()
        except OSError:
            raise errors.CopyFailed(f"{what}: skopeo wrote no digest") from None
        return CopyResult(digest=written, blobs=output.finish())

    def _quick(self, argv: list[str], what: str) -> bytes:
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=self._env(), timeout=QUICK_TIMEOUT)
        except FileNotFoundError:
            raise errors.CopyFailed(f"{what}: skopeo is not installed on this worker ({self.skopeo.binary})") from None
        except subprocess.TimeoutExpired:
            raise errors.Timeout(f"{what}: no answer in {QUICK_TIMEOUT:g} s") from None
        if done.returncode != 0:
            output = CopyOutput()
            output.log(done.stderr)
            output.close()
            raise self._error(output.error_message())
        return done.stdout

    def _stream(self, argv: list[str], output: CopyOutput, check: Callable[[], None] | None) -> int:
        """Run skopeo with its report on a pseudo-terminal and its log on a pipe, feeding both
        to ``output`` as they come; stop it if ``check`` raises (a cancel, the time limit)."""
        controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, TERMINAL_COLUMNS, 0, 0))
        try:
            # Not in a session of its own: killing the worker's process group (its machine went
            # away) ends the copy too.
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE, env=self._env())
        except FileNotFoundError:
            os.close(controller)
            raise errors.CopyFailed(f"skopeo is not installed on this worker ({self.skopeo.binary})") from None
        finally:
            os.close(terminal)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(controller, selectors.EVENT_READ, output.terminal)
                selector.register(process.stderr, selectors.EVENT_READ, output.log)
                while selector.get_map():
                    for key, _ in selector.select(timeout=0.25):
                        try:
                            data = os.read(key.fd, 65536)
                        except OSError:  # EIO: the terminal's last writer is gone
                            data = b""
                        if data:
                            key.data(data)
                        else:
                            selector.unregister(key.fileobj)
                    if check:
                        check()
            return process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()
            os.close(controller)

    def _error(self, message: str) -> errors.ImagepubError:
        """skopeo's last word (it names the reference and the step), scrubbed and classified."""
        message = self.scrub(message)
        log.info("skopeo failed: %s", message)
        return classify(message, errors.CopyFailed, first=SKOPEO_ERRORS)
