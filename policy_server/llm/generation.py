"""Batched generation with a policy LM: temperature sampling, beam search, diverse beam search.

One ``Generator.generate`` call decodes every prompt × sample as one left-padded batch over one KV
cache: the prompts are prefilled once, their rows copied per sample, and each step is one forward
of all unfinished rows. Every sample stops on its own, on the first stop string its decoded text
reaches (or the model's end token) or at its token limit. Log-probs are always those of the
model's raw distribution (temperature 1, no top-p), so that a teacher-forced forward reproduces
them; that is what a PPO/GRPO trainer needs as the behaviour policy's log-probs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import torch
from transformers import DynamicCache

from policy_server.llm.diverse_beam import Hypothesis, group_beam_search
from policy_server.llm.stopping import StopMatcher

if TYPE_CHECKING:
    from policy_server.llm.models import LoadedLM

Strategy = Literal["temperature", "beam_search", "diverse_beam_search"]
FinishReason = Literal["stop", "length"]

POS_INF_LOGIT = 1.0e30
"""What ``safe_logits`` puts in place of a +inf logit: finite, and far above any real logit."""
MIN_BEAMS = 2
"""Plain beam search keeps ``max(num_samples, MIN_BEAMS)`` beams and returns the best ``num_samples``."""
LENGTH_PENALTY = 1.0
"""Beams are ranked by their summed log-prob / length ** LENGTH_PENALTY (transformers' default)."""
MAX_TOP_LOGPROBS = 20
"""OpenAI's bound on ``top_logprobs``."""
MAX_PENALTY = 2.0
"""OpenAI's bound on ``presence_penalty`` and ``frequency_penalty`` (either sign)."""
MAX_LOGIT_BIAS = 100.0
"""OpenAI's bound on a ``logit_bias`` value (either sign)."""


@dataclass(frozen=True)
class StructuredOutput:
    """OpenAI's ``response_format``: any JSON object, or JSON matching a schema."""

    kind: Literal["json_object", "json_schema"]
    json_schema: str | None = None
    """The JSON Schema as text (``kind == "json_schema"``)."""


@dataclass(frozen=True)
class GenerationParams:
    """How to decode; validated on construction (``ValueError``)."""

    num_samples: int = 1
    """Completions per prompt (beams returned, for the beam strategies)."""
    temperature: float = 0.7
    """Sampling temperature; 0 decodes greedily. Beam strategies ignore it."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probability adds up to top_p."""
    max_new_tokens: int = 256
    """At most this many tokens per completion (fewer if the model's context ends first)."""
    min_new_tokens: int = 0
    """Sampling: no stop string (nor the end token) ends a completion before this many tokens."""
    strategy: Strategy = "temperature"
    stop_strings: tuple[str, ...] | None = None
    """A completion ends right after the token that completes one of these in its decoded text.
    None: the model's step and end tokens. The end token always ends a completion."""
    safe_logits: bool = False
    """Replace NaN (-inf) and +inf (large) logits and go on; a row with no finite logit becomes
    uniform. Off: a non-finite logit raises ``ValueError``."""
    diversity_penalty: float = 0.5
    """Diverse beam search: subtracted from a token's log-prob once per earlier group that chose it at this step."""
    num_beam_groups: int | None = None
    """Diverse beam search: groups of ``num_samples / num_beam_groups`` beams; None: ``num_samples`` groups of one."""
    seed: int | None = None
    """Seeds sampling. Sample j of a prompt draws from its own stream seeded by (seed, j), so a seeded
    request gets the same samples whatever else shares its batch (up to float rounding of the batch)."""
    top_logprobs: int = 0
    """Per completion token, the log-probs of the k most likely tokens (``Sample.top_logprobs``)."""
    prompt_logprobs: bool = False
    """Also the log-prob of each prompt token given the ones before it (``Sample.prompt_logprobs``; OpenAI's echo)."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit once it occurs in the completion (OpenAI's definition)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the completion (OpenAI's definition)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling."""
    structured: StructuredOutput | None = None
    """Constrain the completion to JSON (vLLM's structured outputs); the transformers engine refuses it."""

    def __post_init__(self) -> None:
        if self.stop_strings is not None:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        problems = [
            (self.num_samples < 1, f"num_samples must be >= 1, not {self.num_samples}"),
            (
                not 0 <= self.temperature < float("inf"),
                f"temperature must be >= 0 and finite, not {self.temperature}",
            ),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], not {self.top_p}"),
            (self.max_new_tokens < 1, f"max_new_tokens must be >= 1, not {self.max_new_tokens}"),
            (
                not 0 <= self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens must be in [0, max_new_tokens], not {self.min_new_tokens}",
            ),
            (
                self.strategy not in get_args(Strategy),
                f"strategy must be one of {get_args(Strategy)}, not {self.strategy!r}",
            ),
            (
                not 0 <= self.diversity_penalty < float("inf"),
                f"diversity_penalty must be >= 0, not {self.diversity_penalty}",
            ),
            (
                any(not isinstance(s, str) or not s for s in self.stop_strings or ()),
                "stop strings must be non-empty strings",
            ),
        ]
        problems += self._sampling_problems()
        groups = self.num_beam_groups
        if groups is not None and groups < 1:
            problems.append((True, f"num_beam_groups must be >= 1, not {groups}"))
        elif self.strategy == "diverse_beam_search" and self.num_samples % self.groups:
            problems.append(
                (True, f"num_samples ({self.num_samples}) must be a multiple of num_beam_groups ({groups})")
            )
        messages = [message for bad, message in problems if bad]
        if messages:
            raise ValueError("; ".join(messages))

    def _sampling_problems(self) -> list[tuple[bool, str]]:
        """The checks of the OpenAI-style fields: log-prob counts, penalties and biases."""
        if not isinstance(self.logit_bias, tuple):  # a dict or a list of pairs
            pairs = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
            object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in pairs))
        penalties = {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}
        shaped = self.logit_bias != () or any(penalties.values())
        return [
            (
                not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], not {self.top_logprobs}",
            ),
            *(
                (not -MAX_PENALTY <= value <= MAX_PENALTY, f"{name} must be in [-2, 2], not {value}")
                for name, value in penalties.items()
            ),
            *(
                (token < 0, f"logit_bias token ids must be >= 0, not {token}")
                for token, _ in self.logit_bias
            ),
            *(
                (
                    not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                    f"logit_bias values must be in [-100, 100], not {bias} (token {token})",
                )
                for token, bias in self.logit_bias
            ),
            (
                shaped and self.strategy != "temperature",
                (
                    "presence_penalty, frequency_penalty and logit_bias shape sampling: "
                    f"the {self.strategy} strategy cannot take them"
                ),
            ),
        ]

    @property
    def groups(self) -> int:
        """Diverse beam search's number of groups."""
        return self.num_beam_groups or self.num_samples

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one ``generate`` call and get what they would get alone.

        Every field counts except the seed (each row draws from its own seeded stream, see
        ``Generator.generate``) and those the strategy ignores: the beam strategies ignore
        temperature and top_p, greedy decoding (temperature 0) ignores top_p, sampling ignores the
        beam fields, plain beam search ignores diversity.
        """
        ignored: set[str] = {"seed"}
        if self.strategy == "temperature":
            ignored |= {"diversity_penalty", "num_beam_groups"}
            if self.temperature == 0:
                ignored |= {"top_p"}
        else:
            ignored |= {"temperature", "top_p"}
            if self.strategy == "beam_search":
                ignored |= {"diversity_penalty", "num_beam_groups"}
        return tuple(
            (f.name, None if f.name in ignored else getattr(self, f.name)) for f in dataclasses.fields(self)
        )


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    """Generated tokens, including the tokens of the stop string that ended it."""
    log_probs: list[float]
    """log p(token | prefix) of each completion token under the model's raw distribution (temperature 1)."""
    finish_reason: FinishReason
    stop_string: str | None
    """The stop string it ended on; None when it ran to its token limit."""
    nonfinite_logits: int = 0
    """Non-finite logits replaced while it was generated (``safe_logits``)."""
    score: float | None = field(default=None, compare=False)
    """Beam strategies: the beam's score (penalised log-prob sum / length); None for sampling."""
    model_version: int = field(default=0, compare=False)
    """The version of the weights that generated it (set by the engine that serves them)."""
    top_logprobs: list[dict[int, float]] | None = None
    """Per completion token, {token id: log-prob} of the ``params.top_logprobs`` most likely tokens."""
    prompt_logprobs: list[float | None] | None = None
    """Per prompt token, its log-prob given the tokens before it (None for the first); ``params.prompt_logprobs``."""

    def text(self, tokenizer: Any, skip_special_tokens: bool = True) -> str:
        """The decoded completion (stop string included unless it is a skipped special token)."""
        return tokenizer.decode(self.completion_ids, skip_special_tokens=skip_special_tokens)


