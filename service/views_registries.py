"""Registries, and their repositories and images (answered by a worker over the control queue:
see service/control.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

from flask import Blueprint, jsonify, request, url_for
from marshmallow import ValidationError

from . import control, schemas
from .errors import NotFound, ValidationFailed
from .access import image_for
from .fleet import filter_reference
from .auth import is_admin, may_use_repository, require_repositories, require_scope
from .http import ctx, json_body, load, load_query

registries = Blueprint("registries", __name__)


def configured_registries() -> list[dict[str, Any]]:
    """What ``GET /v1/registries`` (and the console) shows: never where secrets live."""
    require_scope("read")
    return [r.public() for r in ctx()["settings"].registries.values()]


@registries.get("/v1/registries")
def list_registries():
    return jsonify({"registries": configured_registries()})


def _registry(name: str):
    registry = ctx()["settings"].registries.get(name)
    if registry is None:
        raise NotFound(f"no registry named {name!r} is configured", code="registry_not_configured")
    return registry


def _repository_name(value: str) -> str:
    try:
        schemas.ecr_repository(value)
    except ValidationError as exc:
        raise ValidationFailed([{"field": "repository", "message": "; ".join(exc.messages)}]) from None
    return value


def _page() -> dict[str, Any]:
    return load_query(schemas.PageQuery())


IMAGES = "/images"


def _raw_tail(registry: str) -> str | None:
    """What follows ``…/repositories/`` in the request line as the client wrote it (still
    percent-encoded), or None when the server gives no raw request line."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if not raw:
        return None
    path = urlsplit(raw).path  # origin-form or absolute-form alike
    prefix = f"{request.script_root}/v1/registries/{registry}/repositories/"
    return path[len(prefix):] if path.startswith(prefix) else None


def _addressed(registry: str, tail: str) -> tuple[str, bool]:
    """The repository a path names (``tail``: what follows ``…/repositories/``, decoded), and
    whether it asks for the repository's images.

    Names have slashes, so ``…/team-a/images`` could be the images of ``team-a`` or the
    repository ``team-a/images``. As in the distribution API (``/v2/<name>/tags/list``), the
    fixed part ends the path and is read as written: a literal ``/images`` at the end lists
    images, and an encoded slash (``%2F``) always belongs to the name. So
    ``…/team-a%2Fimages`` describes ``team-a/images``, and every repository's Location (its name
    in one segment) describes it, whatever the name."""
    raw = _raw_tail(registry)
    written = raw if raw is not None else tail
    images = written.endswith(IMAGES)
    name = written[: -len(IMAGES)] if images else written
    return (unquote(name) if raw is not None else name), images


@registries.post("/v1/registries/<registry>/repositories")
def create_repository(registry: str):
    client = require_scope("publish")
    _registry(registry)
    data = load(schemas.CreateRepositorySchema(), json_body())
    require_repositories(client, [("name", data["name"])])
    repo = ctx()["control"].call(control.CREATE_REPOSITORY, registry, data)
    resp = jsonify(repo)
    resp.status_code = 201
    # one path segment (slashes %2F-encoded), so no client can mistake where the name ends
    resp.headers["Location"] = url_for("registries.create_repository", registry=registry) + "/" + quote(repo["name"], safe="")
    return resp


def repositories_page(registry: str, limit: int, cursor: str | None = None) -> dict[str, Any]:
    """A page of a registry's repositories, only those the caller may use (asked of a worker)."""
    client = require_scope("read")
    _registry(registry)
    answer = ctx()["control"].call(control.LIST_REPOSITORIES, registry, limit, cursor)
    answer["repositories"] = [r for r in answer["repositories"] if may_use_repository(client, r["name"])]
    return answer


@registries.get("/v1/registries/<registry>/repositories")
def list_repositories(registry: str):
    require_scope("read")
    _registry(registry)  # before the query: an unknown registry is 404 whatever was asked of it
    page = _page()
    return jsonify(repositories_page(registry, page["limit"], page.get("cursor")))


@registries.get("/v1/registries/<registry>/repositories/<path:repository>/images")
def list_images(registry: str, repository: str):
    return _repository_or_images(registry, f"{repository}{IMAGES}")


@registries.get("/v1/registries/<registry>/repositories/<path:repository>")
def describe_repository(registry: str, repository: str):
    return _repository_or_images(registry, repository)


def _repository_or_images(registry: str, tail: str):
    """Both routes: the router reads the decoded path, where ``team-a%2Fimages`` and
    ``team-a/images`` look alike, so either may be asked for either (see :func:`_addressed`)."""
    name, images = _addressed(registry, tail)
    name = _allowed_repository(registry, name)  # the name and the client's patterns before the query
    if images:
        page = _page()
        return jsonify(repository_images(registry, name, page["limit"], page.get("cursor")))
    return jsonify(repository(registry, name))


def _allowed_repository(registry: str, name: str) -> str:
    client = require_scope("read")
    _registry(registry)
    name = _repository_name(name)
    require_repositories(client, [("repository", name)])
    return name


def repository(registry: str, name: str) -> dict[str, Any]:
    """One repository (its settings), if the caller may use it (asked of a worker)."""
    return ctx()["control"].call(control.DESCRIBE_REPOSITORY, registry, _allowed_repository(registry, name))


def repository_images(registry: str, name: str, limit: int, cursor: str | None = None) -> dict[str, Any]:
    """A page of a repository's images, if the caller may use it (asked of a worker)."""
    name = _allowed_repository(registry, name)
    return ctx()["control"].call(control.LIST_IMAGES, registry, name, limit, cursor)


@registries.get("/v1/images")
def list_daemon_images():
    """``docker image ls`` of the fleet's daemons (``daemon``: of one), each image with its
    ``daemon``, from the image index the workers keep (service/fleet.py): the same answer from
    every API process on every call. The daemons are shared by every client: a client sees only
    images with a name in its repositories, and only those names (service/access.py); the
    workers' host names are for admins. Filtered here, where the client is known."""
    client = require_scope("read")
    query = load_query(schemas.DaemonImagesQuery())
    fleet = ctx()["fleet"]
    if query.get("daemon"):
        fleet.check_known(query["daemon"])
        names = [query["daemon"]]
    else:
        names = [d.name for d in fleet.daemons()]
    images = fleet.images(names)
    if query.get("reference"):
        images = [shown for image in images if (shown := filter_reference(image, query["reference"])) is not None]
    if not is_admin(client):
        images = [shown for image in images if (shown := image_for(client, image)) is not None]
    return jsonify({"images": images})


@registries.get("/v1/daemons")
def list_daemons():
    """The fleet: each daemon with its state (``up`` while a worker of it sends heartbeats),
    its workers, Docker version and queue depth. Host names are for admins."""
    return jsonify({"daemons": visible_daemons()})


def visible_daemons() -> list[dict[str, Any]]:
    """The fleet as the caller may see it (``GET /v1/daemons``, the console's fleet page)."""
    client = require_scope("read")
    daemons = [d.to_dict() for d in ctx()["fleet"].daemons()]
    if not is_admin(client):
        for daemon in daemons:
            daemon["workers"] = [{k: v for k, v in w.items() if k not in ("hostname", "worker")} for w in daemon["workers"]]
    return daemons
