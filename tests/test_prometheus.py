"""A real Prometheus (Debian's binary) scrapes a real coldwarm server with the compose stack's scrape job.

The config is the repository's docker/prometheus/prometheus.yml with the api job kept (name, path,
relabelling) and its DNS discovery of the `api` containers replaced by the test server's loopback
address, scraped every second, storage in a temporary directory. After a few /recommend requests the
test asserts through Prometheus's HTTP API that the target is up and coldwarm_requests_total has a value,
that every coldwarm series it stored is one tests/test_compose.py expects the service to export, and that
every query of the Grafana dashboard (its template variables filled in) is valid PromQL, with data where
the traffic made some. Skipped without the `prometheus` binary (.ci/install-system-deps installs it).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# Asserts in the shared helpers get pytest's messages too (they are imported before pytest_plugins).
pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import ServingArtifacts, live_server, service_settings  # noqa: E402
from test_compose import (  # noqa: E402
    PROMETHEUS_CONFIG,
    api_scrape_job,
    dashboard_queries,
    exported_metric_names,
    free_port,
    metric_names,
    yaml,
)

# The shared fixtures (serving_artifacts), registered once per session.
pytest_plugins = ["service_fixtures"]

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary (Debian's prometheus package; .ci/install-system-deps)"
)

SCRAPE_WAIT_S = 30.0  # the bound on waiting for the first scrape
N_REQUESTS = 5
# Grafana's variables, as Grafana would fill them in for this test's range.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "10s", "$__range": "5m"}
# Metrics the traffic creates series of (the labelled counters of errors, degradation and reloads have
# none until something fails).
WITH_TRAFFIC = {
    "coldwarm_requests_total",
    "coldwarm_stage_latency_seconds_bucket",
    "coldwarm_gate_cold_weight_bucket",
    "coldwarm_serving_info",
    "coldwarm_index_items",
}


def derived_config(port: int) -> dict[str, Any]:
    repo = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = copy.deepcopy(api_scrape_job(repo))
    discovery = [key for key in job if key.endswith("_sd_configs") or key == "static_configs"]
    assert discovery, "the api job discovers no target"
    for key in discovery:
        del job[key]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    global_section = {**repo.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
    return {"global": global_section, "scrape_configs": [job]}


class Prometheus:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def api(self, path: str, **params: str) -> Any:
        response = self.client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [data["result"]]


@pytest.fixture()
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Starts Prometheus on a free loopback port over the derived config of a target port."""
    processes: list[subprocess.Popen] = []
    log = tmp_path / "prometheus.log"

    def start(target_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(derived_config(target_port)))
        port = free_port()
        with log.open("w") as out:
            processes.append(
                subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while True:
            assert processes[-1].poll() is None, f"prometheus exited:\n{log.read_text()}"
            try:
                if client.get("/-/ready").status_code == 200:
                    return Prometheus(client)
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()}"
            time.sleep(0.1)

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def wait_for(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: nothing within {timeout_s:.0f} s"
        time.sleep(0.25)


def test_prometheus_scrapes_the_service(serving_artifacts: ServingArtifacts, prometheus_for: Any) -> None:
    # The in-process feature store: every user is a cold-start user, which is all the counters need.
    settings = service_settings(serving_artifacts.a.directory, "unused", redis_url=None)
    with live_server(settings) as server:
        port = int(server.url.rsplit(":", 1)[1])
        prometheus = prometheus_for(port)
        job = api_scrape_job(yaml.safe_load(PROMETHEUS_CONFIG.read_text()))["job_name"]
        user_ids = [int(u) for u in serving_artifacts.data.users["user_id"].iloc[:N_REQUESTS]]
        for user_id in user_ids:
            response = server.recommend(user_id=user_id, k=5)
            assert response.status_code == 200, response.text

        def target_up() -> dict[str, Any] | None:
            for target in prometheus.api("targets")["activeTargets"]:
                if target["labels"]["job"] == job and target["health"] == "up":
                    return target
            return None

        def recommend_count() -> float:
            series = prometheus.query(f'coldwarm_requests_total{{job="{job}", endpoint="/recommend"}}')
            return sum(float(s["value"][1]) for s in series)

        # Bounded: the first scrape after the requests, within SCRAPE_WAIT_S in all.
        started = time.monotonic()
        target = wait_for("an up target", target_up, SCRAPE_WAIT_S)
        assert target["labels"]["instance"] == f"127.0.0.1:{port}"
        assert target["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics"
        remaining = max(1.0, SCRAPE_WAIT_S - (time.monotonic() - started))
        assert wait_for("coldwarm_requests_total", lambda: recommend_count() >= N_REQUESTS, remaining)

        # What Prometheus stored is what the dashboard test expects the service to export.
        stored = {name for name in prometheus.api("label/__name__/values") if name.startswith("coldwarm_")}
        assert stored >= WITH_TRAFFIC, sorted(WITH_TRAFFIC - stored)
        assert stored <= exported_metric_names(), sorted(stored - exported_metric_names())

        # Every dashboard query runs; those over series the traffic created return data once two scrapes
        # lie in the rate window.
        for query in dashboard_queries():
            expr = query
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"a Grafana variable this test does not fill in: {query}"
            if query.startswith("label_values("):  # a Grafana function, not PromQL
                name = query.removeprefix("label_values(").split(",")[0]
                assert prometheus.api("series", **{"match[]": name}), query
                continue
            if metric_names(query) & WITH_TRAFFIC:
                assert wait_for(query, lambda expr=expr: prometheus.query(expr), 15.0), query
            else:
                prometheus.query(expr)  # valid PromQL: a syntax error is a 400

        # The version the service serves, as the dashboard's table shows it.
        (info,) = prometheus.query(f'coldwarm_serving_info{{job="{job}"}}')
        assert info["metric"]["model_version"] == serving_artifacts.a.model_version
        assert info["metric"]["index_version"] == serving_artifacts.a.index_version
        assert (info["metric"]["search_backend"], info["metric"]["device"]) == ("faiss-cpu", "cpu")
        (items,) = prometheus.query(f'coldwarm_index_items{{job="{job}"}}')
        assert int(float(items["value"][1])) == len(serving_artifacts.catalog)
