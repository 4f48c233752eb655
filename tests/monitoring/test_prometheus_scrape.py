"""A real Prometheus scrapes a real server on Ray Serve, and every query of the Grafana dashboard
runs against what it scraped.

Prometheus is the Debian package `prometheus` (.ci/packages.txt; the README's "Set up" installs it).
Its configuration is the repo's prometheus.yml with two changes only: the targets' ports are this
test's (the session's Ray picks a free metrics port, the gateway gets another free one) and scraping
is every second instead of every few seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, cart_fragment, running_server, training_schema
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.net import free_port
from policy_server.settings import Settings

ROOT = Path(__file__).parents[2]
AUTH = {"access-token": API_KEY}
OBS = {"cart_position": 0.0, "cart_velocity": 0.1, "pole_angle": -0.02, "pole_angular_velocity": 0.0}
PPO = {"rollout_samples": 32, "num_minibatches": 2, "update_epochs": 1}
# Grafana's variables, as the dashboard would fill them in; 1m spans the test's whole scrape history.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$policy": ".*"}
TIMEOUT_S = 60


def prometheus_config(ray_port: int, gateway_port: int) -> dict[str, Any]:
    """The repo's prometheus.yml, its targets moved to this test's ports, scraping every second."""
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    ports = {"8080": ray_port, "8081": gateway_port}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            hosts = [target.rsplit(":", 1) for target in static["targets"]]
            static["targets"] = [f"{host}:{ports[port]}" for host, port in hosts]
    config["global"]["scrape_interval"] = "1s"
    return config


@pytest.fixture()
def gateway_port() -> int:
    return free_port()


@pytest.fixture()
def prometheus(ray_session: int, gateway_port: int, tmp_path: Path) -> Iterator[httpx.Client]:
    """A Prometheus scraping this test's ports (it starts at once; `wait_ready` before asking it)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "`prometheus` is not on PATH: install the Debian package (sudo apt-get install prometheus; "
            ".ci/packages.txt lists it, see the README's 'Set up')"
        )
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(ray_session, gateway_port)))
    port = free_port()
    command = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{port}"]
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_ready(prometheus: httpx.Client, log: Path) -> None:
    def ready() -> bool:
        try:
            return prometheus.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 30, 0.2, lambda: f"Prometheus did not start:\n{log.read_text()[-2000:]}")


def query(prometheus: httpx.Client, expr: str) -> list[dict[str, Any]]:
    """The instant vector of ``expr``; a bad query fails the test with Prometheus's message."""
    answer = prometheus.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    return answer["data"]["result"]


def value(prometheus: httpx.Client, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else 0.0


def dashboard_queries() -> dict[str, list[str]]:
    """Panel title -> its queries, with Grafana's variables filled in."""
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "policy-server.json").read_text())
    found: dict[str, list[str]] = {}
    for top in dashboard["panels"]:
        for panel in top.get("panels", []) if top["type"] == "row" else [top]:
            exprs = []
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, filled in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, filled)
                assert "$" not in expr, f"{panel['title']}: an unfilled variable in {expr}"
                exprs.append(expr)
            found[panel["title"]] = exprs
    for variable in dashboard["templating"]["list"]:  # label_values(<metric>, <label>): the metric must exist
        metric = variable["query"]["query"].removeprefix("label_values(").split(",")[0]
        found[f"variable {variable['name']}"] = [metric]
    return found


def poll(what: str, check: Callable[[], list[str]], deadline: float) -> None:
    """Wait until ``check`` returns no complaints (Ray exports its metrics every few seconds)."""
    wait_until(lambda: not check(), max(0.0, deadline - time.monotonic()), 0.5,
               lambda: f"{what} after {TIMEOUT_S}s:\n" + "\n".join(check()))


