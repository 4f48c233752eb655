"""The demo's pure logic: schema → form fields → request body, answers → chart data, the client."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import yaml

from policy_server.frontend import charts, forms
from policy_server.frontend.example import demo_api_key, is_local
from policy_server.frontend.gateway_api import DemoClient, ServerError, Unreachable, policy_path
from policy_server.settings import Settings

OBSERVATIONS = {
    "id": {"type": "int", "min_items": None, "max_items": None, "description": "who"},
    "speed": {"type": "float", "min_items": None, "max_items": None, "description": None},
    "free": {"type": "bool", "min_items": None, "max_items": None, "description": None},
    "sensors": {"type": "List[float]", "min_items": 3, "max_items": 3, "description": None},
    "cells": {"type": "List[int]", "min_items": 1, "max_items": None, "description": None},
}


def test_field_specs_follow_the_schema_and_size_the_open_list_from_the_input_width() -> None:
    specs = forms.field_specs(OBSERVATIONS, obs_dim=3 + 3 + 10)
    assert [(s.name, s.kind, s.length) for s in specs] == [
        ("id", "int", None), ("speed", "float", None), ("free", "bool", None),
        ("sensors", "List[float]", 3), ("cells", "List[int]", 10),
    ]
    assert specs[0].description == "who" and specs[3].label == "sensors (float × 3)"
    assert specs[3].per_item and not specs[4].per_item  # 10 items: one comma-separated text
    assert [s.default() for s in specs] == [0, 0.0, False, [0.0, 0.0, 0.0], "0, 0, 0, 0, 0, 0, 0, 0, 0, 0"]
    unknown = forms.field_specs(OBSERVATIONS)[4]  # no GET / answer: length unknown, any length taken
    assert unknown.length is None and unknown.label == "cells (int × ?)"
    assert forms.field_specs(None) == [] and forms.field_specs({}) == []


def test_request_body_converts_types_and_checks_lengths() -> None:
    specs = forms.field_specs(OBSERVATIONS, obs_dim=3 + 3 + 2)
    values = {"id": 3.0, "speed": 1, "free": 1, "sensors": [0.5, -1, 2], "cells": " 4, 5 "}
    body = forms.request_body(specs, values)
    assert body == {"id": 3, "speed": 1.0, "free": True, "sensors": [0.5, -1.0, 2.0], "cells": [4, 5]}
    assert type(body["id"]) is int and type(body["free"]) is bool and type(body["cells"][0]) is int
    json.dumps(body, allow_nan=False)


@pytest.mark.parametrize(("change", "message"), [
    ({"cells": "4, 5, 6"}, "cells: 3 values given, it takes exactly 2"),
    ({"cells": "4, x"}, "cells[1]: 'x' is not a number"),
    ({"cells": "4, 5.5"}, "cells[1]: '5.5' is not a whole number"),
    ({"sensors": [1.0, 2.0]}, "sensors: 2 values given, it takes exactly 3"),
    ({"speed": math.inf}, "speed: 'inf' is not a finite number"),
    ({"cells": ""}, "cells: 0 values given, it takes exactly 2"),
])
def test_request_body_names_the_bad_field(change: dict[str, object], message: str) -> None:
    specs = forms.field_specs(OBSERVATIONS, obs_dim=8)
    values = {"id": 1, "speed": 0.0, "free": False, "sensors": [0.0] * 3, "cells": "1, 2"} | change
    with pytest.raises(forms.FormError, match=message.replace("[", r"\[").replace("]", r"\]")):
        forms.request_body(specs, values)


def test_every_bad_field_is_named_at_once() -> None:
    specs = forms.field_specs(OBSERVATIONS, obs_dim=8)
    with pytest.raises(forms.FormError) as info:
        forms.request_body(specs, {"id": 1.5, "speed": 0.0, "free": False, "sensors": [0.0] * 3})
    assert str(info.value) == "id: '1.5' is not a whole number; cells: missing"


def test_action_text_names_the_action() -> None:
    assert charts.action_text({"action": 3, "action_name": "left"}) == "left (3)"
    assert charts.action_text({"action": 3, "action_name": "3"}) == "3"
    assert charts.action_text({"action": [2, 0], "action_name": ["fast", "0"]}) == "fast (2), 0"
    assert charts.action_text({"action": [0.5, -0.123456]}) == "[0.5, -0.1235]"


def test_distribution_frames_of_each_action_space() -> None:
    discrete = charts.distribution_frame({"probabilities": {"up": 0.25, "down": 0.75}, "model_version": 0})
    assert discrete.to_dict("records") == [{"action": "up", "probability": 0.25}, {"action": "down", "probability": 0.75}]
    tuple_ = charts.distribution_frame({"components": [{"0": 0.5, "1": 0.5}, {"a": 1.0}]})
    assert tuple_.to_dict("records") == [
        {"component": "component 0", "action": "0", "probability": 0.5},
        {"component": "component 0", "action": "1", "probability": 0.5},
        {"component": "component 1", "action": "a", "probability": 1.0},
    ]
    box = charts.distribution_frame({"mean": [0.1, -0.2], "std": [1.0, 0.5]})
    assert box.to_dict("records") == [{"dimension": 0, "mean": 0.1, "std": 1.0}, {"dimension": 1, "mean": -0.2, "std": 0.5}]
    with pytest.raises(ValueError, match="not a distribution"):
        charts.distribution_frame({"model_version": 0})


def test_token_log_prob_frame_keeps_order_and_repeated_tokens_apart() -> None:
    choice = {"logprobs": {"content": [{"token": " 7", "logprob": 0.0}, {"token": " 7", "logprob": math.log(0.5)}]}}
    frame = charts.token_log_prob_frame(choice)
    assert frame["label"].tolist() == ["000 ' 7'", "001 ' 7'"]
    assert frame["probability"].tolist() == pytest.approx([1.0, 0.5])
    assert charts.token_log_prob_frame({"logprobs": None}).empty


def status(version: int, returns: list[float]) -> dict[str, object]:
    return {"model_version": version, "updates": version, "episodes": len(returns), "samples_accepted": 16 * version,
            "mean_return": sum(returns) / len(returns) if returns else None,
            "last_return": returns[-1] if returns else None, "recent_returns": returns}


def test_training_history_keeps_the_ends_of_flat_stretches() -> None:
    history: list[dict[str, object]] = []
    for t, (version, returns) in enumerate([(0, []), (0, []), (0, []), (1, [16.0]), (1, [16.0]), (2, [16.0, 20.0])]):
        history = charts.append_point(history, charts.training_point(status(version, returns), float(t)))
    assert [(p["t"], p["model_version"]) for p in history] == [(0.0, 0), (2.0, 0), (3.0, 1), (4.0, 1), (5.0, 2)]
    frame = charts.history_frame(history)
    assert frame.index.name == "t" and frame["mean_return"].tolist()[-1] == 18.0
    assert len(charts.append_point(history, history[-1] | {"model_version": 9}, max_points=3)) == 3
    returns = charts.returns_frame(status(2, [16.0, 20.0]) | {"episodes": 7})
    assert returns.index.tolist() == [6, 7] and returns["return"].tolist() == [16.0, 20.0]


def test_grpo_frame_is_the_reward_per_cycle() -> None:
    frame = charts.grpo_frame({"reward_history": [0.1, 0.4]})
    assert frame.index.tolist() == [1, 2] and frame["mean_reward"].tolist() == [0.1, 0.4]


def test_client_sends_the_key_to_the_right_paths_and_raises_the_envelope() -> None:
    seen: list[tuple[str, str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.headers.get("access-token")))
        if request.url.path.endswith("/distribution"):
            error = {"code": "invalid_request", "status": 422, "message": "invalid request: body.x: bad",
                     "fields": [{"field": "body.x", "message": "bad"}]}
            return httpx.Response(422, json={"error": error})
        if request.url.path == "/api/v1/v1/chat/completions":
            assert json.loads(request.content)["logprobs"] is True
        return httpx.Response(200, json={"ok": True})

    with DemoClient("http://server/api/v1/", "k", transport=httpx.MockTransport(handler)) as client:
        assert client.predict("lpoc", "lpoc", {"x": 1}) == {"ok": True}
        client.predict("box", "lpoc", {"x": 1})
        client.chat([{"role": "user", "content": "hi"}], 2, 0.7, 8)
        with pytest.raises(ServerError) as info:
            client.distribution("box", "lpoc", {"x": 1})
    assert info.value.fields == [{"field": "body.x", "message": "bad"}]
    assert str(info.value) == "422 invalid_request: invalid request: body.x: bad"
    assert seen == [("POST", "/api/v1/predict", "k"), ("POST", "/api/v1/policies/box/predict", "k"),
                    ("POST", "/api/v1/v1/chat/completions", "k"), ("POST", "/api/v1/policies/box/distribution", "k")]
    assert policy_path("a", None, "predict") == "/policies/a/predict"


def test_client_errors_that_are_not_the_envelope() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/down":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(502, text="<html>bad gateway</html>")

    with DemoClient("http://server", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServerError) as info:
            client.schema()
        assert (info.value.status, info.value.code) == (502, "http_error") and "bad gateway" in info.value.message
        with pytest.raises(Unreachable, match="no answer from http://server"):
            client._call("GET", "/down")
        assert client.alive() is False


def test_a_get_on_a_connection_the_server_closed_is_sent_again_once() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if len(calls) % 2:
            raise httpx.ReadError("connection reset by peer", request=request)
        return httpx.Response(200, json={"runs": []})

    with DemoClient("http://server", transport=httpx.MockTransport(handler)) as client:
        assert client.grpo_runs() == []
        with pytest.raises(Unreachable, match="connection reset"):
            client.predict("p", "p", {})  # a POST is not sent twice
    assert calls == ["GET /llm/grpo/runs", "GET /llm/grpo/runs", "POST /predict"]


def test_space_text_of_each_action_space() -> None:
    assert charts.space_text({"type": "discrete", "n": 2, "names": ["left", "right"]}) == "discrete, 2 actions: left, right"
    assert charts.space_text({"type": "tuple", "nvec": [2, 1], "names": None}) == "tuple of 2: {0, 1} × {0}"
    box = {"type": "box", "shape": [2], "low": [-1.0, -1.0], "high": [1.0, 0.5]}
    assert charts.space_text(box) == "box, shape [2], low [-1.0, -1.0], high [1.0, 0.5]"
    assert charts.space_text(None) == "read off the model"


@pytest.fixture
def no_key_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A folder with no .env, as the demo's working directory, and no key or schema in the environment."""
    for name in ("POLICY_SERVER_API_KEY", "SCHEMA_PATH", "POLICY_SERVER_SCHEMA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/api/v1", "http://[::1]:9000",
                                 "http://127.0.1.1:8000"])
