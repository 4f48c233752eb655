"""The container and monitoring files, checked without a Docker engine: docker-compose.yaml, the
Dockerfile, prometheus.yml, Grafana's provisioning and the dashboard agree with each other and the repo."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from policy_server.settings import Settings

ROOT = Path(__file__).parents[2]
GRAFANA = ROOT / "grafana"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too (rows themselves excluded)."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yaml")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "policy-server.json").read_text())


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    return source


def container_port(mapping: str) -> int:
    """`"3000:3000"` or `"127.0.0.1:3000:3000/tcp"` -> 3000 (the container's side)."""
    return int(mapping.split(":")[-1].split("/")[0])


def test_every_bind_mount_and_build_context_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith((".", "/")):  # a bind mount, not a named volume
                assert (ROOT / host).exists(), f"{name} mounts {host}, which is not in the repo"
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name} builds from a missing {dockerfile}"


def test_services_refer_to_services_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on an unknown {dependency}"
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in services, f"{name} joins an unknown network"
            assert "ports" not in service, f"{name} shares a network: publish its ports on the owner"
    assert services["grafana"]["depends_on"] == ["prometheus"]
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", services["grafana"]["image"])
    assert [container_port(p) for p in services["grafana"]["ports"]] == [3000]


def test_grafana_reaches_prometheus_where_it_listens(
    compose: dict[str, Any], datasource: dict[str, Any]
) -> None:
    services = compose["services"]
    url = urlparse(datasource["url"])
    # Prometheus listens on 9090 (its default) inside the network of the service it joins.
    prometheus = services["prometheus"]
    assert not any("listen-address" in str(arg) for arg in prometheus.get("command", []))
    owner = prometheus.get("network_mode", "service:prometheus").removeprefix("service:")
    assert (url.scheme, url.hostname, url.port) == ("http", owner, 9090)
    assert "network_mode" not in services["grafana"]  # on the default network, where service names resolve
    assert 9090 in [container_port(p) for p in services[owner]["ports"]]  # for a browser on the host too


def test_grafana_mounts_the_provisioning_and_the_dashboards_where_the_provider_reads(
    compose: dict[str, Any],
) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml")["providers"]
    assert provider["type"] == "file"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = compose["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home == provider["options"]["path"] + "/policy-server.json"


def test_prometheus_scrapes_both_metric_ports_of_the_server(compose: dict[str, Any]) -> None:
    config = load_yaml(ROOT / "prometheus.yml")
    statics = [static for job in config["scrape_configs"] for static in job["static_configs"]]
    targets = sorted(target for static in statics for target in static["targets"])
    defaults = Settings.model_fields
    ray, gateway = defaults["ray_metrics_port"].default, defaults["gateway_metrics_port"].default
    assert targets == [f"localhost:{ray}", f"localhost:{gateway}"]
    published = [container_port(p) for p in compose["services"]["policy-server"]["ports"]]
    assert ray in published and gateway in published
    assert compose["services"]["prometheus"]["network_mode"] == "service:policy-server"  # so localhost works


def test_the_dashboard_uses_the_provisioned_data_source(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    assert datasource["type"] == "prometheus" and datasource["uid"]
    assert dashboard["title"] == "policy-server" and dashboard["uid"] and dashboard["schemaVersion"] >= 39
    refs = [p["datasource"] for p in panels(dashboard)]
    refs += [t["datasource"] for p in panels(dashboard) for t in p["targets"] if "datasource" in t]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    assert refs and all(ref == {"type": "prometheus", "uid": datasource["uid"]} for ref in refs)


def test_every_panel_has_a_unique_id_and_a_query(dashboard: dict[str, Any]) -> None:
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for row in rows for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    kinds = {p["type"] for p in panels(dashboard)}
    assert kinds <= {"timeseries", "stat"} and "timeseries" in kinds and "stat" in kinds
    for panel in panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: a target without a query"
    assert [row["title"] for row in rows] == ["Serving", "Training", "LLM"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1]) for line in lines]


def test_dockerfile_is_cpu_by_default_runs_as_a_user_and_checks_health() -> None:
    instructions = dockerfile_instructions()
    base = next(args for op, args in instructions if op == "ARG" and args.startswith("BASE="))
    assert not re.search(r"cuda|nvidia|gpu", base, re.IGNORECASE), f"not a CPU image: {base}"
    assert instructions[1] == ("FROM", "${BASE}")
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (check,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert "/health/ready" in check
    torch = next(args for op, args in instructions if op == "ARG" and args.startswith("TORCH_INDEX="))
    assert torch.endswith("/whl/cpu")


def test_dockerfile_installs_a_java_runtime_for_the_sdk_generator() -> None:
    runs = [args for op, args in dockerfile_instructions() if op == "RUN"]
    (apt,) = [run for run in runs if "apt-get install" in run]
    assert "default-jre-headless" in apt and "--no-install-recommends" in apt
    assert "rm -rf /var/lib/apt/lists/*" in apt


def test_the_demo_runs_frontend_py_from_the_server_image_against_the_server(compose: dict[str, Any]) -> None:
    services = compose["services"]
    demo, server = services["demo"], services["policy-server"]
    assert demo["image"] == server["image"] and (ROOT / demo["command"][2]).is_file()
    target = urlparse(demo["environment"]["POLICY_SERVER_URL"])
    assert target.hostname in services and target.port == container_port(server["ports"][0])
    assert container_port(demo["ports"][0]) == int(demo["command"][demo["command"].index("--server.port") + 1])
