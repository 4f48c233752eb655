"""The vLLM engine of an LLM policy: vLLM's V1 ``AsyncLLM`` behind ``LLMEngine``'s interface.

vLLM schedules (continuous batching, paged KV cache, prefix caching, chunked prefill); this
module maps ``GenerationParams`` to vLLM's ``SamplingParams`` and vLLM's outputs back to
``Sample``s, and adds what vLLM lacks: a bounded wait list (``QueueFull``), the name of the stop
string that ended each sample, beam search and diverse beam search (our ``group_beam_search`` on
vLLM's per-step log-probs), and versioned in-place weight updates.

vLLM runs on its own event loop in a thread of this process (its engine core is a separate
process), so the engine answers callers on any loop or thread: the async methods hop onto that
loop, and a cancelled caller cancels (and aborts) its vLLM request. On CPU the engine keeps vLLM's
engine core off the cores vLLM binds its workers to (``cpu_affinity``).

Log-probs are vLLM's ``raw_logprobs``: those of the model's raw distribution (before temperature,
top-p, penalties and bias), as ``Generator.log_probs`` computes them by teacher forcing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file
from transformers import AutoConfig, AutoTokenizer
from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from policy_server.errors import InvalidRequest, QueueFull
from policy_server.llm.checkpoint import adapter_file_name, read_weights
from policy_server.llm.cpu_affinity import (
    CoreSplit,
    CPUWorker,
    all_cores,
    engine_environment,
    keep_off_workers,
    spread_over_all_cores,
)
from policy_server.llm.diverse_beam import group_beam_search
from policy_server.llm.engine import BatchObserver, BatchReport, check_newer
from policy_server.llm.generation import LENGTH_PENALTY, MIN_BEAMS, sample_of_hypothesis
from policy_server.llm.params import FinishReason, GenerationParams, Sample, SampleChunk
from policy_server.llm.stopping import StopMatcher
from policy_server.llm.vllm_args import engine_args, transfer_backend
from policy_server.llm.vllm_logits import KEY, SafeReport, check_log_probs, collect
from policy_server.llm.vllm_loop import Loop, close_items, next_item
from policy_server.llm.vllm_outputs import PromptLogprobs, prompt_logprobs, top_k
from policy_server.llm.vllm_transfer import join, receive  # registers the gloo backend
from policy_server.schema.llm import LLMPolicySpec
from policy_server.weights import check_weights

ADAPTER_FILE = "adapter_model.safetensors"
VLLM_NAMES = {"n": "num_samples", "max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}  # ours


class VLLMEngine:
    """A policy LM on vLLM: ``generate``, ``stream`` and versioned ``set_weights`` (see the module docstring).

    ``set_weights`` takes some or all of the served weights (checkpoint names, or a LoRA adapter's
    names for a policy with an adapter), checks them like ``weights.VersionedWeights``, and loads
    the whole set into vLLM's workers in place: generation pauses between two scheduler steps,
    the weights load, caches computed with the old weights are dropped, and the requests in flight
    go on (each sample names the version in force when it finished). An adapter is swapped for a
    new vLLM ``LoRARequest`` per version (not merged). The ``llm.policy.adapters`` are more fixed
    ``LoRARequest``s on the same engine, one per model id, that ``GenerationParams.adapter`` picks.
    """

    partial_updates = True

    def __init__(
        self, spec: LLMPolicySpec, folder: Path, adapter: Path | None, device: str,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.spec = spec
        self.on_batch = on_batch
        self.version = 0
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.vocab_size: int = AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config().vocab_size
        self._lock = threading.Lock()  # one weight update at a time
        self._active = 0  # requests in vLLM (counted on the engine loop)
        self._adapter_dir = tempfile.TemporaryDirectory(prefix="policy-server-vllm-lora-") if adapter else None
        self._adapter_config = adapter / "adapter_config.json" if adapter else None
        # The master copy that partial updates merge into, read from the folder on the first
        # update: a replica that is never trained never holds the weights outside vLLM's worker.
        self._weights_folder = adapter if adapter else folder
        self._master: dict[str, torch.Tensor] | None = None
        self._lora = LoRARequest("v0", 1, str(adapter)) if adapter else None
        # fixed: weight updates never touch them; their ids come from the served adapter's counter
        self._extra = {name: LoRARequest(name, _lora_id(), str(f)) for name, f in spec.adapters.items()}
        # vLLM 0.32's CPU LoRA kernel breaks on a batch that computes prompt log-probs (einsum shape
        # error in the worker): the engine core dies and every later request fails. Refused instead.
        on_cpu = device != "cuda"
        self._no_prompt_logprobs = on_cpu and (adapter is not None or bool(spec.adapters))
        self.transfer_backend = transfer_backend(spec, device)  # direct transfers (vllm_transfer), or None
        self._direct_weights = False  # the served weights came from a direct transfer: no master copy
        args = engine_args(spec, folder, adapter, device)
        self._loop = Loop()
        if on_cpu:  # read by the engine core that vLLM spawns
            os.environ.update(engine_environment(spec.cpu_threads_bind, os.environ, len(all_cores())))
            spread_over_all_cores()  # vLLM picks its workers' cores among the starting thread's
        self.llm: AsyncLLM = self._loop.submit(_start(args)).result()
        self._loop.submit(self.llm.collective_rpc("attach_safe_logits")).result()
        self._split = keep_off_workers(self.cpu_workers()) if on_cpu else CoreSplit()
        self.max_model_len: int = self.llm.model_config.max_model_len

    # ---- generation -------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        """``num_samples`` samples for one prompt, and the version of the weights that made them.

        Raises ``QueueFull`` when ``limits.max_queued`` requests are in the engine, ``InvalidRequest``
        for ``safe_logits`` with a beam strategy, ``ValueError`` for a prompt that leaves no room to
        generate or non-finite logits without ``safe_logits``.
        """
        self._check(prompt_ids, params)
        if params.strategy != "temperature":
            samples = await self._loop.call(self._beam(prompt_ids, params))
        else:
            samples = await self._loop.call(self._sample(prompt_ids, params))
        return samples, samples[0].model_version

    async def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """The samples of ``generate`` chunk by chunk; closing the iterator aborts the vLLM request.
        Beam strategies yield each sample whole once the search ends."""
        chunks = self.stream_on_engine_loop(prompt_ids, params)
        try:
            while (chunk := await self._loop.call(next_item(chunks))) is not None:
                yield chunk
        finally:
            await self._loop.call(close_items(chunks))

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop vLLM's ``AsyncLLM`` runs on (a daemon thread's)."""
        return self._loop.loop

    async def stream_on_engine_loop(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """``stream`` for a caller that iterates it on ``event_loop`` itself: no hop between loops per
        chunk (the direct stream transport's replica server runs there). Raises as ``generate``."""
        self._check(prompt_ids, params)
        if params.strategy != "temperature":
            samples = await self._beam(prompt_ids, params)
            for index, s in enumerate(samples):
                yield SampleChunk(index, s.completion_ids, s.log_probs, s.top_logprobs, s.finish_reason,
                                  s.stop_string, s.model_version)
            return
        async with aclosing(self._chunks(prompt_ids, params)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _check(self, prompt_ids: list[int], params: GenerationParams) -> None:
        if params.safe_logits and params.strategy != "temperature":
            raise InvalidRequest.at(
                "safe_logits", "the vllm engine replaces non-finite logits for temperature sampling only; use the "
                "transformers engine (llm.policy.engine: transformers) for safe_logits with beam strategies")
        if params.prompt_logprobs and self._no_prompt_logprobs:
            raise InvalidRequest.at("prompt_logprobs", "the vllm engine cannot give the prompt's log-probs with LoRA "
                                    "adapters on CPU (vLLM's CPU LoRA kernel fails on them); use a GPU, no adapters, "
                                    "or the transformers engine")
        if params.adapter is not None and params.adapter not in self._extra:
            raise InvalidRequest.at("adapter", f"no adapter {params.adapter!r}; llm.policy.adapters has {sorted(self._extra)}")
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the engine takes at most {self.max_model_len} "
                "positions, leaving no room to generate: shorten the prompt"
            )

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count a request in the engine; ``QueueFull`` when ``max_queued`` are in already."""
        limit = self.spec.limits.max_queued
        if self._active >= limit:
            raise QueueFull(f"{limit} generation requests are waiting; retry shortly")
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    async def _sample(self, prompt_ids: list[int], params: GenerationParams) -> list[Sample]:
        started = time.perf_counter()
        key = uuid.uuid4().hex
        safe: dict[int, SafeReport] = {}
        with self._admitted():
            final: RequestOutput | None = None
            sampling = self._sampling_params(params, len(prompt_ids), RequestOutputKind.FINAL_ONLY, key)
            try:
                async for final in self._request(prompt_ids, sampling, params.adapter, key):
                    pass
            finally:  # also forgets the tallies of a cancelled request
                safe = await collect(self.llm, key) if params.safe_logits else {}
        assert final is not None
        version = self.version
        prompt_lps = prompt_logprobs(prompt_ids, final, params.top_logprobs) if params.prompt_logprobs else None
        samples = [self._to_sample(prompt_ids, out, params, version, prompt_lps, safe.get(out.index))
                   for out in sorted(final.outputs, key=lambda o: o.index)]
        self._report(samples, time.perf_counter() - started, version)
        return samples

    async def _chunks(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        started = time.perf_counter()
        tokens = 0
        key = uuid.uuid4().hex
        sent: dict[int, int] = {}  # tokens of each sample yielded so far
        try:
            with self._admitted():
                sampling = self._sampling_params(params, len(prompt_ids), RequestOutputKind.DELTA, key)
                async for output in self._request(prompt_ids, sampling, params.adapter, key):
                    safe = await collect(self.llm, key, keep=True) if params.safe_logits else {}
                    for out in output.outputs:
                        s = self._to_sample(prompt_ids, out, params, self.version, None, safe.get(out.index),
                                            sent.get(out.index, 0))
                        tokens += len(s.completion_ids)
                        sent[out.index] = sent.get(out.index, 0) + len(s.completion_ids)
                        finish = s.finish_reason if out.finish_reason is not None else None
                        yield SampleChunk(out.index, s.completion_ids, s.log_probs, s.top_logprobs, finish,
                                          s.stop_string if finish else None, s.model_version)
        finally:  # a stream closed early (the client left) counts the tokens it was sent
            if params.safe_logits:
                await collect(self.llm, key)  # forget its tallies
            if self.on_batch is not None:
                self.on_batch(BatchReport(1, tokens, time.perf_counter() - started,
                                          self.llm.get_num_unfinished_requests(), self.version))

    def _request(self, prompt_ids: list[int], sampling: SamplingParams, adapter: str | None,
                 key: str | None = None) -> AsyncIterator[RequestOutput]:
        # vLLM aborts the request when this generator is closed or its task cancelled
        lora = self._lora if adapter is None else self._extra[adapter]
        return self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sampling, key or uuid.uuid4().hex,
                                 lora_request=lora)

    def _stops(self, params: GenerationParams) -> list[str]:
        stops = params.stop_strings if params.stop_strings is not None else (self.spec.step_token, self.spec.end_token)
        return list(dict.fromkeys((*stops, self.spec.end_token)))

    def _sampling_params(self, params: GenerationParams, prompt_len: int, kind: RequestOutputKind,
                         key: str) -> SamplingParams:
        structured = None
        if params.structured is not None:
            structured = (
                StructuredOutputsParams(json=params.structured.json_schema)
                if params.structured.kind == "json_schema"
                else StructuredOutputsParams(json_object=True)
            )
        try:
            return SamplingParams(
                n=params.num_samples,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                max_tokens=min(params.max_new_tokens, self.max_model_len - prompt_len),
                min_tokens=params.min_new_tokens,
                # our stop strings, matched on text with special tokens (the step and end tokens) spelled out;
                # the model's eos stops nothing unless it is one of them, as in the transformers engine,
                # except where a grammar ends: structured outputs end on eos
                stop=self._stops(params),
                include_stop_str_in_output=True,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
                ignore_eos=structured is None,
                logprobs=params.top_logprobs,
                prompt_logprobs=params.top_logprobs if params.prompt_logprobs else None,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                logit_bias=dict(params.logit_bias) or None,
                structured_outputs=structured,
                output_kind=kind,
                extra_args={KEY: key} if params.safe_logits else None,  # vllm_logits.SafeLogits cleans its logits
            )
        except VLLMValidationError as exc:  # what the routes let through and vLLM refuses (a temperature above 2)
            name = exc.parameter or exc.args[0].split(" ", 1)[0]
            raise InvalidRequest.at(VLLM_NAMES.get(name, name), f"the vLLM engine refuses it: {exc.args[0]}") from exc

    def _to_sample(self, prompt_ids: list[int], out: CompletionOutput, params: GenerationParams, version: int,
                   prompt_lps: PromptLogprobs | None, safe: SafeReport | None = None, start: int = 0) -> Sample:
        """A ``Sample`` of vLLM's output (of tokens ``start, ...``; ``safe``'s log-probs where it cleaned logits)."""
        token_ids = list(out.token_ids)
        entries = out.logprobs or []
        log_probs = [entry[token].logprob for token, entry in zip(token_ids, entries)]
        k = params.top_logprobs
        # the k most likely, then the sampled token when it is not among them (k or k + 1 entries,
        # as the transformers engine and OpenAI's "up to logprobs + 1" answer)
        top = ([top_k(entry, token, k) for token, entry in zip(token_ids, entries)] if k else None)
        if safe is not None:
            safe.patch(log_probs, top, start)
        check_log_probs(log_probs, start)
        reason: FinishReason = "stop" if out.finish_reason == "stop" else "length"
        stop_string = None
        if reason == "stop":
            stop_string = out.stop_reason if isinstance(out.stop_reason, str) else self._stop_named(token_ids, params)
        return Sample(list(prompt_ids), token_ids, log_probs, reason, stop_string, safe.count if safe else 0,
                      model_version=version, top_logprobs=top, prompt_logprobs=prompt_lps[0] if prompt_lps else None,
                      prompt_top_logprobs=prompt_lps[1] if prompt_lps else None)

    def _stop_named(self, token_ids: list[int], params: GenerationParams) -> str | None:
        """The stop string a sample that vLLM stopped on a token ends with (or that token's text)."""
        found = StopMatcher(self.tokenizer, tuple(self._stops(params)))(token_ids)
        return found if found is not None else self.tokenizer.decode(token_ids[-1:], skip_special_tokens=False)

    def _report(self, samples: list[Sample], seconds: float, version: int) -> None:
        if self.on_batch is not None:
            tokens = sum(len(s.completion_ids) for s in samples)
            self.on_batch(BatchReport(1, tokens, seconds, self.llm.get_num_unfinished_requests(), version))

    # ---- beam strategies --------------------------------------------------------------------

    async def _beam(self, prompt_ids: list[int], params: GenerationParams) -> list[Sample]:
        """Beam search (one group, no penalty, as the transformers engine) and diverse beam search:
        ``group_beam_search`` on the top log-probs of one-token vLLM requests, one per beam and step
        (prefix caching makes each request's re-prefill cheap)."""
        if params.strategy == "beam_search":
            groups, size, penalty = 1, max(params.num_samples, MIN_BEAMS), 0.0
        else:
            groups, size, penalty = params.groups, params.num_samples // params.groups, params.diversity_penalty
        # a token that can enter a group's 2B best after the Hamming penalty is among a row's
        # 2B + (penalised tokens of earlier groups) best
        k = min(self.vocab_size, 2 * size + (groups - 1) * size)
        limit = min(params.max_new_tokens, self.max_model_len - len(prompt_ids))
        width = groups * size
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        with self._admitted():
            first = await self._next_log_probs([prompt_ids], k, params.adapter)
            rows: list[list[int]] = [[] for _ in range(width)]

            def advance(parents: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                nonlocal rows
                rows = [rows[p] + [t] for p, t in zip(parents.tolist(), tokens.tolist())]
                future = asyncio.run_coroutine_threadsafe(
                    self._next_log_probs([prompt_ids + r for r in rows], k, params.adapter), loop)
                return future.result(), torch.zeros(width, dtype=torch.long)

            stop = StopMatcher(self.tokenizer, tuple(self._stops(params)))
            found = await asyncio.to_thread(
                group_beam_search, first.expand(width, -1).clone(), torch.zeros(width, dtype=torch.long), advance,
                num_groups=groups, group_size=size, max_new_tokens=[limit], stop=stop,
                diversity_penalty=penalty, length_penalty=LENGTH_PENALTY,
            )
        version = self.version
        samples = [dataclasses.replace(sample_of_hypothesis(list(prompt_ids), h), model_version=version)
                   for h in found[0][: params.num_samples]]
        self._report(samples, time.perf_counter() - started, version)
        return samples

    async def _next_log_probs(self, prefixes: list[list[int]], k: int, adapter: str | None) -> torch.Tensor:
        """(R, V) float32 raw log-probs of the token after each prefix: its ``k`` best, -inf elsewhere."""
        sampling = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, ignore_eos=True,
                                  output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(prefix: list[int]) -> dict[int, float]:
            final: RequestOutput | None = None
            async for final in self._request(prefix, sampling, adapter):
                pass
            assert final is not None and final.outputs[0].logprobs
            return {t: lp.logprob for t, lp in final.outputs[0].logprobs[0].items()}

        found = await asyncio.gather(*(one(p) for p in prefixes))
        out = torch.full((len(prefixes), self.vocab_size), float("-inf"))
        for row, entry in enumerate(found):
            out[row, list(entry)] = torch.tensor(list(entry.values()))
        return out

    # ---- weights ----------------------------------------------------------------------------

    def set_weights(self, weights: dict[str, Any], version: int) -> int:
        """Load new values for some or all weights in place and move to ``version``; returns it.

        Raises ValueError, changing nothing, when a name is unknown, a shape or dtype kind differs,
        or a value is NaN or infinite, or some are missing after a direct transfer (this replica then
        holds no copy to merge them into); ``Conflict`` unless ``version`` is newer. Blocks until
        vLLM has the weights: call it off the caller's event loop (``asyncio.to_thread``).
        """
        with self._lock:
            check_newer(version, self.version)  # Conflict: served versions never go backwards
            given = {adapter_file_name(n): v for n, v in weights.items()} if self._lora else weights
            master = self._weights()  # after a direct transfer: the folder's, for names and shapes only
            merged = {**master, **check_weights(master, given, partial=not self._direct_weights)}
            self._loop.submit(self._load(merged, version)).result()
            self._master, self._direct_weights = merged, False
            self.version = version
        return version

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join a trainer's transfer group (``vllm_transfer``: vLLM's ``init_weight_transfer_engine``
        with this replica's ``rank_offset``); blocks until every rank has joined."""
        self._loop.submit(join(self.llm, init_info)).result()

    def receive_weights(self, update_info: dict[str, Any], version: int) -> int:
        """Receive every weight the trainer broadcasts in place (as ``set_weights`` does: paused
        between scheduler steps, stale caches dropped) and move to ``version``; returns it.

        ``update_info`` is vLLM's update info (names, dtype names, shapes). ``Conflict`` unless
        ``version`` is newer: check before the trainer sends, or it waits for this rank.
        """
        with self._lock:
            check_newer(version, self.version)
            self._loop.submit(self._paused(receive(self.llm, update_info))).result()
            self._master, self._direct_weights = None, True
            self.version = version
        return version

    def shutdown_weight_transfer(self) -> None:
        """Leave the trainer's transfer group; generation goes on."""
        self._loop.submit(self.llm.shutdown_weight_transfer_engine()).result()

    def _weights(self) -> dict[str, torch.Tensor]:
        """The served weights by checkpoint (or adapter) name; call under ``self._lock``."""
        if self._master is None:
            self._master = read_weights(self._weights_folder)
        return self._master

    async def _paused(self, load: Awaitable[None]) -> None:
        """Pause vLLM's scheduler (requests in flight wait), ``load``, drop stale caches, resume."""
        await self.llm.pause_generation(mode="keep", clear_cache=True)
        try:
            await load
        finally:
            await self.llm.resume_generation()

    async def _load(self, weights: dict[str, torch.Tensor], version: int) -> None:
        if self._lora:
            await self._paused(self._swap_adapter(self._new_adapter(weights, version)))
        else:
            await self._paused(self.llm.collective_rpc("load_safetensors", args=(save(weights),)))

    async def _swap_adapter(self, lora: LoRARequest) -> None:
        await self.llm.add_lora(lora)
        old, self._lora = self._lora, lora
        if old is not None:
            await self.llm.remove_lora(old.lora_int_id)

    def _new_adapter(self, weights: dict[str, torch.Tensor], version: int) -> LoRARequest:
        assert self._adapter_dir is not None and self._adapter_config is not None
        folder = Path(self._adapter_dir.name) / f"v{version}-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(self._adapter_config.read_text())
        save_file({n: t.contiguous() for n, t in weights.items()}, str(folder / ADAPTER_FILE))
        return LoRARequest(f"v{version}-{folder.name}", _lora_id(), str(folder))

    def snapshot(self) -> tuple[dict[str, Any], int]:
        """The served weights (checkpoint or adapter names) as numpy arrays, and their version.
        Raises RuntimeError after a direct transfer: the trainer holds them, not this replica."""
        with self._lock:
            if self._direct_weights:
                raise RuntimeError(f"the served weights came from the trainer ({self.transfer_backend} transfer): "
                                   "this replica keeps no copy")
            return {n: t.float().numpy().copy() if t.dtype == torch.bfloat16 else t.numpy().copy()
                    for n, t in self._weights().items()}, self.version

    def get_weights(self) -> dict[str, Any]:
        return self.snapshot()[0]

    def cpu_workers(self) -> list[CPUWorker]:
        """vLLM's workers and the cores each computes on (on CPU; see ``cpu_affinity``)."""
        found = self._loop.submit(self.llm.collective_rpc("cpu_worker")).result()
        return [CPUWorker(pid, frozenset(cores)) for pid, cores in found]

    def unfinished_requests(self) -> int:
        """Requests vLLM holds now (waiting or running)."""
        return self.llm.get_num_unfinished_requests()

    def close(self) -> None:
        """Shut vLLM's engine core down and stop the engine loop."""
        self._loop.submit(_shutdown(self.llm)).result(timeout=60)
        self._loop.close()
        self._split.undo()
        if self._adapter_dir is not None:
            self._adapter_dir.cleanup()


async def _start(args: AsyncEngineArgs) -> AsyncLLM:
    return AsyncLLM.from_engine_args(args)


async def _shutdown(llm: AsyncLLM) -> None:
    llm.shutdown()


_lora_ids = iter(range(2, 2**31))


def _lora_id() -> int:
    return next(_lora_ids)

