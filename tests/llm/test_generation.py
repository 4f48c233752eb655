"""Generation with the tiny Llama policy (policy_server.llm.generation)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from policy_server.llm.generation import Generator
from policy_server.llm.models import LoadedLM, load_policy
from policy_server.llm.params import GenerationParams, Sample
from policy_server.llm.sampling import (
    POS_INF_LOGIT,
    check_finite,
    penalize,
    sample_tokens,
    sanitize_logits,
    top_p_filter,
)

END, STEP = "<|eot_id|>", "<|eois_id|>"
QUESTIONS = ["What is 3 + 4?", "What is 12 + 25 and then 7 + 8?", "Hi"]


@pytest.fixture(scope="module")
def lm(llm_dirs: dict[str, Path]) -> LoadedLM:
    return load_policy(llm_dirs["policy"])


@pytest.fixture(scope="module")
def gen(lm: LoadedLM) -> Generator:
    return Generator(lm)


@pytest.fixture(scope="module")
def prompts(lm: LoadedLM) -> list[list[int]]:
    """Three chat prompts of different lengths."""
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return [lm.tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chats]


def assert_teacher_forced(gen: Generator, samples: list[Sample]) -> None:
    for s in samples:
        assert len(s.log_probs) == len(s.completion_ids) > 0
        forced = gen.log_probs(s.prompt_ids, s.completion_ids)
        assert forced == pytest.approx(s.log_probs, abs=1e-4)


def test_sampled_logprobs_are_the_raw_model_logprobs(gen: Generator, prompts: list[list[int]]) -> None:
    params = GenerationParams(num_samples=3, temperature=1.3, top_p=0.9, max_new_tokens=24, seed=0)
    out = gen.generate(prompts, params)
    assert [len(samples) for samples in out] == [3, 3, 3]
    for prompt, samples in zip(prompts, out):
        assert all(s.prompt_ids == prompt for s in samples)
        assert_teacher_forced(gen, samples)


def test_beam_logprobs_are_the_raw_model_logprobs(gen: Generator, prompts: list[list[int]]) -> None:
    for strategy in ("beam_search", "diverse_beam_search"):
        out = gen.generate(prompts[:2], GenerationParams(num_samples=2, strategy=strategy, max_new_tokens=16))
        for samples in out:
            assert len(samples) == 2
            assert_teacher_forced(gen, samples)
            for s in samples:  # the beam score is the mean log-prob (no penalty met in group 0 / plain)
                if strategy == "beam_search":
                    assert s.score == pytest.approx(sum(s.log_probs) / len(s.log_probs), abs=1e-5)


def test_generation_through_an_unmerged_lora_adapter(
    llm_dirs: dict[str, Path], prompts: list[list[int]]
) -> None:
    lora = Generator(
        load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
    )  # a peft model: the cache passes through
    for strategy in ("temperature", "beam_search"):
        [samples] = lora.generate(
            prompts[:1], GenerationParams(num_samples=2, strategy=strategy, max_new_tokens=12, seed=0)
        )
        assert_teacher_forced(lora, samples)


def test_default_stop_strings_end_steps(gen: Generator, lm: LoadedLM, prompts: list[list[int]]) -> None:
    [samples] = gen.generate(
        prompts[:1], GenerationParams(num_samples=4, temperature=0.7, max_new_tokens=64, seed=1)
    )
    for s in samples:
        assert s.finish_reason == "stop" and s.stop_string in (STEP, END)
        assert s.completion_ids[-1] == lm.tokenizer.convert_tokens_to_ids(s.stop_string)
        assert s.stop_string not in s.text(lm.tokenizer) and s.text(lm.tokenizer, False).endswith(
            s.stop_string
        )


def test_multi_token_stop_string_stops_right_after_the_token_that_completes_it(
    gen: Generator, lm: LoadedLM, prompts: list[list[int]]
) -> None:
    [[free]] = gen.generate(prompts[:1], GenerationParams(temperature=0, max_new_tokens=12))
    text = free.text(lm.tokenizer, False)
    stop = text[3:9]  # a piece of what greedy decoding writes, spanning tokens
    assert len(lm.tokenizer(stop, add_special_tokens=False)["input_ids"]) > 1
    [[s]] = gen.generate(
        prompts[:1], GenerationParams(temperature=0, max_new_tokens=12, stop_strings=(stop,))
    )
    assert (s.finish_reason, s.stop_string) == ("stop", stop)
    assert stop in s.text(lm.tokenizer, False)
    assert stop not in lm.tokenizer.decode(s.completion_ids[:-1])
    assert s.completion_ids == free.completion_ids[: len(s.completion_ids)]


def test_end_token_always_stops(gen: Generator, lm: LoadedLM, prompts: list[list[int]]) -> None:
    [samples] = gen.generate(
        prompts[:1],
        GenerationParams(num_samples=3, temperature=0.7, max_new_tokens=200, stop_strings=("QQQ",), seed=0),
    )
    for s in samples:
        assert s.finish_reason == "stop" and s.stop_string == END  # went through step tokens to the end
        assert STEP in s.text(lm.tokenizer, False)


def test_length_limit(gen: Generator, prompts: list[list[int]]) -> None:
    for strategy in ("temperature", "beam_search", "diverse_beam_search"):
        out = gen.generate(
            prompts, GenerationParams(num_samples=2, strategy=strategy, max_new_tokens=3, seed=0)
        )
        for s in (s for samples in out for s in samples):
            assert (len(s.completion_ids), s.finish_reason, s.stop_string) == (3, "length", None)


def test_generation_stops_at_the_models_context(gen: Generator, lm: LoadedLM) -> None:
    limit = lm.model.config.max_position_embeddings
    token = lm.tokenizer.convert_tokens_to_ids("4")
    [[s]] = gen.generate([[token] * (limit - 2)], GenerationParams(temperature=0, max_new_tokens=50))
    assert len(s.completion_ids) <= 2
    with pytest.raises(ValueError, match=f"at most {limit} positions"):
        gen.generate([[token] * limit], GenerationParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], GenerationParams())


def test_batched_greedy_equals_one_by_one(gen: Generator, prompts: list[list[int]]) -> None:
    assert len({len(p) for p in prompts}) == 3
    for strategy in ("temperature", "beam_search"):
        params = GenerationParams(num_samples=2, temperature=0, strategy=strategy, max_new_tokens=20)
        batched = gen.generate(prompts, params)
        alone = [gen.generate([p], params)[0] for p in prompts]
        assert [[s.completion_ids for s in ss] for ss in batched] == [
            [s.completion_ids for s in ss] for ss in alone
        ]
        for b, a in zip(batched, alone):
            assert b[0].log_probs == pytest.approx(a[0].log_probs, abs=1e-4)


def test_greedy_samples_are_equal_copies(gen: Generator, prompts: list[list[int]]) -> None:
    [samples] = gen.generate(prompts[:1], GenerationParams(num_samples=3, temperature=0, max_new_tokens=8))
    assert (
        samples[0] == samples[1] == samples[2] and samples[0].completion_ids is not samples[1].completion_ids
    )


def test_seed_reproduces_samples_whatever_the_batch(gen: Generator, prompts: list[list[int]]) -> None:
    params = GenerationParams(num_samples=4, temperature=1.5, max_new_tokens=12, seed=7)

    def ids(out: list[list[Sample]]) -> list[list[list[int]]]:
        return [[s.completion_ids for s in ss] for ss in out]

    first = gen.generate(prompts, params)
    assert ids(gen.generate(prompts, params)) == ids(first)
    assert ids(gen.generate(prompts[1:2], params)) == ids(first[1:2])  # alone, or beside other prompts
    assert len({tuple(s.completion_ids) for s in first[0]}) > 1  # samples of one prompt differ
    other = gen.generate(prompts, dataclasses.replace(params, seed=8))
    assert ids(other) != ids(first)


@pytest.fixture()
def nan_logits(lm: LoadedLM) -> Iterator[list[int]]:
    """A real forward hook on the LM head that writes NaN into the logits of two tokens; yields their ids."""
    bad = [lm.tokenizer.convert_tokens_to_ids(t) for t in ("5", "6")]

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return out.index_fill(-1, torch.tensor(bad, device=out.device), float("nan"))

    handle = lm.model.get_output_embeddings().register_forward_hook(hook)
    yield bad
    handle.remove()


def test_nan_logits_raise_without_safe_logits(
    gen: Generator, prompts: list[list[int]], nan_logits: list[int]
) -> None:
    for strategy in ("temperature", "beam_search"):
        with pytest.raises(ValueError, match="NaN logits at generated token 0; send safe_logits=true"):
            gen.generate(prompts, GenerationParams(strategy=strategy, max_new_tokens=4))


def test_safe_logits_replace_and_count_nan(
    gen: Generator, prompts: list[list[int]], nan_logits: list[int]
) -> None:
    for strategy in ("temperature", "beam_search", "diverse_beam_search"):
        params = GenerationParams(
            num_samples=2, strategy=strategy, temperature=1.0, max_new_tokens=8, safe_logits=True, seed=0
        )
        for s in (s for samples in gen.generate(prompts, params) for s in samples):
            assert s.nonfinite_logits == 2 * len(s.completion_ids)  # two NaN logits per generated token
            assert not set(nan_logits) & set(s.completion_ids)  # NaN became -inf: never chosen
            assert all(math.isfinite(lp) for lp in s.log_probs)


def test_sanitize_logits() -> None:
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[1.0, nan, -inf, 2.0], [0.0, inf, 3.0, -inf], [nan, -inf, nan, -inf], [1.0, 2.0, 3.0, 4.0]]
    )
    clean, changed = sanitize_logits(logits)
    assert changed.tolist() == [1, 1, 4, 0]
    assert torch.equal(clean[0], torch.tensor([1.0, -inf, -inf, 2.0]))
    assert torch.equal(clean[1], torch.tensor([0.0, POS_INF_LOGIT, 3.0, -inf]))
    assert clean[2].tolist() == [0.0] * 4  # nothing left: uniform
    probs = torch.softmax(clean, -1)
    assert probs[1].tolist() == pytest.approx([0, 1, 0, 0]) and probs[2].tolist() == pytest.approx([0.25] * 4)
    check_finite(torch.tensor([[0.0, -inf]]), 0)  # -inf alone is a valid logit
    for bad, word in ((logits[:1], "NaN"), (logits[1:2], r"\+inf"), (torch.full((1, 3), -inf), "all -inf")):
        with pytest.raises(ValueError, match=word):
            check_finite(bad, 3)


def test_top_p_filter_against_naive() -> None:
    probs = torch.softmax(torch.randn(6, 20, generator=torch.Generator().manual_seed(0)), -1)
    for top_p in (0.05, 0.5, 0.9, 1.0):
        filtered = top_p_filter(probs, top_p)
        for row, out in zip(probs.tolist(), filtered.tolist()):
            order = sorted(range(len(row)), key=lambda i: -row[i])
            kept, mass = [], 0.0
            for i in order:
                if mass >= top_p:
                    break
                kept.append(i)
                mass += row[i]
            expected = [row[i] / mass if i in kept else 0.0 for i in range(len(row))]
            assert out == pytest.approx(expected, abs=1e-6)


def test_sample_tokens_follows_the_distribution() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    picks = sample_tokens(probs.expand(len(u), -1), u)
    freq = torch.bincount(picks, minlength=5) / len(u)
    assert freq.tolist() == pytest.approx(probs[0].tolist(), abs=0.015)
    edges = sample_tokens(probs.expand(3, -1), torch.tensor([0.0, 0.5, 1.0 - 1e-7]))
    assert edges.tolist() == [1, 3, 4]  # zero-probability tokens never picked


def test_params_validation_and_batch_key() -> None:
    for bad, word in [
        ({"num_samples": 0}, "num_samples"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"strategy": "nucleus"}, "strategy"),
        ({"stop_strings": ("",)}, "stop strings"),
        ({"strategy": "diverse_beam_search", "num_samples": 3, "num_beam_groups": 2}, "multiple"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
        ({"logit_bias": ((-1, 1.0),)}, "token ids must be >= 0"),
        ({"logit_bias": ((5, 100.5),)}, "logit_bias values"),
        ({"logit_bias": ((5, -101.0),)}, "logit_bias values"),
        ({"logit_bias": ((5, float("nan")),)}, "logit_bias values"),
        ({"logit_bias": ((5, float("inf")),)}, "logit_bias values"),
        ({"strategy": "beam_search", "presence_penalty": 1.0}, "beam_search strategy cannot"),
        ({"strategy": "diverse_beam_search", "logit_bias": ((5, 1.0),)}, "diverse_beam_search strategy cannot"),
    ]:
        with pytest.raises(ValueError, match=word):
            GenerationParams(**bad)
    assert GenerationParams(stop_strings=["a"]).stop_strings == ("a",)  # type: ignore[arg-type]
    assert GenerationParams(logit_bias={5: 1}).logit_bias == ((5, 1.0),)  # type: ignore[arg-type]
    for edge in ({"top_logprobs": 20}, {"presence_penalty": -2.0, "frequency_penalty": 2.0}, {"logit_bias": ((0, -100.0),)}):
        GenerationParams(**edge)  # type: ignore[arg-type]
    key = GenerationParams(seed=1).batch_key()
    assert key == GenerationParams(seed=2).batch_key() == GenerationParams().batch_key() and hash(key)
    assert key != GenerationParams(top_logprobs=2).batch_key() != GenerationParams(logit_bias=((3, 1.0),)).batch_key()
    assert (
        GenerationParams(temperature=0, seed=1).batch_key()
        == GenerationParams(temperature=0, seed=2).batch_key()
    )
    beam = GenerationParams(strategy="beam_search", temperature=0.2, seed=3, diversity_penalty=2.0)
    assert beam.batch_key() == GenerationParams(strategy="beam_search").batch_key()
    assert GenerationParams(max_new_tokens=5).batch_key() != GenerationParams(max_new_tokens=6).batch_key()


def test_min_new_tokens_keeps_stop_strings_from_ending_a_sample_early(llm_dirs: dict) -> None:
    from policy_server.llm.generation import Generator
    from policy_server.llm.models import load_policy
    from policy_server.llm.params import GenerationParams

    generator = Generator(load_policy(llm_dirs["policy"]))
    prompt = generator.encode("What is 2 + 3?")
    params = GenerationParams(temperature=1.0, max_new_tokens=12, min_new_tokens=12, seed=0, stop_strings=("1",))
    sample = generator.generate([prompt], params)[0][0]
    assert len(sample.completion_ids) == 12 and sample.finish_reason in ("length", "stop")


def teacher_forced_log_softmax(lm: LoadedLM, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V) log-probs of each next token of ``ids``: one plain forward, no cache."""
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("strategy", ["temperature", "beam_search"])
def test_top_logprobs_are_the_k_most_likely_and_the_chosen_token(
    gen: Generator, lm: LoadedLM, prompts: list[list[int]], strategy: str
) -> None:
    k = 3
    params = GenerationParams(
        num_samples=2, temperature=1.5, max_new_tokens=16, seed=5, top_logprobs=k, strategy=strategy  # type: ignore[arg-type]
    )
    for s in (s for samples in gen.generate(prompts[:2], params) for s in samples):
        assert s.top_logprobs is not None and len(s.top_logprobs) == len(s.completion_ids)
        forced = teacher_forced_log_softmax(lm, s.prompt_ids + s.completion_ids)[len(s.prompt_ids) - 1 :]
        for top, token, lp, row in zip(s.top_logprobs, s.completion_ids, s.log_probs, forced):
            assert top[token] == pytest.approx(lp, abs=1e-5)  # the chosen token (beams: teacher-forced)
            best = list(top.items())[:k]
            assert [v for _, v in best] == sorted((v for _, v in best), reverse=True)
            values, ids = row.topk(k)
            assert [t for t, _ in best] == ids.tolist()
            assert [v for _, v in best] == pytest.approx(values.tolist(), abs=1e-4)
            assert len(top) == (k if token in ids.tolist() else k + 1)
    [[plain]] = gen.generate(prompts[:1], dataclasses.replace(params, top_logprobs=0, num_samples=1))
    assert plain.top_logprobs is None


