"""VLLMEngine on the tiny Llama: one real vLLM engine (CPU) for the whole module, few fat tests.

Run under ``flock /tmp/ray.lock``: a vLLM engine is as heavy as a Ray session on this machine.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import numpy as np
import pytest
import torch

from policy_server.errors import InvalidRequest, QueueFull
from policy_server.llm.engine import BatchReport
from policy_server.llm.engines import open_policy_engine
from policy_server.llm.generation import Generator
from policy_server.llm.models import load_policy
from policy_server.llm.params import GenerationParams, Sample, StructuredOutput
from policy_server.schema.llm import LLMPolicySpec

if TYPE_CHECKING:  # importing vLLM at collection would hit the DeprecationWarning below outside its filter
    from policy_server.llm.vllm_engine import VLLMEngine

# vLLM's import runs torch.compile, which imports torch.utils.mkldnn and its deprecated torch.jit.script_method

MAX_QUEUED = 20
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reports() -> list[BatchReport]:
    return []


@pytest.fixture(scope="module")
def engine(llm_dirs: dict[str, Path], reports: list[BatchReport]) -> Iterator[Any]:
    spec = LLMPolicySpec(path=llm_dirs["policy"], limits={"max_new_tokens": 64, "max_queued": MAX_QUEUED},
                         weight_transfer="gloo")  # set_weights and the direct path, both
    opened = open_policy_engine(spec, llm_dirs["policy"], None, "cpu", on_batch=reports.append)
    assert type(opened).__name__ == "VLLMEngine"
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def teacher(llm_dirs: dict[str, Path]) -> Generator:
    """The same model on transformers, for teacher-forced log-probs and beam search."""
    return Generator(load_policy(llm_dirs["policy"], dtype="float32", device="cpu"))


def prompt(engine: VLLMEngine, question: str = "What is 2 + 3?") -> list[int]:
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(engine: VLLMEngine, ids: list[int], **params: Any) -> tuple[list[Sample], int]:
    return asyncio.run(engine.generate(ids, GenerationParams(**params)))


def full_log_probs(teacher: Generator, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-probs of the token after each prefix of ``ids`` (teacher forcing)."""
    with torch.inference_mode():
        logits = teacher.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_samples_carry_raw_log_probs_stops_seeds_and_versions(
    engine: VLLMEngine, teacher: Generator, reports: list[BatchReport]
) -> None:
    ids = prompt(engine)
    samples, version = generate(engine, ids, num_samples=4, temperature=1.0, max_new_tokens=40, seed=11)
    assert len(samples) == 4 and version == 0
    assert len({tuple(s.completion_ids) for s in samples}) > 1
    for s in samples:
        assert s.prompt_ids == ids and s.model_version == 0
        assert len(s.log_probs) == len(s.completion_ids) > 0
        np.testing.assert_allclose(s.log_probs, teacher.log_probs(ids, s.completion_ids), atol=TOLERANCE)
        if s.finish_reason == "stop":  # the default stops: the step and end tokens, their tokens kept
            assert s.stop_string in (engine.spec.step_token, engine.spec.end_token)
            assert s.text(engine.tokenizer, skip_special_tokens=False).endswith(s.stop_string)
        else:
            assert s.stop_string is None and len(s.completion_ids) == 40
    again, _ = generate(engine, ids, num_samples=4, temperature=1.0, max_new_tokens=40, seed=11)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples]
    assert reports and reports[-1].new_tokens == sum(len(s.completion_ids) for s in again)

    # a stop string inside the greedy text ends the sample on the token that completes it
    (greedy,), _ = generate(engine, ids, temperature=0.0, max_new_tokens=24, stop_strings=("@@",))
    text = greedy.text(engine.tokenizer, skip_special_tokens=False)
    stop = text[3:5]
    (stopped,), _ = generate(engine, ids, temperature=0.0, max_new_tokens=24, stop_strings=(stop, "@@"))
    assert stopped.finish_reason == "stop" and stopped.stop_string == stop
    assert stopped.completion_ids == greedy.completion_ids[: len(stopped.completion_ids)]
    stopped_text = stopped.text(engine.tokenizer, skip_special_tokens=False)
    assert stop in stopped_text and stop not in engine.tokenizer.decode(
        stopped.completion_ids[:-1], skip_special_tokens=False
    )

    with pytest.raises(InvalidRequest, match=re.escape("no adapter 'tiny-lora-z'; llm.policy.adapters has []")) as refused:
        generate(engine, ids, adapter="tiny-lora-z")
    assert refused.value.fields[0].field == "adapter"


