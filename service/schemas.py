"""Request bodies, loaded by marshmallow. ``openapi.yaml`` states the same rules, and a test
proves the two agree (tests/service/test_contract.py).

Names follow the Docker reference grammar (github.com/distribution/reference), matched whole
(``fullmatch``) and ASCII only, so that nothing a caller sends can smuggle another registry,
option or path into what the worker hands the daemon.
"""

from __future__ import annotations

import re

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from .config import DAEMON_NAME, Limits, Registry

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*", re.ASCII)
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}", re.ASCII)
# A first path component is a registry host only when it looks like one (as in Docker):
# it has a dot or a port, or it is "localhost".
_HOST = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:localhost|{_HOST}(?:\.{_HOST})+|{_HOST}(?=:)|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
# name[:tag][@digest] with an optional registry host, or an image id (full or short).
SOURCE_RE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?"
    r"|(?:sha256:)?[a-f0-9]{12,64}",
    re.ASCII,
)
# Amazon ECR's own rule for repository names: stricter than Docker's.
ECR_REPOSITORY_RE = re.compile(r"(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*", re.ASCII)
MAX_REPOSITORY = 255
MAX_SOURCE = 512
# Docker's limit for an image name *with* its registry host (distribution/reference's
# NameTotalLengthMax): the daemon refuses a longer `host/repository` when it tags or pulls.
MAX_IMAGE_NAME = 255
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})


def _matches(regex: re.Pattern, what: str):
    def check(value: str) -> None:
        if not regex.fullmatch(value):
            raise ValidationError(f"not a valid {what}")

    return check


def _repository(value: str) -> None:
    if len(value) > MAX_REPOSITORY:
        raise ValidationError(f"longer than {MAX_REPOSITORY} characters")
    _matches(REPOSITORY_RE, "repository name: lowercase path components separated by '/'")(value)


def ecr_repository(value: str) -> None:
    if not 2 <= len(value) <= 256 or not ECR_REPOSITORY_RE.fullmatch(value):
        raise ValidationError(
            "not a valid ECR repository name: 2 to 256 characters, lowercase alphanumerics with single "
            "'.', '_' or '-' between them, and '/' between path components"
        )


def image_name(registry: Registry, repository: str) -> str:
    """The name the daemon gives an image of ``repository`` in ``registry``, host included, as
    Docker counts it. An ECR host is ``<account>.dkr.ecr.<region>.amazonaws.com`` (``.com.cn``
    in China), the ``proxyEndpoint`` GetAuthorizationToken answers: an account id always has 12
    digits, so its length is known before a worker asks AWS for it. Docker Hub names a
    one-component repository ``library/…``."""
    if registry.type == "ecr":
        domain = "amazonaws.com.cn" if (registry.region or "").startswith("cn-") else "amazonaws.com"
        return f"{registry.account_id or '0' * 12}.dkr.ecr.{registry.region}.{domain}/{repository}"
    if registry.host in DOCKER_HUB_HOSTS:
        return f"docker.io/{repository if '/' in repository else 'library/' + repository}"
    return f"{registry.host}/{repository}"


def repository_room(registry: Registry) -> dict:
    """The JSON Schema of a repository name's length in ``registry`` (for the served contract):
    what Docker's 255 characters leave after the host — on Docker Hub, a one-component name
    also gets ``library/``."""
    room = MAX_IMAGE_NAME - len(image_name(registry, "a/a")) + 3
    if registry.type != "ecr" and registry.host in DOCKER_HUB_HOSTS:
        return {"maxLength": room, "if": {"pattern": "^[^/]*$"}, "then": {"maxLength": MAX_IMAGE_NAME - len(image_name(registry, "a")) + 1}}
    return {"maxLength": room}


def repository_in(registry: Registry, repository: str) -> None:
    """What a registry adds to the rules for a repository name: ECR's stricter grammar, and
    Docker's limit for the whole image name, the registry's host included."""
    if registry.type == "ecr":
        ecr_repository(repository)
    name = image_name(registry, repository)
    if len(name) > MAX_IMAGE_NAME:
        room = MAX_IMAGE_NAME - (len(name) - len(repository))
        raise ValidationError(
            f"too long for registry {registry.name!r}: the image name {name[:len(name) - len(repository)]}… would have "
            f"{len(name)} characters, Docker allows {MAX_IMAGE_NAME} with the host, so at most {room} for the repository"
        )


