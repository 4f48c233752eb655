"""The streamlit page (AppTest, no browser) against real servers over HTTP (uvicorn in a thread)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import API_KEY, cart_fragment, free_port, multi_policy_schema, running_server, training_schema
from streamlit.testing.v1 import AppTest
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FRONTEND = ROOT / "frontend.py"
AUTH = {"access-token": API_KEY}


def serve(schema: dict[str, Any], folder: Path) -> Any:
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return running_server(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0)))


@pytest.fixture(scope="module")
def policies_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(multi_policy_schema(model_dir), tmp_path_factory.mktemp("policies")) as url:
        yield url


def page(monkeypatch: pytest.MonkeyPatch, url: str, key: str = API_KEY) -> AppTest:
    monkeypatch.setenv("POLICY_SERVER_URL", url)
    monkeypatch.setenv("POLICY_SERVER_API_KEY", key)
    at = AppTest.from_file(str(FRONTEND), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def submit(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def chart_specs(at: AppTest) -> list[dict[str, Any]]:
    return [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]


def test_the_form_follows_the_schema_and_shows_the_action_and_its_distribution(
    monkeypatch: pytest.MonkeyPatch, policies_url: str
) -> None:
    at = page(monkeypatch, policies_url)
    assert at.sidebar.success[0].value == f"A server answers at {policies_url}"
    assert at.selectbox[0].options == ["lpoc", "tuple", "box", "faulty"] and at.selectbox[0].value == "lpoc"
    assert [n.label for n in at.number_input] == ["id", "coordinates_0", "coordinates_1"]
    assert sorted(c.label for c in at.checkbox) == sorted(
        f"{kind}_{side}_{what}" for side in ("up", "right", "down", "left")
        for kind, what in (("has", "neighbour"), ("is", "free"))
    )
    at.number_input(key="lpoc:coordinates_0").set_value(3)
    at.checkbox(key="lpoc:is_up_free").check()
    submit(at, "Predict")
    sent = {name: 0 for name in ("id", "coordinates_0", "coordinates_1")} | {c.label: False for c in at.checkbox}
    sent |= {"coordinates_0": 3, "is_up_free": True}
    expected = httpx.post(f"{policies_url}/distribution", json=sent, headers=AUTH).json()["probabilities"]
    shown = metrics(at)
    name = shown["Action"].split(" ")[0]
    assert shown["Action"] == f"{name} ({['up', 'right', 'down', 'left'].index(name)})"
    assert shown["Probability"] == f"{expected[name]:.3f}" and shown["Model version"] == "0"
    [spec] = chart_specs(at)
    assert spec["encoding"]["y"]["field"] == "probability", spec["encoding"]


def test_tuple_lists_and_box_policies(monkeypatch: pytest.MonkeyPatch, policies_url: str) -> None:
    at = page(monkeypatch, policies_url)
    at.selectbox[0].select("tuple").run()
    assert [n.label for n in at.number_input] == ["speed", "sensors[0]", "sensors[1]", "sensors[2]"]
    assert any("sensors (float × 3)" in m.value for m in at.markdown)
    at.number_input(key="tuple:sensors:1").set_value(0.25)
    submit(at, "Predict")
    action = metrics(at)["Action"].split(", ")
    assert len(action) == 2 and int(action[0]) in range(3) and int(action[1]) in range(2)
    assert len(chart_specs(at)) == 2  # one bar chart per component
    at.selectbox[0].select("box").run()
    submit(at, "Predict")
    assert metrics(at)["Probability"] == "— (a density)"
    [table] = at.dataframe
    assert list(table.value.columns) == ["dimension", "mean", "std"] and len(table.value) == 2


def test_server_errors_show_the_envelope(monkeypatch: pytest.MonkeyPatch, policies_url: str) -> None:
    at = page(monkeypatch, policies_url)
    at.selectbox[0].select("faulty").run()
    at.number_input(key="faulty:a").set_value(5000.0)  # the faulty model raises above 1000
    submit(at, "Predict")
    assert at.error[0].value.startswith("**500 model_error**")
    at = page(monkeypatch, policies_url, key="wrong")
    submit(at, "Predict")
    assert at.error[0].value.startswith("**403 forbidden**: wrong api key")


def test_no_server_offers_the_bundled_example_and_starts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLICY_SERVER_API_KEY", raising=False)
    at = page(monkeypatch, f"http://127.0.0.1:{free_port()}", key="")
    assert "No server answers" in at.sidebar.warning[0].value and "uvicorn app:app" in at.info[0].value
    start = next(b for b in at.sidebar.button if b.label == "Start the bundled example server")
    assert not start.disabled
    start.click()
    at.run()
    try:
        assert not at.exception, [e.value for e in at.exception]
        assert at.text_input(key="api_key").value == "1234567asdfgh"  # the bundled schema's key
        assert at.sidebar.success[0].value.startswith("A server answers at http://127.0.0.1:")
        assert [n.label for n in at.number_input] == ["id", "coordinates_0", "coordinates_1"]
        submit(at, "Predict")
        assert metrics(at)["Action"].split(" ")[0] in ("up", "right", "down", "left")
    finally:
        stop = [b for b in at.sidebar.button if b.label == "Stop the example server"]
        assert stop, "the example server is not listed"
        stop[0].click()
        at.run()
    assert "No server answers" in at.sidebar.warning[0].value


def test_the_first_predict_against_the_bundled_example_needs_no_typed_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """`uvicorn app:app` next to the bundled schema, then `streamlit run frontend.py`: the demo reads
    the key from the same schema.yaml, so the first Predict is answered, not refused with a 403."""
    for name in ("POLICY_SERVER_API_KEY", "SCHEMA_PATH", "POLICY_SERVER_SCHEMA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)  # where both are started
    settings = Settings(schema_path=ROOT / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0)
    with running_server(build_app(settings)) as url:
        monkeypatch.setenv("POLICY_SERVER_URL", url)
        at = AppTest.from_file(str(FRONTEND), default_timeout=60).run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.text_input(key="api_key").value == yaml.safe_load((ROOT / "schema.yaml").read_text())[
            "parameters"]["api_key"]
        submit(at, "Predict")
    assert not at.error, [e.value for e in at.error]
    assert metrics(at)["Action"].split(" ")[0] in ("up", "right", "down", "left")


def test_training_shows_status_and_history(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, tmp_path: Path
) -> None:
    schema = training_schema(model_dir, tmp_path / "ckpt", ppo={"rollout_samples": 16, "num_minibatches": 2})
    with serve(schema, tmp_path) as url:
        sent = httpx.post(f"{url}/train/experience", headers=AUTH,
                          json={"client_id": "c1", "fragments": [cart_fragment()]})
        assert sent.status_code == 200, sent.text
        wait_until(lambda: httpx.get(f"{url}/train/status", headers=AUTH).json()["model_version"] >= 1, 30,
                   message="no update")
        at = page(monkeypatch, url)
    assert [t.label for t in at.tabs] == ["Policies", "Training"]
    shown = metrics(at)
    assert shown["Model version"] == "1" and shown["Episodes"] == "1" and shown["Mean return"] == "16.0"
    assert shown["State"] == "running" and shown["Updates"] == "1"
    assert len(chart_specs(at)) == 3  # return and version over time, the latest episodes' returns


@pytest.fixture(scope="module")
def llm_url(llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("llm")
    schema = {"parameters": {"api_key": API_KEY},
              "llm": {"policy": {"path": str(llm_dirs["policy"]), "served_name": "tiny", "engine": "transformers",
                                 "limits": {"max_new_tokens": 32}, "training": {"save_dir": str(folder / "trained")}}}}
    with serve(schema, folder) as url:
        yield url


def test_llm_prompt_shows_samples_and_their_token_logprobs(monkeypatch: pytest.MonkeyPatch, llm_url: str) -> None:
    at = page(monkeypatch, llm_url)
    assert [t.label for t in at.tabs] == ["LLM", "Training"]
    at.text_area[1].set_value("What is 3 + 4?")
    at.number_input[0].set_value(3)
    at.number_input[1].set_value(12)
    submit(at, "Generate")
    samples = [m.value for m in at.markdown if m.value.startswith("**Sample")]
    assert len(samples) == 3 and len(at.code) == 3
    tables = [d.value for d in at.dataframe]
    assert len(tables) == 3
    for table in tables:
        assert list(table.columns) == ["position", "token", "logprob", "probability"]
        assert 1 <= len(table) <= 12 and (table["logprob"] <= 0).all()
    assert "".join(tables[0]["token"]).startswith(at.code[0].value[:5])


def test_grpo_run_shows_its_reward_per_cycle(monkeypatch: pytest.MonkeyPatch, llm_url: str) -> None:
    runs = f"{llm_url}/llm/grpo/runs"
    run_id = httpx.post(runs, headers=AUTH, json={"group_size": 2, "max_completion_length": 4, "lora": False},
                        timeout=60).json()["run_id"]
    for rewards in ([1.0, 0.0], [1.0, 1.0]):
        group = httpx.post(f"{runs}/{run_id}/completions", headers=AUTH, json={"prompt": "3 + 4 ="}, timeout=60)
        sent = httpx.post(f"{runs}/{run_id}/rewards", headers=AUTH, timeout=60,
                          json={"group_id": group.json()["group_id"], "rewards": rewards})
        assert sent.status_code == 200, sent.text
    at = page(monkeypatch, llm_url)
    assert at.selectbox[0].value == run_id
    shown = metrics(at)
    assert shown["Cycle (model version)"] == "2" and shown["Mean reward"] == "0.750" and shown["State"] == "running"
    assert any("mean_reward" in json.dumps(spec) for spec in chart_specs(at))
