"""Amazon ECR: the control-plane API (boto3) and ECR as a push target.

- :class:`Ecr` wraps one boto3 ECR client; every botocore error becomes one of our typed errors
  in :func:`translate`, the one place that knows ECR's error codes.
- :class:`TokenCache` keeps GetAuthorizationToken answers in Redis for every worker process on
  every machine: one fetch per (account, region, role) per token lifetime, refreshed ahead of
  ``expiresAt``, single-flight under a Redis lock.
- :class:`EcrRegistry` is the :class:`~workers.registries.Target` for ``type: ecr``.

Credentials come from the standard AWS chain (environment, profile, web identity / IRSA,
instance role); ``AWS_ENDPOINT_URL_ECR`` is honoured by botocore itself.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

import boto3
import botocore.exceptions
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from botocore.session import get_session
from redis import exceptions as redis_exceptions

from service import errors
from service.config import Registry
from service.logs import register_secret
from service.metrics import Metrics

log = logging.getLogger(__name__)

_THROTTLED = {"ThrottlingException", "ThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "Throttling"}
_UNAVAILABLE = {"ServiceUnavailableException", "ServerException", "InternalFailure", "InternalServerError", "ServiceUnavailable"}
_DENIED = {"AccessDeniedException", "AccessDenied", "KmsException"}
_AUTH = {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException", "InvalidClientTokenId", "SignatureDoesNotMatch"}
_CODES: dict[str, type[errors.ImagepubError]] = {
    "RepositoryNotFoundException": errors.RepositoryNotFound,
    "RepositoryAlreadyExistsException": errors.RepositoryExists,
    "ImageNotFoundException": errors.ManifestNotFound,
    "ImageTagAlreadyExistsException": errors.TagImmutable,
    **{code: errors.Throttled for code in _THROTTLED},
    **{code: errors.RegistryUnavailable for code in _UNAVAILABLE},
    **{code: errors.AccessDenied for code in _DENIED},
    **{code: errors.AuthFailed for code in _AUTH},
}


def translate(exc: Exception, what: str) -> errors.ImagepubError:
    """The one place where botocore's exceptions become imagepub's."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code, message = err.get("Code", ""), err.get("Message", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        cls = _CODES.get(code)
        if cls is None:
            cls = errors.RegistryUnavailable if status >= 500 else None
        if cls is None:
            return errors.JobFailed(f"{what}: ECR answered {code}: {message}", code="ecr_error")
        return cls(f"{what}: {message or code}")
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return errors.AuthFailed(f"{what}: no AWS credentials found in the credential chain")
    if isinstance(exc, (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)):
        return errors.Timeout(f"{what}: ECR did not answer in time")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError)):
        return errors.RegistryUnavailable(f"{what}: cannot reach the ECR API")
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        # ECR's own rules are stricter than Docker's (names of 2+ characters, for one)
        return errors.JobFailed(f"{what}: ECR does not accept it: {exc.kwargs.get('report', exc)}", code="invalid_for_ecr").with_status(422)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return errors.RegistryUnavailable(f"{what}: {exc.__class__.__name__}")
    raise exc


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _assume_role_session(region: str, role_arn: str) -> boto3.Session:
    """A session whose credentials come from AssumeRole and refresh themselves before expiry."""
    sts = boto3.client("sts", region_name=region)

    def refresh() -> dict[str, str]:
        creds = sts.assume_role(RoleArn=role_arn, RoleSessionName="imagepub")["Credentials"]
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": creds["Expiration"].isoformat(),
        }

    botocore_session = get_session()
    botocore_session._credentials = RefreshableCredentials.create_from_metadata(  # noqa: SLF001 - boto3's documented pattern
        metadata=refresh(), refresh_using=refresh, method="sts-assume-role"
    )
    return boto3.Session(botocore_session=botocore_session, region_name=region)


