"""The Helm charts (deploy/helm/agentgate for the gateway, deploy/helm/agentgate-agent for
agents), rendered offline by Helm itself (Helm 4's SDK, from PyPI's helm-python-sdk) and every
rendered object validated against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields fail) for the default values and for a cluster-mode values file. The gateway.toml the
chart renders is then read by the real binary, and the variables the agent chart sets are
checked against the agent's own flags."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")

GATEWAY = ROOT / "deploy" / "helm" / "agentgate"
AGENT = ROOT / "deploy" / "helm" / "agentgate-agent"
CLUSTER_VALUES = yaml.safe_load((GATEWAY / "ci" / "cluster-values.yaml").read_text())
AGENT_VALUES = yaml.safe_load((AGENT / "ci" / "test-values.yaml").read_text())
# The oldest Kubernetes the charts claim (kubeVersion) and the newest schema at hand.
KUBE_VERSIONS = ["1.30.0", "1.37.0"]


def render(chart: Path, values: dict) -> list[dict]:
    out = helm.Chart.load(str(chart)).render(values, name="ag", namespace="agents", is_install=True)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [o for o in yaml.safe_load_all(text) if o]
    return objects


def validate(objects: list[dict]):
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            check_service_monitor(obj, objects)
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                raise AssertionError(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): "
                                     f"{e.message} at {list(e.path)}") from None


def check_service_monitor(sm: dict, objects: list[dict]):
    """No schema for the Prometheus Operator's CRD here: check that it selects a Service and
    names one of its ports."""
    selector = sm["spec"]["selector"]["matchLabels"]
    ports = sm["spec"]["endpoints"]
    targets = [o for o in objects if o["kind"] == "Service"
               and selector.items() <= o["metadata"]["labels"].items()]
    assert len(targets) == 1, f"ServiceMonitor selects {len(targets)} Services"
    names = {p["name"] for p in targets[0]["spec"]["ports"]}
    assert {e["port"] for e in ports} <= names


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def gateway_toml(objects) -> str:
    return by_kind(objects, "ConfigMap")[0]["data"]["gateway.toml"]


def env_of(deployment) -> dict:
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@pytest.mark.parametrize("values", [{}, CLUSTER_VALUES], ids=["defaults", "cluster"])
def test_the_gateway_chart_renders_valid_objects(values):
    objects = render(GATEWAY, values)
    validate(objects)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    services = {o["metadata"]["name"] for o in by_kind(objects, "Service")}
    assert {"ag-agentgate-agent", "ag-agentgate-api", "ag-agentgate-admin"} <= services
    lint = helm.lint(str(GATEWAY), values, strict=True)
    assert lint["errors"] == [] and all(m["severity"] <= 1 for m in lint["messages"]), lint


@pytest.mark.parametrize("values", [{}, CLUSTER_VALUES], ids=["defaults", "cluster"])
def test_the_rendered_settings_are_read_by_the_gateway(values, tmp_path):
    f = tmp_path / "gateway.toml"
    f.write_text(gateway_toml(render(GATEWAY, values)))
    r = subprocess.run([str(BIN), "server", "--config", str(f), "--print-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"the gateway refused the chart's gateway.toml:\n{r.stderr}\n{f.read_text()}"
    assert 'listen = "0.0.0.0:8150"' in r.stdout
    assert 'tokens = "/etc/agentgate/tokens/tokens.json"' in r.stdout


def test_the_gateway_pod_drains_longer_than_the_grace_and_probes_its_admin_port():
    objects = render(GATEWAY, {})
    dep = by_kind(objects, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    grace = int(re.search(r'shutdown_grace = "(\d+)s"', gateway_toml(objects)).group(1))
    assert pod["terminationGracePeriodSeconds"] > grace
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert all(p["httpGet"]["port"] == "admin" for p in (c["livenessProbe"], c["readinessProbe"]))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    # One replica needs no Redis, no budget and no internal port.
    assert dep["spec"]["replicas"] == 1 and "AGENTGATE_REDIS" not in env_of(dep)
    assert not by_kind(objects, "PodDisruptionBudget") and not by_kind(objects, "Ingress")


def test_cluster_mode_wires_redis_the_internal_secret_and_one_ingress_host_for_both_transports():
    objects = render(GATEWAY, CLUSTER_VALUES)
    dep = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"] == "ag-agentgate"][0]
    env = env_of(dep)
    assert env["AGENTGATE_REDIS"] == "redis://ag-agentgate-redis:6379/0"
    assert env["AGENTGATE_INTERNAL_URL"] == "http://$(POD_IP):8155"
    settings = gateway_toml(objects)
    assert 'internal_secret_file = "/etc/agentgate/internal/secret"' in settings
    assert 'tls_cert = "/etc/agentgate/tls/tls.crt"' in settings
    mounts = {m["mountPath"] for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/etc/agentgate/internal", "/etc/agentgate/tls", "/etc/agentgate/tokens"} <= mounts
    assert by_kind(objects, "PodDisruptionBudget") and by_kind(objects, "HorizontalPodAutoscaler")
    ingresses = {o["metadata"]["name"]: o for o in by_kind(objects, "Ingress")}
    grpc, ws = ingresses["ag-agentgate-grpc"], ingresses["ag-agentgate-ws"]
    # TLS on the agent port: ingress-nginx must speak GRPCS and HTTPS to it.
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert ws["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    assert grpc["spec"]["rules"][0]["host"] == ws["spec"]["rules"][0]["host"] == "agents.example.com"
    paths = {p["path"] for p in grpc["spec"]["rules"][0]["http"]["paths"]}
    assert {"/agentgate.v1.AgentSession", "/agentgate.v1.Tunnel", "/runner.jobs.v1.JobRouter"} <= paths
    assert ws["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/-/agent/"


@pytest.mark.parametrize("values,words", [
    ({"cluster": {"enabled": True, "bundledRedis": {"enabled": True}}}, "internalSecret"),
    ({"replicaCount": 3}, "cluster.enabled"),
    ({"cluster": {"enabled": True, "internalSecret": {"existingSecret": "s"}}}, "Redis"),
], ids=["no-internal-secret", "replicas-without-cluster", "cluster-without-redis"])
def test_a_chart_mistake_fails_with_a_sentence(values, words):
    with pytest.raises(helm.HelmError) as e:
        render(GATEWAY, values)
    assert words in str(e.value)


def test_an_external_redis_behind_sentinel_is_accepted_and_wired():
    sentinel = "redis+sentinel://sentinel-0.redis:26379,sentinel-1.redis:26379/mymaster/0"
    values = {**CLUSTER_VALUES, "cluster": {**CLUSTER_VALUES["cluster"], "redisUrl": sentinel,
                                            "bundledRedis": {"enabled": False}}}
    helm.Chart.load(str(GATEWAY)).validate_schema(values)
    dep = [d for d in by_kind(render(GATEWAY, values), "Deployment")
           if d["metadata"]["name"] == "ag-agentgate"][0]
    assert env_of(dep)["AGENTGATE_REDIS"] == sentinel


@pytest.mark.parametrize("values", [
    {"replicaCount": 0},
    {"config": {"listen": "0.0.0.0:1"}},
    {"ingress": {"websocketPath": "no-slash"}},
    {"replicas": 2},
    {"cluster": {"redisUrl": "http://redis:6379"}},
], ids=["zero-replicas", "chart-owned-setting", "relative-path", "unknown-key", "not-a-redis-url"])
def test_the_values_schema_refuses_bad_values(values):
    chart = helm.Chart.load(str(GATEWAY))
    with pytest.raises(helm.HelmError):
        chart.validate_schema(values)


def test_the_agent_chart_renders_valid_objects_with_variables_the_agent_knows(tmp_path):
    with pytest.raises(helm.HelmError) as e:
        render(AGENT, {})
    assert "token.existingSecret" in str(e.value)
    objects = render(AGENT, AGENT_VALUES)
    validate(objects)
    dep = by_kind(objects, "Deployment")[0]
    env = env_of(dep)
    helptext = subprocess.run([str(BIN), "agent", "--help"], capture_output=True, text=True,
                              check=True).stdout
    known = set(re.findall(r"env: (AGENTGATE_[A-Z_]+)=", helptext))
    assert {k for k in env if k.startswith("AGENTGATE_")} <= known | {"AGENTGATE_LOG_FORMAT"}, \
        sorted(set(env) - known)
    assert env["AGENTGATE_AGENT_UPSTREAM"] == ("http://web.default.svc:8080,"
                                               "metrics=http://prometheus.monitoring.svc:9090")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The agent takes exactly these values: it starts (and keeps retrying a gateway that is
    # not there) instead of stopping on its configuration.
    (tmp_path / "token").write_text("not-a-real-token\n")
    run_env = {k: v for k, v in env.items() if v is not None and "$(" not in v}
    run_env.update(AGENTGATE_TOKEN_FILE=str(tmp_path / "token"),
                   AGENTGATE_SERVER="grpc://127.0.0.1:9", AGENTGATE_AGENT_METRICS_LISTEN="127.0.0.1:0")
    run_env.pop("AGENTGATE_AGENT_CA_CERT", None)
    p = subprocess.Popen([str(BIN), "agent"], env=run_env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=2)
    finally:
        p.kill()
        out = p.communicate()[0]
    assert "error:" not in out.split("\n")[0], out
