"""LLMEngine: batched generation through its queue, streaming, and weight swaps between batches."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from policy_server.errors import Conflict, InvalidRequest, QueueFull
from policy_server.llm.engine import BatchReport, LLMEngine, publish_next
from policy_server.llm.params import GenerationParams, Sample, SampleChunk, StructuredOutput
from policy_server.schema.llm import LLMPolicySpec, LLMTrainingSpec


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


def chat_prompt(engine: LLMEngine, question: str) -> list[int]:
    chat = [{"role": "user", "content": question}]
    return engine.lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)


def test_requests_with_different_seeds_share_a_batch_and_keep_their_samples(llm_dirs: dict[str, Path]) -> None:
    reports: list[BatchReport] = []
    spec = LLMPolicySpec(path=llm_dirs["policy"], limits={"batch_wait_ms": 500})
    engine = LLMEngine(spec, spec.path, None, "cpu", on_batch=reports.append)
    prompts = [chat_prompt(engine, q) for q in ("What is 3 + 4?", "Name a colour.")]
    base = GenerationParams(num_samples=2, temperature=1.5, max_new_tokens=10)
    requests = [(prompts[0], 1), (prompts[1], 2), (prompts[0], 3), (prompts[0], None)]
    try:
        async def together() -> list[tuple[list, int]]:
            return await asyncio.gather(
                *(engine.generate(p, dataclasses.replace(base, seed=seed)) for p, seed in requests)
            )

        batched = asyncio.run(together())
        assert [r.prompts for r in reports] == [4]  # one decode for four seeds
        alone = [engine.generator.generate([p], dataclasses.replace(base, seed=seed))[0] for p, seed in requests[:3]]
    finally:
        engine.close()
    for (samples, _), reference in zip(batched, alone):
        assert [s.completion_ids for s in samples] == [s.completion_ids for s in reference]
    assert batched[0][0][0].completion_ids != batched[2][0][0].completion_ids  # one prompt, two seeds


def collect(engine: LLMEngine, prompt: list[int], params: GenerationParams) -> list[SampleChunk]:
    async def run() -> list[SampleChunk]:
        return [chunk async for chunk in engine.stream(prompt, params)]

    return asyncio.run(run())


def joined(chunks: list[SampleChunk], index: int) -> Sample:
    """A sample's chunks put together, as a Sample (what generate answers)."""
    mine = [c for c in chunks if c.index == index]
    assert all(c.finish_reason is None for c in mine[:-1]) and mine[-1].finish_reason is not None
    tops = [t for c in mine for t in c.top_logprobs or []]
    return Sample(
        [], [t for c in mine for t in c.token_ids], [lp for c in mine for lp in c.log_probs],
        mine[-1].finish_reason, mine[-1].stop_string, top_logprobs=tops or None, model_version=mine[-1].model_version,
    )


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(num_samples=3, temperature=1.2, max_new_tokens=20, seed=4, top_logprobs=2),
        GenerationParams(num_samples=2, temperature=0, max_new_tokens=12, stop_strings=("+",)),
        GenerationParams(num_samples=2, strategy="beam_search", max_new_tokens=8, top_logprobs=1),
    ],
    ids=["sampling", "greedy", "beam_search"],
)
def test_streamed_chunks_concatenate_to_the_generated_samples(engine: LLMEngine, params: GenerationParams) -> None:
    prompt = chat_prompt(engine, "What is 12 + 25?")
    samples, version = asyncio.run(engine.generate(prompt, params))
    chunks = collect(engine, prompt, params)
    if params.strategy == "temperature":
        assert all(len(c.token_ids) == 1 for c in chunks)  # one chunk per decoding step
    assert {c.index for c in chunks} == set(range(params.num_samples))
    for j, s in enumerate(samples):
        streamed = joined(chunks, j)
        assert streamed.completion_ids == s.completion_ids and streamed.log_probs == s.log_probs
        assert (streamed.finish_reason, streamed.stop_string) == (s.finish_reason, s.stop_string)
        assert streamed.top_logprobs == s.top_logprobs and streamed.model_version == version


def test_closing_a_stream_stops_its_rows_and_the_batch_goes_on(llm_dirs: dict[str, Path]) -> None:
    reports: list[BatchReport] = []
    spec = LLMPolicySpec(path=llm_dirs["policy"], limits={"batch_wait_ms": 500})
    engine = LLMEngine(spec, spec.path, None, "cpu", on_batch=reports.append)
    prompt = chat_prompt(engine, "What is 3 + 4?")
    long = GenerationParams(num_samples=2, temperature=1.0, max_new_tokens=300, min_new_tokens=300, seed=0)

    async def run() -> tuple[list[SampleChunk], list]:
        other = asyncio.ensure_future(engine.generate(prompt, long))
        stream = engine.stream(prompt, long)
        read = [await anext(stream), await anext(stream), await anext(stream)]
        await stream.aclose()  # the client went away
        samples, _ = await other
        return read, samples

    try:
        read, samples = asyncio.run(run())
    finally:
        engine.close()
    assert [r.prompts for r in reports] == [2]  # both in one decode
    assert [len(s.completion_ids) for s in samples] == [300, 300]  # the other request ran to its end
    cut = reports[0].new_tokens - 600  # what the closed stream's two rows made
    assert len(read) == 3 and 2 <= cut < 300  # they stopped soon after the close, not at 2 x 300