def exercise(client: httpx.Client) -> None:
    """Predictions, an error, a training update, two finished episodes and a rejected fragment;
    LLM generation and one GRPO cycle."""
    for _ in range(10):
        assert client.post("/predict", json=OBS).status_code == 200
    assert client.post("/predict/batch", json={"observations": [OBS] * 5}).status_code == 200
    assert client.post("/policies/lpoc/predict", json=LPOC_OBS).status_code == 200
    assert client.post("/predict", json={"cart_position": "left"}).status_code == 422
    episodes = [cart_fragment(0, steps=16, seed=s) for s in (1, 2)]  # 32 samples: one PPO update
    answer = client.post("/train/experience", json={"client_id": "monitor", "fragments": episodes})
    assert answer.status_code == 200, answer.text
    malformed = cart_fragment(0, steps=8)
    malformed["actions"][0] = 7
    refused = client.post("/train/experience", json={"client_id": "monitor", "fragments": [malformed]})
    assert refused.status_code == 422, refused.text
    generated = client.post("/llm/direct_forward", json={"input_string": "What is 2 + 3?", "num_samples": 2,
                                                          "max_output_length": 24})
    assert generated.status_code == 200, generated.text
    run = client.post("/llm/grpo/runs", json={"group_size": 2, "max_completion_length": 6, "chat": True})
    assert run.status_code == 201, run.text
    runs = f"/llm/grpo/runs/{run.json()['run_id']}"
    group = client.post(f"{runs}/completions", json={"prompt": "Sort: b a"}).json()
    rewarded = client.post(f"{runs}/rewards", json={"group_id": group["group_id"], "rewards": [0.0, 1.0]})
    assert rewarded.status_code == 200, rewarded.text


def targets_down(prometheus: httpx.Client) -> list[str]:
    active = prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
    assert {t["labels"]["job"] for t in active} == {"ray", "policy-server-gateway"}
    return [f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in active if t["health"] != "up"]


def test_prometheus_scrapes_the_server_and_every_dashboard_query_has_data(
    ray_session: int, gateway_port: int, prometheus: httpx.Client, model_dir: Path, llm_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    schema = training_schema(model_dir, tmp_path / "ckpt", ppo=PPO, return_window=2)
    schema["llm"] = {"policy": {"path": str(llm_dirs["policy"]), "engine": "transformers", "resources": {"num_cpus": 0.5},
                                "training": {"save_dir": str(tmp_path / "llm"), "num_cpus": 0.5}}}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(
        schema_path=path, backend="serve", ray_metrics_port=ray_session, gateway_metrics_port=gateway_port,
        serve_app_prefix="it-monitoring", seed=0,
    )
    # seven Serve apps start (two policies, a trainer, four for the LLM); on CI's 2 cores Ray starts
    # their replicas' processes a few at a time and each imports torch: 107-121 s measured there
    server = running_server(build_app(settings), start_timeout_s=300)
    with server as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        wait_ready(prometheus, tmp_path / "prometheus.log")
        exercise(client)
        deadline = time.monotonic() + TIMEOUT_S
        poll("targets not up", lambda: targets_down(prometheus), deadline)
        # the session's Ray also holds the series of other tests' servers: pick this server's own
        mine = 'application="it-monitoring-cart"'
        counters = [
            'sum(policy_server_requests_total{endpoint="/predict", status="200"})',  # the gateway's
            f"sum(ray_policy_server_replica_batch_rows_count{{{mine}}})",  # the replicas'
            f"sum(ray_policy_server_training_samples_total{{{mine}}})",  # the trainer's
            "sum(ray_serve_deployment_request_counter_total)",  # Serve's
        ]
        poll("no counts yet", lambda: [c for c in counters if value(prometheus, c) <= 0], deadline)
        assert value(prometheus, counters[0]) == 10

        queries = [(title, expr) for title, exprs in dashboard_queries().items() for expr in exprs]
        for _, expr in queries:  # each is valid PromQL, data or not
            query(prometheus, expr)
        poll(
            "dashboard queries without data",
            lambda: [f"{title}: {expr}" for title, expr in queries if not query(prometheus, expr)],
            deadline,
        )
        rejected = f'sum(ray_policy_server_training_samples_rejected_total{{reason="malformed", {mine}}})'
        assert value(prometheus, rejected) == 8
        assert value(prometheus, f"max(ray_policy_server_training_model_version{{{mine}}})") >= 1
