"""The ``copy`` phase (issue 12, benchmark target 7): one image copied registry to registry three
ways, same run, same machine, same registries.

- imagepub: ``POST /v1/copy`` → the terminal event on the job's SSE stream (a worker, skopeo
  with its debug log and progress bars read, the digest verified against the destination);
- raw skopeo: ``skopeo copy`` with the same flags imagepub gives it (``--all
  --preserve-digests``, the same TLS settings, an auth file), quietly — the fastest honest way;
- the daemon: ``docker pull && docker tag && docker push``, what the seed did.

From the plain registry ``local`` to the password-protected ``secure`` (two registries: the
bytes really move; within one registry skopeo would mount). Every copy moves an image nobody has
seen yet (new random content, single platform, 3 layers), written as an OCI layout and put into
``local`` with skopeo before the clock starts, so no copy can reuse another's blobs.
"""

from __future__ import annotations

import base64
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

MiB = 1024 * 1024
DOCKER = "/usr/bin/docker"
WAYS = ("imagepub", "skopeo", "daemon")


def _fresh_image(stack, name: str, mib: int) -> str:
    """A single-platform image of ``mib`` MiB (3 layers of random bytes) at ``local``/bench/copy-NAME:1."""
    import oci_layout  # tests/

    layout = stack.tmp / f"bench-oci-{name}"
    third = mib * MiB // 3
    image = oci_layout.write_image(layout, "1", ("linux/amd64",), (third, third, mib * MiB - 2 * third))
    oci_layout.push(layout, "1", f"{stack.registry}/bench/copy-{name}:1")
    shutil.rmtree(layout, ignore_errors=True)
    return image.digest


def _auth_file(stack) -> Path:
    path = stack.tmp / "bench-skopeo-auth.json"
    token = base64.b64encode(f"{stack.auth_user}:{stack.auth_password}".encode()).decode()
    path.write_text(json.dumps({"auths": {stack.auth_registry: {"auth": token}}}))
    path.chmod(0o600)
    return path


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} … failed: {(out.stderr or out.stdout).strip()[-500:]}")


def raw_skopeo(stack, auth: Path, name: str) -> float:
    t0 = time.perf_counter()
    _run(["skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--src-tls-verify=false", "--src-no-creds",
          "--dest-tls-verify=false", f"--dest-authfile={auth}",
          f"docker://{stack.registry}/bench/copy-{name}:1", f"docker://{stack.auth_registry}/bench/copy-{name}:1"])
    return time.perf_counter() - t0


def daemon_route(stack, env: dict[str, str], name: str) -> float:
    source, target = f"{stack.registry}/bench/copy-{name}:1", f"{stack.auth_registry}/bench/copy-{name}:1"
    t0 = time.perf_counter()
    for argv in ([DOCKER, "pull", source], [DOCKER, "tag", source, target], [DOCKER, "push", target]):
        _run(argv, env)
    return time.perf_counter() - t0


def copy_phase(stack, args, res, log, svc, follow: Callable, cli_env: Callable, epoch: Callable) -> None:
    env = cli_env(stack, stack.tmp / "bench-docker-cli")
    subprocess.run([DOCKER, "login", "--username", stack.auth_user, "--password-stdin", stack.auth_registry],
                   input=stack.auth_password, capture_output=True, text=True, env=env, check=True)
    auth = _auth_file(stack)
    rounds, mib = args.copies, args.copy_mib
    log(f"writing {3 * rounds} fresh images of {mib} MiB into the plain registry")
    digests = {f"{way}{i}": _fresh_image(stack, f"{way}{i}", mib) for i in range(rounds) for way in WAYS}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    inside: list[float] = []
    steps: list[dict[str, float]] = []
    for i in range(rounds):
        order = WAYS[i % 3:] + WAYS[:i % 3]  # each way goes first, second and third in turn
        for way in order:
            name = f"{way}{i}"
            if way == "imagepub":
                seconds, job = follow(svc, {"source": {"registry": "local", "repository": f"bench/copy-{name}", "tag": "1"},
                                            "targets": [{"registry": "secure", "repository": f"bench/copy-{name}", "tags": ["1"]}]},
                                      path="/v1/copy")
                if job["state"] != "succeeded":
                    raise RuntimeError(f"copy job failed: {job.get('error')}")
                target = job["targets"][0]
                statuses = {layer["status"] for layer in target["layers"]}
                if target["digest"] != digests[name] or statuses != {"copied"}:
                    raise RuntimeError(f"not a fresh, exact copy: digest {target['digest']}, blobs {statuses}")
                inside.append(epoch(job["finished_at"]) - epoch(job["started_at"]))
                steps.append(job_steps(svc, job, epoch))
            elif way == "skopeo":
                seconds = raw_skopeo(stack, auth, name)
            else:
                seconds = daemon_route(stack, env, name)
            if stack.registry_digest(stack.auth_registry, f"bench/copy-{name}", "1") is None:
                raise RuntimeError(f"{way}: nothing at the destination")
            times[way].append(seconds)
        log(f"copy {mib} MiB, round {i + 1}/{rounds}: " + ", ".join(f"{w} {times[w][-1]:.2f} s" for w in order))
    report(res, times, inside, steps, rounds, mib, stack, digests)


