"""All of imagepub's configuration, read in one place.

The YAML file named by ``IMAGEPUB_CONFIG`` declares what is stable for a deployment (registries,
clients, limits); environment variables override what changes per deployment. Nothing else in
the code base reads ``os.environ``: the rest receives a :class:`Settings`.

Secrets never live in the YAML: a registry names the environment variable or file its password
comes from, and the password is only read, on the worker, at the moment it is used.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ConfigError(Exception):
    """The configuration file or environment cannot be used; the message says why."""


@dataclass(frozen=True)
class RepositoryDefaults:
    """Settings for ECR repositories that imagepub creates."""

    image_tag_mutability: str = "MUTABLE"
    scan_on_push: bool = False
    encryption_type: str = "AES256"
    kms_key: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Registry:
    """A named place imagepub may push to or pull from.

    ``type: registry`` is any OCI registry (Docker Hub included) at ``host``; ``type: ecr`` is an
    Amazon ECR registry whose host and credentials come from the ECR API.
    """

    name: str
    type: str
    host: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    region: str | None = None
    account_id: str | None = None
    role_arn: str | None = None
    create_repositories: bool = False
    repository_defaults: RepositoryDefaults = field(default_factory=RepositoryDefaults)
    # TLS for daemonless clients (copies between registries; the Docker daemon has its own
    # certs.d and insecure-registries): a CA to trust for this registry, and whether it may be
    # plain HTTP or unverified TLS (Docker's "insecure registry"; the default for loopback hosts,
    # as the daemon has it).
    ca_file: str | None = None
    insecure: bool = False

    @property
    def tls_verify(self) -> bool:
        return not self.insecure

    def password(self) -> str | None:
        """The registry password, read now from its environment variable or file."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"registry {self.name!r}: environment variable {self.password_env} is not set"
                )
            return value
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"registry {self.name!r}: cannot read password_file: {exc.strerror}"
                ) from None
        return None

    def public(self) -> dict[str, Any]:
        """What callers may know about this registry: never where its secrets live."""
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == "registry":
            out["host"] = self.host
        else:
            out["region"] = self.region
            if self.account_id:
                out["account_id"] = self.account_id
            out["create_repositories"] = self.create_repositories
        return out


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    max_targets: int = 20
    max_tags_per_target: int = 20
    max_page_size: int = 200
    max_queued_jobs: int = 10_000
    default_rate_limit: str | None = None
    max_context_bytes: int = 50 * 1024 * 1024
    # Entries in a build context. Empty ones cost a few bytes compressed but time in the API's
    # check and the daemon's unpacking (~17 µs each here); 10,000 covers a service's source
    # tree, and a context near 50 MiB with more files than that is rare (node_modules belongs
    # in .dockerignore). Raise it for contexts of many small files.
    max_context_entries: int = 10_000
    # Live event streams one API process serves at once. Each holds a greenlet and its socket
    # for as long as the job runs (the process' one reader hands it its job's events:
    # service/followers.py; docs/benchmarks.md, "A thousand followers"); the default is the
    # gevent worker's connections per process. Followers beyond it get 503 and poll (the CLI
    # does so by itself).
    event_streams_per_process: int = 1000
    # An uploaded image archive (POST /v1/publish, multipart). S3 takes at most 5 GiB in one PUT,
    # the way the API hands an archive to an s3 artifact store (README, Design): the bound.
    max_archive_bytes: int = 2 * 1024**3


MAX_ARCHIVE_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Artifacts:
    """Where uploads (image archives, build contexts) wait for the worker that runs their job:
    a place the API and every worker reach. ``type: directory`` is a path on one host (or a
    volume every pod mounts); ``type: s3`` a bucket, which only workers have credentials for
    (the API stores through URLs a worker presigns: service/artifacts.py)."""

    type: str = "directory"
    path: str | None = None
    bucket: str | None = None
    prefix: str = "imagepub/uploads/"
    region: str | None = None
    endpoint_url: str | None = None


# audit: read the audit trail (GET /v1/audit), which admin may too
SCOPES = ("publish", "pull", "build", "read", "admin", "audit")