def test_a_stream_that_does_not_fit_the_queue_is_refused(llm_dirs: dict[str, Path]) -> None:
    spec = LLMPolicySpec(path=llm_dirs["policy"], limits={"max_queued": 1})
    engine = LLMEngine(spec, spec.path, None, "cpu")
    prompt = chat_prompt(engine, "What is 3 + 4?")
    long = GenerationParams(temperature=1.0, max_new_tokens=200, min_new_tokens=200, seed=0)

    async def run() -> None:
        running = engine.stream(prompt, long)
        await anext(running)  # decoding: the queue is empty again
        waiting = engine.stream(prompt, long)
        queued = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0)  # let it enter the queue
        with pytest.raises(QueueFull, match="generation queue is full"):
            await anext(engine.stream(prompt, long))
        await running.aclose()
        assert (await queued).index == 0
        await waiting.aclose()

    try:
        asyncio.run(run())
    finally:
        engine.close()


def test_what_the_transformers_engine_cannot_do_is_refused_naming_the_field(engine: LLMEngine) -> None:
    prompt = chat_prompt(engine, "Hi")
    structured = GenerationParams(structured=StructuredOutput("json_object"))
    vocab = engine.generator.vocab_size
    for params, field, words in [
        (structured, "structured", "transformers engine cannot do structured outputs"),
        (GenerationParams(logit_bias=((vocab, 1.0), (1, 2.0))), "logit_bias", f"\\[{vocab}\\] are outside"),
        (GenerationParams(adapter="tiny-lora-a"), "adapter", "serves no adapters besides the policy's own"),
    ]:
        with pytest.raises(InvalidRequest, match=words) as raised:
            asyncio.run(engine.generate(prompt, params))
        assert [f.field for f in raised.value.fields] == [field]

        async def first_chunk(params: GenerationParams = params) -> SampleChunk:
            return await anext(engine.stream(prompt, params))

        with pytest.raises(InvalidRequest, match=words):
            asyncio.run(first_chunk())


def test_grpo_then_x1_publish_increasing_versions_and_an_older_one_is_refused(
    llm_dirs: dict[str, Path], tmp_path: Path, policy_engine: LLMEngine
) -> None:
    """GRPO and x1 training both publish into the served policy: each as the served version + 1,
    so the versions go up whoever publishes; a version not above the served one changes nothing."""
    from policy_server.llm.grpo import GRPORun, Served
    from policy_server.llm.grpo_settings import GRPOSettings
    from policy_server.llm.models import load_policy
    from policy_server.llm.x1_config import X1TrainingConfig
    from policy_server.llm.x1_trainer import X1Trainer

    settings = GRPOSettings(group_size=4, lr=1e-3, lora=False, max_completion_length=4, serve=True)
    run = GRPORun("g", load_policy(llm_dirs["policy"]), settings, tmp_path / "grpo",
                  served=Served.in_process(policy_engine, adapter=False))

    def grpo_cycle() -> int:
        group = run.complete("What is 2 + 3?")
        return int(run.submit_rewards(group["group_id"], [1.0, 0.0, 0.5, 0.0])["served_version"])

    x1 = X1Trainer("policy", lambda: load_policy(llm_dirs["policy"]), LLMTrainingSpec(save_dir=tmp_path / "x1"),
                   functools.partial(publish_next, policy_engine))
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}]

    def x1_run() -> int:
        x1.start(X1TrainingConfig(dataset=[{"messages": messages, "GAE": 1.0}], num_epochs=1))
        x1._thread.join()  # type: ignore[union-attr]
        assert x1.status()["last_run"]["error"] is None
        return int(x1.status()["model_version"])

    versions = [run.publish_served(), grpo_cycle(), x1_run(), grpo_cycle(), x1_run()]
    assert versions == [1, 2, 3, 4, 5] and policy_engine.version == 5

    served = {n: p.detach().clone() for n, p in policy_engine.lm.model.named_parameters()}
    name = next(iter(served))
    for older in (5, 4, 0, -1):
        with pytest.raises(Conflict, match=f"version {older} is not newer than the served version 5"):
            policy_engine.set_weights({name: torch.zeros_like(served[name])}, older)
    assert policy_engine.version == 5
    assert all(torch.equal(p, served[n]) for n, p in policy_engine.lm.model.named_parameters())
    assert policy_engine.set_weights({name: served[name] + 1}, 9) == 9  # newer, not necessarily the next
