"""vLLM's per-token log-probs (``vllm.logprobs.Logprob`` entries) in our ``Sample``'s terms: the
log-prob of the token that was sampled or given, and its k most likely alternatives."""

from __future__ import annotations

from typing import TypeAlias

from vllm.logprobs import Logprob
from vllm.outputs import RequestOutput

PromptLogprobs: TypeAlias = tuple[list[float | None], list[dict[int, float] | None] | None]
"""(each prompt token's log-prob, its alternatives or None without ``top_logprobs``); None for the first token."""


def prompt_logprobs(prompt_ids: list[int], output: RequestOutput, k: int) -> PromptLogprobs:
    """vLLM's prompt log-probs as (each prompt token's log-prob, its k alternatives or None for k 0)."""
    entries = list(zip(prompt_ids, output.prompt_logprobs or []))
    lps = [None if entry is None else entry[token].logprob for token, entry in entries]
    return lps, [None if entry is None else top_k(entry, token, k) for token, entry in entries] if k else None


def top_k(entry: dict[int, Logprob], sampled: int, k: int) -> dict[int, float]:
    """vLLM's log-probs of one position (the sampled token and the k most likely, ranked) as
    {token id: log-prob}: the k most likely first, then the sampled token if it is not one of them."""
    ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k)
    top = {t: logprob for _, t, logprob in ranked}
    top.setdefault(sampled, entry[sampled].logprob)
    return top