@dataclass(frozen=True)
class Client:
    """An API caller: who it is (by the SHA-256 of its token), what it may do, where."""

    name: str
    token_sha256: str
    scopes: frozenset[str]
    repositories: tuple[str, ...] = ("*",)
    rate_limit: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 120.0


@dataclass(frozen=True)
class Recovery:
    """How jobs whose worker died are found and run again (see workers/supervisor.py)."""

    lock_ttl_seconds: float = 30.0
    scan_interval_seconds: float = 10.0
    max_worker_losses: int = 3


@dataclass(frozen=True)
class Audit:
    """The audit trail (service/audit.py): kept this long, whatever happens to jobs."""

    retention_days: int = 400


@dataclass(frozen=True)
class Webhooks:
    """Callbacks when jobs end (see workers/outbox.py)."""

    secret_env: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_attempts: int = 8
    timeout_seconds: float = 10.0  # one delivery, all of it: resolve, connect, send, the answer's head
    concurrency: int = 4  # deliveries at once per worker, on threads of their own


@dataclass(frozen=True)
class Builds:
    """How a worker's daemon runs a build's ``RUN`` steps. ``network`` is the Docker network
    their containers join: ``none`` (the default: a loopback of their own, nothing else), or a
    network the operator made for builds and locked down (``docker network create --internal``,
    or one whose only way out is a proxy), or ``default``/``bridge``, the daemon's own bridge.
    A tenant's ``RUN`` step runs the tenant's code next to the workers: on a network that reaches
    Redis, the cloud's metadata service (the node's credentials) or other internal services, it
    reaches them too. ``host`` (and ``container:…``) would hand it the daemon host's own network,
    and are refused.

    ``memory_bytes`` bounds the memory of each ``RUN`` step's container (swap included), so
    that one tenant's build cannot take the daemon host's memory from every other job there;
    None sets no bound."""

    network: str = "none"
    memory_bytes: int | None = 4 * 1024**3


@dataclass(frozen=True)
class Console:
    """The web console (service/console/): how long a signed-in session lives idle and at most,
    and how many reverse proxies in front of the API may say (``X-Forwarded-Proto``) that the
    browser came over TLS; with none, that header is ignored."""

    session_idle_seconds: int = 8 * 3600
    session_lifetime_seconds: int = 24 * 3600
    trusted_proxies: int = 0


@dataclass(frozen=True)
class SkopeoSettings:
    """How workers run skopeo for copies between registries (workers/skopeo.py): the program,
    the only environment it gets (the proxy and trust variables of the worker's, never its
    secrets), and the directory for its blob-info cache (``XDG_DATA_HOME``, skopeo's own default
    place: where it remembers which repositories hold a blob, so that it mounts instead of
    uploading)."""

    binary: str = "skopeo"
    environment: Mapping[str, str] = field(default_factory=dict)
    data_home: str | None = None


# What skopeo may see of the worker's environment.
SKOPEO_ENVIRONMENT = ("PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
                      "SSL_CERT_FILE", "SSL_CERT_DIR", "TZ")