def test_top_logprobs_hold_the_sampled_token_beyond_the_top_k(gen: Generator, prompts: list[list[int]]) -> None:
    params = GenerationParams(num_samples=8, temperature=2.0, max_new_tokens=16, seed=0, top_logprobs=1)
    tops = [t for samples in gen.generate(prompts, params) for s in samples for t in s.top_logprobs or []]
    assert {len(t) for t in tops} == {1, 2}  # at temperature 2, some sampled tokens are not the most likely


def test_prompt_logprobs_are_teacher_forced(gen: Generator, lm: LoadedLM, prompts: list[list[int]]) -> None:
    for strategy in ("temperature", "beam_search"):
        params = GenerationParams(num_samples=2, max_new_tokens=4, seed=0, prompt_logprobs=True, strategy=strategy)  # type: ignore[arg-type]
        for prompt, samples in zip(prompts, gen.generate(prompts, params)):
            forced = teacher_forced_log_softmax(lm, prompt).gather(-1, torch.tensor(prompt[1:])[:, None])
            for s in samples:
                assert s.prompt_logprobs is not None and s.prompt_logprobs[0] is None
                assert s.prompt_logprobs[1:] == pytest.approx(forced.squeeze(-1).tolist(), abs=1e-5)
    [[one]] = gen.generate([prompts[0][:1]], GenerationParams(max_new_tokens=2, prompt_logprobs=True))
    assert one.prompt_logprobs == [None] and one.prompt_top_logprobs is None
    [[off]] = gen.generate(prompts[:1], GenerationParams(max_new_tokens=2))
    assert off.prompt_logprobs is None


