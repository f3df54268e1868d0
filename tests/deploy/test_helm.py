"""The Helm chart, rendered without helm by tools/helm-render (Go text/template + sprig,
the engine Helm uses) for the default values and the variants that matter, then
checked three ways: values against values.schema.json, every manifest against the
Kubernetes schemas (kubernetes-validate), and the facts the deployment relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploytools import CHART, FULLNAME, render_chart

KUBERNETES_VERSION = "1.30"

HUB_PASSWORD = "hub-pa55-do-not-leak"
WEBHOOK_SECRET = "webhook-s3cret-do-not-leak"
CONFIG = {
    "registries": {
        "prod-ecr": {"type": "ecr", "region": "eu-west-1", "account_id": "123456789012",
                     "create_repositories": True,
                     "repository_defaults": {"image_tag_mutability": "IMMUTABLE",
                                             "scan_on_push": True, "encryption": "AES256"}},
        "hub": {"type": "registry", "host": "docker.io", "username": "acme",
                "password_env": "HUB_PASSWORD"},
    },
    "clients": [{"name": "ci", "token_sha256": "ab" * 32, "scopes": ["publish", "pull", "read"],
                 "repositories": ["team-a/*"]}],
    "auth": {"anonymous": False},
    "webhooks": {"secret_env": "IMAGEPUB_WEBHOOK_SECRET", "allowed_hosts": ["ci.example.com"]},
}
SECRETS = {"env": {"HUB_PASSWORD": HUB_PASSWORD, "IMAGEPUB_WEBHOOK_SECRET": WEBHOOK_SECRET}}
IRSA_ROLE = "arn:aws:iam::123456789012:role/imagepub-publisher"

VARIANTS = {
    "default": {},
    "dind": {"config": CONFIG, "secrets": SECRETS, "docker": {"mode": "dind"}},
    "hostSocket": {"config": CONFIG, "secrets": SECRETS,
                   "docker": {"mode": "hostSocket", "hostSocket": {"groupId": 998}}},
    "scaled": {
        "config": CONFIG, "secrets": SECRETS, "aws": {"region": "eu-west-1"},
        "serviceAccount": {"irsaRoleArn": IRSA_ROLE},
        "api": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        "worker": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    "existingSecret": {
        "config": CONFIG, "secrets": {"existingSecret": "imagepub-env"},
        "redis": {"url": "", "existingSecret": {"name": "imagepub-redis", "key": "url"}},
    },
}


# ------------------------------------------------------------------ rendering


def merged_values(overrides: dict) -> dict:
    """values.yaml with *overrides* merged in as Helm does (maps merge, the rest replaces)."""
    def merge(base, over):
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out
    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), overrides)


def render(renderer: Path, tmp_path: Path, overrides: dict) -> list[dict]:
    return render_chart(renderer, tmp_path, overrides)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, renderer, tmp_path):
    name = request.param
    return name, VARIANTS[name], render(renderer, tmp_path, VARIANTS[name])


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(deployment: dict, name: str) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    for c in spec["containers"] + spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {deployment['metadata']['name']}")


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def api_deployment(docs):
    return find(docs, "Deployment", f"{FULLNAME}-api")


def worker_deployment(docs):
    return find(docs, "Deployment", f"{FULLNAME}-worker")


# --------------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def schema() -> dict:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_values_match_the_schema(schema, name):
    jsonschema.validate(merged_values(VARIANTS[name]), schema)


@pytest.mark.parametrize("bad", [
    pytest.param({"config": {"registries": {"hub": {"type": "registry", "host": "docker.io",
                                                    "password": "inline"}}}}, id="inline-password"),
    pytest.param({"config": {"webhooks": {"secret": "inline"}}}, id="inline-webhook-secret"),
    pytest.param({"config": {"clients": [{"name": "ci", "token_sha256": "not-a-hash"}]}}, id="token-hash"),
    pytest.param({"docker": {"mode": "podman"}}, id="docker-mode"),
    pytest.param({"config": {"builds": {"network": "host"}}}, id="builds-on-the-hosts-network"),
    pytest.param({"config": {"builds": {"network": "container:dind"}}}, id="builds-in-a-containers-network"),
    pytest.param({"config": {"builds": {"memory_bytes": 1024}}}, id="builds-memory-below-the-daemons-bound"),
    pytest.param({"serviceAccount": {"irsaRoleArn": "imagepub-role"}}, id="irsa-arn"),
    pytest.param({"redis": {"url": "http://redis:6379"}}, id="redis-url"),
    pytest.param({"secrets": {"env": {"HUB-PASSWORD": "x"}}}, id="env-name"),
    pytest.param({"worker": {"concurency": 4}}, id="typo"),
    # Workers serve no metrics: the option is gone, and the schema says so.
    pytest.param({"worker": {"metrics": {"enabled": True, "port": 9808}}}, id="worker-metrics"),
    pytest.param({"worker": {"livenessProbe": {"enabled": "yes"}}}, id="worker-probe-enabled"),
    pytest.param({"worker": {"livenessProbe": {"maxAgeSeconds": 5}}}, id="worker-probe-too-tight"),
    pytest.param({"worker": {"livenessProbe": {"periodSeconds": 0}}}, id="worker-probe-period"),
    pytest.param({"worker": {"livenessProbe": {"httpGet": {"path": "/metrics", "port": 9808}}}},
                 id="worker-probe-http"),
])
def test_schema_rejects(schema, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(merged_values(bad), schema)


# ------------------------------------------------------- Kubernetes validity


def test_manifests_are_valid_kubernetes(variant):
    _, _, docs = variant
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            # A CRD kubernetes-validate does not ship: check its shape by hand.
            assert doc["kind"] == "ServiceMonitor"
            assert doc["spec"]["selector"]["matchLabels"]
            for endpoint in doc["spec"]["endpoints"]:
                assert endpoint["port"] and endpoint["path"] == "/metrics"
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def test_selectors_match_their_pods(variant):
    _, _, docs = variant
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] == "Deployment"}
    assert set(pods) == {f"{FULLNAME}-api", f"{FULLNAME}-worker"}
    for d in docs:
        if d["kind"] == "Deployment":
            selector = d["spec"]["selector"]["matchLabels"]
        elif d["kind"] == "Service":
            selector = d["spec"]["selector"]
        elif d["kind"] == "PodDisruptionBudget":
            selector = d["spec"]["selector"]["matchLabels"]
        else:
            continue
        matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, f"{d['kind']}/{d['metadata']['name']} selects {matched}"


# ---------------------------------------------------------- what we rely on


def test_api_probes_and_port(renderer, tmp_path):
    docs = render(renderer, tmp_path, {})
    api = container(api_deployment(docs), "api")
    assert api["args"][:3] == ["serve", "--bind", "0.0.0.0:8080"]
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in api["ports"]
    service = find(docs, "Service", FULLNAME)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    worker = container(worker_deployment(docs), "worker")
    assert worker["args"] == ["worker", "--concurrency", "4"]
    # The API serves the fleet's metrics; workers serve nothing on any port.
    assert "IMAGEPUB_METRICS_PORT" not in env_of(worker)
    assert "ports" not in worker and "readinessProbe" not in worker


def _probe_script(probe: dict) -> str:
    command = probe["exec"]["command"]
    assert command[:2] == ["/opt/imagepub/bin/python", "-c"] and len(command) == 3
    return command[2]


def test_worker_liveness_probe(variant):
    """Every variant gives the worker the exec probe on the supervisor's alive file."""
    _, _, docs = variant
    probe = container(worker_deployment(docs), "worker")["livenessProbe"]
    assert set(probe) == {"exec", "initialDelaySeconds", "periodSeconds", "timeoutSeconds",
                          "failureThreshold"}
    assert (probe["initialDelaySeconds"], probe["periodSeconds"], probe["timeoutSeconds"],
            probe["failureThreshold"]) == (30, 20, 5, 3)
    script = _probe_script(probe)
    assert "IMAGEPUB_WORKER_ALIVE_FILE" in script and "/tmp/imagepub-worker.alive" in script
    assert "<= 60 " in script


