"""What an LLM engine is asked and what it answers, engine-independent: ``GenerationParams`` (how
to decode), ``Sample`` (one completion), ``SampleChunk`` (a streamed piece of one). Both engines
(``llm.engine.LLMEngine`` on our transformers loop, ``llm.vllm_engine.VLLMEngine``) take and give
these; the gateway and Ray carry them. Imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

Strategy = Literal["temperature", "beam_search", "diverse_beam_search"]
FinishReason = Literal["stop", "length"]

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
    """Also the log-prob of each prompt token given the ones before it (``Sample.prompt_logprobs``; OpenAI's
    echo), with its ``top_logprobs`` most likely alternatives (``Sample.prompt_top_logprobs``)."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit once it occurs in the completion (OpenAI's definition)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the completion (OpenAI's definition)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling."""
    structured: StructuredOutput | None = None
    """Constrain the completion to JSON (vLLM's structured outputs); the transformers engine refuses it."""
    adapter: str | None = None
    """Generate with this one of ``llm.policy.adapters`` (its model id); None: the served model."""

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
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token, {token id: log-prob} of the ``params.top_logprobs`` most likely tokens at its place,
    then the token itself if it is not among them (None for the first); with ``params.prompt_logprobs``
    and ``params.top_logprobs`` > 0."""

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


class ChunkSink(Protocol):
    """Where a streaming request's tokens go, called from the generation thread."""

    @property
    def cancelled(self) -> bool:
        """True once nobody reads the chunks any more: the request's rows stop at the next step."""

    def push(self, chunk: SampleChunk) -> None: ...