@dataclass(frozen=True)
class SampleChunk:
    """What a streaming engine yields: the tokens sample ``index`` added since its previous chunk.

    Its last chunk has ``finish_reason`` set (and ``stop_string``, when a stop string ended it).
    Concatenating a sample's chunks gives the ``Sample`` that ``generate`` would have returned.
    """

    index: int
    token_ids: list[int]
    log_probs: list[float]
    top_logprobs: list[dict[int, float]] | None
    finish_reason: FinishReason | None
    stop_string: str | None
    model_version: int


def sanitize_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace non-finite logits: NaN → -inf, +inf → ``POS_INF_LOGIT``; a row with no token left → zeros.

    (R, V) float → (cleaned (R, V), entries changed per row (R,)). -inf stays -inf (probability 0)
    unless its whole row is -inf/NaN, which becomes uniform.
    """
    nan, pos_inf = torch.isnan(logits), torch.isposinf(logits)
    clean = logits.masked_fill(nan, float("-inf")).masked_fill(pos_inf, POS_INF_LOGIT)
    dead = ~torch.isfinite(clean).any(dim=-1)  # (R,)
    clean = torch.where(dead[:, None], torch.zeros_like(clean), clean)
    changed = (nan | pos_inf).sum(-1) + torch.where(dead, torch.isneginf(logits).sum(-1), 0)
    return clean, changed


def check_finite(logits: torch.Tensor, step: int) -> None:
    """Raise ``ValueError`` naming the problem if a row has a NaN or +inf logit, or no finite one."""
    if bool(torch.isfinite(logits).all()):
        return
    problems = []
    if torch.isnan(logits).any():
        problems.append("NaN")
    if torch.isposinf(logits).any():
        problems.append("+inf")
    if not problems and (~torch.isfinite(logits).any(dim=-1)).any():
        problems.append("all -inf")
    if problems:
        raise ValueError(
            f"the model produced {' and '.join(problems)} logits at generated token {step}; "
            "send safe_logits=true to replace non-finite logits and go on"
        )


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probability reaches ``top_p``; renormalise.

    (R, V) → (R, V). The most likely token is always kept.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: (R, V) probabilities, (R,) uniforms in [0, 1) → (R,) token ids.

    Picks the first token whose cumulative probability exceeds ``u * total``; a zero-probability
    token is never picked.
    """
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def penalize(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float, bias: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties and logit bias: (R, V) logits, (R, V) counts of each token in the
    completion so far, (V,) bias → (R, V). Naive equivalent, per row and token ``v``:
    ``logits[v] - frequency * counts[v] - presence * (counts[v] > 0) + bias[v]``."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype) + bias


def top_logprobs(log_probs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[dict[int, float]]:
    """Per row, {token id: log-prob} of its ``k`` most likely tokens, most likely first, then the
    chosen token when it is not among them (as vLLM answers ``logprobs=k``): k or k + 1 entries.

    (R, V) log-probs, (R,) chosen token ids → R dicts.
    """
    values, index = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    picked = log_probs.gather(-1, chosen[:, None]).squeeze(-1)
    out = []
    for ids, lps, token, lp in zip(index.tolist(), values.tolist(), chosen.tolist(), picked.tolist()):
        top = dict(zip(ids, lps))
        top.setdefault(token, lp)
        out.append(top)
    return out


def _stream_seed(seed: int, sample: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + sample * 0xBF58476D1CE4E5B9 + 1) % 2**63


class _Uniforms:
    """One uniform per row per step: a seeded row draws from its own stream, seeded by (seed, sample
    index), so what it samples does not depend on the rows beside it; unseeded rows share one stream."""

    def __init__(self, seeds: list[int | None], sample_of_row: list[int]) -> None:
        self.shared = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self.streams: list[torch.Generator | None] = [
            None if seed is None else torch.Generator().manual_seed(_stream_seed(seed, j))
            for seed, j in zip(seeds, sample_of_row)
        ]
        self.seeded = any(stream is not None for stream in self.streams)

    def draw(self, rows: list[int]) -> torch.Tensor:
        """(len(rows),) uniforms for the given (original) row indices."""
        if not self.seeded:
            return torch.rand(len(rows), generator=self.shared)
        return torch.cat([torch.rand(1, generator=self.streams[r] or self.shared) for r in rows])


class ChunkSink(Protocol):
    """Where a streaming request's tokens go, called from the generation thread."""

    @property
    def cancelled(self) -> bool:
        """True once nobody reads the chunks any more: the request's rows stop at the next step."""

    def push(self, chunk: SampleChunk) -> None: ...


class _Shaping:
    """OpenAI's presence/frequency penalties and logit bias for the rows of one decode."""

    def __init__(self, params: GenerationParams, rows: int, vocab: int, device: torch.device) -> None:
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.bias = torch.zeros(vocab, device=device)
        for token, bias in params.logit_bias:
            self.bias[token] += bias
        self.counts = torch.zeros(rows, vocab, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return penalize(logits, self.counts, self.presence, self.frequency, self.bias)

    def count(self, chosen: torch.Tensor) -> None:
        self.counts.scatter_add_(1, chosen[:, None], torch.ones_like(self.counts[:, :1]))

    def select(self, index: torch.Tensor) -> None:
        self.counts = self.counts[index]


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
                    forced = self._prompt_log_probs(prompt)
                    for s in samples:
                        s.prompt_logprobs = list(forced)
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

    def _prompt_log_probs(self, prompt: list[int]) -> list[float | None]:
        """Each prompt token's teacher-forced log-prob; None for the first (nothing precedes it)."""
        if len(prompt) == 1:
            return [None]
        log_probs = self._teacher_forced(prompt)
        picked = log_probs.gather(-1, torch.tensor(prompt[1:], device=self.device)[:, None]).squeeze(-1)
        return [None, *picked.tolist()]

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
        uniforms = _Uniforms([seeds[p] for p in prompt_of], [r % n for r in range(total)])
        shaped = params.logit_bias != () or params.presence_penalty != 0 or params.frequency_penalty != 0
        shaping = _Shaping(params, total, logits.shape[-1], self.device) if shaped else None
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
            [_from_hypothesis(prompt, h) for h in hyps[: params.num_samples]]
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


def _from_hypothesis(prompt: list[int], h: Hypothesis) -> Sample:
    reason: FinishReason = "stop" if h.stop_string is not None else "length"
    return Sample(prompt, h.tokens, h.log_probs, reason, h.stop_string, h.nonfinite, h.score)