def _skopeo(environ: Mapping[str, str]) -> SkopeoSettings:
    home = environ.get("HOME") or "/root"
    return SkopeoSettings(
        binary=environ.get("IMAGEPUB_SKOPEO") or "skopeo",
        environment={"PATH": "/usr/local/bin:/usr/bin:/bin",
                     **{k: environ[k] for k in SKOPEO_ENVIRONMENT if environ.get(k)}},
        data_home=environ.get("XDG_DATA_HOME") or str(Path(home) / ".local" / "share"),
    )


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1, with or without a port: the hosts the
    Docker daemon treats as insecure registries without being told."""
    name = host
    if name.startswith("[") and "]" in name:  # [::1] or [::1]:5000
        name = name[1:name.index("]")]
    elif name.count(":") == 1:  # host:port
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    registries: Mapping[str, Registry] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    recovery: Recovery = field(default_factory=Recovery)
    clients: tuple[Client, ...] = ()
    anonymous: bool = False
    webhooks: Webhooks = field(default_factory=Webhooks)
    console: Console = field(default_factory=Console)
    retention_seconds: int = 7 * 86400
    job_timeout_seconds: int = 3600
    log_level: str = "INFO"
    docker_host: str | None = None
    # The Docker daemon a worker serves, by name (`imagepub worker --daemon`); None for a worker
    # without one, which takes only daemonless work.
    daemon_name: str | None = "default"
    worker_alive_file: str | None = "/tmp/imagepub-worker.alive"
    skopeo: SkopeoSettings = field(default_factory=SkopeoSettings)
    artifacts: Artifacts = field(default_factory=Artifacts)
    audit: Audit = field(default_factory=Audit)
    builds: Builds = field(default_factory=Builds)

    def webhook_secret(self) -> str | None:
        """The webhook signing secret, read now from the variable ``webhooks.secret_env`` names."""
        return os.environ.get(self.webhooks.secret_env) if self.webhooks.secret_env else None


# --- the file's schema ---------------------------------------------------------------------

_NAME = validate.Regexp(r"[a-z0-9][a-z0-9_-]{0,62}\Z", error="must be lowercase letters, digits, '-' or '_'")


class _RepositoryDefaultsSchema(Schema):
    class Meta:
        unknown = RAISE

    image_tag_mutability = fields.String(load_default="MUTABLE", validate=validate.OneOf(["MUTABLE", "IMMUTABLE"]))
    scan_on_push = fields.Boolean(load_default=False)
    encryption = fields.String(load_default="AES256", validate=validate.OneOf(["AES256", "KMS"]))
    kms_key = fields.String(load_default=None)
    tags = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)

    @post_load
    def make(self, data, **_):
        return RepositoryDefaults(
            image_tag_mutability=data["image_tag_mutability"],
            scan_on_push=data["scan_on_push"],
            encryption_type=data["encryption"],
            kms_key=data["kms_key"],
            tags=data["tags"],
        )


class _RegistrySchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(["registry", "ecr"]))
    host = fields.String()
    username = fields.String()
    password_env = fields.String()
    password_file = fields.String()
    region = fields.String()
    account_id = fields.String(validate=validate.Regexp(r"[0-9]{12}\Z", error="must be 12 digits"))
    role_arn = fields.String()
    create_repositories = fields.Boolean(load_default=False)
    repository_defaults = fields.Nested(_RepositoryDefaultsSchema, load_default=RepositoryDefaults)
    ca_file = fields.String(validate=validate.Length(min=1, max=4096))
    insecure = fields.Boolean()

    @pre_load
    def no_inline_password(self, data, **_):
        if isinstance(data, Mapping) and "password" in data:
            raise ValidationError("passwords never go in the file: use password_env or password_file", "password")
        return data

    @validates_schema
    def check(self, data, **_):
        if data.get("password_env") and data.get("password_file"):
            raise ValidationError("give password_env or password_file, not both", "password_env")
        if data["type"] == "registry":
            if not data.get("host"):
                raise ValidationError("required for type: registry", "host")
            for key in ("region", "account_id", "role_arn"):
                if key in data:
                    raise ValidationError("only for type: ecr", key)
            if data.get("insecure") and data.get("ca_file"):
                raise ValidationError("an insecure registry's certificate is not checked: drop ca_file or insecure", "insecure")
        else:
            if not data.get("region"):
                raise ValidationError("required for type: ecr", "region")
            for key in ("host", "username", "password_env", "password_file"):
                if key in data:
                    raise ValidationError("ECR credentials come from the AWS credential chain", key)
            if "insecure" in data:
                raise ValidationError("ECR is always HTTPS with a verified certificate", "insecure")


class _LimitsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    max_body_bytes = fields.Integer(load_default=Limits.max_body_bytes, validate=validate.Range(min=1024))
    max_targets = fields.Integer(load_default=Limits.max_targets, validate=validate.Range(min=1, max=100))
    max_tags_per_target = fields.Integer(load_default=Limits.max_tags_per_target, validate=validate.Range(min=1, max=100))
    max_queued_jobs = fields.Integer(load_default=Limits.max_queued_jobs, validate=validate.Range(min=1))
    default_rate_limit = fields.String(load_default=None)
    max_context_bytes = fields.Integer(load_default=Limits.max_context_bytes, validate=validate.Range(min=1024, max=512 * 1024 * 1024))
    max_context_entries = fields.Integer(load_default=Limits.max_context_entries, validate=validate.Range(min=1, max=1_000_000))
    event_streams_per_process = fields.Integer(load_default=Limits.event_streams_per_process, validate=validate.Range(min=1, max=100_000))
    max_archive_bytes = fields.Integer(load_default=Limits.max_archive_bytes, validate=validate.Range(min=1024, max=MAX_ARCHIVE_BYTES))


class _ArtifactsSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(load_default="directory", validate=validate.OneOf(["directory", "s3"]))
    path = fields.String(validate=validate.Length(min=1, max=4096))
    bucket = fields.String(validate=validate.Regexp(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z", error="an S3 bucket name"))
    prefix = fields.String(load_default=Artifacts.prefix, validate=validate.Length(max=512))
    region = fields.String()
    endpoint_url = fields.Url(schemes={"http", "https"}, require_tld=False)

    @pre_load
    def unset_when_empty(self, data, **_):
        """``bucket: ""`` is no bucket (Helm values leave one for the s3 type's sake)."""
        return {k: v for k, v in data.items() if v not in ("", None)} if isinstance(data, Mapping) else data

    @validates_schema
    def check(self, data, **_):
        if data["type"] == "directory":
            if not data.get("path", "/").startswith("/"):
                raise ValidationError("an absolute path", "path")
            for key in ("bucket", "region", "endpoint_url"):
                if key in data:
                    raise ValidationError("only for type: s3", key)
        elif not data.get("bucket"):
            raise ValidationError("required for type: s3", "bucket")
        elif "path" in data:
            raise ValidationError("only for type: directory", "path")


def _artifacts(data: Mapping[str, Any]) -> Artifacts:
    if data["type"] == "directory":
        # the default suits one host, API and workers side by side (what scripts/run sets up)
        return Artifacts(type="directory", path=data.get("path") or str(Path(tempfile.gettempdir()) / "imagepub-artifacts"))
    return Artifacts(type="s3", bucket=data["bucket"], prefix=data["prefix"], region=data.get("region"),
                     endpoint_url=data.get("endpoint_url"))


class _ClientSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=_NAME)
    token_sha256 = fields.String(required=True, validate=validate.Regexp(r"[0-9a-f]{64}\Z", error="64 lowercase hex digits: the SHA-256 of the token"))
    scopes = fields.List(fields.String(validate=validate.OneOf(SCOPES)), required=True, validate=validate.Length(min=1))
    repositories = fields.List(fields.String(validate=validate.Length(min=1, max=255)), load_default=lambda: ["*"])
    rate_limit = fields.String(load_default=None)

    @pre_load
    def no_plain_token(self, data, **_):
        if isinstance(data, Mapping) and "token" in data:
            raise ValidationError("tokens never go in the file: store token_sha256 (see `imagepub token new`)", "token")
        return data