def test_top_and_prompt_log_probs_are_the_models(engine: VLLMEngine, teacher: Generator) -> None:
    ids = prompt(engine, "Tom has 3 apples and buys 4 more. How many?")
    (s,), _ = generate(engine, ids, temperature=0.0, max_new_tokens=12, top_logprobs=3, prompt_logprobs=True)
    full = full_log_probs(teacher, ids + s.completion_ids)
    assert s.top_logprobs is not None and len(s.top_logprobs) == len(s.completion_ids)
    for t, (token, top) in enumerate(zip(s.completion_ids, s.top_logprobs)):
        expected = full[len(ids) - 1 + t].topk(3)
        assert token in top and len(top) == 3
        assert sorted(top) == sorted(expected.indices.tolist())
        np.testing.assert_allclose(sorted(top.values()), sorted(expected.values.tolist()), atol=TOLERANCE)
    (sampled,), _ = generate(engine, ids, temperature=1.0, seed=3, max_new_tokens=24, top_logprobs=1)
    assert sampled.top_logprobs is not None
    for token, lp, top in zip(sampled.completion_ids, sampled.log_probs, sampled.top_logprobs):
        # the most likely token, then the sampled one when it is another (OpenAI's "up to logprobs + 1")
        assert top[token] == pytest.approx(lp) and len(top) == (1 if next(iter(top)) == token else 2)
        assert next(iter(top)) == max(top, key=lambda t: top[t])
    assert s.prompt_logprobs is not None and s.prompt_logprobs[0] is None
    expected_prompt = full[: len(ids) - 1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    np.testing.assert_allclose(s.prompt_logprobs[1:], expected_prompt.tolist(), atol=TOLERANCE)
    assert s.prompt_top_logprobs is not None and s.prompt_top_logprobs[0] is None
    for place, (token, top) in enumerate(zip(ids[1:], s.prompt_top_logprobs[1:])):  # echo's alternatives
        best = full[place].topk(3)
        assert top is not None and set(list(top)[:3]) == set(best.indices.tolist())
        np.testing.assert_allclose(sorted(list(top.values())[:3]), sorted(best.values.tolist()), atol=TOLERANCE)
        assert top[token] == pytest.approx(s.prompt_logprobs[place + 1]) and len(top) in (3, 4)


def test_structured_output_follows_the_json_schema(engine: VLLMEngine) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}}, "required": ["answer"],
              "additionalProperties": False}
    structured = StructuredOutput("json_schema", json.dumps(schema))
    samples, _ = generate(engine, prompt(engine), num_samples=3, temperature=1.0, seed=3, max_new_tokens=64,
                          structured=structured)
    for s in samples:
        text = s.text(engine.tokenizer)
        assert s.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    # no step-token stop: it could end a JSON string early
    (obj,), _ = generate(engine, prompt(engine), temperature=0.0, max_new_tokens=64, stop_strings=(),
                         structured=StructuredOutput("json_object"))
    text = obj.text(engine.tokenizer)
    assert obj.finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_what_vllm_refuses_is_an_invalid_request_naming_our_field(engine: VLLMEngine) -> None:
    """x1's routes allow temperatures up to 10; vLLM's sampler takes up to 2: a 422, never a 500."""
    with pytest.raises(InvalidRequest) as refused:
        generate(engine, prompt(engine), temperature=5.0, max_new_tokens=4)
    assert refused.value.fields[0].field == "temperature" and "[0, 2]" in refused.value.message