class Ecr:
    """One ECR registry's control plane: repositories, images, authorization tokens."""

    def __init__(self, client, registry_id: str | None = None):
        self.client = client
        self.registry_id = registry_id

    @classmethod
    def from_config(cls, config: Registry) -> "Ecr":
        session = _assume_role_session(config.region, config.role_arn) if config.role_arn else boto3.Session(region_name=config.region)
        client = session.client(
            "ecr",
            config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30),
        )
        return cls(client, config.account_id)

    def _call(self, what: str, method: str, **params):
        if self.registry_id:
            params.setdefault("registryId", self.registry_id)
        try:
            return getattr(self.client, method)(**params)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise translate(exc, what) from None

    def authorization(self) -> dict[str, Any]:
        """A fresh token: ``username``, ``password``, ``endpoint`` (host) and ``expires_at`` (epoch)."""
        params = {"registryIds": [self.registry_id]} if self.registry_id else {}
        try:
            data = self.client.get_authorization_token(**params)["authorizationData"][0]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise translate(exc, "ECR GetAuthorizationToken") from None
        username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        endpoint = data["proxyEndpoint"].removeprefix("https://").removeprefix("http://").rstrip("/")
        expires = data.get("expiresAt")
        return {
            "username": username,
            "password": password,
            "endpoint": endpoint,
            "expires_at": expires.timestamp() if isinstance(expires, datetime) else None,
        }

    def describe_repository(self, name: str) -> dict[str, Any]:
        data = self._call(f"repository {name}", "describe_repositories", repositoryNames=[name])
        return repository_view(data["repositories"][0])

    def create_repository(self, name: str, *, tag_mutability: str, scan_on_push: bool, encryption: str, kms_key: str | None, tags: dict[str, str]) -> dict[str, Any]:
        params: dict[str, Any] = {
            "repositoryName": name,
            "imageTagMutability": tag_mutability,
            "imageScanningConfiguration": {"scanOnPush": scan_on_push},
            "encryptionConfiguration": {"encryptionType": encryption, **({"kmsKey": kms_key} if kms_key else {})},
        }
        if tags:
            params["tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
        data = self._call(f"create repository {name}", "create_repository", **params)
        return repository_view(data["repository"])

    def list_repositories(self, *, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        params: dict[str, Any] = {"maxResults": limit}
        if cursor:
            params["nextToken"] = cursor
        data = self._call("list repositories", "describe_repositories", **params)
        return [repository_view(r) for r in data["repositories"]], data.get("nextToken")

    def list_images(self, repository: str, *, limit: int, cursor: str | None, tag: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        params: dict[str, Any] = {"repositoryName": repository}
        if tag:
            params["imageIds"] = [{"imageTag": tag}]
        else:
            params["maxResults"] = limit
            if cursor:
                params["nextToken"] = cursor
        data = self._call(f"images of {repository}", "describe_images", **params)
        images = [
            {
                "digest": d["imageDigest"],
                "tags": sorted(d.get("imageTags") or []),
                "pushed_at": _iso(d.get("imagePushedAt")),
                "size": d.get("imageSizeInBytes"),
                "media_type": d.get("imageManifestMediaType"),
            }
            for d in data.get("imageDetails", [])
        ]
        return images, data.get("nextToken")

    def digest_of_tag(self, repository: str, tag: str) -> str | None:
        try:
            images, _ = self.list_images(repository, limit=1, cursor=None, tag=tag)
        except errors.ManifestNotFound:
            return None
        return images[0]["digest"] if images else None


    def config_digest_of_tag(self, repository: str, tag: str) -> str | None:
        """The image config digest (the daemon's image id) behind ``tag``, from its manifest."""
        data = self._call(
            f"manifest of {repository}:{tag}", "batch_get_image", repositoryName=repository, imageIds=[{"imageTag": tag}],
            acceptedMediaTypes=["application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"],
        )
        for image in data.get("images", []):
            try:
                return json.loads(image["imageManifest"])["config"]["digest"]
            except (KeyError, ValueError, TypeError):
                return None
        return None


def repository_view(repo: dict[str, Any]) -> dict[str, Any]:
    encryption = repo.get("encryptionConfiguration") or {}
    return {
        "name": repo["repositoryName"],
        "uri": repo["repositoryUri"],
        "arn": repo.get("repositoryArn"),
        "registry_id": repo.get("registryId"),
        "created_at": _iso(repo.get("createdAt")),
        "image_tag_mutability": repo.get("imageTagMutability"),
        "scan_on_push": (repo.get("imageScanningConfiguration") or {}).get("scanOnPush", False),
        "encryption": encryption.get("encryptionType", "AES256"),
        "kms_key": encryption.get("kmsKey"),
    }


class TokenCache:
    """Authorization tokens shared through Redis by every worker, fetched single-flight.

    A token is refreshed ``refresh_margin`` seconds before its ``expiresAt``. An ``expiresAt``
    that is missing, already past or implausibly near (clock skew, emulators) is not trusted: the
    token is then kept for ``fallback_ttl`` seconds, and a registry that refuses it makes the
    caller drop it and fetch a fresh one.
    """

    def __init__(self, redis, *, refresh_margin: float = 1800, fallback_ttl: float = 900, lock_timeout: float = 30):
        self.redis = redis
        self.metrics = Metrics(redis)
        self.refresh_margin = refresh_margin
        self.fallback_ttl = fallback_ttl
        self.lock_timeout = lock_timeout

    def get(self, key: str, fetch: Callable[[], dict[str, Any]], registry: str = "") -> dict[str, Any]:
        token = self._cached(key)
        if token is not None:
            self.metrics.incr("imagepub_ecr_token_cache_hits", registry=registry)
            return token
        # Single-flight: one fetch for the fleet. The lock lives ``lock_timeout`` at most (a
        # fetch that takes longer has failed anyway), so a fetcher that died holds nobody up for
        # longer; a waiter that gives up fetches on its own rather than fail its job.
        lock = self.redis.lock(f"{key}:lock", timeout=self.lock_timeout, thread_local=False)
        locked = lock.acquire(blocking_timeout=self.lock_timeout)
        try:
            token = self._cached(key)  # another worker may have fetched it while we waited
            if token is not None:
                self.metrics.incr("imagepub_ecr_token_cache_hits", registry=registry)
                return token
            return self._fetch(key, fetch, registry)
        finally:
            if locked:
                with contextlib.suppress(redis_exceptions.LockError):
                    lock.release()

    def _fetch(self, key: str, fetch: Callable[[], dict[str, Any]], registry: str) -> dict[str, Any]:
        token = fetch()
        now = time.time()
        expires = token.get("expires_at")
        usable_until = expires - self.refresh_margin if expires else 0
        if usable_until - now < 60:
            usable_until = now + self.fallback_ttl
        token["usable_until"] = usable_until
        self.redis.set(key, json.dumps(token), exat=int(usable_until) + 1)
        self.metrics.incr("imagepub_ecr_token_fetches", registry=registry)
        return token

    def _cached(self, key: str) -> dict[str, Any] | None:
        raw = self.redis.get(key)
        if raw is None:
            return None
        token = json.loads(raw)
        return token if token["usable_until"] > time.time() else None

    def drop(self, key: str) -> None:
        self.redis.delete(key)


class EcrRegistry:
    """An ECR registry as a push and pull target."""

    refreshable_auth = True

    def __init__(self, config: Registry, ecr: Ecr, tokens: TokenCache):
        self.config = config
        self.name = config.name
        self.ecr = ecr
        self.tokens = tokens
        role = hashlib.sha256((config.role_arn or "").encode()).hexdigest()[:16]
        self.token_key = f"imagepub:ecr-token:{config.account_id or 'default'}:{config.region}:{role}"

    @classmethod
    def from_config(cls, config: Registry, redis, lock_ttl: float = 30) -> "EcrRegistry":
        return cls(config, Ecr.from_config(config), TokenCache(redis, lock_timeout=lock_ttl))

    def _token(self) -> dict[str, Any]:
        return self.tokens.get(self.token_key, self.ecr.authorization, self.name)

    def host(self) -> str:
        return self._token()["endpoint"]

    def repository_ref(self, repository: str) -> str:
        return f"{self.host()}/{repository}"

    def auth_config(self) -> dict[str, str]:
        token = self._token()
        register_secret(token["password"])
        return {"username": token["username"], "password": token["password"], "serveraddress": token["endpoint"]}

    def invalidate_auth(self) -> None:
        self.tokens.drop(self.token_key)

    def ensure_repository(self, repository: str, create: bool) -> bool:
        try:
            self.ecr.describe_repository(repository)
            return False
        except errors.RepositoryNotFound:
            if not create:
                raise errors.RepositoryNotFound(
                    f"repository {repository!r} does not exist in {self.name}; "
                    "create it, or ask for it with \"create_repository\": true"
                ) from None
            if not self.config.create_repositories:
                raise errors.RepositoryNotFound(
                    f"repository {repository!r} does not exist in {self.name}, "
                    "and this registry is not configured to create repositories"
                ) from None
        defaults = self.config.repository_defaults
        try:
            self.ecr.create_repository(
                repository,
                tag_mutability=defaults.image_tag_mutability,
                scan_on_push=defaults.scan_on_push,
                encryption=defaults.encryption_type,
                kms_key=defaults.kms_key,
                tags=dict(defaults.tags),
            )
        except errors.RepositoryExists:
            return False  # created by a concurrent job: just as good
        log.info("created ECR repository", extra={"registry": self.name, "repository": repository})
        return True

    def digest_of_tag(self, repository: str, tag: str) -> str | None:
        return self.ecr.digest_of_tag(repository, tag)

    def config_digest_of_tag(self, repository: str, tag: str) -> str | None:
        return self.ecr.config_digest_of_tag(repository, tag)