def test_prompt_tokens_carry_their_k_most_likely_alternatives(gen: Generator, lm: LoadedLM, prompts: list[list[int]]) -> None:
    """OpenAI's echo with ``logprobs: k``: per prompt token after the first, the k most likely tokens
    at its place, then the token itself when it is not among them."""
    params = GenerationParams(max_new_tokens=2, seed=0, prompt_logprobs=True, top_logprobs=3)
    for prompt, (s,) in zip(prompts, gen.generate(prompts, params)):
        full = teacher_forced_log_softmax(lm, prompt)
        assert s.prompt_top_logprobs is not None and s.prompt_top_logprobs[0] is None
        assert len(s.prompt_top_logprobs) == len(prompt)
        for place, (token, top) in enumerate(zip(prompt[1:], s.prompt_top_logprobs[1:])):
            best = full[place].topk(3)
            assert top is not None and list(top)[:3] == best.indices.tolist()
            assert list(top.values())[:3] == pytest.approx(best.values.tolist(), abs=1e-5)
            assert top[token] == pytest.approx(s.prompt_logprobs[place + 1], abs=1e-6)
            assert len(top) == (3 if token in best.indices.tolist() else 4)


def test_penalize_against_naive() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g)
    counts = torch.randint(0, 3, (3, 6), generator=g).float()
    bias = torch.tensor([0.0, 5.0, 0.0, -100.0, 0.0, 1.5])
    out = penalize(logits, counts, 0.7, -0.4, bias)
    naive = [
        [l - (-0.4) * c - 0.7 * (c > 0) + b for l, c, b in zip(lr, cr, bias.tolist())]
        for lr, cr in zip(logits.tolist(), counts.tolist())
    ]
    assert out.flatten().tolist() == pytest.approx([v for row in naive for v in row], abs=1e-5)


