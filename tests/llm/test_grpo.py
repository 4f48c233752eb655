"""GRPO runs with client-side rewards (policy_server.llm.grpo, grpo_step, grpo_checkpoints) on the tiny model;
the maths are in test_losses.py."""

from __future__ import annotations

import copy
import io
import math
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from policy_server.errors import Conflict, GroupLost, InvalidRequest, NotFound, RunFinished, StaleGroup
from policy_server.llm.engine import LLMEngine
from policy_server.llm.grpo import GRPORun, Served
from policy_server.llm.grpo_checkpoints import latest_checkpoint
from policy_server.llm.grpo_journal import JOURNAL_FILE
from policy_server.llm.grpo_settings import GRPOSettings
from policy_server.llm.grpo_step import completion_log_probs
from policy_server.llm.models import LoadedLM, load_policy
from policy_server.schema.llm import LLMPolicySpec

PROMPT = "What is 3 + 4?"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices: a second thread only adds contention (and nondeterminism) on a 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- runs on the tiny model --------------------------------------------------------------------------


def seven_reward(lm: LoadedLM, completion: dict) -> float:
    """The fraction of a completion's tokens that are " 7": rare at first, easy to make frequent."""
    (seven,) = lm.tokenizer.encode(" 7", add_special_tokens=False)
    ids = completion["token_ids"]
    return sum(t == seven for t in ids) / len(ids)


def full_settings(**overrides: object) -> GRPOSettings:
    base = {
        "group_size": 8,
        "lr": 1e-3,
        "lora": False,
        "chat": True,
        "max_completion_length": 16,
        "checkpoint_every": 1000,
    }
    return GRPOSettings(**{**base, **overrides})  # type: ignore[arg-type]


def play(run: GRPORun, lm: LoadedLM, cycles: int) -> list[float]:
    curve = []
    for _ in range(cycles):
        group = run.complete(PROMPT)
        answer = run.submit_rewards(group["group_id"], [seven_reward(lm, c) for c in group["completions"]])
        curve.append(answer["mean_reward"])
    return curve


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_reward_rises(llm_dirs: dict[str, Path], tmp_path: Path, seed: int) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("rise", lm, full_settings(seed=seed), tmp_path)
    curve = play(run, lm, 50)
    first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
    # Seen over seeds 0-4 (the example model trained 400 steps): first 0.08-0.22, last 0.50-1.00.
    assert first < 0.3
    assert last > 0.4
    assert last > first + 0.3
    status = run.status()
    assert status["cycle"] == 50 and status["rewards_received"] == 50 and status["groups_handed_out"] == 50
    assert status["reward_history"] == curve
    assert status["mean_reward"] == pytest.approx(sum(curve[-20:]) / 20)


