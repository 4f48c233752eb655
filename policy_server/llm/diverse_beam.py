"""Beam search and diverse beam search (Vijayakumar et al. 2016), over any next-token log-prob function.

transformers 5 moved group ("diverse") beam search out of the library, so it lives here. Plain
beam search is the one-group case of the same code: with ``num_groups=1`` and no penalty it makes
the choices ``model.generate(num_beams=B, do_sample=False, early_stopping=False)`` makes (tested).

The search holds ``P × G × B`` rows (prompt-major, then group, then beam: row
``(p * G + g) * B + b``). Each step it asks ``advance(parents, tokens)`` for the next-token
log-probs of every row after moving row ``parents[r]`` into row ``r`` and appending ``tokens[r]``;
it knows nothing of models, caches or tokenizers.

Per prompt and step, the groups choose in order. Group ``g`` scores token ``v`` of beam ``b`` as

    running[b] + log p(v | beam b) - diversity_penalty * count_v

where ``count_v`` is how many beams of groups ``0..g-1`` chose ``v`` at this step (Hamming
diversity; a group's chosen beams are those that go on, or on the last step those that finish). Of the ``2B`` best candidates, those among the best ``B`` that end the beam (a stop
string, or the last allowed token) join the group's pool of finished hypotheses with score
``sum / length ** length_penalty``, the pool keeping its best ``B``; the best ``B`` candidates that
do not end continue. A group closes when its pool is full and its best running beam, normalised by
the current length, cannot beat the pool's worst (transformers' ``early_stopping=False``
heuristic), or at the last allowed token. Scores include the diversity penalties, as in the paper;
``Hypothesis.log_probs`` are the model's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NEG_INF_SCORE = -1.0e9
"""Starting score of every beam but the first in a group, so that step 0 expands one beam only."""

Advance = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``advance(parents (R,), tokens (R,)) -> (log-probs (R, V), non-finite logits replaced (R,))``."""
StopFn = Callable[[list[int]], "str | None"]
"""The stop string a completion has just reached, or None."""


@dataclass
class Hypothesis:
    """A finished beam."""

    tokens: list[int]
    log_probs: list[float]
    """log p(token | prefix) of each token under the model (no diversity penalty)."""
    score: float
    """(sum of log-probs - diversity penalties) / len(tokens) ** length_penalty."""
    stop_string: str | None
    """The stop string that ended it; None if it ran to its token limit."""
    nonfinite: int = 0
    """Non-finite logits replaced along this beam."""


def hamming_penalty(chosen: torch.Tensor, vocab_size: int, diversity_penalty: float) -> torch.Tensor:
    """Penalty per token: ``diversity_penalty`` times how often earlier groups chose it at this step.

    ``chosen`` (P, n) token ids, -1 for none (n may be 0) → (P, V). Naive equivalent:
    ``[[diversity_penalty * row.tolist().count(v) for v in range(V)] for row in chosen]``.
    """
    counts = torch.zeros(chosen.shape[0], vocab_size, dtype=torch.float32, device=chosen.device)
    counts.scatter_add_(1, chosen.clamp(min=0), (chosen >= 0).to(torch.float32))
    return diversity_penalty * counts


@dataclass
class _Group:
    """One prompt's group: its finished pool (best first) and whether it can still change."""

    pool: list[Hypothesis]
    open: bool = True


@dataclass
class _Beams:
    """Per-row histories (python lists: they are read token by token for stop checks)."""

    tokens: list[list[int]]
    log_probs: list[list[float]]
    nonfinite: list[int]


Continuation = tuple[float, int, int, list[float], int]
"""(score, parent row, token, log-prob history, non-finite count) of a beam that goes on."""


