"""Multi-platform test images written by hand as OCI image layouts (no buildx, no daemon).

An OCI image layout is a directory with ``oci-layout``, ``index.json`` and ``blobs/sha256/``.
:func:`write_image` puts into one: per platform a gzipped tar layer (or several) of random bytes
and a config, a manifest per platform, and an image index listing them with ``platform``
fields, named by a tag in ``index.json``. :func:`write_signature` adds a cosign-style artifact
(``sha256-<hex>.sig``, ``.att`` or ``.sbom``) for a digest. :func:`push` puts a tag of the
layout into a registry with skopeo, every platform and the digests kept, so the registry serves
exactly the digests computed here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
# What cosign writes (sigstore/cosign pkg/oci/static and pkg/types).
COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_ATTESTATION = "application/vnd.dsse.envelope.v1+json"
SPDX = "text/spdx+json"
ARTIFACT_LAYER = {"sig": COSIGN_SIMPLESIGNING, "att": COSIGN_ATTESTATION, "sbom": SPDX}


@dataclass
class Image:
    """What :func:`write_image` wrote: the tag's digest and media type, and per platform
    (``os/arch[/variant]``) its manifest digest and its layer digests."""

    tag: str
    digest: str
    media_type: str
    manifests: dict[str, str] = field(default_factory=dict)
    layers: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # blob digest -> size

    @property
    def blobs(self) -> set[str]:
        return {d for ls in self.layers.values() for d in ls}


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest, len(data)


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _layer(size: int) -> tuple[bytes, str]:
    """A gzipped tar holding ``size`` random bytes (incompressible: the blob is about that big),
    and its diff id (the digest of the tar itself, which a daemon checks when it pulls)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size, info.mtime = size, 0
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0), "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()


def _tag(layout: Path, tag: str, descriptor: dict) -> None:
    """Name ``descriptor`` ``tag`` in index.json (replacing an entry of that name)."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) != tag]
    index["manifests"].append({**descriptor, "annotations": {REF_NAME: tag}})
    index_path.write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def _manifest(layout: Path, image: Image, platform: str, layer_sizes: list[int]) -> dict:
    os_, arch, *variant = platform.split("/")
    layers, diff_ids = [], []
    for size in layer_sizes:
        blob, diff_id = _layer(size)
        digest, length = _put(layout, blob)
        image.sizes[digest] = length
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": length})
        diff_ids.append(diff_id)
    config = {"architecture": arch, "os": os_, "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "config": {}, "created": "2024-01-01T00:00:00Z"}
    if variant:
        config["variant"] = variant[0]
    config_digest, config_size = _put(layout, _json(config))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size}, "layers": layers}
    digest, size = _put(layout, _json(manifest))
    image.manifests[platform] = digest
    image.layers[platform] = [l["digest"] for l in layers]
    descriptor = {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                  "platform": {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}}
    return descriptor


def write_image(layout: Path, tag: str, platforms=("linux/amd64", "linux/arm64"), layer_sizes=(2048, 1024)) -> Image:
    """An image of ``platforms`` under ``tag``: an index of their manifests when there are
    several, the manifest itself for one."""
    layout.mkdir(parents=True, exist_ok=True)
    image = Image(tag=tag, digest="", media_type="")
    descriptors = [_manifest(layout, image, p, list(layer_sizes)) for p in platforms]
    if len(descriptors) == 1:
        descriptor = {k: v for k, v in descriptors[0].items() if k != "platform"}
    else:
        digest, size = _put(layout, _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}))
        descriptor = {"mediaType": OCI_INDEX, "digest": digest, "size": size}
    image.digest, image.media_type = descriptor["digest"], descriptor["mediaType"]
    _tag(layout, tag, descriptor)
    return image


def write_signature(layout: Path, signed: str, kind: str = "sig") -> tuple[str, str]:
    """A cosign-style artifact for digest ``signed``: a manifest with an empty-ish config and
    one layer, tagged ``sha256-<hex>.<kind>``; returns (tag, digest)."""
    payload = _json({"critical": {"image": {"docker-manifest-digest": signed}, "type": "cosign container image signature"}})
    layer_digest, layer_size = _put(layout, payload)
    config_digest, config_size = _put(layout, _json({"architecture": "", "os": "", "rootfs": {"type": "layers", "diff_ids": [layer_digest]}, "config": {}}))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": ARTIFACT_LAYER[kind], "digest": layer_digest, "size": layer_size,
                            "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQDtest"}}]}
    digest, size = _put(layout, _json(manifest))
    tag = f"{signed.replace(':', '-')}.{kind}"
    _tag(layout, tag, {"mediaType": OCI_MANIFEST, "digest": digest, "size": size})
    return tag, digest


def push(layout: Path, tag: str, destination: str, *, tls_verify: bool = False, authfile: Path | None = None,
         prefix: list[str] | None = None, env: dict | None = None) -> None:
    """``skopeo copy --all --preserve-digests oci:LAYOUT:TAG docker://DESTINATION``."""
    argv = (prefix or []) + ["skopeo", "copy", "--quiet", "--all", "--preserve-digests",
                             f"--dest-tls-verify={'true' if tls_verify else 'false'}"]
    argv += [f"--dest-authfile={authfile}"] if authfile else ["--dest-no-creds"]
    argv += [f"oci:{layout}:{tag}", f"docker://{destination}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"skopeo copy oci:{layout}:{tag} → {destination}: {out.stderr.strip()}")
