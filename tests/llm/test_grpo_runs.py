"""GRPORuns: the runs of one policy; at most one of them trains the served model (``serve: true``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from policy_server.errors import InvalidRequest, NotFound, TooManyRuns
from policy_server.llm.engine import LLMEngine
from policy_server.llm.grpo import Served
from policy_server.llm.grpo_runs import GRPORuns
from policy_server.llm.grpo_settings import GRPOSettings

SERVING = GRPOSettings(serve=True, lora=False, group_size=2, max_completion_length=4, checkpoint_every=1)


def runs_of(llm_dirs: dict[str, Path], root: Path, engine: LLMEngine | None) -> GRPORuns:
    served = None if engine is None else Served.in_process(engine, adapter=False)
    return GRPORuns(llm_dirs["policy"], None, root, max_runs=3, served=served)


def test_one_serving_run_at_a_time(llm_dirs: dict[str, Path], tmp_path: Path, policy_engine: LLMEngine) -> None:
    runs = runs_of(llm_dirs, tmp_path, policy_engine)
    first = runs.start(SERVING)
    assert first["served_version"] == 1 and policy_engine.version == 1  # its starting weights, published
    with pytest.raises(TooManyRuns, match=f"run {first['run_id']} trains the served model") as refused:
        runs.start(SERVING)
    assert refused.value.status == 409
    own = runs.start(GRPOSettings(serve=False))  # a run on its own copy still starts
    assert own["served_version"] is None and policy_engine.version == 1
    runs.stop(first["run_id"])
    second = runs.start(SERVING)  # the slot is free again
    assert second["served_version"] == 2


def test_a_serving_run_resumed_after_a_restart_publishes_its_checkpoint(
    llm_dirs: dict[str, Path], tmp_path: Path, policy_engine: LLMEngine
) -> None:
    runs = runs_of(llm_dirs, tmp_path, policy_engine)
    run_id = runs.start(SERVING)["run_id"]
    group = runs.complete(run_id, "What is 3 + 4?")
    assert runs.rewards(run_id, group["group_id"], [1.0, 0.0])["served_version"] == 2
    trained = {n: p.detach().clone() for n, p in runs.run(run_id).lm.model.named_parameters()}

    restarted = runs_of(llm_dirs, tmp_path, policy_engine)  # a new process: the run comes from its checkpoint
    assert restarted.status(run_id)["cycle"] == 1 and policy_engine.version == 3
    served = dict(policy_engine.lm.model.named_parameters())
    for name, value in trained.items():
        torch.testing.assert_close(served[name].detach(), value, rtol=0, atol=0)
    with pytest.raises(TooManyRuns, match=f"run {run_id}"):
        restarted.start(SERVING)


def test_a_server_without_a_serving_engine_refuses_serve(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as refused:
        runs_of(llm_dirs, tmp_path, None).start(SERVING)
    assert refused.value.fields[0].field == "serve"


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_its_start(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """No checkpoint yet: the run starts again from the model it started on (a new adapter with the
    same initial weights) and trains its journaled cycles again, to the same weights."""
    runs = runs_of(llm_dirs, tmp_path, None)
    settings = GRPOSettings(lora=True, group_size=2, max_completion_length=4, lr=1e-2, checkpoint_every=100)
    run_id = runs.start(settings)["run_id"]
    for _ in range(2):
        group = runs.complete(run_id, "What is 3 + 4?")
        runs.rewards(run_id, group["group_id"], [1.0, 0.0])
    trained = {n: p.detach().clone() for n, p in runs.run(run_id).lm.model.named_parameters()}

    restarted = runs_of(llm_dirs, tmp_path, None)
    assert restarted.status(run_id)["cycle"] == 2
    resumed = dict(restarted.run(run_id).lm.model.named_parameters())
    assert resumed.keys() == trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(resumed[name].detach(), value, rtol=0, atol=0)
    with pytest.raises(NotFound):
        restarted.status("nope")


def test_a_finished_serving_run_resumed_publishes_nothing_and_holds_no_slot(
    llm_dirs: dict[str, Path], tmp_path: Path, policy_engine: LLMEngine
) -> None:
    runs = runs_of(llm_dirs, tmp_path, policy_engine)
    run_id = runs.start(SERVING)["run_id"]
    runs.stop(run_id)
    version = policy_engine.version
    restarted = runs_of(llm_dirs, tmp_path, policy_engine)
    assert restarted.status(run_id)["state"] == "finished" and policy_engine.version == version
    assert restarted.start(SERVING)["served_version"] == version + 1
