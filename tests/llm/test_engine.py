"""LLMEngine: batched generation through its queue, and weight swaps between batches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from policy_server.llm.engine import BatchReport, LLMEngine
from policy_server.llm.generation import GenerationParams
from policy_server.schema.llm import LLMPolicySpec


@pytest.fixture(scope="module")
def engine(llm_dirs: dict[str, Path]) -> LLMEngine:
    spec = LLMPolicySpec(path=llm_dirs["policy"])
    engine = LLMEngine(spec, spec.path, llm_dirs["policy_lora"], "cpu")
    yield engine
    engine.close()


def test_set_weights_swaps_the_adapter_and_answers_carry_the_new_version(engine: LLMEngine) -> None:
    params = GenerationParams(temperature=0, max_new_tokens=6)
    prompt = engine.generator.encode("What is 2 + 3?")
    before, version = asyncio.run(engine.generate(prompt, params))
    assert version == 0 and before[0].model_version == 0
    lora = {n: torch.zeros_like(p) for n, p in engine.lm.model.named_parameters() if "lora_B" in n}
    assert lora and engine.set_weights(lora, 1) == 1
    after, version = asyncio.run(engine.generate(prompt, params))
    assert version == 1 and after[0].model_version == 1
    # lora_B = 0 turns the adapter off: the answer is the base model's
    with engine.lm.model.disable_adapter():
        base = engine.generator.generate([prompt], params)[0][0]
    assert after[0].completion_ids == base.completion_ids


def test_weights_that_do_not_fit_change_nothing(engine: LLMEngine) -> None:
    version = engine.version
    with pytest.raises(ValueError, match="unknown"):
        engine.set_weights({"nope": torch.zeros(1)}, version + 1)
    name, param = next(iter(engine.lm.model.named_parameters()))
    with pytest.raises(ValueError, match="wrong shapes"):
        engine.set_weights({name: torch.zeros(param.numel() + 1)}, version + 1)
    assert engine.version == version


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_and_the_served_ones_stay(engine: LLMEngine, bad: float) -> None:
    version = engine.version
    params = GenerationParams(temperature=0, max_new_tokens=6)
    prompt = engine.generator.encode("What is 2 + 3?")
    before, _ = asyncio.run(engine.generate(prompt, params))
    served = {n: p.detach().clone() for n, p in engine.lm.model.named_parameters()}
    lora = {n: p.detach().clone() + 0.5 for n, p in engine.lm.model.named_parameters() if "lora_" in n}
    name = min(lora)
    lora[name].view(-1)[0] = bad
    with pytest.raises(ValueError, match=rf"refused weights: \['{name}'\] hold NaN or infinite values"):
        engine.set_weights(lora, version + 1)
    assert engine.version == version
    assert all(torch.equal(p, served[n]) for n, p in engine.lm.model.named_parameters())
    after, answered = asyncio.run(engine.generate(prompt, params))
    assert answered == version and after[0].completion_ids == before[0].completion_ids


def test_weights_are_checked_at_the_precision_of_the_parameter(engine: LLMEngine) -> None:
    name, param = next((n, p) for n, p in engine.lm.model.named_parameters() if "lora_A" in n)
    original, half = param.detach().clone(), param.detach().to(torch.float16)
    param.data = half  # as in a float16 model, where 1e5 does not fit
    try:
        with pytest.raises(ValueError, match="NaN or infinite"):
            engine.set_weights({name: torch.full(half.shape, 1e5)}, engine.version + 1)
        assert torch.equal(param.detach(), half)
    finally:
        param.data = original


def test_every_generate_call_is_reported_with_its_prompts_tokens_and_version(llm_dirs: dict[str, Path]) -> None:
    reports: list[BatchReport] = []
    spec = LLMPolicySpec(path=llm_dirs["policy"])
    engine = LLMEngine(spec, spec.path, None, "cpu", on_batch=reports.append)
    try:
        params = GenerationParams(temperature=0.7, max_new_tokens=5, min_new_tokens=5, num_samples=3, seed=1)
        prompt = engine.generator.encode("What is 2 + 3?")

        async def two_at_once() -> list[tuple[list, int]]:
            return await asyncio.gather(engine.generate(prompt, params), engine.generate(prompt, params))

        answers = asyncio.run(two_at_once())
    finally:
        engine.close()
    generated = sum(len(s.completion_ids) for samples, _ in answers for s in samples)
    assert generated == 2 * 3 * 5
    assert sum(r.prompts for r in reports) == 2 and sum(r.new_tokens for r in reports) == generated
    assert all(r.seconds > 0 and r.queued >= 0 and r.version == 0 for r in reports)