def test_worker_liveness_probe_values(renderer, tmp_path):
    docs = render(renderer, tmp_path, {"worker": {"livenessProbe": {
        "maxAgeSeconds": 90, "initialDelaySeconds": 45, "periodSeconds": 15, "failureThreshold": 4}}})
    probe = container(worker_deployment(docs), "worker")["livenessProbe"]
    assert (probe["initialDelaySeconds"], probe["periodSeconds"], probe["timeoutSeconds"],
            probe["failureThreshold"]) == (45, 15, 5, 4)
    assert "<= 90 " in _probe_script(probe)
    docs = render(renderer, tmp_path, {"worker": {"livenessProbe": {"enabled": False}}})
    assert "livenessProbe" not in container(worker_deployment(docs), "worker")


def test_worker_liveness_script(renderer, tmp_path):
    """The rendered script itself (the image test runs it inside a worker container too):
    0 for a fresh file, 1 with a reason for a stale or missing one."""
    script = _probe_script(container(worker_deployment(render(renderer, tmp_path, {})), "worker")
                           ["livenessProbe"])
    alive = tmp_path / "alive"

    def probe(path: Path = alive):
        env = dict(os.environ, IMAGEPUB_WORKER_ALIVE_FILE=str(path))
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)

    alive.touch()
    assert probe().returncode == 0
    os.utime(alive, (time.time() - 55, time.time() - 55))
    assert probe().returncode == 0
    os.utime(alive, (time.time() - 65, time.time() - 65))
    out = probe()
    assert out.returncode == 1 and "was last touched 6" in out.stderr and "(limit 60s)" in out.stderr
    out = probe(tmp_path / "missing")
    assert out.returncode == 1 and "is missing" in out.stderr


