"""Batched generation with a policy LM: temperature sampling, beam search, diverse beam search.

One ``Generator.generate`` call decodes every prompt × sample as one left-padded batch over one KV
cache: the prompts are prefilled once, their rows copied per sample, and each step is one forward
of all unfinished rows. Every sample stops on its own, on the first stop string its decoded text
reaches (or the model's end token) or at its token limit. Log-probs are always those of the
model's raw distribution (temperature 1, no top-p, no penalty or bias), so that a teacher-forced
forward reproduces them; that is what a PPO/GRPO trainer needs as the behaviour policy's log-probs.

Sampling also takes OpenAI's presence/frequency penalties and logit bias (``penalize``), and a
seed per prompt: each seeded row draws from its own stream, so requests with different seeds
share a decode. A prompt's tokens can stream out step by step (``ChunkSink``) and stop when
their reader goes away.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from policy_server.llm.diverse_beam import Hypothesis, group_beam_search
from policy_server.llm.params import ChunkSink, FinishReason, GenerationParams, Sample, SampleChunk
from policy_server.llm.sampling import (
    Shaping,
    Uniforms,
    check_finite,
    sample_tokens,
    sanitize_logits,
    top_logprobs,
    top_p_filter,
)
from policy_server.llm.stopping import StopMatcher

if TYPE_CHECKING:
    from policy_server.llm.models import LoadedLM

MIN_BEAMS = 2
"""Plain beam search keeps ``max(num_samples, MIN_BEAMS)`` beams and returns the best ``num_samples``."""
LENGTH_PENALTY = 1.0
"""Beams are ranked by their summed log-prob / length ** LENGTH_PENALTY (transformers' default)."""






class _Rows:
    """Rows of a left-padded batch decoding in lock-step over one KV cache."""

    def __init__(self, model: Any, prompts: list[list[int]], pad_id: int, device: torch.device) -> None:
        width = max(len(p) for p in prompts)
        self.model = model
        self.device = device
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        self.cache = DynamicCache(config=model.config)
        self.next_pos = torch.tensor([len(p) for p in prompts], device=device)

    def prefill(self) -> torch.Tensor:
        """(R, V) float32 logits of the token after each prompt."""
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(self.ids, positions)

    def select(self, index: torch.Tensor) -> None:
        """Row r becomes old row ``index[r]`` (reorders, copies or drops rows)."""
        self.cache.reorder_cache(index)
        self.mask = self.mask[index]
        self.next_pos = self.next_pos[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; (R,) → (R, V) float32 logits of the next token."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self._forward(tokens[:, None], self.next_pos[:, None])
        self.next_pos = self.next_pos + 1
        return logits

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,  # transformers 5.19 name; an unknown keyword is swallowed silently
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()


class Generator:
    """Generates completions of token prompts with a loaded policy LM (see the module docstring)."""

    def __init__(self, lm: LoadedLM) -> None:
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.device = torch.device(lm.device)
        config = self.model.config.get_text_config()
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model's tokenizer makes them (with bos if it adds one)."""
        return list(self.tokenizer(text)["input_ids"])

    def generate(
        self,
        prompts: list[list[int]],
        params: GenerationParams,
        seeds: list[int | None] | None = None,
        sinks: list[ChunkSink | None] | None = None,
    ) -> list[list[Sample]]:
        """``params.num_samples`` samples for each prompt, in prompt order, from one batched decode.

        ``seeds[i]`` seeds prompt i's sampling in place of ``params.seed`` (requests with other
        seeds share the decode). ``sinks[i]``, when given, receives prompt i's samples as
        ``SampleChunk``s: one per sampled token as it is decoded (the beam strategies: one per
        sample when the search ends); once it is ``cancelled``, prompt i's rows stop decoding and
        its samples are cut where they stopped. Raises ``ValueError`` for a prompt that is empty
        or leaves no room in the model's context, a ``logit_bias`` token outside the vocabulary,
        a ``structured`` output, or non-finite logits (without ``safe_logits``).
        """
        if not prompts:
            return []
        self._check_supported(params)
        limits = [self._token_limit(p, params.max_new_tokens) for p in prompts]
        seeds = seeds if seeds is not None else [params.seed] * len(prompts)
        sinks = sinks if sinks is not None else [None] * len(prompts)
        stop = StopMatcher(self.tokenizer, self._stop_strings(params))
        with torch.inference_mode():
            if params.strategy == "temperature":
                out = self._sample(prompts, params, limits, stop, seeds, sinks)
            else:
                out = self._beam(prompts, params, limits, stop)
                self._emit_whole(out, sinks)
            if params.prompt_logprobs:
                for prompt, samples in zip(prompts, out):
                    forced, tops = self._prompt_log_probs(prompt, params.top_logprobs)
                    for s in samples:
                        s.prompt_logprobs = list(forced)
                        s.prompt_top_logprobs = [dict(t) if t else None for t in tops] if tops else None
        return out

    def log_probs(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Teacher-forced log p(completion token | prefix) of each completion token, in one forward."""
        if not completion_ids:
            return []
        self._token_limit(prompt_ids, 1)
        ids = prompt_ids + completion_ids
        with torch.inference_mode():
            log_probs = self._teacher_forced(ids)[len(prompt_ids) - 1 :]
        picked = log_probs.gather(-1, torch.tensor(completion_ids, device=self.device)[:, None])
        return picked.squeeze(-1).tolist()

    def _teacher_forced(self, ids: list[int]) -> torch.Tensor:
        """(len(ids) - 1, V) float32 log-probs of each next token of ``ids``, in one forward."""
        batch = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=batch, use_cache=False).logits[0, :-1].float()
        return torch.log_softmax(logits, -1)

    def _prompt_log_probs(
        self, prompt: list[int], k: int
    ) -> tuple[list[float | None], list[dict[int, float] | None] | None]:
        """Each prompt token's teacher-forced log-prob and, for ``k`` > 0, its ``top_logprobs``
        alternatives; None for the first token (nothing precedes it)."""
        if len(prompt) == 1:
            return [None], [None] if k else None
        log_probs = self._teacher_forced(prompt)
        tokens = torch.tensor(prompt[1:], device=self.device)
        picked = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
        return [None, *picked.tolist()], [None, *top_logprobs(log_probs, tokens, k)] if k else None

    def _check_supported(self, params: GenerationParams) -> None:
        if params.structured is not None:
            raise ValueError(
                "the transformers engine cannot do structured outputs (response_format); "
                "serve the policy with llm.policy.engine: vllm"
            )
        vocab = self.vocab_size
        outside = [token for token, _ in params.logit_bias if token >= vocab]
        if outside:
            raise ValueError(f"logit_bias names tokens {outside} outside the vocabulary of {vocab} tokens")

    @property
    def vocab_size(self) -> int:
        """Tokens of the model's output layer (the logits' last dimension)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _token_limit(self, prompt: list[int], max_new_tokens: int) -> int:
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if self.max_positions is None:
            return max_new_tokens
        room = self.max_positions - len(prompt)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; the model takes at most {self.max_positions} positions, "
                "leaving no room to generate: shorten the prompt"
            )
        return min(max_new_tokens, room)

    def _stop_strings(self, params: GenerationParams) -> tuple[str, ...]:
        stops = (
            params.stop_strings
            if params.stop_strings is not None
            else (self.lm.step_token, self.lm.end_token)
        )
        return (*stops, self.lm.end_token)

    def _log_probs(self, logits: torch.Tensor, safe: bool, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, V) logits → (log-probs (R, V), replaced logits per row (R,)), sanitising or checking first."""
        if safe:
            logits, changed = sanitize_logits(logits)
        else:
            check_finite(logits, step)
            changed = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return torch.log_softmax(logits, -1), changed

    def _sample(
        self,
        prompts: list[list[int]],
        params: GenerationParams,
        limits: list[int],
        stop: StopMatcher,
        seeds: list[int | None],
        sinks: list[ChunkSink | None],
    ) -> list[list[Sample]]:
        greedy = params.temperature == 0
        n = 1 if greedy else params.num_samples  # greedy samples are all the same: decode one
        rows = _Rows(self.model, prompts, self.pad_id, self.device)
        logits = rows.prefill()
        expand = torch.arange(len(prompts), device=self.device).repeat_interleave(n)
        if n > 1:
            rows.select(expand)
            logits = logits[expand]
        prompt_of = expand.tolist()
        total = len(prompt_of)
        uniforms = Uniforms([seeds[p] for p in prompt_of], [r % n for r in range(total)])
        shaped = params.logit_bias != () or params.presence_penalty != 0 or params.frequency_penalty != 0
        shaping = Shaping(params, total, logits.shape[-1], self.device) if shaped else None
        tokens: list[list[int]] = [[] for _ in range(total)]
        lps: list[list[float]] = [[] for _ in range(total)]
        tops: list[list[dict[int, float]]] = [[] for _ in range(total)]
        nonfinite = [0] * total
        ended: list[tuple[FinishReason, str | None] | None] = [None] * total
        active = list(range(total))  # original row index of each live row
        step = 0
        while True:
            log_probs, changed = self._log_probs(logits, params.safe_logits, step)
            scores = shaping(log_probs) if shaping is not None else log_probs  # log_probs stay raw
            if greedy:
                chosen = scores.argmax(-1)
            else:
                probs = top_p_filter(torch.softmax(scores / params.temperature, -1), params.top_p)
                chosen = sample_tokens(probs, uniforms.draw(active).to(self.device))
            if shaping is not None:
                shaping.count(chosen)
            chosen_lp = log_probs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
            step_tops = top_logprobs(log_probs, chosen, params.top_logprobs) if params.top_logprobs else None
            keep = []
            for i, (r, token, lp, nf) in enumerate(zip(active, chosen.tolist(), chosen_lp, changed.tolist())):
                tokens[r].append(token)
                lps[r].append(lp)
                if step_tops is not None:
                    tops[r].append(step_tops[i])
                nonfinite[r] += nf
                found = stop(tokens[r]) if len(tokens[r]) >= params.min_new_tokens else None
                if found is not None:
                    ended[r] = ("stop", found)
                elif len(tokens[r]) >= limits[prompt_of[r]]:
                    ended[r] = ("length", None)
                sink = sinks[prompt_of[r]]
                if sink is not None:
                    indices = range(params.num_samples) if greedy else [r % n]
                    _push(sink, indices, token, lp, step_tops[i] if step_tops is not None else None, ended[r])
                    if ended[r] is None and sink.cancelled:
                        ended[r] = ("length", None)  # nobody reads it: cut where it is
                if ended[r] is None:
                    keep.append(i)
            step += 1
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                rows.select(index)
                if shaping is not None:
                    shaping.select(index)
                chosen = chosen[index]
                active = [active[i] for i in keep]
            logits = rows.step(chosen)

        samples = []
        for r in range(total):
            reason, found = ended[r] or ("length", None)
            top = tops[r] if params.top_logprobs else None
            samples.append(
                Sample(prompts[prompt_of[r]], tokens[r], lps[r], reason, found, nonfinite[r], top_logprobs=top)
            )
        per_prompt = [samples[i * n : (i + 1) * n] for i in range(len(prompts))]
        if greedy and params.num_samples > 1:
            per_prompt = [[_copy(s) for _ in range(params.num_samples) for s in group] for group in per_prompt]
        return per_prompt

    def _beam(
        self, prompts: list[list[int]], params: GenerationParams, limits: list[int], stop: StopMatcher
    ) -> list[list[Sample]]:
        if params.strategy == "beam_search":
            groups, size, penalty = 1, max(params.num_samples, MIN_BEAMS), 0.0
        else:
            groups, size, penalty = (
                params.groups,
                params.num_samples // params.groups,
                params.diversity_penalty,
            )
        width = groups * size
        rows = _Rows(self.model, prompts, self.pad_id, self.device)
        expand = torch.arange(len(prompts), device=self.device).repeat_interleave(width)
        logits = rows.prefill()[expand]
        rows.select(expand)
        step = 0

        def advance(parents: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal step
            step += 1
            rows.select(parents)
            return self._log_probs(rows.step(tokens), params.safe_logits, step)

        log_probs, changed = self._log_probs(logits, params.safe_logits, step)
        found = group_beam_search(
            log_probs,
            changed,
            advance,
            num_groups=groups,
            group_size=size,
            max_new_tokens=limits,
            stop=stop,
            diversity_penalty=penalty,
            length_penalty=LENGTH_PENALTY,
        )
        out = [
            [sample_of_hypothesis(prompt, h) for h in hyps[: params.num_samples]]
            for prompt, hyps in zip(prompts, found)
        ]
        if params.top_logprobs:
            for s in (s for samples in out for s in samples):
                s.top_logprobs = self._forced_top(s.prompt_ids, s.completion_ids, params.top_logprobs)
        return out

    def _forced_top(self, prompt: list[int], completion: list[int], k: int) -> list[dict[int, float]]:
        """``top_logprobs`` of a finished completion, from one teacher-forced forward."""
        log_probs = self._teacher_forced(prompt + completion)[len(prompt) - 1 :]
        return top_logprobs(log_probs, torch.tensor(completion, device=self.device), k)

    @staticmethod
    def _emit_whole(out: list[list[Sample]], sinks: list[ChunkSink | None]) -> None:
        """Stream each finished sample as one chunk (a beam is only known once the search ends)."""
        for samples, sink in zip(out, sinks):
            if sink is None:
                continue
            for j, s in enumerate(samples):
                sink.push(
                    SampleChunk(
                        j, list(s.completion_ids), list(s.log_probs), s.top_logprobs, s.finish_reason,
                        s.stop_string, 0,
                    )
                )


def _push(
    sink: ChunkSink,
    indices: range | list[int],
    token: int,
    log_prob: float,
    top: dict[int, float] | None,
    ended: tuple[FinishReason, str | None] | None,
) -> None:
    """One decoded token of a row, as a chunk for each sample index the row stands for."""
    reason, found = ended or (None, None)
    for j in indices:
        top_list = [dict(top)] if top is not None else None
        sink.push(SampleChunk(j, [token], [log_prob], top_list, reason, found, 0))


def _copy(s: Sample) -> Sample:
    return dataclasses.replace(
        s,
        completion_ids=list(s.completion_ids),
        log_probs=list(s.log_probs),
        top_logprobs=[dict(t) for t in s.top_logprobs] if s.top_logprobs is not None else None,
    )


def sample_of_hypothesis(prompt: list[int], h: Hypothesis) -> Sample:
    reason: FinishReason = "stop" if h.stop_string is not None else "length"
    return Sample(prompt, h.tokens, h.log_probs, reason, h.stop_string, h.nonfinite, h.score)
