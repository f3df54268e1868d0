"""Registry TLS settings for daemonless clients (copies): ``ca_file`` and ``insecure``."""

from __future__ import annotations

import pytest

from service.config import ConfigError, is_loopback, parse


def registry(**entry):
    return parse({"registries": {"r": entry}}, {}).registries["r"]


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1:5000", True), ("127.20.30.40", True), ("localhost", True), ("localhost:5000", True), ("[::1]:5000", True),
    ("::1", True), ("docker.io", False), ("10.0.0.1:5000", False), ("registry.example.com:443", False), ("localhost.example.com", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_insecure_defaults_as_the_daemons_insecure_registries():
    assert registry(type="registry", host="127.0.0.1:5000").insecure is True  # loopback: plain HTTP allowed, as dockerd does
    assert registry(type="registry", host="ghcr.io").insecure is False
    assert registry(type="registry", host="localhost:5000", insecure=False).tls_verify is True
    assert registry(type="registry", host="10.1.2.3:5000", insecure=True).tls_verify is False
    # a CA named is a CA to check, loopback or not
    assert registry(type="registry", host="127.0.0.1:5443", ca_file="/etc/imagepub/ca.pem").insecure is False
    assert registry(type="ecr", region="eu-west-1", ca_file="/etc/ssl/ca.pem").ca_file == "/etc/ssl/ca.pem"


@pytest.mark.parametrize("entry, words", [
    ({"type": "ecr", "region": "eu-west-1", "insecure": True}, "registries.r.insecure: ECR is always HTTPS"),
    ({"type": "registry", "host": "h", "insecure": True, "ca_file": "/ca.pem"}, "registries.r.insecure: an insecure registry"),
    ({"type": "registry", "host": "h", "insecure": "maybe"}, "registries.r.insecure"),
    ({"type": "registry", "host": "h", "ca_file": ""}, "registries.r.ca_file"),
])
def test_tls_settings_are_validated(entry, words):
    with pytest.raises(ConfigError, match=words):
        parse({"registries": {"r": entry}}, {})


def test_skopeo_gets_the_proxy_and_trust_variables_only():
    settings = parse({}, {"PATH": "/opt/bin:/usr/bin", "HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "10.0.0.0/8",
                          "SSL_CERT_FILE": "/etc/ssl/corp.pem", "SECURE_REGISTRY_PASSWORD": "x", "AWS_SECRET_ACCESS_KEY": "y",
                          "HOME": "/home/imagepub"})
    assert settings.skopeo.environment == {"PATH": "/opt/bin:/usr/bin", "HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "10.0.0.0/8",
                                           "SSL_CERT_FILE": "/etc/ssl/corp.pem"}
    assert settings.skopeo.data_home == "/home/imagepub/.local/share"  # skopeo's own place for its blob-info cache
