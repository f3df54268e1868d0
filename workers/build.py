"""Build: build the uploaded context with the daemon, then publish the image like a publish job.

The build log is kept in the job (its last lines, bounded) and so reaches live followers.
Repositories are checked before the build starts: a build whose image could not be pushed is
not worth running.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service import errors
from service.build_context import ContextRefused, check_context

from .build_sources import authorise_build_sources
from .publish import prepare_targets, push_targets

if TYPE_CHECKING:
    from .deps import Deps
    from .jobs import Progress

MAX_LOG_LINES = 500
MAX_LINE = 1000


def build(job: dict[str, Any], deps: "Deps", progress: "Progress") -> None:
    request, record = job["request"], job["build"]
    context = deps.artifacts.read(job["id"])  # put in the artifact store by the API (service/artifacts.py)
    if context is None:
        raise errors.JobFailed("the build context is gone (deleted, or expired before the job ran)", code="context_missing")
    try:  # checked at submission; checked again here, where it is unpacked
        compressed = check_context(context, request["dockerfile"], deps.settings.limits)
    except ContextRefused as exc:
        raise errors.JobFailed(str(exc), code="invalid_context") from None
    authorise_build_sources(job, deps, context)  # the images it reads, in this daemon, before anything is created
    targets = prepare_targets(job, deps, progress)

    def on_line(line: str) -> None:
        record["log"].append(line[:MAX_LINE])
        if len(record["log"]) > MAX_LOG_LINES:
            del record["log"][: len(record["log"]) - MAX_LOG_LINES]
            record["log_truncated"] = True
        progress.save(force=False)

    record["log"] = []
    image_id = deps.engine.build(
        context, compressed=compressed, dockerfile=request["dockerfile"], build_args=request.get("build_args") or {},
        labels={"org.imagepub.job": job["id"]}, tag=f"imagepub-build:{job['id']}", network=deps.settings.builds.network,
        memory_bytes=deps.settings.builds.memory_bytes, on_line=on_line,
    )
    record["image_id"] = job["source_image_id"] = image_id
    progress.save()
    push_targets(job, deps, progress, deps.engine.inspect(image_id), targets)