def test_complete_returns_a_versioned_group_with_sampling_logprobs(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("r", lm, full_settings(group_size=4), tmp_path)
    group = run.complete(PROMPT)
    assert group["model_version"] == ["r", 0] and group["prompt"] == PROMPT
    assert len(group["completions"]) == 4
    prompt_ids = run._encode(PROMPT)
    completions = [c["token_ids"] for c in group["completions"]]
    for c in group["completions"]:
        assert len(c["token_ids"]) == len(c["logprobs"]) <= 16
        assert c["text"] == lm.tokenizer.decode(c["token_ids"], skip_special_tokens=True)
    # The trainer's teacher-forced log-probs reproduce the sampling ones: the first step is on policy.
    with torch.no_grad():
        log_probs, mask = completion_log_probs(lm.model, prompt_ids, completions, lm.device)
    for row, c in zip(range(4), group["completions"]):
        n = len(c["logprobs"])
        assert mask[row].sum() == n
        assert log_probs[row, :n].tolist() == pytest.approx(c["logprobs"], abs=1e-4)


def test_one_step_changes_every_parameter_and_not_the_reference(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("r", lm, full_settings(group_size=4), tmp_path)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    group = run.complete(PROMPT)
    answer = run.submit_rewards(group["group_id"], [1.0, 0.0, 0.5, 0.0])
    assert answer["model_version"] == ["r", 1] and answer["mean_reward"] == 0.375
    after = lm.model.state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    for k, v in run._reference.state_dict().items():
        assert torch.equal(v, before[k])


def test_lora_run_trains_only_the_adapter(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    lm = load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
    run = GRPORun("lora", lm, full_settings(lora=True, group_size=4), tmp_path)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    group = run.complete(PROMPT)
    run.submit_rewards(group["group_id"], [1.0, 0.0, 0.0, 0.0])
    changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if "lora_" in k}


def test_stale_group_is_rejected_and_counted(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("stale", lm, full_settings(group_size=2), tmp_path)
    a, b = run.complete(PROMPT), run.complete(PROMPT)
    run.submit_rewards(a["group_id"], [1.0, 0.0])
    with pytest.raises(StaleGroup, match="cycle 0.*cycle 1") as caught:
        run.submit_rewards(b["group_id"], [1.0, 0.0])
    assert (
        isinstance(caught.value, Conflict)
        and caught.value.status == 409
        and caught.value.code == "stale_group"
    )
    status = run.status()
    assert status["rejected_stale"] == 1 and status["rewards_received"] == 1 and status["cycle"] == 1
    with pytest.raises(NotFound):  # a rejected group is forgotten
        run.submit_rewards(b["group_id"], [1.0, 0.0])

    lagging = GRPORun(
        "lag",
        load_policy(llm_dirs["policy"]),
        full_settings(group_size=2, max_version_lag=1),
        tmp_path / "lag",
    )
    a, b = lagging.complete(PROMPT), lagging.complete(PROMPT)
    lagging.submit_rewards(a["group_id"], [1.0, 0.0])
    assert lagging.submit_rewards(b["group_id"], [0.0, 1.0])["model_version"] == ["lag", 2]


def test_unknown_group_and_bad_rewards(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    run = GRPORun("r", load_policy(llm_dirs["policy"]), full_settings(group_size=2), tmp_path)
    with pytest.raises(NotFound, match="no group 'nope'") as caught:
        run.submit_rewards("nope", [1.0, 0.0])
    assert caught.value.status == 404
    group = run.complete(PROMPT)
    for bad in ([1.0], [1.0, float("nan")], [1.0, "x"]):
        with pytest.raises(InvalidRequest):
            run.submit_rewards(group["group_id"], bad)  # type: ignore[arg-type]
    run.submit_rewards(group["group_id"], [1.0, 0.0])  # still pending after the refusals
    with pytest.raises(Conflict, match="already rewarded: it trained cycle 1"):  # rewarded once only
        run.submit_rewards(group["group_id"], [1.0, 0.0])


def test_finished_run_refuses_and_checkpoints(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    run = GRPORun("fin", load_policy(llm_dirs["policy"]), full_settings(group_size=2), tmp_path)
    group = run.complete(PROMPT)
    run.submit_rewards(group["group_id"], [1.0, 0.0])
    status = run.stop()
    assert status["state"] == "finished" and status["cycle"] == 1
    assert latest_checkpoint(tmp_path) == tmp_path / "cycle-00000001"
    assert run.stop()["state"] == "finished"  # idempotent
    for call in (lambda: run.complete(PROMPT), lambda: run.submit_rewards(group["group_id"], [1.0, 0.0])):
        with pytest.raises(RunFinished) as caught:
            call()
        assert caught.value.status == 409 and caught.value.code == "run_finished"


def test_save_archive_holds_the_model_folder(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    run = GRPORun(
        "arc",
        load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"]),
        full_settings(lora=True),
        tmp_path,
    )
    with tarfile.open(fileobj=io.BytesIO(run.save_archive()), mode="r:gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names


@pytest.mark.parametrize("lora", [False, True])
def test_resume_continues_the_cycle_count_and_reproduces_the_weights(
    llm_dirs: dict[str, Path], tmp_path: Path, lora: bool
) -> None:
    """A "restart" (everything from disk): the checkpoint of cycle 3, then cycle 4 trained again
    from the journal, to the same weights; a group handed out before is lost (410), and rewards
    sent again for a group that trained (checkpointed or journaled) are 409 naming its cycle."""
    adapter = llm_dirs["policy_lora"] if lora else None
    lm = load_policy(llm_dirs["policy"], adapter=adapter)
    settings = full_settings(lora=lora, group_size=4, checkpoint_every=3, lr=1e-3)
    run = GRPORun("res", lm, settings, tmp_path, base_path=llm_dirs["policy"])
    curve = play(run, lm, 2)
    groups = []
    for rewards in ([0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]):
        groups.append(run.complete(PROMPT))
        curve.append(run.submit_rewards(groups[-1]["group_id"], rewards)["mean_reward"])
        if len(curve) == 3:
            assert latest_checkpoint(tmp_path) == tmp_path / "cycle-00000003"
            assert not (tmp_path / JOURNAL_FILE).read_bytes()  # the checkpoint holds every cycle
    at_cycle_4 = {k: v.clone() for k, v in lm.model.state_dict().items()}
    pending = run.complete(PROMPT)

    resumed = GRPORun.resume("res", tmp_path)
    status = resumed.status()
    assert status["cycle"] == 4 and status["reward_history"] == curve and status["groups_handed_out"] == 4
    state = resumed.lm.model.state_dict()
    assert state.keys() == at_cycle_4.keys()
    for k, v in at_cycle_4.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    with pytest.raises(GroupLost, match="ask for new completions") as lost:
        resumed.submit_rewards(pending["group_id"], [0.0] * 4)
    assert lost.value.status == 410 and lost.value.code == "group_lost"
    for cycle, group in enumerate(groups, start=3):  # their answers were lost, say
        with pytest.raises(Conflict, match=f"already rewarded: it trained cycle {cycle}"):
            resumed.submit_rewards(group["group_id"], [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(NotFound):
        resumed.submit_rewards("no-such-group", [0.0] * 4)
    play(resumed, resumed.lm, 1)
    assert resumed.status()["model_version"] == ["res", 5]
    with pytest.raises(ValueError, match="belong to run res"):
        GRPORun.resume("other", tmp_path)


def test_a_stopped_run_stays_finished_when_resumed(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    run = GRPORun("fin", load_policy(llm_dirs["policy"]), full_settings(group_size=2), tmp_path, llm_dirs["policy"])
    play(run, run.lm, 1)
    run.stop()
    resumed = GRPORun.resume("fin", tmp_path)
    assert resumed.status()["state"] == "finished" and resumed.status()["cycle"] == 1
    with pytest.raises(RunFinished):
        resumed.complete(PROMPT)


def test_concurrent_clients_and_periodic_checkpoints(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("par", lm, full_settings(group_size=2, max_version_lag=100, checkpoint_every=2), tmp_path)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(3):
                group = run.complete(PROMPT)
                run.submit_rewards(group["group_id"], [seven_reward(lm, c) for c in group["completions"]])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    status = run.status()
    assert status["cycle"] == 12 and status["groups_handed_out"] == 12 and status["rewards_received"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cycle-00000010", "cycle-00000012", JOURNAL_FILE]
    assert not (tmp_path / JOURNAL_FILE).read_bytes()  # cycle 12 is checkpointed


# -- non-finite steps are refused -------------------------------------------------------------------


def optimizer_state(run: GRPORun) -> dict:
    return {i: {k: v.clone() for k, v in s.items()} for i, s in run.optimizer.state_dict()["state"].items()}


def test_a_non_finite_step_is_skipped_counted_and_not_checkpointed(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    rewards = [3e38, 3e38, 3e38, -3e38]  # valid float32 (1e39 is refused at submit); their spread overflows it
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("nf", lm, full_settings(group_size=4, checkpoint_every=2), tmp_path)
    group = run.complete(PROMPT)
    run.submit_rewards(group["group_id"], [1.0, 0.0, 0.5, 0.0])  # Adam has moments now
    weights, moments = {k: v.clone() for k, v in lm.model.state_dict().items()}, optimizer_state(run)

    group = run.complete(PROMPT)
    answer = run.submit_rewards(group["group_id"], rewards)
    assert answer["skipped"] and answer["reason"] == "data" and answer["loss"] is None
    assert answer["model_version"] == ["nf", 1]
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
    now = optimizer_state(run)
    assert now.keys() == moments.keys()
    assert all(torch.equal(now[i][k], v) for i, s in moments.items() for k, v in s.items())
    status = run.status()
    assert status["skipped_updates"] == 1 and status["cycle"] == 1 and status["rewards_received"] == 1
    assert status["last_error"].startswith("step skipped at cycle 1, model kept: non-finite data")
    assert latest_checkpoint(tmp_path) is None  # cycle 2 would have been checkpointed
    with pytest.raises(NotFound):  # the group was used up
        run.submit_rewards(group["group_id"], [1.0, 0.0, 0.0, 0.0])

    group = run.complete(PROMPT)
    answer = run.submit_rewards(group["group_id"], [0.0, 1.0, 0.0, 0.0])
    assert not answer["skipped"] and answer["model_version"] == ["nf", 2] and math.isfinite(answer["loss"])
    assert all(not torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
    assert latest_checkpoint(tmp_path) == tmp_path / "cycle-00000002"
    resumed = GRPORun.resume("nf", tmp_path, base_path=llm_dirs["policy"])
    assert resumed.status()["skipped_updates"] == 1


# -- serving runs: sampled by the serving engine, published into it ---------------------------------


def assert_serves(engine: LLMEngine, weights: dict[str, torch.Tensor]) -> None:
    served = dict(engine.lm.model.named_parameters())
    assert weights and set(weights) <= set(served)
    for name, value in weights.items():
        torch.testing.assert_close(served[name].detach(), value, rtol=0, atol=0)


def test_a_serving_run_samples_through_the_engine_and_publishes_every_cycle(
    llm_dirs: dict[str, Path], tmp_path: Path, policy_engine: LLMEngine
) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("srv", lm, full_settings(group_size=4, serve=True), tmp_path, served=Served.in_process(policy_engine, adapter=False))
    assert run.status()["served_version"] is None
    assert run.publish_served() == 1 and policy_engine.version == 1  # its starting weights
    assert run.publish_served() == 1  # nothing new: nothing published
    group = run.complete(PROMPT)
    assert group["served_version"] == 1 and group["model_version"] == ["srv", 0]
    # the engine's log-probs are the old policy's: the run's copy, teacher-forced, gives them back
    prompt_ids = run._encode(PROMPT)
    with torch.no_grad():
        log_probs, _ = completion_log_probs(lm.model, prompt_ids, [c["token_ids"] for c in group["completions"]], lm.device)
    for row, c in enumerate(group["completions"]):
        assert log_probs[row, : len(c["logprobs"])].tolist() == pytest.approx(c["logprobs"], abs=1e-4)

    answer = run.submit_rewards(group["group_id"], [1.0, 0.0, 0.5, 0.0])
    assert answer["served_version"] == 2 and answer["model_version"] == ["srv", 1]
    assert_serves(policy_engine, {n: p.detach() for n, p in lm.model.named_parameters()})
    assert run.status()["served_version"] == 2
    assert run.complete(PROMPT)["served_version"] == 2


def test_a_new_adapter_is_published_merged_into_a_plain_served_model(
    llm_dirs: dict[str, Path], tmp_path: Path, policy_engine: LLMEngine
) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = GRPORun("mrg", lm, full_settings(lora=True, group_size=4, serve=True), tmp_path,
                  served=Served.in_process(policy_engine, adapter=False))
    play(run, lm, 2)
    assert policy_engine.version == 3  # its starting weights, then one publish per cycle
    merged = copy.deepcopy(lm.model).merge_and_unload()
    assert_serves(policy_engine, {n: p.detach() for n, p in merged.named_parameters()})


def test_a_served_adapter_is_trained_and_published_alone(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    spec = LLMPolicySpec(path=llm_dirs["policy"])
    engine = LLMEngine(spec, spec.path, llm_dirs["policy_lora"], "cpu")
    try:
        lm = load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
        served = Served.in_process(engine, adapter=True)
        with pytest.raises(InvalidRequest, match="lora") as refused:
            GRPORun("a", lm, full_settings(lora=False, serve=True), tmp_path, served=served)
        assert refused.value.fields[0].field == "lora"
        run = GRPORun("a", lm, full_settings(lora=True, group_size=4, serve=True), tmp_path, served=served)
        published: list[set[str]] = []
        run.served = Served(served.generate, lambda w: published.append(set(w)) or served.publish(w), adapter=True)
        play(run, lm, 1)
        adapter = {n: p.detach() for n, p in lm.model.named_parameters() if "lora_" in n}
        assert published == [set(adapter), set(adapter)]
        assert_serves(engine, adapter)
    finally:
        engine.close()


def test_a_resumed_serving_run_publishes_its_checkpoint_first(
    llm_dirs: dict[str, Path], tmp_path: Path, policy_engine: LLMEngine
) -> None:
    base = {n: p.detach().clone() for n, p in policy_engine.lm.model.named_parameters()}
    lm = load_policy(llm_dirs["policy"])
    settings = full_settings(group_size=4, serve=True, checkpoint_every=2)
    run = GRPORun("res", lm, settings, tmp_path, served=Served.in_process(policy_engine, adapter=False))
    play(run, lm, 2)
    trained = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    policy_engine.set_weights(base, 10)  # someone else's weights are served now

    resumed = GRPORun.resume("res", tmp_path, base_path=llm_dirs["policy"], served=Served.in_process(policy_engine, adapter=False))
    assert resumed.publish_served() == 11
    assert_serves(policy_engine, trained)
    assert resumed.status()["cycle"] == 2 and resumed.complete(PROMPT)["served_version"] == 11


def test_a_serving_run_needs_the_engine(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="serving engine"):
        GRPORun("x", load_policy(llm_dirs["policy"]), full_settings(serve=True), tmp_path)


def test_resuming_removes_what_a_killed_save_left_and_finds_the_last_whole_checkpoint(tmp_path: Path) -> None:
    whole = tmp_path / "cycle-00000002"
    whole.mkdir()
    (whole / "state.json").write_text("{}")
    half = tmp_path / ".cycle-00000003.partial-0123456789ab"  # its writer was killed: nobody holds its lock
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cycle-00000002"]
