"""Pathmind's clients work unchanged: trailing slashes, a prefix stripped by the ingress, ``actions``
in every answer, and the ``/collect_experience`` loop (in-process, local backend)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import yaml
from conftest import (
    API_KEY,
    BOX_OBS,
    CART_OBSERVATIONS,
    LPOC_OBS,
    TUPLE_OBS,
    multi_policy_schema,
    training_schema,
)
from fastapi.testclient import TestClient
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}


def build(path: Path, **settings: Any) -> TestClient:
    base = {"schema_path": path, "backend": "local", "gateway_metrics_port": 0, "seed": 0, "clients_enabled": True}
    return TestClient(build_app(Settings(**(base | settings))), follow_redirects=False)


def everything_schema(model_dir: Path, llm_dirs: dict[str, Path], folder: Path, **parameters: Any) -> dict[str, Any]:
    """Every kind of route: policies (one trainable), LLM policy and value with x1 training and GRPO."""
    schema = training_schema(model_dir, folder / "ckpt")
    training = {"data_dir": str(folder / "data"), "samples_dir": str(folder / "samples"), "save_dir": str(folder / "llm")}
    schema["parameters"] |= parameters
    schema["llm"] = {
        "policy": {"path": str(llm_dirs["policy"]), "engine": "transformers", "training": training},
        "value": {"path": str(llm_dirs["value"]), "training": training},
    }
    return schema


def operations(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every documented operation plus the docs, path parameters filled in."""
    spec = client.get(client.app.openapi_url).json()  # type: ignore[attr-defined]
    ops = [(m.upper(), re.sub(r"\{[^}]+\}", "x", p)) for p, item in spec["paths"].items() for m in item]
    docs = [client.app.docs_url, client.app.redoc_url, client.app.openapi_url]  # type: ignore[attr-defined]
    return ops + [("GET", str(d)) for d in docs]


def answer(client: TestClient, method: str, path: str) -> tuple[int, str | None]:
    """Without the api key: a protected route answers 401/403 when it matched (a miss is 404)."""
    r = client.request(method, path, json={} if method in ("POST", "PUT") else None)
    return r.status_code, r.headers.get("location")


@pytest.fixture(scope="module")
def unstarted(model_dir: Path, llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """The app with every kind of route, not started: routing and auth answer, nothing runs."""
    folder = tmp_path_factory.mktemp("everything")
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(everything_schema(model_dir, llm_dirs, folder), sort_keys=False))
    return build(path)


def test_every_route_answers_with_or_without_a_trailing_slash_and_never_redirects(unstarted: TestClient) -> None:
    ops = operations(unstarted)
    paths = {p for _, p in ops}
    for needed in ["/predict", "/collect_experience", "/train/experience", "/clients", "/llm/direct_forward",
                   "/llm/grpo/runs", "/v1/chat/completions", "/value/forward", "/llm/", "/"]:
        assert needed in paths, needed
    for method, path in ops:
        plain = answer(unstarted, method, path)
        assert plain[0] not in (307, 308, 404, 405) and plain[1] is None, (method, path, plain)
        other = path.rstrip("/") if path.endswith("/") else path + "/"
        assert answer(unstarted, method, other or "/") == plain, (method, path, other)


def test_the_openapi_document_lists_each_route_once_without_the_slash(unstarted: TestClient) -> None:
    paths = list(unstarted.get("/openapi.json").json()["paths"])
    stems = [p.rstrip("/") for p in paths]
    assert len(stems) == len(set(stems))
    assert "/collect_experience" in paths and "/collect_experience/" not in paths


