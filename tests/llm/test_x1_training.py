"""x1 training on the tiny models (policy_server.llm.x1_training): PPO, MSE, LoRA, stop, save."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from policy_server.errors import InvalidRequest
from policy_server.llm.datasets import PolicySample, ValueSample, encode_last_message, parse_samples
from policy_server.llm.losses import token_log_probs
from policy_server.llm.models import LoadedLM, load_policy, load_value
from policy_server.llm.x1_config import LoraSettings, X1TrainingConfig
from policy_server.llm.x1_trainer import X1Trainer
from policy_server.llm.x1_training import TrainingRun
from policy_server.schema.llm import LLMTrainingSpec

QUESTION = {"role": "user", "content": "What is 2 + 2?"}
GOOD = [QUESTION, {"role": "assistant", "content": "The answer is 4."}]
BAD = [QUESTION, {"role": "assistant", "content": "The answer is 5."}]
OTHER = [{"role": "user", "content": "Sort the letters of cab."}, {"role": "assistant", "content": "abc"}]
# Positive advantages only: GOOD and BAD share all tokens but the last digit, so pushing BAD down
# would push most of GOOD down too.
POLICY_SAMPLES = [PolicySample(GOOD, 1.0), PolicySample(OTHER, 0.5)]
VALUE_SAMPLES = [ValueSample(GOOD, 0.8), ValueSample(OTHER, -0.8)]
# One minibatch holds the whole dataset, so the losses of successive steps compare.
FAST = {"lr": 3e-3, "num_epochs": 4}
FAST_BATCH = 2


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices gain nothing from a second thread on a 2-core machine (see build_tiny_model.fit).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.module.named_parameters() if p.requires_grad}


def assert_all_changed(before: dict[str, torch.Tensor], run: TrainingRun) -> None:
    after = dict(run.module.named_parameters())
    unchanged = [name for name, value in before.items() if torch.equal(value, after[name].detach())]
    assert before and not unchanged, f"parameters that did not change: {unchanged}"


def answer_log_prob(lm: LoadedLM, messages: list[dict[str, str]]) -> float:
    ids, mask = encode_last_message(lm.tokenizer, messages, 512)
    batch = torch.tensor([ids])
    with torch.no_grad():
        log_probs = token_log_probs(lm.model(input_ids=batch).logits, batch)[0]
    return float((log_probs * torch.tensor(mask[1:])).sum())


def train(run: TrainingRun, samples: list[Any], **kwargs: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    steps: list[dict[str, Any]] = []
    summary = run.run(samples, on_step=steps.append, **kwargs)
    return summary, steps


def test_ppo_full_fine_tuning_reinforces_the_good_answer(llm_dirs: dict[str, Path]) -> None:
    lm = load_policy(llm_dirs["policy"])
    # Every weight moves in full fine-tuning: a smaller step than the adapter's keeps the loss monotone.
    run = TrainingRun(lm, X1TrainingConfig(**{**FAST, "lr": 3e-4}), batch_size=FAST_BATCH)
    before, good = snapshot(run), answer_log_prob(lm, GOOD)
    assert len(before) == len(list(lm.model.parameters()))  # full fine-tuning
    summary, steps = train(run, POLICY_SAMPLES)
    assert summary == {
        "step": 4,
        "total_steps": 4,
        "epoch": 3,
        "loss": steps[-1]["loss"],
        "running": False,
        "skipped_steps": 0,
        "last_error": None,
        "stopped": False,
    }
    losses = [step["loss"] for step in steps]
    assert losses[-1] < losses[0], losses
    assert {"pg_loss", "kl", "approx_kl", "clip_frac", "entropy"} <= set(steps[0])
    assert_all_changed(before, run)
    assert not lm.model.training
    assert answer_log_prob(lm, GOOD) > good


def test_ppo_with_adapter_trains_only_the_adapter_and_saves_it(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    lm = load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
    run = TrainingRun(lm, X1TrainingConfig(**FAST), batch_size=FAST_BATCH)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" not in n}
    before, good = snapshot(run), answer_log_prob(lm, GOOD)
    assert before and all("lora_" in name for name in before)
    _, steps = train(run, POLICY_SAMPLES)
    losses = [step["loss"] for step in steps]
    assert losses[-1] < losses[0], losses
    assert steps[0]["kl"] > 0  # the reference is the base model without the adapter
    assert_all_changed(before, run)
    assert all(torch.equal(p, dict(lm.model.named_parameters())[n]) for n, p in base.items())
    assert answer_log_prob(lm, GOOD) > good

    saved = run.save(tmp_path / "adapter")
    assert (saved / "adapter_config.json").is_file() and not (saved / "config.json").exists()
    reloaded = load_policy(llm_dirs["policy"], adapter=saved)
    assert answer_log_prob(reloaded, GOOD) == pytest.approx(answer_log_prob(lm, GOOD), abs=1e-4)


def test_new_lora_wraps_a_plain_policy(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    lm = load_policy(llm_dirs["policy"])
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    run = TrainingRun(
        lm, X1TrainingConfig(lora=settings, **FAST), batch_size=FAST_BATCH, lora_target_modules=r".*\.(q_proj|v_proj)"
    )
    before = snapshot(run)
    assert before and all("lora_" in name for name in before)
    _, steps = train(run, POLICY_SAMPLES)
    assert steps[-1]["loss"] < steps[0]["loss"]
    # peft starts B at zero, so A only moves after B has: every adapter tensor still changes in 4 steps.
    assert_all_changed(before, run)
    reloaded = load_policy(llm_dirs["policy"], adapter=run.save(tmp_path / "new-adapter"))
    assert answer_log_prob(reloaded, GOOD) == pytest.approx(answer_log_prob(lm, GOOD), abs=1e-4)


def test_value_mse_moves_scores_to_targets_and_reloads(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    value = load_value(llm_dirs["value"])
    run = TrainingRun(value, X1TrainingConfig(lr=3e-4, num_epochs=6), batch_size=2)
    before = snapshot(run)
    assert len(before) == len(list(value.model.parameters()))
    _, steps = train(run, VALUE_SAMPLES)
    losses = [step["loss"] for step in steps]
    assert losses[-1] < losses[0] / 4, losses
    assert_all_changed(before, run)

    saved = run.save(tmp_path / "value")
    reloaded = load_value(saved)
    batch = value.tokenizer(
        [value.tokenizer.apply_chat_template(m, tokenize=False) for m in (GOOD, OTHER)],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        trained = value.model.scores(batch["input_ids"], batch["attention_mask"])
        again = reloaded.model.scores(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(again, trained)
    assert trained[0] > 0 > trained[1]


def test_stop_interrupts_within_one_step_and_save_replaces_atomically(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    lm = load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
    run = TrainingRun(lm, X1TrainingConfig(lr=1e-3, num_epochs=5), batch_size=1)
    steps: list[dict[str, Any]] = []
    summary = run.run(POLICY_SAMPLES, should_stop=lambda: len(steps) >= 1, on_step=steps.append)
    assert summary["stopped"] and summary["step"] == 1 and summary["total_steps"] == 10
    assert run.progress() == {
        "step": 1,
        "total_steps": 10,
        "epoch": 0,
        "loss": steps[0]["loss"],
        "running": False,
        "skipped_steps": 0,
        "last_error": None,
    }

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an earlier save")
    assert run.save(folder) == folder
    assert not (folder / "stale.txt").exists() and (folder / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left
    reloaded = load_policy(llm_dirs["policy"], adapter=folder)
    assert answer_log_prob(reloaded, GOOD) == pytest.approx(answer_log_prob(lm, GOOD), abs=1e-4)


def test_sample_logprobs_are_the_old_policy(llm_dirs: dict[str, Path]) -> None:
    lm = load_policy(llm_dirs["policy"])
    run = TrainingRun(lm, X1TrainingConfig(), batch_size=2)
    _, mask = encode_last_message(lm.tokenizer, GOOD, 512)
    count = sum(mask)
    # The generating policy gave the answer a far lower probability: every ratio is clipped at once.
    low = parse_samples([{"messages": GOOD, "GAE": 1.0, "logprobs": [-20.0] * count}], "policy")
    _, steps = train(run, low)
    assert steps[0]["clip_frac"] == 1.0
    with pytest.raises(InvalidRequest, match=r"^dataset\.0\.logprobs: has 1 values"):
        run.run(parse_samples([{"messages": GOOD, "GAE": 1.0, "logprobs": [-1.0]}], "policy"))


# --- non-finite steps are refused -----------------------------------------------------------------

HUGE = 3e38  # valid float32: a dataset may hold it; its square (the MSE) overflows


def test_a_non_finite_value_step_is_skipped_and_the_weights_stay(llm_dirs: dict[str, Path]) -> None:
    value = load_value(llm_dirs["value"])
    run = TrainingRun(value, X1TrainingConfig(lr=3e-4, num_epochs=2), batch_size=1)
    before = snapshot(run)
    summary, steps = train(run, [ValueSample(GOOD, HUGE)])
    assert steps == [] and summary["step"] == 2 and summary["skipped_steps"] == 2 and summary["loss"] is None
    assert summary["last_error"] == "step skipped, weights kept: non-finite loss in the loss at epoch 1 step 2"
    after = dict(run.module.named_parameters())
    assert all(torch.equal(v, after[n].detach()) for n, v in before.items())
    assert all(p.grad is None for p in run.parameters)


@pytest.mark.parametrize("kind", ["policy", "value"])
def test_training_goes_on_past_a_skipped_step(llm_dirs: dict[str, Path], kind: str) -> None:
    if kind == "policy":
        model = load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
        samples: list[Any] = [PolicySample(GOOD, 1.0), PolicySample(OTHER, math.inf)]
    else:
        model = load_value(llm_dirs["value"])
        samples = [ValueSample(GOOD, 0.8), ValueSample(OTHER, HUGE)]
    run = TrainingRun(model, X1TrainingConfig(lr=1e-3, num_epochs=2), batch_size=1)
    before = snapshot(run)
    summary, steps = train(run, samples)
    assert summary["step"] == 4 and summary["skipped_steps"] == 2 and len(steps) == 2
    assert "non-finite" in summary["last_error"] and math.isfinite(summary["loss"])
    assert_all_changed(before, run)
    assert all(torch.isfinite(p).all() for p in run.parameters)


def test_a_run_whose_every_step_was_skipped_publishes_and_saves_nothing(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    published: list[int] = []

    def publish(weights: dict[str, Any]) -> int:  # a served model at version 0 until now
        published.append(len(published) + 1)
        return published[-1]

    trainer = X1Trainer(
        "policy", lambda: load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"]),
        LLMTrainingSpec(save_dir=tmp_path), publish,
    )
    trainer.start(X1TrainingConfig(dataset=[{"messages": GOOD, "GAE": HUGE}], num_epochs=1))  # valid float32
    trainer._thread.join()  # type: ignore[union-attr]
    status = trainer.status()
    assert published == [] and status["model_version"] == 0 and not (tmp_path / "policy").exists()
    assert status["last_run"]["skipped_steps"] == 1 and "non-finite loss" in status["last_run"]["error"]

    trainer.start(X1TrainingConfig(dataset=[{"messages": GOOD, "GAE": 1.0}], num_epochs=1))
    trainer._thread.join()  # type: ignore[union-attr]
    assert published == [1] and trainer.status()["last_run"]["error"] is None and (tmp_path / "policy").is_dir()


def test_a_trainer_opening_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    half = tmp_path / ".policy.partial-0123456789ab"  # a save killed half-way: nobody holds its lock
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "policy").mkdir()  # the last whole save stays
    X1Trainer("policy", lambda: None, LLMTrainingSpec(save_dir=tmp_path), lambda weights: 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_a_trainer_that_died_mid_run_is_reported_interrupted_by_the_next_one(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A new trainer on the same save_dir (a new process after the old one died): the run that was
    going is reported interrupted, never running; a run that ended is reported as it ended."""
    spec = LLMTrainingSpec(save_dir=tmp_path)
    versions = iter(range(1, 10))

    def trainer() -> X1Trainer:
        return X1Trainer("policy", lambda: load_policy(llm_dirs["policy"]), spec, lambda weights: next(versions))

    first = trainer()
    first.start(X1TrainingConfig(dataset=[{"messages": GOOD, "GAE": 1.0}], num_epochs=1))
    first._thread.join()  # type: ignore[union-attr]
    assert trainer().status()["last_run"] == first.status()["last_run"] and trainer().status()["model_version"] == 1

    second = trainer()
    second.start(X1TrainingConfig(dataset=[{"messages": GOOD, "GAE": 1.0}], num_epochs=1000))
    after_death = trainer().status()  # the second's process "died": its run was going
    second.stop()
    assert after_death["running"] is False and after_death["model_version"] == 1
    assert after_death["last_run"]["interrupted"] is True and "start it again" in after_death["last_run"]["error"]