def test_stream_concatenates_to_the_sample_and_closing_it_aborts(
    engine: VLLMEngine, reports: list[BatchReport]
) -> None:
    ids = prompt(engine)
    params = GenerationParams(num_samples=2, temperature=1.0, seed=5, max_new_tokens=32, top_logprobs=2)

    async def collect() -> list[list[Any]]:
        chunks = [c async for c in engine.stream(ids, params)]
        return [[c for c in chunks if c.index == i] for i in range(2)]

    by_sample = asyncio.run(collect())
    samples, _ = generate(engine, ids, num_samples=2, temperature=1.0, seed=5, max_new_tokens=32, top_logprobs=2)
    for chunks, s in zip(by_sample, samples):
        assert len(chunks) > 1 and all(c.finish_reason is None for c in chunks[:-1])
        assert [t for c in chunks for t in c.token_ids] == s.completion_ids
        assert [x for c in chunks for x in c.log_probs] == s.log_probs
        assert [x for c in chunks for x in c.top_logprobs or []] == s.top_logprobs
        assert (chunks[-1].finish_reason, chunks[-1].stop_string) == (s.finish_reason, s.stop_string)

    async def close_early() -> int:
        stream = engine.stream(ids, GenerationParams(temperature=1.0, max_new_tokens=64, stop_strings=("@@@",)))
        await anext(stream)
        running = engine.unfinished_requests()
        await stream.aclose()  # type: ignore[attr-defined]
        return running

    reported = len(reports)
    assert asyncio.run(close_early()) == 1
    deadline = time.monotonic() + 10
    while (engine.unfinished_requests() or len(reports) == reported) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.unfinished_requests() == 0
    assert len(reports) == reported + 1 and reports[-1].new_tokens >= 1  # the tokens it sent are counted


def test_the_direct_transport_streams_from_the_engines_loop_and_a_reader_that_leaves_aborts(
    engine: VLLMEngine,
) -> None:
    """serving.llm_transport on vLLM's own loop: the chunks ``stream`` gives, an engine refusal as
    itself, and a gateway that closes the connection aborts the vLLM request."""
    from contextlib import aclosing

    from policy_server.serving.llm_transport import DirectLLMStreams, LLMStreamServer, engine_streams

    streams, loop = engine_streams(engine)
    assert loop is engine._loop.loop
    token = "ab" * 32
    server = LLMStreamServer(streams, token, "127.0.0.1", loop)
    ids = prompt(engine)
    params = GenerationParams(num_samples=2, temperature=1.0, seed=7, max_new_tokens=16, top_logprobs=1)

    async def listed() -> list[tuple[str, int, str]]:
        return [(*server.address, token)]

    async def no_fallback(prompt_ids: list[int], p: GenerationParams) -> Any:
        raise AssertionError("the direct path was not used")
        yield

    async def run() -> tuple[list[Any], int]:
        direct = DirectLLMStreams(listed, no_fallback)
        async with aclosing(direct.stream(ids, params)) as chunks:
            got = [c async for c in chunks]
        with pytest.raises(InvalidRequest):
            async with aclosing(direct.stream(ids, GenerationParams(adapter="no-such-adapter"))) as chunks:
                [c async for c in chunks]
        long = GenerationParams(temperature=1.0, max_new_tokens=64, stop_strings=("@@@",))
        async with aclosing(direct.stream(ids, long)) as chunks:
            await anext(chunks)
            running = engine.unfinished_requests()
        return got, running

    try:
        chunks, running = asyncio.run(run())
    finally:
        server.close()
    samples, _ = generate(engine, ids, num_samples=2, temperature=1.0, seed=7, max_new_tokens=16, top_logprobs=1)
    for i, s in enumerate(samples):
        assert [t for c in chunks if c.index == i for t in c.token_ids] == s.completion_ids
    assert running == 1
    deadline = time.monotonic() + 10
    while engine.unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.unfinished_requests() == 0


