"""compose.yaml against the Compose Specification's JSON schema, plus what must hold for
embedq: durable Redis, pinned images with health checks, init before workers, GPU and CPU
workers, and no secret written into the file.

The schema is the compose-spec.json that the check-jsonschema package vendors (from the
compose-spec/compose-spec repository), so the test runs offline.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from embedq.api.serve import check_exposure
from embedq.core.config import Settings
from embedq.core.errors import ConfigError

from .support.prometheus import RULES, binary

ROOT = Path(__file__).resolve().parents[1]
LONG_RUNNING = (
    *("redis", "etcd", "minio", "milvus"),
    *("worker", "worker-cpu", "exporter", "prometheus"),
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(
        (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    )
    assert schema["title"] == "Compose Specification"
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    # The schema is strict enough to catch a typo: prove it on a copy.
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["healthchek"] = broken["services"]["redis"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+", redis["image"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--user default off" in command  # only the ACL user with a password gets in


def test_images_are_pinned_and_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith((":latest", ":")), name
        if name in LONG_RUNNING:
            assert service["healthcheck"]["test"], name
    assert compose["services"]["milvus"]["image"].startswith("milvusdb/milvus:v2.")


def test_group_and_collection_exist_before_workers_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services["init"]
    assert init["entrypoint"][:3] == ["embedq", "init", "--with-collection"]
    assert init["depends_on"]["redis"]["condition"] == "service_healthy"
    assert init["depends_on"]["milvus"]["condition"] == "service_healthy"
    for name in ("worker", "worker-cpu", "producer"):
        assert services[name]["depends_on"]["init"]["condition"] == (
            "service_completed_successfully"
        ), name
    assert services["milvus"]["depends_on"]["etcd"]["condition"] == "service_healthy"


def test_gpu_worker_reserves_a_gpu_and_the_cpu_profile_has_none(compose: dict[str, Any]) -> None:
    gpu, cpu = compose["services"]["worker"], compose["services"]["worker-cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["EMBEDQ_DEVICE"] == "cuda"
    assert cpu["profiles"] == ["cpu"] and cpu["environment"]["EMBEDQ_DEVICE"] == "cpu"
    assert "deploy" not in cpu
    for worker in (gpu, cpu):
        grace_s = float(worker["environment"]["EMBEDQ_GRACE_S"])
        assert int(worker["stop_grace_period"].removesuffix("s")) > grace_s
        assert worker["read_only"] is True
        assert "/readyz" in " ".join(worker["healthcheck"]["test"])


def test_every_embedq_variable_is_a_setting_and_secrets_come_from_env(
    compose: dict[str, Any],
) -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    example = (ROOT / ".env.example").read_text()
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            if key.startswith("EMBEDQ_") and name != "redis":
                assert key.removeprefix("EMBEDQ_").lower() in fields, (name, key)
            if "PASSWORD" in key or "TOKEN" in key or "SECRET" in key:
                assert str(value).startswith("${") and ":?" in str(value), (name, key)
        url = env.get("EMBEDQ_REDIS_URL", "")
        if url:
            assert "${EMBEDQ_REDIS_PASSWORD:?" in url, name
    for required in re.findall(r"\$\{(\w+):\?", (ROOT / "compose.yaml").read_text()):
        assert f"\n{required}=" in "\n" + example, f"{required} missing from .env.example"
    stream_settings = {
        (s["environment"]["EMBEDQ_STREAM"], s["environment"]["EMBEDQ_GROUP"])
        for n, s in compose["services"].items()
        if n in ("init", "worker", "worker-cpu", "producer", "exporter", "gateway")
    }
    assert len(stream_settings) == 1  # init, workers and producer agree on stream and group


def test_one_exporter_serves_the_stream_gauges_and_prometheus_scrapes_it_all(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The exporter is the one source of the stream gauges (as in the chart); the
    monitoring profile's Prometheus config is valid for the real `promtool`, scrapes the
    exporter and every worker container, and loads the chart's alert rules."""
    services = compose["services"]
    exporter = services["exporter"]
    assert exporter["command"] == ["exporter"]
    assert exporter["image"] == services["producer"]["image"]  # no model in it
    assert exporter["environment"]["EMBEDQ_METRICS_PORT"] == "9400"
    assert "/readyz" in " ".join(exporter["healthcheck"]["test"])
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in prometheus["volumes"][:2])
    assert mounts["./helm/embedq/alerts/embedq.rules.yaml"] == "/etc/prometheus/embedq.rules.yaml"
    config = yaml.safe_load((ROOT / "compose" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/embedq.rules.yaml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["embedq-exporter"]["static_configs"][0]["targets"] == ["exporter:9400"]
    (dns,) = jobs["embedq-worker"]["dns_sd_configs"]
    assert set(dns["names"]) == {"worker", "worker-cpu"} and dns["port"] == 9400
    for worker in ("worker", "worker-cpu"):
        assert services[worker]["environment"]["EMBEDQ_METRICS_PORT"] == "9400"
    # promtool reads the rule files too: point it at the chart's file where it lies here.
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [binary("promtool"), "check", "config", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_gateway_serves_through_the_workers_with_keys_from_env(
    compose: dict[str, Any],
) -> None:
    """Issue 14: `embedq serve` in the small image, on loopback, keys from .env, healthy
    only when /readyz says so."""
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["command"] == ["serve"]
    assert gateway["image"] == services["producer"]["image"]  # no model in it
    env = gateway["environment"]
    assert env["EMBEDQ_API_KEYS"].startswith("${EMBEDQ_API_KEYS:?")
    port = env["EMBEDQ_API_PORT"]
    assert gateway["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f":{port}/readyz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert Settings(api_port=int(port), api_keys="k1, k2").api_key_list == ("k1", "k2")
    # Every address of the container, which the gateway binds only with keys (issue 28).
    host = env["EMBEDQ_API_HOST"]
    check_exposure(Settings(api_host=host, api_keys="k1"))
    with pytest.raises(ConfigError, match="--allow-anonymous"):
        check_exposure(Settings(api_host=host))


def test_the_cpu_profile_builds_no_cuda_image(compose: dict[str, Any]) -> None:
    """Issue 28: `--profile cpu` built the CUDA base image for `init` and `worker-cpu`."""
    services = compose["services"]
    dockerfile = (ROOT / "workers" / "Dockerfile").read_text()
    default_base = re.search(r"ARG BASE_IMAGE=(\S+)", dockerfile)
    assert default_base and "cuda" in default_base[1]
    for name, service in services.items():
        if "gpu" in service.get("profiles", []) or "build" not in service:
            continue
        build = service["build"]
        if build.get("dockerfile") == "workers/Dockerfile":
            assert "cuda" not in build["args"]["BASE_IMAGE"], name
            assert build["args"]["TORCH_INDEX_URL"].endswith("/cpu"), name
            assert service["image"] != services["worker"]["image"], name  # not the GPU tag


def test_redis_is_published_on_loopback_for_enqueue_from_the_host(
    compose: dict[str, Any],
) -> None:
    (published,) = compose["services"]["redis"]["ports"]
    assert published.startswith("127.0.0.1:") and published.endswith(":6379")


def test_the_documented_compose_commands_name_services_of_their_profile(
    compose: dict[str, Any],
) -> None:
    """`docker compose exec worker embedq top` failed on the cpu profile (no `worker`)."""
    services = compose["services"]
    text = (ROOT / "docs" / "operations.md").read_text() + (ROOT / "compose.yaml").read_text()
    for line in re.findall(r"docker compose [^\n#]+", text):
        profiles = set(re.findall(r"--profile (\S+)", line))
        named = re.findall(r"\bexec (\S+)", line) + re.findall(r"--scale (\S+?)=", line)
        for name in named:
            wanted = set(services[name].get("profiles", []))
            assert not wanted or wanted & profiles, line  # runs in every profile, or in this
