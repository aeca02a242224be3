"""The Helm chart, rendered by the real Helm engine (helm-python-sdk, offline), linted, and
every manifest validated against the Kubernetes schemas (kubernetes-validate).

KEDA's ScaledObject/TriggerAuthentication and the Prometheus Operator's ServiceMonitor are
CRDs that kubernetes-validate has no schema for: they are checked against KEDA_SCHEMAS and
SERVICE_MONITOR_SCHEMA below, written from the fields the KEDA docs (ScaledObject spec,
TriggerAuthentication, redis-streams scaler) and the ServiceMonitor API define.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from embedq.core.config import Settings
from embedq.core.keys import partition_streams
from embedq.worker.health import HealthServer

from .support import helm_chart
from .support.helm_chart import CHART, HelmFailed
from .support.servers import http_get

KUBE_VERSION = "1.30.0"

EXTERNAL_TLS = {
    "redis": {
        "host": "redis.data.svc.cluster.local",
        "port": 6380,
        "database": 2,
        "username": "embedq",
        "tls": {"enabled": True, "caSecret": "redis-ca"},
    },
    "milvus": {"uri": "https://milvus.data.svc:19530", "tls": {"caSecret": "milvus-ca"}},
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "keda-off": {"keda": {"enabled": False}},
    "keda-off-no-hpa": {"keda": {"enabled": False}, "autoscaling": {"enabled": False}},
    "external-redis-tls": EXTERNAL_TLS,
    "cpu-only": {"gpu": {"enabled": False}, "resources": {"requests": {"cpu": "4"}}},
    "partitioned": {"stream": {"name": "ingest:tasks", "partitions": 4}},
    "redis-cluster": {
        "redis": {"host": "redis-cluster.data.svc", "cluster": True},
        "stream": {"partitions": 3},
    },
    "chart-made-secret": {
        "secrets": {
            "existingSecret": "",
            "create": True,
            "redisPassword": "r3dis-Passw0rd-xyz",
            "milvusToken": "root:M1lvus-t0ken-xyz",
        },
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
            "grafanaDashboard": {"enabled": True},
        },
        "model": {
            "path": "/models/bge-small",
            "volume": {"persistentVolumeClaim": {"claimName": "m"}},
        },
    },
    # The online gateway, with API keys from a chart-made Secret (trial) and KEDA off,
    # so that the workers' HPA and the gateway's are side by side.
    "gateway": {
        "gateway": {"enabled": True, "rateLimit": 20, "requestTimeoutS": 5},
        "keda": {"enabled": False},
        "secrets": {
            "existingSecret": "",
            "create": True,
            "redisPassword": "r3dis-Passw0rd-xyz",
            "milvusToken": "root:M1lvus-t0ken-xyz",
            "apiKeys": "sk-gw-alpha-0123,sk-gw-beta-4567",
        },
    },
    "gateway-open": {
        "gateway": {"enabled": True, "requireApiKeys": False, "autoscaling": {"enabled": False}},
    },
}

_str_map = {"type": "object", "additionalProperties": {"type": "string"}}
_meta = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "labels": _str_map, "annotations": _str_map},
}
# From KEDA's docs: the redis-streams scaler's metadata keys (all strings), and those of
# redis-cluster-streams (a list of nodes, no database: a cluster has only database 0).
REDIS_STREAMS_METADATA = {
    "address",
    "host",
    "port",
    "usernameFromEnv",
    "passwordFromEnv",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
}
REDIS_CLUSTER_STREAMS_METADATA = (
    REDIS_STREAMS_METADATA - {"address", "host", "port", "databaseIndex"}
) | {"addresses", "hosts", "ports"}
KEDA_SCHEMAS = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": _meta,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "fallback": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["failureThreshold", "replicas"],
                        "properties": {
                            "failureThreshold": {"type": "integer", "minimum": 1},
                            "replicas": {"type": "integer", "minimum": 1},
                            "behavior": {"type": "string"},
                        },
                    },
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "behavior": {}},
                            },
                            "scalingModifiers": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["formula", "target"],
                                "properties": {
                                    "formula": {"type": "string"},
                                    "target": {"type": "string"},
                                    "activationTarget": {"type": "string"},
                                    "metricType": {"enum": ["AverageValue", "Value"]},
                                },
                            },
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metadata": _str_map,
                                "useCachedMetrics": {"type": "boolean"},
                                # fallback works only with AverageValue (the default)
                                "metricType": {"const": "AverageValue"},
                                "authenticationRef": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name"],
                                    "properties": {
                                        "name": {"type": "string"},
                                        "kind": {
                                            "enum": [
                                                "TriggerAuthentication",
                                                "ClusterTriggerAuthentication",
                                            ]
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": _meta,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["parameter", "name", "key"],
                            "properties": {
                                # the redis scalers' auth parameters
                                "parameter": {
                                    "enum": [
                                        "password",
                                        "username",
                                        "tls",
                                        "ca",
                                        "cert",
                                        "key",
                                        "keyPassword",
                                    ]
                                },
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": _meta,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": _str_map,
                        "matchExpressions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["key", "operator"],
                                "properties": {
                                    "key": {"type": "string"},
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                    "values": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}
# The Prometheus Operator's PrometheusRule: spec.groups[].rules[] with alert/record, expr.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": _meta,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "interval": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": {"type": "string"},
                                        "labels": _str_map,
                                        "annotations": _str_map,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    helm_chart.validate_schema(values)
    files = helm_chart.render(values, name="prod", namespace="ml", is_install=True)
    docs = []
    for name, text in files.items():
        if not name.endswith((".yaml", ".yml")):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, component: str = "worker") -> dict[str, Any]:
    """The one ``kind`` of a component: the workers' Deployment, not the exporter's."""
    (found,) = [
        d
        for d in by_kind(docs, kind)
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component", component)
        == component
    ]
    return found


def worker_hpas(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers' HPA (not the gateway's)."""
    return [
        h
        for h in by_kind(docs, "HorizontalPodAutoscaler")
        if h["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


def worker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values."""
    for name, val in env.items():
        value = value.replace(f"$({name})", val)
    return value


def settings_from_env(container: dict[str, Any], secrets: dict[str, str]) -> Settings:
    """The Settings a worker builds from the container's EMBEDQ_* variables (as click does)."""
    plain: dict[str, str] = {}
    for name, entry in env_of(container).items():
        if "value" in entry:
            plain[name] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            plain[name] = secrets[entry["valueFrom"]["secretKeyRef"]["key"]]
        elif "fieldRef" in entry.get("valueFrom", {}):
            plain[name] = "pod-name"
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    options: dict[str, Any] = {}
    for name, raw in plain.items():
        if not name.startswith("EMBEDQ_"):
            continue
        field = name.removeprefix("EMBEDQ_").lower()
        assert field in fields, f"{name} sets no Settings field"
        default = getattr(Settings(consumer="x"), field)
        text = expand(raw, plain)
        if isinstance(default, bool) or field == "log_json":
            options[field] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            options[field] = int(text)
        elif isinstance(default, float):
            options[field] = float(text)
        else:
            options[field] = text
    return Settings.from_options(**options)


SECRETS = {"redis-password": "pw", "milvus-token": "root:Milvus"}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VALUE_SETS[request.param])


def test_every_manifest_is_valid_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Job", "ServiceAccount"} <= kinds
    for doc in docs:
        if doc["kind"] in KEDA_SCHEMAS:
            jsonschema.validate(doc, KEDA_SCHEMAS[doc["kind"]])
        elif doc["kind"] == "ServiceMonitor":
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
        elif doc["kind"] == "PrometheusRule":
            jsonschema.validate(doc, PROMETHEUS_RULE_SCHEMA)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_chart_lints_clean_for_every_value_set() -> None:
    for name, values in VALUE_SETS.items():
        report = helm_chart.lint(values, strict=True, kube_version="v" + KUBE_VERSION)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (name, report)


def test_keda_trigger_matches_the_workers_settings(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    values = helm_chart.merge_values(VALUE_SETS[name])
    scaled = by_kind(docs, "ScaledObject")
    if not values["keda"]["enabled"]:
        assert scaled == [] and by_kind(docs, "TriggerAuthentication") == []
        hpa = worker_hpas(docs)
        assert len(hpa) == int(values["autoscaling"]["enabled"])
        replicas = one(docs, "Deployment")["spec"].get("replicas")
        assert replicas == (None if hpa else values["replicaCount"])
        return
    assert worker_hpas(docs) == []  # KEDA owns the workers' HPA
    assert "replicas" not in one(docs, "Deployment")["spec"]
    (so,) = scaled
    settings = settings_from_env(worker_container(docs), SECRETS)
    triggers = so["spec"]["triggers"]
    # One trigger per stream the workers read, in partition order.
    assert [t["metadata"]["stream"] for t in triggers] == partition_streams(
        settings.stream, settings.partitions
    )
    assert settings.stream == values["stream"]["name"]
    if settings.partitions > 1:
        # Summed: the HPA alone would scale to the busiest partition's lag / lagCount.
        names = [t["name"] for t in triggers]
        assert names == [f"p{i}" for i in range(settings.partitions)]
        modifiers = so["spec"]["advanced"]["scalingModifiers"]
        assert modifiers["formula"] == " + ".join(names)
        assert modifiers["target"] == str(values["keda"]["lagCount"])
        assert modifiers["activationTarget"] == str(values["keda"]["activationLagCount"])
        assert modifiers["metricType"] == "AverageValue"  # replicas = total lag / target
    else:
        assert "scalingModifiers" not in so["spec"]["advanced"]
    trigger = triggers[0]

    def connection(t: dict[str, Any]) -> tuple[Any, ...]:
        meta = {k: v for k, v in t["metadata"].items() if k != "stream"}
        return t["type"], meta, t.get("authenticationRef")

    assert all(connection(t) == connection(trigger) for t in triggers)  # only streams differ
    meta = trigger["metadata"]
    url = urlsplit(settings.redis_url)
    assert meta["consumerGroup"] == settings.group == values["stream"]["group"]
    if settings.redis_cluster:
        assert trigger["type"] == "redis-cluster-streams"
        assert set(meta) <= REDIS_CLUSTER_STREAMS_METADATA
        assert meta["addresses"] == f"{url.hostname}:{url.port}"
        assert url.path.strip("/") == "0"
    else:
        assert trigger["type"] == "redis-streams"
        assert set(meta) <= REDIS_STREAMS_METADATA
        assert meta["address"] == f"{url.hostname}:{url.port}"
        assert meta["databaseIndex"] == url.path.strip("/")
    assert meta["enableTLS"] == str(url.scheme == "rediss").lower()
    container_env = env_of(worker_container(docs))
    username_var = meta.get("usernameFromEnv")
    username = container_env[username_var]["value"] if username_var else ""
    assert username == (url.username or "")
    # Lag mode (scales from zero); never pending-count or length mode alongside it.
    assert int(meta["lagCount"]) == values["keda"]["lagCount"] > 0
    assert int(meta["activationLagCount"]) >= 1  # KEDA 2.16 rejects 0
    assert not {"pendingEntriesCount", "streamLength"} & set(meta)
    assert so["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["fallback"]["replicas"] >= 1
    auth = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    password = env_of(worker_container(docs))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (params["password"]["name"], params["password"]["key"]) == (
        password["name"],
        password["key"],
    )
    if url.scheme == "rediss" and "ssl_ca_certs" in (url.query or ""):
        assert params["ca"]["name"] == values["redis"]["tls"]["caSecret"]


def test_the_worker_env_builds_valid_settings_with_credentials_from_the_secret(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    container = worker_container(docs)
    env = env_of(container)
    settings = settings_from_env(container, SECRETS)
    assert urlsplit(settings.redis_url).password == "pw"
    assert settings.milvus_token == "root:Milvus"
    assert env["EMBEDQ_CONSUMER"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for secret_var in ("REDIS_PASSWORD", "EMBEDQ_MILVUS_TOKEN"):
        assert "value" not in env[secret_var] and "secretKeyRef" in env[secret_var]["valueFrom"]
    if name == "external-redis-tls":
        assert settings.redis_url.startswith(
            "rediss://embedq:pw@redis.data.svc.cluster.local:6380/2"
        )
        assert "ssl_ca_certs=/etc/embedq/redis-ca/ca.crt" in settings.redis_url
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["redis-ca"] == "/etc/embedq/redis-ca"
        assert env["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"]["value"] == "/etc/embedq/milvus-ca/ca.pem"
    if name == "chart-made-secret":
        assert settings.model == "/models/bge-small"


def test_no_secret_value_appears_outside_the_secret() -> None:
    values = VALUE_SETS["chart-made-secret"]
    docs = render(values)
    secret_values = [values["secrets"]["redisPassword"], values["secrets"]["milvusToken"]]
    for doc in docs:
        text = yaml.safe_dump(doc)
        if doc["kind"] == "Secret":
            continue
        for secret in secret_values:
            assert secret not in text, f"{doc['kind']} carries a secret value"
    (secret,) = by_kind(docs, "Secret")
    # The Secret is a hook that runs before the stream-setup Job, which reads it.
    job = one(docs, "Job")
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert "pre-install" in secret["metadata"]["annotations"]["helm.sh/hook"]


def test_probes_point_at_endpoints_the_worker_serves(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    container = worker_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics_port = int(env_of(container)["EMBEDQ_METRICS_PORT"]["value"])
    server = HealthServer(CollectorRegistry(), 0)
    server.require("worker", lambda: True)
    try:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert ports[get["port"]] == metrics_port
            status, _ = http_get(f"http://127.0.0.1:{server.port}{get['path']}")
            assert status == 200, (probe, get)
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    finally:
        server.close()
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    for monitor in by_kind(docs, "ServiceMonitor"):
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_pods_run_unprivileged_with_a_grace_longer_than_the_workers(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = worker_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    grace_s = float(env_of(container)["EMBEDQ_GRACE_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > grace_s
    limits = container["resources"].get("limits", {})
    if name == "cpu-only":
        assert "nvidia.com/gpu" not in limits
        assert env_of(container)["EMBEDQ_DEVICE"]["value"] == "cpu"
    else:
        assert limits["nvidia.com/gpu"] == 1
    job_pod = one(docs, "Job")["spec"]["template"]["spec"]
    assert job_pod["securityContext"]["runAsNonRoot"] is True
    assert (
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
        == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_the_hook_job_creates_the_group_before_anything_scales(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    job = one(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["init"]
    job_settings = settings_from_env(container, SECRETS)
    worker_settings = settings_from_env(worker_container(docs), SECRETS)

    def where(s: Settings) -> tuple[str, str, str, int]:
        return s.redis_url, s.stream, s.group, s.partitions

    assert where(job_settings) == where(worker_settings)  # groups on every partition


def test_the_dashboard_promql_parses_and_sums_a_streams_partitions() -> None:
    import promql_parser

    dashboard = json.loads((CHART / "dashboards" / "embedq.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    selectors = set()
    for expr in exprs:
        concrete = grafana_to_promql(expr)
        if not concrete.startswith("label_values("):  # Grafana's, not PromQL
            promql_parser.parse(concrete)  # raises on a syntax error
        selectors |= set(re.findall(r'stream=~"([^"]+)"', concrete))
    (selector,) = selectors  # every panel picks the stream the same way
    # Prometheus anchors the regex at both ends, like fullmatch.
    picked = [
        s
        for s in [*partition_streams("embedq:tasks", 4), "embedq:tasks", "embedq:tasks:other"]
        if re.fullmatch(selector, s)
    ]
    assert picked == [*partition_streams("embedq:tasks", 4), "embedq:tasks"]
    # The stream variable offers the base name once for all its partitions.
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "stream"]
    pattern = re.compile(variable["regex"].strip("/"))  # a JS regex; this one reads the same
    names = [*partition_streams("embedq:tasks", 4), "embedq:tasks"]
    assert {m.group(1) for m in map(pattern.fullmatch, names) if m} == {"embedq:tasks"}


def bad_values() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "activationLagCount 0", {"keda": {"activationLagCount": 0}}
    yield "lagCount 0", {"keda": {"lagCount": 0}}
    yield "password in the host", {"redis": {"host": "redis://u:secret@redis"}}
    yield "token in the milvus uri", {"milvus": {"uri": "http://root:Milvus@milvus:19530"}}
    yield "unknown key", {"worker": {"batchSize": 64}}
    yield "bad dtype", {"worker": {"dtype": "fp8"}}
    yield "negative replicas", {"keda": {"maxReplicaCount": 0}}
    yield "port out of range", {"worker": {"metricsPort": 70000}}
    yield "both secret sources", {"secrets": {"create": True, "existingSecret": "x"}}
    yield "zero partitions", {"stream": {"partitions": 0}}
    yield "hash tag with partitions", {"stream": {"name": "q:{t}:tasks", "partitions": 4}}
    yield "one untagged stream on a cluster", {"redis": {"host": "r", "cluster": True}}
    yield (
        "a database on a cluster",
        {
            "redis": {"host": "r", "cluster": True, "database": 2},
            "stream": {"partitions": 4},
        },
    )


@pytest.mark.parametrize(("why", "values"), list(bad_values()), ids=lambda v: str(v)[:30])
def test_values_schema_rejects_nonsense(why: str, values: dict[str, Any]) -> None:
    with pytest.raises(HelmFailed) as refused:
        helm_chart.validate_schema(values)
    assert refused.value.kind == "HelmValuesError", refused.value


def test_a_hash_tagged_stream_name_is_fine_without_partitions() -> None:
    # A cluster user's single stream: S:dlq on S's slot ...
    helm_chart.validate_schema({"stream": {"name": "q:{t}:tasks", "partitions": 1}})
    # ... which is also how one stream runs on a cluster
    helm_chart.validate_schema({"stream": {"name": "q:{t}:tasks"}, "redis": {"cluster": True}})


def test_the_chart_refuses_settings_that_cannot_work() -> None:
    with pytest.raises(HelmFailed, match="terminationGracePeriodSeconds"):
        helm_chart.render({"worker": {"graceS": 120}}, name="prod")
    with pytest.raises(HelmFailed, match="minIdleS"):
        helm_chart.render({"worker": {"minIdleS": 5}}, name="prod")
    with pytest.raises(HelmFailed, match=r"secrets\.existingSecret"):
        helm_chart.render({"secrets": {"existingSecret": ""}}, name="prod")
    with pytest.raises(HelmFailed, match=r"secrets\.redisPassword"):
        helm_chart.render({"secrets": {"existingSecret": "", "create": True}}, name="prod")


def grafana_to_promql(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard expression with Grafana's variables filled in as Grafana would."""
    for variable, value in (
        ("$__rate_interval", rate_interval),
        ("$stream", "embedq:tasks"),
        ("$group", "embedq"),
    ):
        expr = expr.replace(variable, value)
    return expr


def test_the_dashboard_queries_only_metrics_embedq_exports() -> None:
    from embedq.ops.exporter import StreamState, stream_gauges
    from embedq.queue.lag import ConsumerInfo, LagInfo
    from embedq.worker.metrics import GPU_MEMORY, WorkerMetrics

    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "info": ["_info"],
    }
    exported = {
        f.name + suffix
        for f in WorkerMetrics().registry.collect()
        for suffix in suffixes.get(f.type, [""])
    }
    info = LagInfo("s", "g", 1, 1, 1, None, 1, [ConsumerInfo("c", 1, 1)], 0, group_exists=True)
    exported |= {f.name for f in stream_gauges([StreamState(info, 1, 1)])} | {"embedq_stream_up"}
    # CUDA workers only (embedq.worker.metrics.GpuCollector)
    exported |= {f"embedq_gpu_memory_{key}_bytes" for key in GPU_MEMORY} | {"embedq_gpu_ooms_total"}
    dashboard = json.loads((CHART / "dashboards" / "embedq.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for e in exprs for name in re.findall(r"embedq_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    (config_map,) = [d for d in render(VALUE_SETS["chart-made-secret"]) if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["embedq.json"]) == dashboard


def test_one_exporter_always_serves_the_stream_gauges(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """Issue 12 item 8 / issue 17: the stream gauges come from one exporter Deployment,
    deployed whatever the worker count, on the same stream as the workers, and never
    counted as a worker by the workers' Deployment, Service, PDB or KEDA."""
    name, docs = rendered
    values = helm_chart.merge_values(VALUE_SETS[name])
    exporter = one(docs, "Deployment", component="exporter")
    assert exporter["spec"]["replicas"] == 1
    pod = exporter["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["exporter"]
    assert container["image"].startswith(values["hookImage"]["repository"] + ":")
    exporter_settings = settings_from_env(container, SECRETS)
    worker_settings = settings_from_env(worker_container(docs), SECRETS)

    def where(s: Settings) -> tuple[str, bool, str, str, int]:
        return s.redis_url, s.redis_cluster, s.stream, s.group, s.partitions

    assert where(exporter_settings) == where(worker_settings)
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert exporter_settings.metrics_port == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    labels = pod["metadata"]["labels"]
    worker_selectors = [
        one(docs, "Deployment")["spec"]["selector"]["matchLabels"],
        one(docs, "Service")["spec"]["selector"],
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in worker_selectors:
        assert not selector.items() <= labels.items(), selector
        assert selector.items() <= worker_pod_labels(docs).items()
    service = one(docs, "Service", component="exporter")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def worker_pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    labels: dict[str, str] = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def test_pods_are_scraped_once_with_a_timeout(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """No prometheus.io/* annotations next to the ServiceMonitor (issue 17: both scraped
    every pod); the ServiceMonitor picks the workers' and the exporter's Services and sets
    a scrape timeout within its interval."""
    _, docs = rendered
    for component in ("worker", "exporter"):
        pod = one(docs, "Deployment", component=component)["spec"]["template"]["metadata"]
        assert not any(k.startswith("prometheus.io/") for k in pod.get("annotations", {}))
    for monitor in by_kind(docs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]
        services = [one(docs, "Service", c) for c in ("worker", "exporter")]
        for service in services:
            labels = service["metadata"]["labels"]
            assert selector["matchLabels"].items() <= labels.items()
            for expression in selector["matchExpressions"]:
                assert labels[expression["key"]] in expression["values"]
        (endpoint,) = monitor["spec"]["endpoints"]

        def seconds(duration: str) -> float:
            number, unit = re.fullmatch(r"([0-9]+)(ms|s|m|h)", duration).groups()  # type: ignore[union-attr]
            return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]

        assert 0 < seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])


def test_the_prometheus_rule_carries_the_readme_alerts() -> None:
    docs = render(VALUE_SETS["chart-made-secret"])
    (rule,) = by_kind(docs, "PrometheusRule")
    shipped = yaml.safe_load((CHART / "alerts" / "embedq.rules.yaml").read_text())
    assert rule["spec"] == shipped
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"] for g in shipped["groups"] for r in g["rules"]}
    readme = (CHART.parents[1] / "docs" / "operations.md").read_text()
    for alert in alerts:  # every shipped alert is explained where operators read (the docs)
        assert f"`{alert}`" in readme, alert
    assert by_kind(render({}), "PrometheusRule") == []


SECRETS_WITH_KEYS = {**SECRETS, "api-keys": "sk-gw-alpha-0123,sk-gw-beta-4567"}


def test_the_gateway_serves_through_the_chart(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Issue 14: the gateway's Deployment, Service and HPA; its settings match the workers'
    stream, keys come from the Secret, its probes are routes `embedq serve` answers, and no
    worker selector counts its pods."""
    from embedq.api.app import create_app
    from embedq.api.serve import check_exposure

    name, docs = rendered
    values = helm_chart.merge_values(VALUE_SETS[name])
    gateways = [
        d
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "gateway"
    ]
    if not values["gateway"]["enabled"]:
        assert gateways == []
        return
    deployment = one(docs, "Deployment", component="gateway")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["serve"]
    assert container["image"].startswith(values["hookImage"]["repository"] + ":")
    settings = settings_from_env(container, SECRETS_WITH_KEYS)
    workers = settings_from_env(worker_container(docs), SECRETS_WITH_KEYS)
    assert (settings.redis_url, settings.stream, settings.group, settings.partitions) == (
        workers.redis_url,
        workers.stream,
        workers.group,
        workers.partitions,
    )
    assert (settings.milvus_uri, settings.collection) == (workers.milvus_uri, workers.collection)
    # Workers keep answers as long as the gateway waits for them.
    assert workers.api_timeout_s == settings.api_timeout_s == values["gateway"]["requestTimeoutS"]
    env = env_of(container)
    if values["gateway"]["requireApiKeys"]:
        assert settings.api_key_list == ("sk-gw-alpha-0123", "sk-gw-beta-4567")
        assert "value" not in env["EMBEDQ_API_KEYS"]
        assert env["EMBEDQ_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "api-keys"
    else:
        assert "EMBEDQ_API_KEYS" not in env
        assert settings.api_allow_anonymous  # said out loud (issue 28)
    # The pod's address, not loopback: it starts (keys, or anonymous said out loud).
    assert settings.api_host == "0.0.0.0"
    check_exposure(settings)
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert settings.api_port == port
    routes = {getattr(r, "path", "") for r in create_app(settings).routes}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
        assert container[probe]["httpGet"]["path"] in routes
    assert {"/v1/embeddings", "/v1/search", "/metrics"} <= routes
    service = one(docs, "Service", component="gateway")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpas = [h for h in by_kind(docs, "HorizontalPodAutoscaler") if h in gateways]
    assert len(hpas) == int(values["gateway"]["autoscaling"]["enabled"])
    for hpa in hpas:
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"]
    for selector in (
        one(docs, "Deployment")["spec"]["selector"]["matchLabels"],
        one(docs, "Service")["spec"]["selector"],
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert not selector.items() <= pod["metadata"]["labels"].items(), selector
    if name == "gateway":
        for doc in docs:
            if doc["kind"] != "Secret":
                assert "sk-gw-alpha" not in yaml.safe_dump(doc), doc["kind"]


def test_the_notes_commands_work_at_zero_workers() -> None:
    """Issue 28: NOTES.txt said `kubectl exec deploy/<workers> -- embedq top`, which fails
    while KEDA holds the workers at 0 replicas, and `kubectl port-forward ... && curl ...`,
    whose curl never runs (port-forward does not return)."""
    files = helm_chart.render({}, name="prod", namespace="ml", is_install=True)
    notes = files["embedq/templates/NOTES.txt"]
    deployments = {d["metadata"]["name"]: d for d in by_kind(render({}), "Deployment")}
    for target in re.findall(r"kubectl exec deploy/(\S+)", notes):
        assert deployments[target]["spec"]["replicas"] >= 1, target  # never scaled to 0
        assert "ScaledObject" not in {
            d["kind"]
            for d in render({})
            if d.get("spec", {}).get("scaleTargetRef", {}).get("name") == target
        }
    assert "&& curl" not in notes
    assert re.search(r"port-forward \S+ \d+ &\n\s+curl ", notes)