def test_weights_swap_in_place_under_load_and_a_full_wait_list_answers_429(engine: VLLMEngine) -> None:
    ids = prompt(engine)
    (before,), _ = generate(engine, ids, temperature=0.0, max_new_tokens=16, stop_strings=("@@@",))
    original = engine.get_weights()
    name = "model.norm.weight"
    long = GenerationParams(temperature=1.0, max_new_tokens=64, min_new_tokens=64)

    async def swap_under_load() -> list[Any]:
        loads = [asyncio.ensure_future(engine.generate(ids, long)) for _ in range(16)]
        while engine.unfinished_requests() == 0:  # swap as soon as vLLM holds them
            await asyncio.sleep(0.002)
        await asyncio.to_thread(engine.set_weights, {name: -original[name]}, 1)
        return await asyncio.gather(*loads, return_exceptions=True)

    try:
        answers = asyncio.run(swap_under_load())
        assert [a for a in answers if isinstance(a, BaseException)] == []
        assert 1 in {version for _, version in answers} <= {0, 1}  # some were in flight across the swap
        assert all(len(samples[0].completion_ids) == 64 for samples, _ in answers)
        (after,), version = generate(engine, ids, temperature=0.0, max_new_tokens=16, stop_strings=("@@@",))
        assert version == after.model_version == engine.version == 1
        assert after.completion_ids != before.completion_ids

        with pytest.raises(ValueError, match="NaN or infinite"):
            engine.set_weights({name: np.full_like(original[name], np.nan)}, 2)
        with pytest.raises(ValueError, match="unknown"):
            engine.set_weights({"no.such.weight": original[name]}, 2)
        assert engine.version == 1
    finally:
        assert engine.set_weights({name: original[name]}, 2) == 2
    (restored,), version = generate(engine, ids, temperature=0.0, max_new_tokens=16, stop_strings=("@@@",))
    assert (restored.completion_ids, version) == (before.completion_ids, 2)
    np.testing.assert_allclose(restored.log_probs, before.log_probs, atol=TOLERANCE)

    async def flood() -> list[Any]:
        calls = [engine.generate(ids, long) for _ in range(MAX_QUEUED + 4)]
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(flood())
    refused = [a for a in answers if isinstance(a, QueueFull)]
    assert len(refused) == 4 and refused[0].status == 429 and refused[0].retry_after_s == 1
    assert sum(isinstance(a, tuple) for a in answers) == MAX_QUEUED


def test_a_trainer_broadcasts_every_weight_into_the_worker_under_load_as_set_weights_would_load_them(
    engine: VLLMEngine, llm_dirs: dict[str, Path]
) -> None:
    """``weight_transfer: gloo``: this process is the trainer (rank 0) and broadcasts straight into
    vLLM's worker through vLLM's weight-transfer API (``vllm_transfer``, ``weight_publish``). New
    values for the tied embedding and the final norm, sent while 16 requests run: none fails, and
    the engine then answers exactly as after ``set_weights`` of the same values."""
    from policy_server.llm.weight_publish import LocalReplicas, TransferReceiver, WeightPublisher

    ids = prompt(engine)
    greedy = {"temperature": 0.0, "max_new_tokens": 16, "stop_strings": ("@@@",)}
    (before,), _ = generate(engine, ids, **greedy)
    original = {n: torch.from_numpy(a) for n, a in engine.get_weights().items()}
    changed = {**original, "model.embed_tokens.weight": 1.5 * original["model.embed_tokens.weight"],
               "model.norm.weight": -original["model.norm.weight"]}
    receiver = TransferReceiver(engine, "float32", llm_dirs["policy"], "local")
    publisher = WeightPublisher(LocalReplicas(receiver), "127.0.0.1")
    long = GenerationParams(temperature=1.0, max_new_tokens=64, min_new_tokens=64)
    start = engine.version

    async def publish_under_load() -> list[Any]:
        loads = [asyncio.ensure_future(engine.generate(ids, long)) for _ in range(16)]
        while engine.unfinished_requests() == 0:
            await asyncio.sleep(0.002)
        await asyncio.to_thread(publisher.publish, changed)
        return await asyncio.gather(*loads, return_exceptions=True)

    try:
        answers = asyncio.run(publish_under_load())
        assert publisher.path == "gloo" and engine.version == start + 1
        assert [a for a in answers if isinstance(a, BaseException)] == []
        assert start + 1 in {version for _, version in answers} <= {start, start + 1}
        (direct,), version = generate(engine, ids, **greedy)
        assert version == start + 1 and direct.completion_ids != before.completion_ids
        with pytest.raises(RuntimeError, match="keeps no copy"):
            engine.snapshot()  # the trainer holds the served weights now
        with pytest.raises(ValueError, match="missing"):
            engine.set_weights({"model.norm.weight": original["model.norm.weight"].numpy()}, start + 2)

        engine.set_weights({n: t.numpy() for n, t in changed.items()}, start + 2)  # every weight: allowed
        (loaded,), _ = generate(engine, ids, **greedy)
        assert loaded.completion_ids == direct.completion_ids
        np.testing.assert_allclose(loaded.log_probs, direct.log_probs, atol=TOLERANCE)
        assert publisher.publish(original) == start + 3 and publisher.path == "gloo"
        (back,), _ = generate(engine, ids, **greedy)
        assert back.completion_ids == before.completion_ids
    finally:
        publisher.close()
        engine.set_weights({n: t.numpy() for n, t in original.items()}, engine.version + 1)  # a copy again
    assert engine.snapshot()[1] == engine.version