def group_beam_search(
    first_log_probs: torch.Tensor,
    first_nonfinite: torch.Tensor,
    advance: Advance,
    *,
    num_groups: int,
    group_size: int,
    max_new_tokens: list[int],
    stop: StopFn,
    diversity_penalty: float = 0.0,
    length_penalty: float = 1.0,
) -> list[list[Hypothesis]]:
    """Diverse beam search for P prompts; for each prompt, the groups' pools in group order, best first.

    ``first_log_probs`` (R, V) and ``first_nonfinite`` (R,) are the log-probs of the first token of
    every row (R = P * num_groups * group_size; rows of one prompt start equal). ``max_new_tokens[p]``
    bounds prompt p's completions. Each returned list holds ``num_groups * group_size`` hypotheses.
    """
    P, G, B = len(max_new_tokens), num_groups, group_size
    R, V = first_log_probs.shape
    if R != P * G * B:
        raise ValueError(f"expected {P} * {G} * {B} rows, got {R}")
    device = first_log_probs.device
    running = torch.full((P, G, B), NEG_INF_SCORE, device=device)
    running[:, :, 0] = 0.0
    beams = _Beams([[] for _ in range(R)], [[] for _ in range(R)], [0] * R)
    groups = [[_Group([]) for _ in range(G)] for _ in range(P)]
    log_probs, step_nonfinite = first_log_probs, first_nonfinite
    t = 0
    while True:
        step_nf = step_nonfinite.tolist()
        parents, next_tokens = list(range(R)), [0] * R
        chosen = torch.zeros(P, 0, dtype=torch.long, device=device)  # this step's tokens of earlier groups
        for g in range(G):
            rows = log_probs.view(P, G, B, V)[:, g].reshape(P, B * V)
            scores = rows - hamming_penalty(chosen, V, diversity_penalty).repeat(1, B) if g else rows
            candidates = scores + running[:, g].repeat_interleave(V, dim=1)  # (P, B*V)
            k = min(2 * B, B * V)
            values, index = candidates.topk(k)
            top = zip(values.tolist(), index.tolist(), rows.gather(1, index).tolist())
            scores_g = running[:, g].tolist()
            picked = [[-1] * B for _ in range(P)]
            for p, (top_values, top_index, top_raw) in enumerate(top):
                group = groups[p][g]
                if not group.open:
                    continue
                base = (p * G + g) * B
                last = t + 1 >= max_new_tokens[p]
                kept, finished = _choose(
                    list(zip(top_values, top_index, top_raw)),
                    B,
                    V,
                    base,
                    last,
                    t,
                    length_penalty,
                    beams,
                    step_nf,
                    stop,
                )
                if not last and len(kept) < B:  # more than B of the best 2B ended: look further
                    values_p, index_p = candidates[p].topk(B * V)
                    ranked = list(zip(values_p.tolist(), index_p.tolist(), rows[p][index_p].tolist()))
                    kept, finished = _choose(
                        ranked, B, V, base, last, t, length_penalty, beams, step_nf, stop
                    )
                group.pool = sorted(group.pool + finished, key=lambda h: h.score, reverse=True)[:B]
                for b, (score, parent, token, history, nf) in enumerate(kept):
                    scores_g[p][b] = score
                    parents[base + b], next_tokens[base + b] = parent, token
                    beams.log_probs[base + b], beams.nonfinite[base + b] = (
                        history,
                        nf,
                    )  # rows of this group only
                    picked[p][b] = token
                if last:  # nothing goes on: the beams this group chose are the ones it finished
                    picked[p][: len(finished)] = [h.tokens[-1] for h in finished]
                    group.open = False
                elif len(group.pool) == B:  # transformers' early_stopping=False heuristic
                    group.open = kept[0][0] / (t + 1) ** length_penalty > group.pool[-1].score
            running[:, g] = torch.tensor(scores_g, device=device)
            chosen = torch.cat([chosen, torch.tensor(picked, device=device)], dim=1)
        beams.tokens = [beams.tokens[parent] + [next_tokens[r]] for r, parent in enumerate(parents)]
        t += 1
        if not any(group.open for prompt in groups for group in prompt):
            break
        log_probs, step_nonfinite = advance(
            torch.tensor(parents, device=device), torch.tensor(next_tokens, device=device)
        )
    return [[h for group in prompt for h in group.pool] for prompt in groups]


def _choose(
    ranked: list[tuple[float, int, float]],
    B: int,
    V: int,
    base: int,
    last: bool,
    t: int,
    length_penalty: float,
    beams: _Beams,
    step_nf: list[int],
    stop: StopFn,
) -> tuple[list[Continuation], list[Hypothesis]]:
    """One group's step for one prompt: the B best candidates that go on, and those that end.

    ``ranked`` holds ``(score, index into the group's B*V candidates, model log-prob)``, best first.
    Only candidates among the best B may finish (as in transformers); on the last step all of those do.
    """
    kept: list[Continuation] = []
    finished: list[Hypothesis] = []
    for rank, (score, flat, lp) in enumerate(ranked):
        if len(kept) == B and rank >= B:
            break
        parent, token = base + flat // V, flat % V
        seq = beams.tokens[parent] + [token]
        ended = stop(seq)
        history = beams.log_probs[parent] + [lp]
        nf = beams.nonfinite[parent] + step_nf[parent]
        if ended is not None or last:
            if rank < B:
                finished.append(Hypothesis(seq, history, score / (t + 1) ** length_penalty, ended, nf))
        elif len(kept) < B:
            kept.append((score, parent, token, history, nf))
    return kept, finished