def test_a_server_on_this_machine_gets_the_local_schemas_key(no_key_settings: Path, url: str) -> None:
    (no_key_settings / "schema.yaml").write_text("parameters:\n  api_key: local-key\n")
    assert is_local(url) and demo_api_key(url) == "local-key"


def test_schema_path_names_the_local_schema(no_key_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (no_key_settings / "other.yaml").write_text("parameters:\n  api_key: other-key\n")
    monkeypatch.setenv("SCHEMA_PATH", str(no_key_settings / "other.yaml"))
    assert demo_api_key("http://127.0.0.1:8000") == "other-key"


def test_without_a_schema_here_the_one_beside_frontend_py_is_read(no_key_settings: Path) -> None:
    bundled = yaml.safe_load((Path(__file__).resolve().parents[2] / "schema.yaml").read_text())
    assert demo_api_key("http://127.0.0.1:8000") == bundled["parameters"]["api_key"]


@pytest.mark.parametrize("schema", ["observations: {}\n", "parameters: [1, 2\n", "- a list\n", ""])
def test_a_local_schema_without_a_key_gives_none(no_key_settings: Path, schema: str) -> None:
    (no_key_settings / "schema.yaml").write_text(schema)
    assert demo_api_key("http://127.0.0.1:8000") == ""


@pytest.mark.parametrize("url", ["http://policy-server:8000", "http://10.0.0.5:8000", "https://example.org"])
def test_a_server_elsewhere_gets_no_key_unless_the_environment_has_one(
    no_key_settings: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """docker compose's demo talks to the server's container: the user types the key, or sets it."""
    (no_key_settings / "schema.yaml").write_text("parameters:\n  api_key: local-key\n")
    assert not is_local(url) and demo_api_key(url) == ""
    monkeypatch.setenv("POLICY_SERVER_API_KEY", "")  # compose passes an unset variable as ""
    assert demo_api_key(url) == ""
    monkeypatch.setenv("POLICY_SERVER_API_KEY", "from-env")
    assert demo_api_key(url) == "from-env" and demo_api_key("http://127.0.0.1:8000") == "from-env"


def test_a_dot_env_beside_the_demo_gives_the_key_as_it_gives_it_to_the_server(
    no_key_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(Settings.model_config, "env_file", ".env")  # conftest keeps the machine's .env out
    (no_key_settings / ".env").write_text("POLICY_SERVER_API_KEY=dot-env-key\n")
    assert demo_api_key("http://policy-server:8000") == "dot-env-key"