def test_beam_search_scores_teacher_forced_log_probs_and_one_group_equals_it(
    engine: VLLMEngine, teacher: Generator
) -> None:
    ids = prompt(engine, "Tom has 3 apples and buys 4 more. How many?")
    beam, _ = generate(engine, ids, num_samples=2, strategy="beam_search", max_new_tokens=10)
    one_group, _ = generate(engine, ids, num_samples=2, strategy="diverse_beam_search", num_beam_groups=1,
                            max_new_tokens=10, diversity_penalty=2.0)
    assert [(s.completion_ids, s.score) for s in one_group] == [(s.completion_ids, s.score) for s in beam]
    diverse, _ = generate(engine, ids, num_samples=4, strategy="diverse_beam_search", num_beam_groups=2,
                          diversity_penalty=1.0, max_new_tokens=8)
    assert len(diverse) == 4 and len({tuple(s.completion_ids) for s in diverse}) > 1
    for s in beam + diverse:
        forced = teacher.log_probs(ids, s.completion_ids)
        np.testing.assert_allclose(s.log_probs, forced, atol=TOLERANCE)
        assert s.score is not None and s.model_version == engine.version
    for s in beam:  # plain beam search: the summed log-prob over the length (length penalty 1)
        assert s.score == pytest.approx(sum(s.log_probs) / len(s.log_probs), abs=TOLERANCE)
    assert beam[0].score >= beam[1].score


def test_engine_args_make_room_for_every_adapter_and_the_served_ones_swap(llm_dirs: dict[str, Path], engine: VLLMEngine) -> None:
    """``engine``: vLLM is imported already (see the note on its import above)."""
    from policy_server.llm.vllm_args import engine_args

    adapters = {"a": llm_dirs["policy_lora"], "b": llm_dirs["policy_lora_1"]}
    spec = LLMPolicySpec(path=llm_dirs["policy"], adapters=adapters)
    extra = engine_args(spec, llm_dirs["policy"], None, "cpu")
    assert (extra.enable_lora, extra.max_loras, extra.max_cpu_loras, extra.max_lora_rank) == (True, 2, 2, 8)
    both = engine_args(spec, llm_dirs["policy"], llm_dirs["policy_lora"], "cpu")
    assert (both.max_loras, both.max_cpu_loras) == (4, 4)  # a, b, the served adapter and its next version
    plain = engine_args(LLMPolicySpec(path=llm_dirs["policy"]), llm_dirs["policy"], None, "cpu")
    assert not plain.enable_lora


def test_engine_args_size_the_kv_cache_as_the_spec_says(llm_dirs: dict[str, Path], engine: VLLMEngine) -> None:
    from policy_server.llm.vllm_args import CPU_KV_CACHE_BYTES, engine_args

    folder = llm_dirs["policy"]
    default = LLMPolicySpec(path=folder)
    assert engine_args(default, folder, None, "cpu").kv_cache_memory_bytes == CPU_KV_CACHE_BYTES
    assert engine_args(default, folder, None, "cuda").kv_cache_memory_bytes is None  # vLLM's share of the GPU
    sized = LLMPolicySpec(path=folder, kv_cache_memory_bytes="1GiB")
    assert engine_args(sized, folder, None, "cpu").kv_cache_memory_bytes == 1 << 30
    assert engine_args(sized, folder, None, "cuda").kv_cache_memory_bytes == 1 << 30


def test_the_worker_is_bound_as_the_machine_size_says(engine: VLLMEngine) -> None:
    from policy_server.llm.cpu_affinity import all_cores, cpu_threads_bind

    (worker,) = engine.cpu_workers()
    if cpu_threads_bind(None, {}, len(all_cores())) == "nobind":  # 2 cores or fewer, as in CI
        assert worker.cores == all_cores()
        assert engine._split.moved == {}  # nothing to keep off: the worker may use every core
    else:  # vLLM's auto: one core kept for its scheduler, where the engine core was moved
        assert worker.cores < all_cores()
        assert engine._split.moved