def test_app_pods_run_non_root_read_only(variant):
    _, _, docs = variant
    for deployment in (api_deployment(docs), worker_deployment(docs)):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
        assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


def test_config_comes_from_the_configmap(renderer, tmp_path):
    docs = render(renderer, tmp_path, VARIANTS["dind"])
    config_map = find(docs, "ConfigMap", FULLNAME)
    assert yaml.safe_load(config_map["data"]["imagepub.yaml"]) == merged_values(VARIANTS["dind"])["config"]
    for deployment in (api_deployment(docs), worker_deployment(docs)):
        pod = deployment["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert env_of(c)["IMAGEPUB_CONFIG"] == "/etc/imagepub/imagepub.yaml"
        assert {"name": "config", "mountPath": "/etc/imagepub", "readOnly": True} in c["volumeMounts"]
        assert {"name": "config", "configMap": {"name": FULLNAME}} in pod["volumes"]
        assert env_of(c)["IMAGEPUB_REDIS_URL"] == "redis://redis:6379/0"
        # A config change rolls the pods.
        assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_dind_mode(renderer, tmp_path):
    docs = render(renderer, tmp_path, VARIANTS["dind"])
    worker_pod = worker_deployment(docs)["spec"]["template"]["spec"]
    dind = container(worker_deployment(docs), "dind")
    assert dind in worker_pod["initContainers"] and dind["restartPolicy"] == "Always"
    assert dind["securityContext"]["privileged"] is True
    assert env_of(dind) == {"DOCKER_TLS_CERTDIR": "/certs"}
    assert dind["startupProbe"]["exec"]["command"][:2] == ["docker", "--host=tcp://localhost:2376"]
    worker = container(worker_deployment(docs), "worker")
    env = env_of(worker)
    assert env["DOCKER_HOST"] == "tcp://localhost:2376"
    assert env["DOCKER_TLS_VERIFY"] == "1"
    assert env["DOCKER_CERT_PATH"] == "/certs/client"
    # The worker sees the client certificates (read-only) and nothing else of the daemon.
    assert {"name": "docker-certs-client", "mountPath": "/certs/client", "readOnly": True} in worker["volumeMounts"]
    assert {"name": "docker-certs-client", "mountPath": "/certs/client"} in dind["volumeMounts"]
    assert not any(v.get("hostPath") for v in worker_pod["volumes"])


def test_host_socket_mode(renderer, tmp_path):
    docs = render(renderer, tmp_path, VARIANTS["hostSocket"])
    worker_pod = worker_deployment(docs)["spec"]["template"]["spec"]
    assert "initContainers" not in worker_pod
    worker = container(worker_deployment(docs), "worker")
    assert env_of(worker)["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert "DOCKER_TLS_VERIFY" not in env_of(worker)
    assert {"name": "docker-sock", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}} \
        in worker_pod["volumes"]
    assert worker_pod["securityContext"]["supplementalGroups"] == [998]
    assert not any(c.get("securityContext", {}).get("privileged") for c in worker_pod["containers"])


def test_each_worker_names_its_daemon(renderer, tmp_path):
    """The fleet routes jobs by daemon name: a dind pod's daemon is its own (the pod's name),
    a node's socket is shared by that node's pods (the node's name); or the value given."""
    for variant, field in (("dind", "metadata.name"), ("hostSocket", "spec.nodeName")):
        worker = container(worker_deployment(render(renderer, tmp_path, VARIANTS[variant])), "worker")
        assert env_of(worker)["IMAGEPUB_DAEMON_NAME"] == {"fieldRef": {"fieldPath": field}}
    named = render(renderer, tmp_path, {**VARIANTS["dind"], "docker": {"mode": "dind", "daemonName": "build-host-1"}})
    assert env_of(container(worker_deployment(named), "worker"))["IMAGEPUB_DAEMON_NAME"] == "build-host-1"


def test_secrets_stay_out_of_configmaps(variant):
    name, overrides, docs = variant
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        assert HUB_PASSWORD not in text and WEBHOOK_SECRET not in text, f"{doc['kind']} leaks a secret"
    if overrides.get("secrets", {}).get("env"):
        secret = find(docs, "Secret", FULLNAME)
        assert secret["stringData"] == SECRETS["env"]
        for deployment in (api_deployment(docs), worker_deployment(docs)):
            c = deployment["spec"]["template"]["spec"]["containers"][0]
            assert c["envFrom"] == [{"secretRef": {"name": FULLNAME}}]


def test_existing_secrets(renderer, tmp_path):
    docs = render(renderer, tmp_path, VARIANTS["existingSecret"])
    assert "Secret" not in kinds(docs)
    for deployment in (api_deployment(docs), worker_deployment(docs)):
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        assert c["envFrom"] == [{"secretRef": {"name": "imagepub-env"}}]
        assert env_of(c)["IMAGEPUB_REDIS_URL"] == {"secretKeyRef": {"name": "imagepub-redis", "key": "url"}}


def test_redis_is_required(renderer, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"redis": {"url": ""}}))
    out = subprocess.run([str(renderer), "-f", str(values), str(CHART)], capture_output=True, text=True)
    assert out.returncode != 0 and "redis.url" in out.stderr


