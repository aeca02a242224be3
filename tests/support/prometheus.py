"""A private Prometheus for tests (Debian's `prometheus` package): it scrapes given targets
on loopback every second, evaluates rule files, and answers PromQL through its HTTP API.
The dashboard's expressions are turned into plain PromQL as Grafana would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .servers import free_port, wait_until

CHART = Path(__file__).resolve().parents[2] / "helm" / "embedq"
DASHBOARD = CHART / "dashboards" / "embedq.json"
RULES = CHART / "alerts" / "embedq.rules.yaml"

SCRAPE_S = 1
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 × scrape interval); with
# a 1 s scrape and a one-hour panel about 1000 px wide, $__interval is ~4 s.
RATE_INTERVAL = "5s"


def binary(name: str) -> str:
    """``name`` from PATH. Missing: a failure in CI (.ci/run installs it), else a skip."""
    found = shutil.which(name)
    if found is None:
        why = f"{name} is not installed (apt-get install -y prometheus)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    return found


def grafana_to_promql(expr: str, stream: str, group: str) -> str:
    for variable, value in (
        ("$__rate_interval", RATE_INTERVAL),
        ("$stream", stream),
        ("$group", group),
    ):
        expr = expr.replace(variable, value)
    return expr


def dashboard_panels() -> dict[str, list[str]]:
    """Each panel's title and its expressions (Grafana variables still in)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}


def panel_mappings(title: str) -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    mappings: list[dict[str, Any]] = panel["fieldConfig"]["defaults"].get("mappings", [])
    return mappings


def shown(title: str, value: float | None) -> str:
    """What a stat panel shows for ``value``: its value mapping's text, else the number."""
    if value is None:
        return "no data"
    for mapping in panel_mappings(title):
        options = mapping["options"]
        if mapping["type"] == "value" and str(int(value)) in options and value == int(value):
            return str(options[str(int(value))]["text"])
        if mapping["type"] == "range" and value >= options["from"]:
            return str(options["result"]["text"])
    return f"{value:g}"


class Prometheus:
    """``prometheus`` on 127.0.0.1, scraping ``targets`` (job name: host:port)."""

    def __init__(self, data_dir: Path, targets: dict[str, str], rules: Path = RULES) -> None:
        self.dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "prometheus.log"
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": "900ms",
                "evaluation_interval": f"{SCRAPE_S}s",
            },
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: self._get("/-/ready")[0] == 200, 30, "prometheus to be ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                body = response.read()
                return int(response.status), json.loads(body) if path.startswith("/api") else body
        except OSError:
            return 0, None

    def api(self, path: str, **params: str) -> Any:
        status, body = self._get(f"{path}?{urllib.parse.urlencode(params)}")
        assert status == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a one-series result; None when there is none."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def alerts(self) -> dict[str, str]:
        """{alertname: state} of the alerts pending or firing now."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("/api/v1/alerts")["alerts"]}
