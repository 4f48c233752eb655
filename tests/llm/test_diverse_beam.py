"""Beam search and diverse beam search (policy_server.llm.diverse_beam), on a fixed table and on the tiny Llama."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from policy_server.llm.diverse_beam import group_beam_search, hamming_penalty
from policy_server.llm.generation import Generator
from policy_server.llm.models import LoadedLM, load_policy
from policy_server.llm.params import GenerationParams

UNIGRAM = [0.5, 0.3, 0.1, 0.1]


@pytest.fixture(scope="module")
def lm(llm_dirs: dict[str, Path]) -> LoadedLM:
    return load_policy(llm_dirs["policy"])


@pytest.fixture(scope="module")
def gen(lm: LoadedLM) -> Generator:
    return Generator(lm)


@pytest.fixture(scope="module")
def prompts(lm: LoadedLM) -> list[list[int]]:
    chats = [
        [{"role": "user", "content": q}] for q in ("What is 3 + 4?", "What is 12 + 25?", "Name a colour.")
    ]
    return [lm.tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chats]


def test_hamming_penalty_against_naive() -> None:
    chosen = torch.tensor([[2, 0, 2, -1], [-1, -1, -1, -1], [4, 4, 4, 1]])
    out = hamming_penalty(chosen, 5, 0.5)
    naive = [[0.5 * row.count(v) for v in range(5)] for row in chosen.tolist()]
    assert out.tolist() == naive
    assert hamming_penalty(torch.zeros(2, 0, dtype=torch.long), 3, 1.0).tolist() == [[0.0] * 3] * 2


def unigram_search(penalty: float, groups: int = 2, size: int = 1, steps: int = 3) -> list[list]:
    """Every row of one prompt sees the same next-token distribution ``UNIGRAM``; nothing stops."""
    rows = groups * size
    logp = torch.tensor(UNIGRAM).log().expand(rows, -1)
    none = torch.zeros(rows, dtype=torch.long)
    return group_beam_search(
        logp,
        none,
        lambda parents, tokens: (logp, none),
        num_groups=groups,
        group_size=size,
        max_new_tokens=[steps],
        stop=lambda seq: None,
        diversity_penalty=penalty,
    )[0]


@pytest.mark.parametrize(
    ("penalty", "second", "second_score"),
    [
        (0.0, [0, 0, 0], math.log(0.5)),  # no penalty: both groups take the best token
        (0.3, [0, 0, 0], math.log(0.5) - 0.3),  # log 0.5 - 0.3 > log 0.3: still token 0, paying the penalty
        (1.0, [1, 1, 1], math.log(0.3)),  # log 0.5 - 1 < log 0.3: the second group takes token 1
    ],
)
def test_hamming_diversity_on_a_fixed_distribution(
    penalty: float, second: list[int], second_score: float
) -> None:
    first, other = unigram_search(penalty)
    assert (first.tokens, first.score) == ([0, 0, 0], pytest.approx(math.log(0.5)))
    assert (other.tokens, other.score) == (second, pytest.approx(second_score))
    assert other.log_probs == pytest.approx([math.log(UNIGRAM[t]) for t in second])  # never penalised
    assert first.stop_string is None and other.stop_string is None


def test_finished_beams_fill_the_pool_best_first() -> None:
    """A bigram table; token 3 stops. Two beams, three tokens at most.

    Step 1: [0] and [1] go on; [3] (0.15) ranks third, and only the best two may finish.
    Step 2: [0, 3] (0.35) finishes; [1, 0] (0.18) and [1, 1] (0.06) go on.
    Step 3 (the last): the best two, [1, 0, 3] (0.126) and [1, 1, 0] (0.036), finish; the pool keeps
    the best two by mean log-prob: [0, 3] and [1, 0, 3].
    """
    first = torch.tensor([[0.5, 0.3, 0.05, 0.15]] * 2).log()
    after = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.6, 0.2, 0.1, 0.1], [0.25] * 4, [0.25] * 4]).log()
    none = torch.zeros(2, dtype=torch.long)
    [pool] = group_beam_search(
        first,
        none,
        lambda parents, tokens: (after[tokens], none),
        num_groups=1,
        group_size=2,
        max_new_tokens=[3],
        stop=lambda seq: "<stop>" if seq[-1] == 3 else None,
    )
    assert [(h.tokens, h.stop_string) for h in pool] == [([0, 3], "<stop>"), ([1, 0, 3], "<stop>")]
    assert [h.score for h in pool] == pytest.approx([math.log(0.35) / 2, math.log(0.126) / 3])
    assert pool[1].log_probs == pytest.approx([math.log(0.3), math.log(0.6), math.log(0.7)])


def test_one_group_is_transformers_beam_search(
    gen: Generator, lm: LoadedLM, prompts: list[list[int]]
) -> None:
    eos = [lm.tokenizer.convert_tokens_to_ids(t) for t in (lm.step_token, lm.end_token)]
    for beams, max_new in ((4, 40), (3, 6)):
        plain = gen.generate(
            prompts, GenerationParams(num_samples=beams, strategy="beam_search", max_new_tokens=max_new)
        )
        one_group = gen.generate(
            prompts,
            GenerationParams(
                num_samples=beams, strategy="diverse_beam_search", num_beam_groups=1, max_new_tokens=max_new
            ),
        )
        assert one_group == plain
        assert [[s.score for s in ss] for ss in one_group] == [[s.score for s in ss] for ss in plain]
        for prompt, samples in zip(prompts, plain):
            with torch.inference_mode():
                hf = lm.model.generate(
                    torch.tensor([prompt]),
                    num_beams=beams,
                    num_return_sequences=beams,
                    do_sample=False,
                    early_stopping=False,
                    length_penalty=1.0,
                    max_new_tokens=max_new,
                    eos_token_id=eos,
                    pad_token_id=lm.tokenizer.pad_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            completions = [seq[len(prompt) :].tolist() for seq in hf.sequences]
            completions = [
                c[: next((i + 1 for i, t in enumerate(c) if t in eos), len(c))] for c in completions
            ]
            assert [s.completion_ids for s in samples] == completions
            assert [s.score for s in samples] == pytest.approx(hf.sequences_scores.tolist(), abs=1e-5)


def test_groups_differ_with_a_penalty(gen: Generator, lm: LoadedLM, prompts: list[list[int]]) -> None:
    def completions(penalty: float) -> list[list[list[int]]]:
        params = GenerationParams(
            num_samples=3, strategy="diverse_beam_search", diversity_penalty=penalty, max_new_tokens=16
        )
        return [[s.completion_ids for s in samples] for samples in gen.generate(prompts, params)]

    for same in completions(0.0):  # groups of one beam without a penalty: three copies of one search
        assert same[0] == same[1] == same[2]
    for diverse in completions(10.0):  # more than the trained model's lead of its best token
        assert len({tuple(c) for c in diverse}) == 3


def test_diverse_groups_of_two(gen: Generator, prompts: list[list[int]]) -> None:
    # beams within a group always differ; across groups only as far as the penalty pushes them
    # (0.5 by default, and even 2, let one of the tiny model's groups repeat the other's)
    params = GenerationParams(
        num_samples=4, num_beam_groups=2, strategy="diverse_beam_search", max_new_tokens=16, diversity_penalty=10.0
    )
    for samples in gen.generate(prompts, params):
        assert len(samples) == 4
        assert (
            samples[0].score >= samples[1].score and samples[2].score >= samples[3].score
        )  # best first per group
        assert samples[0].completion_ids != samples[1].completion_ids
        assert samples[2].completion_ids != samples[3].completion_ids
        assert len({tuple(s.completion_ids) for s in samples}) == 4
