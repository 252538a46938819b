"""A real Prometheus server (Debian's ``prometheus``) in its own process, for end-to-end tests.

It runs the compose scrape config (deploy/compose/prometheus.yml: job name and the ``namespace``
label a ServiceMonitor gives in Kubernetes) with the test's targets, scraping and evaluating
every ``interval_s``, and the rule groups of the PrometheusRule the cluster gets
(k8s/components/prometheus-operator/prometheusrule.yaml, its ``spec.groups`` as a plain rules
file). Queries go through its HTTP API, as Grafana's go.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.harness import ROOT, free_port

COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "prometheus.yml"
PROMETHEUS_RULE = ROOT / "k8s" / "components" / "prometheus-operator" / "prometheusrule.yaml"
APT_HINT = "apt-get install -y --no-install-recommends prometheus"


def prometheus_binary() -> str:
    """The server's path; skip when missing outside CI, fail when missing in CI."""
    path = shutil.which("prometheus")
    if path is None:
        message = f"prometheus is not installed ({APT_HINT})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(f"{message}; CI installs it")
    return path


class PrometheusProcess:
    """``prometheus`` scraping ``targets`` under the compose job, with the cluster's rules."""

    def __init__(self, workdir: Path, targets: list[str], interval_s: float = 1.0) -> None:
        self.binary = prometheus_binary()
        self.workdir = workdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.interval_s = interval_s
        self.config = yaml.safe_load(COMPOSE_CONFIG.read_text())
        (self.scrape,) = self.config["scrape_configs"]
        self.job: str = self.scrape["job_name"]
        self.labels: dict[str, str] = self.scrape["static_configs"][0].get("labels", {})
        self.config["global"].update(
            scrape_interval=f"{interval_s:g}s", evaluation_interval=f"{interval_s:g}s"
        )
        self.config["rule_files"] = ["rules.yml"]
        self.scrape["static_configs"][0]["targets"] = targets
        self.rule_groups: list[dict[str, Any]] = yaml.safe_load(PROMETHEUS_RULE.read_text())[
            "spec"
        ]["groups"]
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.base_url, timeout=10)

    def start(self) -> PrometheusProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(self.config))
        (self.workdir / "rules.yml").write_text(yaml.safe_dump({"groups": self.rule_groups}))
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/-/ready").status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready within 30 s:\n{self.log()}")

    def api(self, path: str, **params: Any) -> Any:
        """``data`` of an HTTP API answer; an error answer fails with Prometheus' message."""
        response = self.client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert response.status_code == 200, body
        assert body["status"] == "success", body
        assert not body.get("warnings"), body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (now, or at unix time ``at``)."""
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        data = self.api("query", **params)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float:
        """The single value of a query that returns at most one series (0 when none)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