def test_irsa_autoscaling_and_service_monitors(renderer, tmp_path):
    docs = render(renderer, tmp_path, VARIANTS["scaled"])
    account = find(docs, "ServiceAccount", FULLNAME)
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == IRSA_ROLE
    worker_pod = worker_deployment(docs)["spec"]["template"]["spec"]
    assert worker_pod["serviceAccountName"] == FULLNAME
    assert env_of(worker_pod["containers"][0])["AWS_REGION"] == "eu-west-1"
    # The API never calls AWS: it does not run under the IRSA account.
    assert "serviceAccountName" not in api_deployment(docs)["spec"]["template"]["spec"]

    for component in ("api", "worker"):
        deployment = find(docs, "Deployment", f"{FULLNAME}-{component}")
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        hpa = find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-{component}")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}

    # One ServiceMonitor, on the API: its /metrics serves the whole fleet. Workers have
    # no Service and no metrics port.
    services = [d for d in docs if d["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == [FULLNAME]
    monitor = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["name"] == f"{FULLNAME}-api"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= services[0]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert "http" in {p["name"] for p in services[0]["spec"]["ports"]}


def test_defaults_render_without_optional_objects(renderer, tmp_path):
    docs = render(renderer, tmp_path, {})
    assert kinds(docs) == ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget",
                           "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert "annotations" not in find(docs, "ServiceAccount", FULLNAME)["metadata"]
