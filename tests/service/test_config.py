"""Configuration: one file plus the environment, secrets never in the file."""

from __future__ import annotations

import pytest

from service import config
from service.config import ConfigError


def test_full_file_and_environment_overrides(tmp_path):
    path = tmp_path / "imagepub.yaml"
    (tmp_path / "hub-password").write_text("from-a-file\n")
    path.write_text(f"""
registries:
  local: {{type: registry, host: "localhost:5000"}}
  hub: {{type: registry, host: docker.io, username: acme, password_file: {tmp_path / 'hub-password'}}}
  prod-ecr:
    type: ecr
    region: eu-west-1
    account_id: "123456789012"
    role_arn: arn:aws:iam::123456789012:role/publisher
    create_repositories: true
    repository_defaults: {{image_tag_mutability: IMMUTABLE, scan_on_push: true, encryption: KMS, kms_key: alias/ecr, tags: {{team: platform}}}}
clients: [{{name: ci, token_sha256: {"ab" * 32}, scopes: [publish, read], repositories: ["team-a/*"], rate_limit: 20/second}}]
auth: {{anonymous: false}}
webhooks: {{secret_env: HOOK_SECRET}}
retention: {{finished_jobs: 7d}}
limits: {{max_targets: 5}}
""")
    settings = config.load({"IMAGEPUB_CONFIG": str(path), "IMAGEPUB_REDIS_URL": "redis://redis:6379/3", "DOCKER_HOST": "tcp://dind:2376"})
    assert settings.redis_url == "redis://redis:6379/3"
    assert settings.docker_host == "tcp://dind:2376"
    assert settings.limits.max_targets == 5 and settings.limits.max_tags_per_target == 20
    assert settings.registries["hub"].password() == "from-a-file"
    ecr = settings.registries["prod-ecr"]
    assert ecr.type == "ecr" and ecr.role_arn.endswith("publisher")
    assert ecr.repository_defaults.image_tag_mutability == "IMMUTABLE"
    assert ecr.repository_defaults.encryption_type == "KMS" and ecr.repository_defaults.tags == {"team": "platform"}
    assert settings.registries["local"].public() == {"name": "local", "type": "registry", "host": "localhost:5000"}


def test_defaults_without_a_file():
    settings = config.load({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0" and settings.registries == {}


def test_builds_run_on_no_network_unless_the_operator_names_one():
    assert config.load({}).builds.network == "none"  # a tenant's RUN step reaches nothing by default
    for network in ("none", "default", "bridge", "imagepub-builds", "egress_only.v2"):
        assert config.parse({"builds": {"network": network}}, {}).builds.network == network
    with pytest.raises(ConfigError, match="builds.netwrok"):  # a typo is no silent default
        config.parse({"builds": {"netwrok": "none"}}, {})


def test_a_builds_run_steps_have_a_memory_bound_unless_the_operator_lifts_it():
    assert config.load({}).builds.memory_bytes == 4 * 1024**3
    assert config.parse({"builds": {"memory_bytes": 512 * 1024**2}}, {}).builds.memory_bytes == 512 * 1024**2
    assert config.parse({"builds": {"memory_bytes": None}}, {}).builds.memory_bytes is None
    with pytest.raises(ConfigError, match="builds.memory_bytes"):  # below what the daemon takes
        config.parse({"builds": {"memory_bytes": 1024**2}}, {})


@pytest.mark.parametrize("network, message", [
    ("host", "daemon host's network"),
    ("container:ab12", "a Docker network's name"),
    ("", "a Docker network's name"),
    ("-x", "a Docker network's name"),
])
def test_a_build_network_that_would_reach_the_host_is_refused(network, message):
    with pytest.raises(ConfigError, match=f"builds.network: .*{message}"):
        config.parse({"builds": {"network": network}}, {})


def test_password_env_is_read_when_used(monkeypatch):
    settings = config.parse({"registries": {"r": {"type": "registry", "host": "h:1", "username": "u", "password_env": "R_PASSWORD"}}}, {})
    monkeypatch.setenv("R_PASSWORD", "later")
    assert settings.registries["r"].password() == "later"
    monkeypatch.delenv("R_PASSWORD")
    with pytest.raises(ConfigError, match="R_PASSWORD is not set"):
        settings.registries["r"].password()


@pytest.mark.parametrize(
    "registry, message",
    [
        ({"type": "registry", "host": "h", "password": "inline"}, "passwords never go in the file"),
        ({"type": "registry"}, "host"),
        ({"type": "ecr"}, "region"),
        ({"type": "ecr", "region": "us-east-1", "password_env": "X"}, "AWS credential chain"),
        ({"type": "ecr", "region": "us-east-1", "account_id": "12"}, "12 digits"),
        ({"type": "gcr", "host": "h"}, "type"),
        ({"type": "registry", "host": "h", "hots": "typo"}, "hots"),
        ({"type": "registry", "host": "h", "password_env": "A", "password_file": "/b"}, "not both"),
    ],
)
def test_bad_registries_are_refused_with_the_reason(registry, message):
    with pytest.raises(ConfigError, match=message):
        config.parse({"registries": {"r": registry}}, {})


def test_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load({"IMAGEPUB_CONFIG": str(tmp_path / "missing.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("registries: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load({"IMAGEPUB_CONFIG": str(bad)})
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        config.load({"IMAGEPUB_CONFIG": str(bad)})
