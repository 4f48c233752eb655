"""Pure tensor math of sampling: non-finite logits, top-p, inverse-CDF draws, OpenAI's penalties
and logit bias, top-k log-probs, and per-row seeded random streams. Shapes: R rows, V vocabulary.
"""

from __future__ import annotations

import os

import torch

from policy_server.llm.params import GenerationParams

POS_INF_LOGIT = 1.0e30
"""What ``safe_logits`` puts in place of a +inf logit: finite, and far above any real logit."""


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


def stream_seed(seed: int, sample: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + sample * 0xBF58476D1CE4E5B9 + 1) % 2**63


class Uniforms:
    """One uniform per row per step: a seeded row draws from its own stream, seeded by (seed, sample
    index), so what it samples does not depend on the rows beside it; unseeded rows share one stream."""

    def __init__(self, seeds: list[int | None], sample_of_row: list[int]) -> None:
        self.shared = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self.streams: list[torch.Generator | None] = [
            None if seed is None else torch.Generator().manual_seed(stream_seed(seed, j))
            for seed, j in zip(seeds, sample_of_row)
        ]
        self.seeded = any(stream is not None for stream in self.streams)

    def draw(self, rows: list[int]) -> torch.Tensor:
        """(len(rows),) uniforms for the given (original) row indices."""
        if not self.seeded:
            return torch.rand(len(rows), generator=self.shared)
        return torch.cat([torch.rand(1, generator=self.streams[r] or self.shared) for r in rows])


class Shaping:
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
