"""The chart's artifact store (where uploads wait for their job): an S3 bucket, which needs no
volume and no AWS access on the API, or a directory on one shared volume that every API and
worker pod mounts at the configured path; a directory without a shared volume does not render."""

from __future__ import annotations

import subprocess

import kubernetes_validate
import yaml

from deploytools import CHART, FULLNAME, RELEASE, render_chart
from service import config

KUBERNETES_VERSION = "1.30"


def _pods(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix(FULLNAME + "-"): d["spec"]["template"]["spec"]
            for d in docs if d["kind"] == "Deployment"}


def _config(docs: list[dict]) -> dict:
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    return yaml.safe_load(config_map["data"]["imagepub.yaml"])


def test_an_s3_store_is_configured_and_needs_no_volume(renderer, tmp_path):
    docs = render_chart(renderer, tmp_path, {"config": {"artifacts": {"bucket": "acme-imagepub", "region": "eu-west-1"}}})
    assert _config(docs)["artifacts"] == {"type": "s3", "bucket": "acme-imagepub", "prefix": "imagepub/uploads/", "region": "eu-west-1"}
    assert config.parse(_config(docs), {}).artifacts == config.Artifacts("s3", bucket="acme-imagepub", region="eu-west-1")
    for name, pod in _pods(docs).items():
        assert "artifacts" not in {v["name"] for v in pod["volumes"]}, name
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert tmp["emptyDir"]["sizeLimit"] in ("4Gi", "10Gi")  # room for an upload on its way
        env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
        assert not env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_a_directory_store_is_one_shared_volume_in_every_pod(renderer, tmp_path):
    overrides = {"config": {"artifacts": {"type": "directory", "path": "/var/lib/imagepub/artifacts"}},
                 "artifactsVolume": {"existingClaim": "imagepub-artifacts"}}
    docs = render_chart(renderer, tmp_path, overrides)
    assert config.parse(_config(docs), {}).artifacts == config.Artifacts("directory", path="/var/lib/imagepub/artifacts")
    pods = _pods(docs)
    assert set(pods) == {"api", "worker"}
    for name, pod in pods.items():
        assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "imagepub-artifacts"}} in pod["volumes"], name
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["artifacts"]["mountPath"] == "/var/lib/imagepub/artifacts", name
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_default_bucket_is_to_be_named(renderer, tmp_path):
    """No bucket is guessed (a name someone else owns would receive the uploads): the pods
    refuse to start until one is named."""
    docs = render_chart(renderer, tmp_path, {})
    try:
        config.parse(_config(docs), {})
    except config.ConfigError as exc:
        assert "artifacts.bucket: required for type: s3" in str(exc)
    else:
        raise AssertionError("the default configuration names no bucket and was accepted")


def test_a_directory_store_without_a_shared_volume_does_not_render(renderer, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": {"artifacts": {"type": "directory", "path": "/var/lib/imagepub/artifacts"}}}))
    out = subprocess.run([str(renderer), "--name", RELEASE, "-f", str(values), str(CHART)], capture_output=True, text=True)
    assert out.returncode != 0 and "artifactsVolume.existingClaim" in out.stderr
