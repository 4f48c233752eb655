"""``safe_logits`` on vLLM: a V1 logits processor that replaces non-finite logits and counts them.

vLLM has no per-request hook before its raw log-probs are taken, so this works in two halves:

* ``SafeLogits`` runs inside vLLM's worker (named in ``AsyncEngineArgs(logits_processors=...)``).
  For the requests whose ``SamplingParams.extra_args`` carry ``{"safe_logits": key}`` it replaces
  NaN/±inf logits exactly as the transformers engine does (``sampling.sanitize_logits``), so the
  token is drawn from the cleaned distribution, and keeps per request and output position the
  number replaced. vLLM's raw log-probs are computed *before* logits processors run (see
  ``vllm/v1/sample/sampler.py``, ``Sampler.forward``), so at a position where something was
  replaced they are NaN; the processor also keeps that position's log-softmax of the cleaned raw
  logits and, once the sampled token is known, its log-prob and top-k: what the transformers engine
  reports there.
* The worker extension (``vllm_worker.WeightLoader``) reads those tallies back through
  ``collective_rpc`` (``safe_logits_report``), keyed by our request id: the counts live in the
  engine-core process, and a utility call is served between scheduler steps, after the step that
  produced the output we hold. No data rides in the outputs and no side channel needs cleaning up.

vLLM fans ``n > 1`` out to child requests that share one ``SamplingParams`` (and key); children
are told apart by vLLM's request ids, which the processor reads from the worker's input batch.

This module imports vLLM: only the engine core and ``vllm_engine`` load it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from policy_server.llm.sampling import sanitize_logits, top_logprobs

KEY = "safe_logits"
"""``SamplingParams.extra_args`` key whose value (our request id) asks for safe logits."""
PROCESSOR = "policy_server.llm.vllm_logits:SafeLogits"


@dataclasses.dataclass
class Fix:
    """What the transformers engine would report at one output position that had non-finite logits."""

    log_prob: float
    top: dict[int, float] | None


@dataclasses.dataclass
class Tally:
    """One vLLM request's replacements, by output position (a later pass over a position, after a
    partial prefill chunk or a preemption, overwrites the earlier one)."""

    key: str
    outputs: list[int]  # vLLM's running list of the request's output tokens (a reference)
    bias: dict[int, float]
    top_k: int
    req_id: str = ""
    counts: dict[int, int] = dataclasses.field(default_factory=dict)
    fixes: dict[int, Fix] = dataclasses.field(default_factory=dict)
    pending: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # position → (V,) log-probs

    def resolve(self) -> None:
        """Turn the pending log-prob rows of positions whose token is sampled by now into fixes."""
        for position in [p for p in self.pending if p < len(self.outputs) and self.outputs[p] >= 0]:
            row = self.pending.pop(position)[None]
            token = torch.tensor([self.outputs[position]], device=row.device)
            top = top_logprobs(row, token, self.top_k)[0] if self.top_k else None
            self.fixes[position] = Fix(float(row[0, token[0]]), top)

    def report(self) -> SafeReport:
        """Non-finite logits replaced in all, and the log-probs where any were."""
        self.resolve()
        return SafeReport(sum(self.counts.values()), {p: (f.log_prob, f.top) for p, f in self.fixes.items()})


@dataclasses.dataclass
class SafeReport:
    """What ``safe_logits`` did to one sample: ``count`` non-finite logits replaced, and per output
    position where any were, (the sampled token's log-prob, its top-k or None) from the cleaned logits."""

    count: int
    fixes: dict[int, tuple[float, dict[int, float] | None]]

    def patch(self, log_probs: list[float], tops: list[dict[int, float]] | None, start: int = 0) -> None:
        """Put the fixes into the log-probs (and top-k) of output positions ``start, start + 1, ...``."""
        for position, (log_prob, top) in self.fixes.items():
            if 0 <= position - start < len(log_probs):
                log_probs[position - start] = log_prob
                if tops is not None and top is not None:
                    tops[position - start] = top


class SafeLogits(LogitsProcessor):
    """vLLM V1 logits processor of ``safe_logits`` (see the module docstring); one per worker."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, Tally] = {}  # batch row → tally of the request there
        self.tallies: dict[str, Tally] = {}  # vLLM request id → tally, until reported
        self.batch: Any = None  # the worker's input batch, for its request ids (``attach``)

    def is_argmax_invariant(self) -> bool:
        return False  # a NaN or +inf logit decides greedy's argmax until it is replaced

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, _new_tally)
        if batch_update is None:
            return
        for index, *_ in batch_update.added:
            tally = self.rows.get(index)
            if tally is not None and not tally.req_id:
                assert self.batch is not None, "SafeLogits.attach was not called"
                tally.req_id = self.batch.req_ids[index]
                earlier = self.tallies.get(tally.req_id)
                if earlier is not None:  # a preempted request back in the batch keeps its counts
                    earlier.outputs = tally.outputs
                    self.rows[index] = tally = earlier
                self.tallies[tally.req_id] = tally
        for tally in self.rows.values():
            tally.resolve()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 logits → the same tensor, rows of safe requests cleaned in place."""
        if not self.rows:
            return logits
        rows = list(self.rows.items())
        picked = logits[torch.tensor([r for r, _ in rows], device=logits.device)]
        bad = (~torch.isfinite(picked).all(-1)).tolist()
        for _, tally in rows:  # a position seen again (after a partial prefill) starts over
            position = len(tally.outputs)
            tally.counts[position] = 0
            tally.fixes.pop(position, None)
            tally.pending.pop(position, None)
        if not any(bad):
            return logits
        clean, changed = sanitize_logits(picked)
        logits[torch.tensor([r for r, _ in rows], device=logits.device)] = clean
        for i, ((_, tally), n, hit) in enumerate(zip(rows, changed.tolist(), bad)):
            if hit:  # the raw log-probs (taken before us) are NaN here: keep the cleaned raw ones
                position = len(tally.outputs)
                tally.counts[position] = n
                raw = clean[i].clone()
                for token, bias in tally.bias.items():  # vLLM's logit bias ran before us; ours are raw
                    raw[token] -= bias
                tally.pending[position] = torch.log_softmax(raw, -1)
        return logits

    def report(self, key: str, keep: bool) -> dict[str, Any]:
        """{vLLM request id: (count, [[position, log-prob, [[token, log-prob], ...] or None], ...])} of
        our request ``key`` (plain lists: they cross vLLM's msgpack); forgets them unless ``keep``."""
        found = {rid: t for rid, t in self.tallies.items() if t.key == key}
        if not keep:
            for rid in found:
                del self.tallies[rid]
        reports = {rid: t.report() for rid, t in found.items()}
        return {rid: (r.count, [[p, lp, None if top is None else [[t, v] for t, v in top.items()]]
                                for p, (lp, top) in r.fixes.items()]) for rid, r in reports.items()}


def _new_tally(params: SamplingParams, _prompt: list[int] | None, outputs: list[int]) -> Tally | None:
    key = (params.extra_args or {}).get(KEY)
    if key is None:
        return None
    return Tally(str(key), outputs, dict(params.logit_bias or {}), params.logprobs or 0)


def processor(worker: Any) -> SafeLogits:
    """The worker's ``SafeLogits``; LookupError when the engine was started without it."""
    for p in worker.model_runner.input_batch.logitsprocs.all:
        if isinstance(p, SafeLogits):
            return p
    raise LookupError("the vLLM engine runs without the SafeLogits logits processor")


def attach(worker: Any) -> bool:
    """Give the worker's ``SafeLogits`` the input batch's request ids; True when it has one."""
    processor(worker).batch = worker.model_runner.input_batch
    return True


def sample_index(request_id: str, key: str) -> int:
    """Which of the ``n`` samples a vLLM request id is: vLLM names child ``i`` ``f"{i}_{id}"``."""
    head = request_id.split(key, 1)[0]
    return int(head.rstrip("_")) if head else 0


async def collect(llm: Any, key: str, keep: bool = False) -> dict[int, SafeReport]:
    """Ask vLLM's worker (``AsyncLLM.collective_rpc``) what ``safe_logits`` did to our request ``key``:
    {sample index: report}. Call it after the request's last output (or with ``keep`` while it runs)."""
    found = (await llm.collective_rpc("safe_logits_report", args=(key, keep)))[0]
    return {
        sample_index(rid, key): SafeReport(count, {
            int(p): (float(lp), None if top is None else {int(t): float(v) for t, v in top}) for p, lp, top in fixes
        })
        for rid, (count, fixes) in found.items()
    }


def check_log_probs(log_probs: list[float], start: int = 0) -> None:
    """Raise ``ValueError`` as the transformers engine does when a sampled token's raw log-prob is not
    finite: vLLM drew it from NaN or +inf logits (a request without ``safe_logits``)."""
    for step, log_prob in enumerate(log_probs):
        if not math.isfinite(log_prob):
            raise ValueError(
                f"the model produced non-finite logits at generated token {start + step}; "
                "send safe_logits=true to replace non-finite logits and go on"
            )