def test_safe_logits_replaces_and_counts_non_finite_logits_as_the_transformers_engine(
    engine: VLLMEngine, teacher: Generator
) -> None:
    """Weights that give a +inf logit without relying on how a matrix product sums infinities: every
    token's embedding gets +10 in dimension 0 (about +8 after the final norm at every position; the
    tied output layer adds the same to every logit), and one token's row is float32's max in that
    dimension only, zeros elsewhere: its logit overflows to +inf. Drawn, that token's own input
    (max in one dimension) normalises to zeros, so the next logits are all 0: samples alternate.
    vLLM's counts and log-probs equal teacher forcing's through ``sanitize_logits``, and greedy
    equals the transformers engine."""
    from policy_server.llm.sampling import sanitize_logits, top_logprobs

    ids = prompt(engine)
    original = engine.get_weights()
    embed = "model.embed_tokens.weight"  # tied: the output rows are the embedding's
    unused = [t for t in range(engine.vocab_size - 1, 0, -1) if t not in ids and t not in engine.tokenizer.all_special_ids]
    inf_token = unused[0]

    def set_both(weights: dict[str, np.ndarray]) -> None:
        engine.set_weights(weights, engine.version + 1)
        state = teacher.model.state_dict()
        with torch.no_grad():
            for name, value in weights.items():
                state[name].copy_(torch.from_numpy(value))

    def forced_logits(completion: list[int]) -> torch.Tensor:
        """(len(completion), V) teacher-forced logits before each completion token."""
        with torch.inference_mode():
            out = teacher.model(input_ids=torch.tensor([ids + completion]), use_cache=False).logits[0].float()
        return out[len(ids) - 1 : len(ids) - 1 + len(completion)]

    shifted = original[embed].copy()
    shifted[:, 0] = 10.0
    shifted[inf_token] = 0.0
    shifted[inf_token, 0] = np.finfo(np.float32).max
    try:
        set_both({embed: shifted})
        with pytest.raises(ValueError, match="non-finite logits at generated token 0; send safe_logits=true"):
            generate(engine, ids, temperature=1.0, max_new_tokens=4)
        with pytest.raises(ValueError, match=r"\+inf logits at generated token 0; send safe_logits=true"):
            teacher.generate([ids], GenerationParams(temperature=1.0, max_new_tokens=4))

        params = {"num_samples": 2, "temperature": 1.0, "seed": 3, "max_new_tokens": 12, "top_logprobs": 2,
                  "stop_strings": ("@@@",), "safe_logits": True}
        samples, _ = generate(engine, ids, **params)
        for s in samples:
            logits = forced_logits(s.completion_ids)
            clean, changed = sanitize_logits(logits)
            assert torch.isposinf(logits[0, inf_token]) and s.completion_ids[0] == inf_token
            assert s.nonfinite_logits == int(changed.sum()) == s.completion_ids.count(inf_token) > 1
            forced = torch.log_softmax(clean, -1)
            chosen = torch.tensor(s.completion_ids)
            np.testing.assert_allclose(s.log_probs, forced.gather(-1, chosen[:, None])[:, 0], atol=TOLERANCE)
            assert s.top_logprobs is not None
            for got, want in zip(s.top_logprobs, top_logprobs(forced, chosen, 2)):
                assert got.keys() == want.keys()
                np.testing.assert_allclose(list(got.values()), [want[t] for t in got], atol=TOLERANCE)

        async def chunks() -> list[Any]:
            return [c async for c in engine.stream(ids, GenerationParams(**params))]

        streamed = asyncio.run(chunks())
        for index, s in enumerate(samples):
            assert [x for c in streamed if c.index == index for x in c.log_probs] == s.log_probs

        greedy = {"temperature": 0.0, "max_new_tokens": 3, "safe_logits": True}
        (ours,), _ = generate(engine, ids, **greedy)
        (theirs,) = teacher.generate([ids], GenerationParams(**greedy))[0]
        assert (ours.completion_ids, ours.nonfinite_logits) == (theirs.completion_ids, theirs.nonfinite_logits)
        np.testing.assert_allclose(ours.log_probs, theirs.log_probs, atol=TOLERANCE)

        with pytest.raises(InvalidRequest) as refused:
            generate(engine, ids, strategy="beam_search", num_samples=2, max_new_tokens=2, safe_logits=True)
        assert refused.value.fields[0].field == "safe_logits" and "beam" in refused.value.message
    finally:
        set_both({embed: original[embed]})
    (after,), _ = generate(engine, ids, temperature=1.0, seed=3, max_new_tokens=12, safe_logits=True)
    assert after.nonfinite_logits == 0
    np.testing.assert_allclose(after.log_probs, teacher.log_probs(ids, after.completion_ids), atol=TOLERANCE)