def _source_name(value: str) -> None:
    """An image in the daemon has a name Docker allows: counted as Docker counts it, with the
    ``docker.io/`` (and ``library/``) it adds to a name without a registry host."""
    name = value.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]  # the tag
    first, _, rest = name.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{name if rest else 'library/' + name}"
    if len(name) > MAX_IMAGE_NAME:
        raise ValidationError(f"the image name {name[:40]}… has {len(name)} characters as Docker counts it; Docker allows {MAX_IMAGE_NAME}")


class StrictBoolean(fields.Boolean):
    """JSON true or false only (marshmallow's Boolean also takes 1, "yes", "on"…)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


Repository = lambda **kw: fields.String(required=True, validate=_repository, **kw)  # noqa: E731
Tag = lambda **kw: fields.String(validate=_matches(TAG_RE, "tag"), **kw)  # noqa: E731
RegistryName = lambda: fields.String(required=True, validate=validate.Length(min=1, max=63))  # noqa: E731


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class TargetSchema(_Strict):
    registry = RegistryName()
    repository = Repository()
    tags = fields.List(Tag(), required=True, validate=validate.Length(min=1))

    @post_load
    def dedupe(self, data, **_):
        data["tags"] = list(dict.fromkeys(data["tags"]))
        return data


def DaemonName(**kwargs) -> fields.String:
    return fields.String(validate=_matches(DAEMON_NAME, "daemon name (a DNS name: lowercase letters, digits, '-' and '.', at most 253)"), **kwargs)


class PublishSchema(_Strict):
    daemon = DaemonName()
    source = fields.String(
        required=True, validate=[validate.Length(max=MAX_SOURCE), _matches(SOURCE_RE, "image reference or id"), _source_name]
    )
    targets = fields.List(fields.Nested(TargetSchema), required=True, validate=validate.Length(min=1))
    create_repository = StrictBoolean(load_default=False)
    callback_url = fields.Url(load_default=None, allow_none=True, schemes={"http", "https"}, validate=validate.Length(max=2048))

    def __init__(self, limits: Limits = Limits(), **kwargs):
        super().__init__(**kwargs)
        self.limits = limits

    @validates_schema(skip_on_field_errors=True)
    def within_limits(self, data, **_):
        if len(data["targets"]) > self.limits.max_targets:
            raise ValidationError(f"at most {self.limits.max_targets} targets", "targets")

    @post_load
    def merge_targets(self, data, **_):
        """Two entries for one repository become one target with the union of their tags. The
        tag limit holds for what is pushed, the merged target: checked here, after merging."""
        merged: dict[tuple[str, str], dict] = {}
        first: dict[tuple[str, str], int] = {}
        for i, target in enumerate(data["targets"]):
            key = (target["registry"], target["repository"])
            if key in merged:
                merged[key]["tags"] = list(dict.fromkeys(merged[key]["tags"] + target["tags"]))
            else:
                merged[key], first[key] = target, i
            if len(merged[key]["tags"]) > self.limits.max_tags_per_target:
                raise ValidationError({str(i): {"tags": [self._too_many_tags(first[key], i)]}}, "targets")
        data["targets"] = list(merged.values())
        return data

    def _too_many_tags(self, first: int, index: int) -> str:
        limit = f"at most {self.limits.max_tags_per_target} tags per target"
        if first == index:
            return limit
        return f"{limit}, counted after merging: targets.{first} names the same repository, and together they pass it"


class BuildSchema(PublishSchema):
    """The JSON ``request`` part of a build: a publish whose source is the image it builds."""

    source = fields.Raw(load_default=None, validate=validate.Equal(None, error="a build publishes the image it builds; no source"))
    dockerfile = fields.String(load_default="Dockerfile", validate=validate.Length(min=1, max=1024))
    build_args = fields.Dict(
        keys=fields.String(validate=_matches(re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII), "build argument name")),
        values=fields.String(validate=validate.Length(max=4096)),
        load_default=dict,
        validate=validate.Length(max=64),
    )

    @post_load
    def drop_source(self, data, **_):
        data.pop("source", None)
        return data


class ArchivePublishSchema(PublishSchema):
    """The JSON ``request`` part of a publish of an uploaded image archive: a publish whose
    source is the archive (so no daemon is involved, nor named)."""

    class Meta:
        unknown = RAISE
        exclude = ("daemon",)

    source = fields.Raw(load_default=None, validate=validate.Equal(None, error="the `image` part is the source; no source"))

    @post_load
    def drop_source(self, data, **_):
        data.pop("source", None)
        return data


PLATFORM_RE = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?", re.ASCII)  # os/architecture[/variant]
MAX_PLATFORMS = 32


class Platforms(fields.Field):
    """``"all"``, or a list of ``os/architecture[/variant]`` (each at most once)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if value == "all":
            return value
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_PLATFORMS:
            raise ValidationError(f'"all", or a list of 1 to {MAX_PLATFORMS} platforms such as "linux/arm64"')
        problems = {i: ["not a platform: os/architecture[/variant], such as linux/arm64 or linux/arm/v7"]
                    for i, p in enumerate(value) if not isinstance(p, str) or not PLATFORM_RE.fullmatch(p)}
        if problems:
            raise ValidationError(problems)
        return list(dict.fromkeys(value))


