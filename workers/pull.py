"""Pull: bring ``registry/repository:tag`` (or ``@digest``) into the worker's daemon."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service import errors

from .publish import count_layers, layer_recorder, with_fresh_auth

if TYPE_CHECKING:
    from .deps import Deps
    from .jobs import Progress


def pull(job: dict[str, Any], deps: "Deps", progress: "Progress") -> None:
    request = job["request"]
    target = deps.targets.get(request["registry"])
    if target is None:
        raise errors.RegistryNotConfigured(f"registry {request['registry']!r} is no longer configured")
    repository_ref = target.repository_ref(request["repository"])
    reference = request.get("digest") or request["tag"]
    job["result"] = {"layers": []}
    on_layer = layer_recorder(job["result"], progress)
    try:
        result = with_fresh_auth(target, lambda auth: deps.engine.pull(repository_ref, reference, auth, on_layer))
    except (errors.ManifestNotFound, errors.ImageNotFound):
        # the registry has no such tag or digest (or repository): what the caller asked for is not there
        separator = "@" if reference.startswith("sha256:") else ":"
        raise errors.ImageNotFound(f"{request['registry']} has no image {request['repository']}{separator}{reference}") from None
    if result.digest is None:
        raise errors.PullFailed(f"pull {repository_ref}: the daemon reported no digest")
    if request.get("digest") and result.digest != request["digest"]:
        raise errors.PullFailed(f"pull {repository_ref}: got {result.digest}, asked for {request['digest']}")
    separator = "@" if reference.startswith("sha256:") else ":"
    job["result"].update(reference=f"{repository_ref}{separator}{reference}", digest=result.digest, image_id=result.image_id)
    count_layers(deps, request["registry"], job["result"]["layers"], "pulled", "imagepub_pulled_bytes")