def _daemon_digest_changes(stack, digests: dict[str, str]) -> str:
    changed = sum(stack.registry_digest(stack.auth_registry, f"bench/copy-{name}", "1") != digest
                  for name, digest in digests.items() if name.startswith("daemon"))
    total = sum(name.startswith("daemon") for name in digests)
    return f"{changed} of {total}"


def job_steps(svc, job: dict[str, Any], epoch: Callable) -> dict[str, float]:
    """Where the job's own time went, from the snapshots it wrote as it ran (its events stream):
    resolving the source (until the first blob shows), the blobs (until the last is done), and
    the rest (the tag written, the digest verified against the destination, signatures)."""
    snapshots = [json.loads(fields["job"]) for _, fields in svc.redis.xrange(f"imagepub:job:{job['id']}:events")]
    started, finished = epoch(job["started_at"]), epoch(job["finished_at"])
    first = next((epoch(s["updated_at"]) for s in snapshots if (s.get("targets") or [{}])[0].get("layers")), started)
    done = next((epoch(s["updated_at"]) for s in snapshots
                 if (s.get("targets") or [{}])[0].get("layers") and all(l["status"] == "copied" for l in s["targets"][0]["layers"])), finished)
    return {"resolve the source (skopeo inspect)": first - started, "the blobs (skopeo copy)": done - first,
            "write the manifest, verify the digest, look for signatures": finished - done}


def report(res, times: dict[str, list[float]], inside: list[float], steps: list[dict[str, float]], rounds: int, mib: int,
           stack, digests) -> None:
    med = {way: statistics.median(values) for way, values in times.items()}
    i, s, d = med["imagepub"], med["skopeo"], med["daemon"]
    res.add("7 copy", f"{mib} MiB registry → registry: imagepub (POST → terminal event), median", f"{i:.2f} s",
            f"{s:.2f} s (raw skopeo copy)", i / s, "≤ 1.10×", i / s <= 1.10)
    res.add("7 copy", f"{mib} MiB registry → registry: imagepub vs the daemon route, median", f"{i:.2f} s",
            f"{d:.2f} s (docker pull && tag && push)", i / d, "≤ 0.25×", i / d <= 0.25)
    outside = [total - job for total, job in zip(times["imagepub"], inside)]
    res.detail("Copy between registries (target 7, issue 12)", "",
               f"{rounds} rounds; in each, three images of {mib} MiB (single platform, 3 layers of random bytes, new content "
               "for every copy, so nothing can be mounted or found) go from the plain registry to the password-protected "
               "one, each way in turn first. imagepub: `POST /v1/copy` and the job's SSE stream until the terminal event "
               "(every blob `copied`, the digest the destination serves checked against the source's). Raw skopeo: "
               "`skopeo copy --quiet --all --preserve-digests` with the same TLS flags and an auth file. The daemon: "
               "`docker pull`, `docker tag`, `docker push` with the CLI against the stack's private daemon (vfs).", "",
               "| way | median | min | max |", "| --- | ---: | ---: | ---: |",
               *[f"| {way} | {med[way]:.2f} s | {min(v):.2f} s | {max(v):.2f} s |" for way, v in times.items()],
               f"| imagepub: the job itself (finished_at − started_at) | {statistics.median(inside):.2f} s | {min(inside):.2f} s | {max(inside):.2f} s |",
               f"| imagepub: outside the job (API, queue, pick-up, SSE) | {statistics.median(outside) * 1000:.0f} ms | "
               f"{min(outside) * 1000:.0f} ms | {max(outside) * 1000:.0f} ms |",
               *[f"| imagepub job: {name} | {statistics.median(v) * 1000:.0f} ms | {min(v) * 1000:.0f} ms | {max(v) * 1000:.0f} ms |"
                 for name, v in ((name, [s[name] for s in steps]) for name in (steps[0] if steps else {}))], "",
               f"The daemon route changed the digest of {_daemon_digest_changes(stack, digests)} images (it re-compresses the "
               "layers it extracted); imagepub and skopeo kept every one.")