class RegistryImageSchema(_Strict):
    """An image in a configured registry: a tag (``latest`` when neither is given) or a digest."""

    registry = RegistryName()
    repository = Repository()
    tag = Tag()
    digest = fields.String(validate=_matches(DIGEST_RE, "digest: sha256 and 64 lowercase hex digits"))

    @validates_schema(skip_on_field_errors=True)
    def one_of_tag_or_digest(self, data, **_):
        if "tag" in data and "digest" in data:
            raise ValidationError("give a tag or a digest, not both", "digest")

    @post_load
    def default_tag(self, data, **_):
        if "tag" not in data and "digest" not in data:
            data["tag"] = "latest"
        return data


class CopySchema(PublishSchema):
    """A copy between registries: a publish whose source is an image in a registry (so no
    daemon is involved, nor named)."""

    class Meta:
        unknown = RAISE
        exclude = ("daemon",)

    source = fields.Nested(RegistryImageSchema, required=True)
    platforms = Platforms(load_default="all")
    signatures = StrictBoolean(load_default=True)

    @validates_schema(skip_on_field_errors=True)
    def not_onto_itself(self, data, **_):
        """A tag copied onto itself is a no-op at best; with some platforms only, it would
        replace the source's index with a part of it."""
        source = data["source"]
        for i, target in enumerate(data["targets"]):
            if (target["registry"], target["repository"]) == (source["registry"], source["repository"]) \
                    and source.get("tag") in target["tags"]:
                raise ValidationError({str(i): {"tags": [f"{source['tag']!r} is the copy's own source"]}}, "targets")


class PullSchema(RegistryImageSchema):
    """A pull: an image in a registry, into a daemon (``daemon``: which one; any by default)."""

    daemon = DaemonName()


class JobListQuery(_Strict):
    state = fields.String(validate=validate.OneOf(["queued", "running", "retrying", "succeeded", "failed", "cancelled"]))
    kind = fields.String(validate=validate.OneOf(["publish", "pull", "build", "copy"]))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    cursor = fields.String(validate=validate.Length(max=64))


def field_errors(messages, prefix: str = "") -> list[dict[str, str]]:
    """marshmallow's nested messages as a flat list of ``{"field": "targets.0.tags", "message": …}``."""
    out: list[dict[str, str]] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            name = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else str(key))
            out += field_errors(value, name)
    elif isinstance(messages, list):
        for item in messages:
            if isinstance(item, (dict, list)):
                out += field_errors(item, prefix)
            else:
                out.append({"field": prefix or "body", "message": str(item)})
    else:
        out.append({"field": prefix or "body", "message": str(messages)})
    return out


class CreateRepositorySchema(_Strict):
    name = fields.String(required=True, validate=ecr_repository)
    image_tag_mutability = fields.String(validate=validate.OneOf(["MUTABLE", "IMMUTABLE"]))
    scan_on_push = StrictBoolean()
    encryption = fields.String(validate=validate.OneOf(["AES256", "KMS"]))
    kms_key = fields.String(validate=validate.Length(min=1, max=2048))
    tags = fields.Dict(
        keys=fields.String(validate=_matches(re.compile(r"[A-Za-z0-9 _.:/=+@-]{1,128}", re.ASCII), "tag key")),
        values=fields.String(validate=_matches(re.compile(r"[A-Za-z0-9 _.:/=+@-]{0,256}", re.ASCII), "tag value")),
        validate=validate.Length(max=50),
    )

    @validates_schema(skip_on_field_errors=True)
    def kms_key_needs_kms(self, data, **_):
        if "kms_key" in data and data.get("encryption") != "KMS":
            raise ValidationError("kms_key needs \"encryption\": \"KMS\"", "kms_key")


class PageQuery(_Strict):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(validate=_matches(re.compile(r"[A-Za-z0-9+/=_.~-]{1,2048}", re.ASCII), "cursor from a previous page"))


class DaemonImagesQuery(_Strict):
    daemon = DaemonName()
    reference = fields.String(validate=[validate.Length(min=1, max=MAX_SOURCE), _matches(re.compile(r"[A-Za-z0-9_./:@*?-]+", re.ASCII), "reference filter")])
