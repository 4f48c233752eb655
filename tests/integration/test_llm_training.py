"""GRPO runs and x1 training on their own Ray Serve deployments, beside the serving one, behind a
real uvicorn; each of them killed (SIGKILL to its replica's process) in the middle of its work."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import API_KEY, running_server
from support import live_actors, wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}


PREFIX = "it-llm-train"


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-train") / "trained"


@pytest.fixture(scope="module")
def client(ray_session: int, llm_dirs: dict[str, Path], save_dir: Path) -> Iterator[httpx.Client]:
    schema = {"parameters": {"api_key": API_KEY},
              "llm": {"policy": {"path": str(llm_dirs["policy"]), "engine": "transformers", "resources": {"num_cpus": 0.5},
                                 "training": {"save_dir": str(save_dir), "num_cpus": 0.5}}}}
    path = save_dir.parent / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix=PREFIX)
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


def test_a_grpo_run_over_serve_trains_while_the_policy_keeps_serving(client: httpx.Client) -> None:
    settings = {"group_size": 4, "lr": 1e-3, "lora": True, "chat": True, "max_completion_length": 8}
    run_id = client.post("/llm/grpo/runs", json=settings).json()["run_id"]
    for cycle in range(1, 4):
        group = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": "Sort: b a"}).json()
        assert [len(c["token_ids"]) == len(c["logprobs"]) for c in group["completions"]] == [True] * 4
        rewards = [float(i) for i in range(4)]
        answer = client.post(f"/llm/grpo/runs/{run_id}/rewards", json={"group_id": group["group_id"], "rewards": rewards})
        assert answer.json()["model_version"] == [run_id, cycle]
        served = client.post("/llm/direct_forward", json={"input_string": "Hi", "max_output_length": 8})
        assert served.status_code == 200  # serving answers while the run trains
    assert client.post(f"/llm/grpo/runs/{run_id}/stop").json()["state"] == "finished"
    assert client.get(f"/llm/grpo/runs/{run_id}/model").content[:2] == b"\x1f\x8b"  # gzip


def test_a_serving_grpo_run_over_serve_publishes_into_the_policy_replica(client: httpx.Client) -> None:
    """``serve: true`` on Ray Serve: the GRPO deployment samples through the policy deployment's
    handle and broadcasts its weights into it after each cycle, before the rewards answer; only one
    serving run at a time. (x1 training, the next test, then publishes above these versions.)"""
    settings = {"group_size": 4, "lr": 1e-3, "lora": True, "chat": True, "max_completion_length": 8, "serve": True}
    started = client.post("/llm/grpo/runs", json=settings)
    assert started.status_code == 201, started.text
    run_id, version = started.json()["run_id"], started.json()["served_version"]
    assert client.get("/llm/").json()["model_version"] == version  # published at the start
    second = client.post("/llm/grpo/runs", json=settings)
    assert second.status_code == 409 and run_id in second.text
    for cycle in range(1, 4):
        group = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": "Sort: b a"}).json()
        assert group["served_version"] == version + cycle - 1
        rewards = {"group_id": group["group_id"], "rewards": [float(i) for i in range(4)]}
        answer = client.post(f"/llm/grpo/runs/{run_id}/rewards", json=rewards).json()
        assert answer["served_version"] == version + cycle
        served = client.post("/llm/direct_forward", json={"input_string": "Hi", "max_output_length": 8})
        assert served.json()["model_version"] == version + cycle
    assert client.post(f"/llm/grpo/runs/{run_id}/stop").json()["state"] == "finished"


def test_train_from_dataset_over_serve_publishes_the_trained_weights(client: httpx.Client) -> None:
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    before = client.get("/llm/").json()["model_version"]
    started = client.post("/llm/train_from_dataset", json={"dataset": [{"messages": chat, "GAE": 1.0}] * 4, "lr": 1e-3})
    assert started.status_code == 201, started.text

    def trained() -> dict[str, Any] | None:
        status = client.get("/llm/").json()
        return None if status["training"]["running"] or status["model_version"] == before else status

    status = wait_until(trained, 120, 0.1, lambda: str(client.get("/llm/").json()))
    assert status["model_version"] == before + 1 and status["training"]["last_run"]["error"] is None
    answer = client.post("/llm/direct_forward", json={"input_string": "Hi", "max_output_length": 8})
    assert answer.json()["model_version"] == before + 1


def kill_replica(deployment: str) -> str:
    """SIGKILL the process of the one replica of ``deployment`` (its app is ``<PREFIX>-<deployment>``);
    returns its actor id."""
    (victim, pid), = live_actors(f"ServeReplica:{PREFIX}-{deployment}:{deployment}").items()
    os.kill(pid, signal.SIGKILL)
    return victim


def answered(client: httpx.Client, method: str, path: str, seen: list[int]) -> httpx.Response | None:
    """The answer once the replica behind ``path`` answers again (503 with Retry-After meanwhile)."""
    answer = client.request(method, path)
    seen.append(answer.status_code)
    if answer.status_code == 503:
        assert "Retry-After" in answer.headers
        return None
    return answer


def leftovers(folder: Path) -> list[Path]:
    """What a killed write left: hidden partial (or moved-aside) files and folders."""
    return [p for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def test_a_grpo_run_killed_mid_cycle_resumes_every_acknowledged_cycle(client: httpx.Client, save_dir: Path) -> None:
    """The GRPO replica dies with cycles trained since the last checkpoint, one group handed out and
    another's rewards on their way: Serve replaces it; the run resumes with every acknowledged cycle
    (the one on its way too, if it was journaled before the kill: then its retry is 409, else 410),
    the engine serves the resumed weights as a new version, and the handed-out group answers 410."""
    settings = {"group_size": 2, "lr": 1e-3, "lora": True, "chat": True, "max_completion_length": 4,
                "checkpoint_every": 2, "serve": True}
    run_id = client.post("/llm/grpo/runs", json=settings).json()["run_id"]
    runs = f"/llm/grpo/runs/{run_id}"
    for _ in range(3):  # checkpoints at cycle 2; cycle 3 was acknowledged after it
        group = client.post(f"{runs}/completions", json={"prompt": "Sort: b a"}).json()
        answer = client.post(f"{runs}/rewards", json={"group_id": group["group_id"], "rewards": [1.0, 0.0]})
    history, served_before = client.get(runs).json()["reward_history"], answer.json()["served_version"]
    pending = client.post(f"{runs}/completions", json={"prompt": "Sort: c a"}).json()
    flying = client.post(f"{runs}/completions", json={"prompt": "Sort: d a"}).json()
    with ThreadPoolExecutor(1) as pool:
        on_its_way = pool.submit(client.post, f"{runs}/rewards", json={"group_id": flying["group_id"], "rewards": [0.0, 1.0]})
        time.sleep(0.05)  # on its way: in the gateway, in Serve, or training (each outcome is checked)
        victim = kill_replica("llm-grpo")
        killed_at = time.monotonic()
        first = on_its_way.result()
    seen: list[int] = []
    status = wait_until(lambda: answered(client, "GET", runs, seen), 60, 0.5, lambda: f"answers {seen[-5:]}").json()
    resumed_after = time.monotonic() - killed_at
    assert first.status_code in (200, 503, 410), first.text
    assert first.status_code != 503 or "Retry-After" in first.headers
    assert victim not in live_actors(f"ServeReplica:{PREFIX}-llm-grpo:llm-grpo") and set(seen) <= {200, 503}
    retry = client.post(f"{runs}/rewards", json={"group_id": flying["group_id"], "rewards": [0.0, 1.0]})
    assert retry.status_code in (409, 410), retry.text
    print(f"GRPO: rewards on their way answered {first.status_code}, their retry {retry.status_code}; status "
          f"answers {seen}, resumed at cycle {status['cycle']} {resumed_after:.1f} s after the kill")
    kept = retry.status_code == 409  # journaled before the kill: trained again on resume
    assert status["state"] == "running" and status["cycle"] == 3 + kept
    assert status["reward_history"] == history + [0.5] * kept
    # the resumed weights, published as a new version (one more if the dead process published cycle 4)
    assert served_before + 1 <= status["served_version"] <= served_before + 2
    assert client.post("/llm/direct_forward", json={"input_string": "Hi"}).json()["model_version"] == status["served_version"]
    lost = client.post(f"{runs}/rewards", json={"group_id": pending["group_id"], "rewards": [1.0, 0.0]})
    assert lost.status_code == 410 and lost.json()["error"]["code"] == "group_lost", lost.text
    group = client.post(f"{runs}/completions", json={"prompt": "Sort: b a"}).json()
    answer = client.post(f"{runs}/rewards", json={"group_id": group["group_id"], "rewards": [1.0, 0.0]})
    assert answer.json()["model_version"] == [run_id, 4 + kept], answer.text
    assert client.post(f"{runs}/stop").json()["state"] == "finished"
    assert leftovers(save_dir / "grpo") == []


def test_x1_training_killed_mid_run_reports_it_interrupted_and_trains_again(client: httpx.Client, save_dir: Path) -> None:
    """The x1 trainer's replica dies in the middle of a run: after Serve replaced it, the status
    says the run was interrupted (never that it still runs), and a new run trains and publishes."""
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    long_run = {"dataset": [{"messages": chat, "GAE": 1.0}] * 8, "num_epochs": 1000, "lr": 1e-5}
    assert client.post("/llm/train_from_dataset", json=long_run).status_code == 201
    wait_until(lambda: (client.get("/llm/").json()["training"]["progress"] or {}).get("step", 0) >= 2, 60, 0.2)
    kill_replica("llm-x1-policy")
    killed_at = time.monotonic()
    seen: list[int] = []
    status = wait_until(lambda: answered(client, "GET", "/llm/", seen), 60, 0.5, lambda: f"answers {seen[-5:]}").json()
    print(f"x1: status answers {seen}, {time.monotonic() - killed_at:.1f} s after the kill: {status['training']}")
    training = status["training"]
    assert training["running"] is False and training["last_run"]["interrupted"] is True, training
    assert "interrupted" in training["last_run"]["error"]
    before = status["model_version"]
    assert client.post("/llm/train_from_dataset", json={"dataset": [{"messages": chat, "GAE": 1.0}] * 2}).status_code == 201

    def trained() -> dict[str, Any] | None:
        now = client.get("/llm/").json()
        return None if now["training"]["running"] or now["model_version"] == before else now

    status = wait_until(trained, 60, 0.2, lambda: str(client.get("/llm/").json()))
    assert status["training"]["last_run"]["error"] is None and status["model_version"] == before + 1
    assert leftovers(save_dir) == []