def test_url_path_answers_behind_a_proxy_that_keeps_or_strips_the_prefix(
    model_dir: Path, llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "schema.yaml"
    schema = everything_schema(model_dir, llm_dirs, tmp_path, url_path="api/v1")
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    client = build(path)
    for method, full in operations(client):
        assert full.startswith("/api/v1/"), full
        plain = answer(client, method, full)
        assert plain[0] not in (307, 308, 404, 405) and plain[1] is None, (method, full, plain)
        stripped = full.removeprefix("/api/v1").rstrip("/") or "/"
        for spelling in (full.rstrip("/") or "/", stripped, stripped.rstrip("/") + "/"):
            assert answer(client, method, spelling) == plain, (method, full, spelling)


def test_swagger_ui_works_through_either_proxy(model_dir: Path, write_schema: Any) -> None:
    """The page points at the prefixed document, whose paths carry the prefix: the browser and
    "Try it out" go through the public prefix either way, and the server answers both."""
    client = build(write_schema(multi_policy_schema(model_dir, url_path="api/v1")))
    for docs in ("/api/v1/docs", "/docs", "/docs/"):
        page = client.get(docs)
        assert page.status_code == 200 and "'/api/v1/openapi.json'" in page.text, docs
    spec = client.get("/openapi.json").json()
    assert spec == client.get("/api/v1/openapi.json").json()
    assert "/api/v1/predict" in spec["paths"] and "servers" not in spec
    # behind `uvicorn --root-path /ext` (a proxy publishing the server under another prefix)
    proxied = TestClient(client.app, root_path="/ext")
    assert "'/ext/api/v1/openapi.json'" in proxied.get("/ext/docs").text


# --- answers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path = tmp_path_factory.mktemp("compat") / "schema.yaml"
    path.write_text(yaml.safe_dump(multi_policy_schema(model_dir), sort_keys=False))
    with build(path) as c:
        c.headers.update(AUTH)
        yield c


@pytest.mark.parametrize(
    ("base", "obs", "raw"),
    [("", LPOC_OBS, [float(v) for v in LPOC_OBS.values()]),
     ("/policies/tuple", TUPLE_OBS, [0.5, 0.1, -0.2, 0.3]),
     ("/policies/box", BOX_OBS, [0.1, -0.3, 0.0])],
)
def test_every_action_answer_carries_pathminds_actions_list(served: TestClient, base: str, obs: dict[str, Any],
                                                             raw: list[float]) -> None:
    singles = [
        served.post(f"{base}/predict/", json=obs).json(),
        served.post(f"{base}/predict_deterministic/", json=obs).json(),
        served.post(f"{base}/predict_raw/", json={"obs": raw}).json(),
    ]
    batches = [
        served.post(f"{base}/predict/batch/", json={"observations": [obs, obs]}).json(),
        served.post(f"{base}/predict_deterministic/batch", json={"observations": [obs]}).json(),
        served.post(f"{base}/predict_raw/batch", json={"obs": [raw, raw]}).json(),
    ]
    results = singles + [r for b in batches for r in b["results"]]
    assert len(results) == 3 + 5
    for result in results:
        action = result["action"]
        assert result["actions"] == (action if isinstance(action, list) else [action])
        if base == "/policies/box":
            assert "probability" not in result  # a density; Pathmind served no boxes
        else:
            assert 0 < result["probability"] <= 1 and isinstance(result["actions"][0], int)


def test_distribution_keeps_its_shape_with_pathminds_mapping_inside(served: TestClient) -> None:
    """Pathmind answered a flat ``{action: probability}``; ours nests that very mapping under
    ``probabilities`` beside ``model_version`` and ``variant`` (a flat mapping could not carry them)."""
    body = served.post("/distribution/", json=LPOC_OBS).json()
    assert set(body) == {"probabilities", "model_version", "variant"}
    assert list(body["probabilities"]) == ["up", "right", "down", "left"]
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-6


# --- /collect_experience -------------------------------------------------------------------------


def trainable_client(model_dir: Path, folder: Path, **ppo: Any) -> TestClient:
    """A trainable CartPole policy `cart` (the default, PPO on 64-step rollouts) beside `lpoc`."""
    schema = training_schema(model_dir, folder / "ckpt", ppo={"rollout_samples": 64, "num_minibatches": 2} | ppo)
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    client = build(path)
    client.headers.update(AUTH)
    return client


@pytest.fixture()
def trainable(model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with trainable_client(model_dir, tmp_path) as c:
        yield c


@pytest.fixture(scope="module")
def untouched(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The same server, shared by the tests that must not reach its trainer."""
    with trainable_client(model_dir, tmp_path_factory.mktemp("untouched")) as c:
        yield c


def as_observation(obs: Any) -> dict[str, float]:
    return {name: float(v) for name, v in zip(CART_OBSERVATIONS, obs)}


def pathmind_episode(client: TestClient, env: gym.Env, seed: int) -> tuple[int, float]:
    """Pathmind's test client: post what the environment shows with the last reward and `done`,
    step with `actions[0]`; the call that reports `done` ends the episode. Returns (steps, return)."""
    obs, _ = env.reset(seed=seed)
    reward, done, steps, total = 0.0, False, 0, 0.0
    while True:
        r = client.post("/collect_experience/", json={"observation": as_observation(obs), "reward": reward, "done": done})
        assert r.status_code == 200, r.text
        if done:
            return steps, total
        obs, reward, terminated, truncated, _ = env.step(r.json()["actions"][0])
        reward, done, steps, total = float(reward), bool(terminated or truncated), steps + 1, total + float(reward)


def test_a_pathmind_client_loop_on_cartpole_feeds_the_trainer(trainable: TestClient) -> None:
    env = gym.make("CartPole-v1")
    steps = [pathmind_episode(trainable, env, seed)[0] for seed in range(8)]

    def updated() -> dict[str, Any] | None:  # 64 rows arrived
        status = trainable.get("/train/status").json()
        return status if status["updates"] >= 1 else None

    status = wait_until(updated, 20, message=lambda: str(trainable.get("/train/status").json()))
    assert status["samples_received"] == status["samples_accepted"] == sum(steps)
    assert status["episodes"] == 8 and status["recent_returns"] == [float(s) for s in steps]
    assert status["model_version"] >= 1 and status["samples_rejected"] == {"stale": 0, "malformed": 0}
    client_id = next(iter(status["clients"]))
    assert client_id.startswith("addr-") and status["clients"][client_id]["episodes"] == 8


def test_a_pathmind_client_loop_raises_the_return(model_dir: Path, tmp_path: Path) -> None:
    """Online PPO through `/collect_experience` alone: a random policy's episodes last about 20
    steps; after 3,000 steps (about 23 updates) the last ten episodes are at least twice as long
    as the first ten."""
    env = gym.make("CartPole-v1")
    returns: list[float] = []
    with trainable_client(model_dir, tmp_path, rollout_samples=128, num_minibatches=4, learning_rate=2.5e-3) as client:
        while sum(returns) < 3000:
            returns.append(pathmind_episode(client, env, len(returns))[1])
        status = client.get("/train/status").json()
    first, last = sum(returns[:10]) / 10, sum(returns[-10:]) / 10
    assert last >= 2 * first, returns
    assert status["model_version"] >= 10 and status["samples_rejected"]["stale"] == 0, status


def test_clients_named_by_client_id_are_paired_separately(trainable: TestClient) -> None:
    obs = as_observation([0.0, 0.0, 0.01, 0.0])
    for reward, done in [(0.0, False), (1.0, False), (2.0, False), (3.0, True)]:
        for client_id, scale in (("env-a", 1.0), ("env-b", 10.0)):
            body = {"observation": obs, "reward": reward * scale, "done": done, "client_id": client_id}
            assert trainable.post("/collect_experience", json=body).status_code == 200
    clients = trainable.get("/train/status").json()["clients"]
    assert clients["env-a"]["last_return"] == 6.0 and clients["env-b"]["last_return"] == 60.0
    assert clients["env-a"]["samples"] == clients["env-b"]["samples"] == 3


def test_collect_experience_acts_while_training_is_paused_and_stores_nothing(trainable: TestClient) -> None:
    trainable.post("/train/pause")
    obs = as_observation([0.0, 0.0, 0.01, 0.0])
    for done in (False, False, True):
        answer = trainable.post("/collect_experience", json={"observation": obs, "reward": 1.0, "done": done})
        assert answer.status_code == 200 and answer.json()["actions"][0] in (0, 1)
    assert trainable.get("/train/status").json()["samples_received"] == 0


def test_a_policy_without_training_only_acts(untouched: TestClient) -> None:
    answer = untouched.post("/policies/lpoc/collect_experience/", json={"observation": LPOC_OBS, "reward": 1.0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["actions"] == [answer.json()["action"]] and answer.json()["model_version"] == 0


OBS = {"cart_position": 0.0, "cart_velocity": 0.0, "pole_angle": 0.01, "pole_angular_velocity": 0.0}
BAD_COLLECT = {
    "reward as string": ({"observation": OBS, "reward": "1"}, "body.reward"),
    "reward as boolean": ({"observation": OBS, "reward": True}, "body.reward"),
    "reward overflows float32": ({"observation": OBS, "reward": 1e39}, "body.reward"),
    "done as number": ({"observation": OBS, "done": 1}, "body.done"),
    "done as string": ({"observation": OBS, "done": "yes"}, "body.done"),
    "observation missing": ({"reward": 1.0}, "body.observation"),
    "observation field missing": ({"observation": {"cart_position": 0.0}}, "body.observation.cart_velocity"),
    "observation unknown field": ({"observation": OBS | {"x": 1.0}}, "body.observation.x"),
    "observation as list": ({"observation": [0.0] * 4}, "body.observation"),
    "bad client_id": ({"observation": OBS, "client_id": "a b/c"}, "body.client_id"),
    "unknown field": ({"observation": OBS, "episode": 3}, "body.episode"),
}


@pytest.mark.parametrize("case", list(BAD_COLLECT))
def test_bad_collect_bodies_are_422_naming_the_field_and_reach_no_trainer(untouched: TestClient, case: str) -> None:
    body, field = BAD_COLLECT[case]
    r = untouched.post("/collect_experience/", json=body)
    assert r.status_code == 422, r.text
    assert field in [f["field"] for f in r.json()["error"]["fields"]], r.json()
    assert untouched.get("/train/status").json()["clients"] == {}