class _AuthSchema(Schema):
    class Meta:
        unknown = RAISE

    anonymous = fields.Boolean(load_default=False)


class _RetrySchema(Schema):
    class Meta:
        unknown = RAISE

    max_attempts = fields.Integer(load_default=RetryPolicy.max_attempts, validate=validate.Range(min=1, max=50))
    backoff_base_seconds = fields.Float(load_default=RetryPolicy.backoff_base_seconds, validate=validate.Range(min=0))
    backoff_max_seconds = fields.Float(load_default=RetryPolicy.backoff_max_seconds, validate=validate.Range(min=0))


_RATE = re.compile(r"[0-9]+ ?(/|per) ?([0-9]+ )?(second|minute|hour|day)s?", re.ASCII)
_DURATION = re.compile(r"([0-9]+)\s*([smhdw]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(fields.Field):
    """``90``, ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` → seconds."""

    def _deserialize(self, value, attr, data, **kwargs):
        match = _DURATION.match(str(value).strip())
        if not match:
            raise ValidationError("a duration such as 30s, 15m, 12h or 7d")
        return int(match.group(1)) * _UNITS[match.group(2)]


class _RecoverySchema(Schema):
    class Meta:
        unknown = RAISE

    lock_ttl_seconds = fields.Float(load_default=Recovery.lock_ttl_seconds, validate=validate.Range(min=1))
    scan_interval_seconds = fields.Float(load_default=Recovery.scan_interval_seconds, validate=validate.Range(min=0.2))
    max_worker_losses = fields.Integer(load_default=Recovery.max_worker_losses, validate=validate.Range(min=1))


class _WebhooksSchema(Schema):
    class Meta:
        unknown = RAISE

    secret_env = fields.String(load_default=None)
    allowed_hosts = fields.List(fields.String(), load_default=list)
    max_attempts = fields.Integer(load_default=Webhooks.max_attempts, validate=validate.Range(min=1, max=50))
    timeout_seconds = fields.Float(load_default=Webhooks.timeout_seconds, validate=validate.Range(min=0.5, max=120))
    concurrency = fields.Integer(load_default=Webhooks.concurrency, validate=validate.Range(min=1, max=64))


class _AuditSchema(Schema):
    class Meta:
        unknown = RAISE

    retention_days = fields.Integer(load_default=Audit.retention_days, validate=validate.Range(min=1, max=36500))


# A Docker network's name as the daemon takes it (moby's restrictedNamePattern).
_NETWORK = validate.Regexp(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z",
                           error="a Docker network's name: letters, digits, '_', '.' or '-' (none, default, bridge or one of yours)")


def _not_the_hosts_network(value: str) -> None:
    if value == "host":
        raise ValidationError("host would give every build's RUN steps the daemon host's network (its Redis, its "
                              "metadata service); use none, or a network made for builds")


class _BuildsSchema(Schema):
    class Meta:
        unknown = RAISE

    network = fields.String(load_default=Builds.network, validate=[_NETWORK, _not_the_hosts_network])
    # the daemon's own lower bound is 6 MiB
    memory_bytes = fields.Integer(load_default=Builds.memory_bytes, allow_none=True, validate=validate.Range(min=6 * 1024**2))


class _RetentionSchema(Schema):
    class Meta:
        unknown = RAISE

    finished_jobs = Duration(load_default=7 * 86400, validate=validate.Range(min=60))


class _ConsoleSchema(Schema):
    class Meta:
        unknown = RAISE

    session_idle = Duration(load_default=Console.session_idle_seconds, validate=validate.Range(min=60))
    session_lifetime = Duration(load_default=Console.session_lifetime_seconds, validate=validate.Range(min=60))
    trusted_proxies = fields.Integer(load_default=Console.trusted_proxies, validate=validate.Range(min=0, max=5))


def _console(data: Mapping[str, Any]) -> Console:
    return Console(session_idle_seconds=data.get("session_idle", Console.session_idle_seconds),
                   session_lifetime_seconds=data.get("session_lifetime", Console.session_lifetime_seconds),
                   trusted_proxies=data.get("trusted_proxies", Console.trusted_proxies))


class _FileSchema(Schema):
    # Sections that later versions add (clients, webhooks, ...) must not break older readers.
    class Meta:
        unknown = EXCLUDE

    registries = fields.Dict(keys=fields.String(validate=_NAME), values=fields.Nested(_RegistrySchema), load_default=dict)
    console = fields.Nested(_ConsoleSchema, load_default=dict)
    limits = fields.Nested(_LimitsSchema, load_default=dict)
    retry = fields.Nested(_RetrySchema, load_default=dict)
    recovery = fields.Nested(_RecoverySchema, load_default=dict)
    clients = fields.List(fields.Nested(_ClientSchema), load_default=list)
    auth = fields.Nested(_AuthSchema, load_default=dict)
    webhooks = fields.Nested(_WebhooksSchema, load_default=dict)
    retention = fields.Nested(_RetentionSchema, load_default=dict)
    audit = fields.Nested(_AuditSchema, load_default=dict)
    builds = fields.Nested(_BuildsSchema, load_default=dict)
    artifacts = fields.Nested(_ArtifactsSchema, load_default=lambda: {"type": "directory", "prefix": Artifacts.prefix})
    job_timeout_seconds = fields.Integer(load_default=3600, validate=validate.Range(min=10))
    redis_url = fields.String()
    log_level = fields.String(load_default="INFO")


def _format_errors(messages: Any, prefix: str = "") -> list[str]:
    if isinstance(messages, Mapping):
        out = []
        for key, value in messages.items():
            if key == "value":  # marshmallow's Dict nests value errors under "value"
                out += _format_errors(value, prefix)
                continue
            out += _format_errors(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{prefix}: {'; '.join(messages)}"]
    return [f"{prefix}: {messages}"]


def parse(document: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from an already-parsed YAML document plus environment overrides."""
    environ = os.environ if environ is None else environ
    try:
        data = _FileSchema().load(document or {})
    except ValidationError as exc:
        raise ConfigError("invalid configuration: " + ", ".join(_format_errors(exc.messages))) from None
    registries = {}
    for name, reg in data["registries"].items():
        defaults = reg.pop("repository_defaults")
        if reg["type"] == "registry" and "insecure" not in reg:  # a CA given is a CA to check
            reg["insecure"] = is_loopback(reg["host"]) and not reg.get("ca_file")
        registries[name] = Registry(name=name, repository_defaults=defaults, **reg)
    limits = data["limits"]
    clients = tuple(
        Client(name=c["name"], token_sha256=c["token_sha256"], scopes=frozenset(c["scopes"]),
               repositories=tuple(c["repositories"]), rate_limit=c["rate_limit"])
        for c in data["clients"]
    )
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise ConfigError("invalid configuration: clients: names must be unique")
    if len({c.token_sha256 for c in clients}) != len(clients):
        raise ConfigError("invalid configuration: clients: two clients share one token")
    for rate in [c.rate_limit for c in clients] + [limits.get("default_rate_limit")]:
        if rate and not _RATE.fullmatch(rate):
            raise ConfigError(f"invalid configuration: rate limit {rate!r}: write it like 20/second or 100/minute")
    return Settings(
        redis_url=environ.get("IMAGEPUB_REDIS_URL") or data.get("redis_url") or DEFAULT_REDIS_URL,
        registries=registries,
        limits=Limits(**limits) if not isinstance(limits, Limits) else limits,
        retry=RetryPolicy(**data["retry"]),
        recovery=Recovery(**data["recovery"]),
        clients=clients,
        console=_console(data["console"]),
        anonymous=data["auth"].get("anonymous", False),
        webhooks=Webhooks(
            secret_env=data["webhooks"].get("secret_env"),
            allowed_hosts=tuple(data["webhooks"].get("allowed_hosts", ())),
            **{k: v for k, v in data["webhooks"].items() if k in ("max_attempts", "timeout_seconds", "concurrency")},
        ),
        retention_seconds=data["retention"].get("finished_jobs", 7 * 86400),
        job_timeout_seconds=data["job_timeout_seconds"],
        log_level=environ.get("IMAGEPUB_LOG_LEVEL") or data["log_level"],
        docker_host=environ.get("DOCKER_HOST"),
        daemon_name=_daemon_name(environ.get("IMAGEPUB_DAEMON_NAME", "default")),
        worker_alive_file=environ.get("IMAGEPUB_WORKER_ALIVE_FILE", "/tmp/imagepub-worker.alive") or None,
        skopeo=_skopeo(environ),
        artifacts=_artifacts(data["artifacts"]),
        audit=Audit(**data["audit"]),
        builds=Builds(**data["builds"]),
    )


# A Docker daemon's name in the fleet: a DNS name (RFC 1123 subdomain), so that a Kubernetes pod's
# or node's name serves as one.
DAEMON_NAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?", re.ASCII)


def _daemon_name(value: str) -> str | None:
    """``IMAGEPUB_DAEMON_NAME``: a DNS name (a pod's or a node's serves), or empty for no daemon."""
    if not value:
        return None
    if not DAEMON_NAME.fullmatch(value):
        raise ConfigError(f"IMAGEPUB_DAEMON_NAME={value!r}: a daemon's name is a DNS name: lowercase letters, digits, '-' and '.' (at most 253)")
    return value


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for this process: the file named by ``IMAGEPUB_CONFIG`` plus the environment."""
    environ = os.environ if environ is None else environ
    path = environ.get("IMAGEPUB_CONFIG")
    document: Any = {}
    if path:
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read IMAGEPUB_CONFIG={path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"IMAGEPUB_CONFIG={path} is not valid YAML: {exc}") from None
        if not isinstance(document, Mapping):
            raise ConfigError(f"IMAGEPUB_CONFIG={path} must hold a mapping at the top level")
    return parse(document, environ)