def test_a_large_logit_bias_makes_every_token_that_one(
    gen: Generator, lm: LoadedLM, prompts: list[list[int]]
) -> None:
    seven = lm.tokenizer.convert_tokens_to_ids("7")
    params = GenerationParams(num_samples=3, temperature=1.0, max_new_tokens=8, seed=0, logit_bias=((seven, 100.0),))
    for s in (s for samples in gen.generate(prompts, params) for s in samples):
        assert s.completion_ids == [seven] * 8
        assert s.log_probs == pytest.approx(gen.log_probs(s.prompt_ids, s.completion_ids), abs=1e-4)  # raw
    [[free]] = gen.generate(prompts[:1], GenerationParams(temperature=0, max_new_tokens=8))
    banned = free.completion_ids[0]
    [[other]] = gen.generate(
        prompts[:1], GenerationParams(temperature=0, max_new_tokens=8, logit_bias=((banned, -100.0),))
    )
    assert banned not in other.completion_ids


@pytest.mark.parametrize(("presence", "frequency"), [(2.0, 0.0), (0.0, 1.5), (2.0, -0.5)])
def test_penalties_follow_openais_definition(
    gen: Generator, lm: LoadedLM, prompts: list[list[int]], presence: float, frequency: float
) -> None:
    """Greedy decoding with penalties picks, at each step, the argmax of the teacher-forced logits
    minus ``frequency * count + presence * (count > 0)`` of the tokens generated so far."""
    params = GenerationParams(
        temperature=0, max_new_tokens=24, presence_penalty=presence, frequency_penalty=frequency,
        stop_strings=("QQQ",),
    )
    for [s] in gen.generate(prompts, params):
        forced = teacher_forced_log_softmax(lm, s.prompt_ids + s.completion_ids)[len(s.prompt_ids) - 1 :]
        for t, row in enumerate(forced):
            counts = torch.bincount(torch.tensor(s.completion_ids[:t], dtype=torch.long), minlength=row.shape[0])
            scores = row - frequency * counts - presence * (counts > 0).float()
            assert scores[s.completion_ids[t]] >= scores.max() - 1e-4
        assert s.log_probs == pytest.approx(forced.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1).tolist(), abs=1e-4)
    plain = gen.generate(prompts, dataclasses.replace(params, presence_penalty=0.0, frequency_penalty=0.0))
    assert [ss[0].completion_ids for ss in plain] != [ss[0].completion_ids for ss in gen.generate(prompts, params)]


def test_rows_with_different_seeds_share_a_decode_and_reproduce(gen: Generator, prompts: list[list[int]]) -> None:
    params = GenerationParams(num_samples=3, temperature=1.5, max_new_tokens=12)

    def ids(samples: list[Sample]) -> list[list[int]]:
        return [s.completion_ids for s in samples]

    together = gen.generate([prompts[0], prompts[0], prompts[1], prompts[2]], params, seeds=[7, 8, 7, None])
    alone_7 = gen.generate(prompts[:1], dataclasses.replace(params, seed=7))[0]
    assert ids(together[0]) == ids(alone_7)
    assert ids(together[1]) == ids(gen.generate(prompts[:1], dataclasses.replace(params, seed=8))[0])
    assert ids(together[1]) != ids(together[0])  # same prompt, other seed, same batch
    assert ids(together[2]) == ids(gen.generate(prompts[1:2], dataclasses.replace(params, seed=7))[0])
