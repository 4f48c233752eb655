"""vLLM's engine arguments for a policy folder (``VLLMEngine`` starts its ``AsyncLLM`` with them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

from transformers import AutoConfig
from vllm.config import StructuredOutputsConfig
from vllm.config.lora import MaxLoRARanks
from vllm.engine.arg_utils import AsyncEngineArgs

from policy_server.llm.vllm_logits import PROCESSOR
from policy_server.schema.llm import LLMPolicySpec

CPU_KV_CACHE_BYTES = 256 << 20
"""KV cache of an engine on CPU (vLLM's default share of memory is refused on a small machine)."""
MIN_MAX_LOGPROBS = 20
"""vLLM's default ``max_logprobs`` (OpenAI's ``top_logprobs`` goes up to 20)."""
WORKER_EXTENSION = "policy_server.llm.vllm_worker.WeightLoader"


def transfer_backend(spec: LLMPolicySpec, device: str) -> str | None:
    """The backend of direct weight transfers into this engine's workers (``vllm_transfer``), or
    None where weights arrive only as ``set_weights`` (``rpc``, an adapter, ``auto`` on CPU).
    Raises ValueError for ``nccl`` on a replica without a GPU."""
    setting = spec.weight_transfer
    if setting == "nccl" and device != "cuda":
        raise ValueError("weight_transfer: nccl needs the policy's replicas on a GPU (resources.num_gpus > 0, "
                         "device: auto or cuda); use gloo or rpc on CPU")
    if setting == "auto":
        return "nccl" if device == "cuda" and spec.adapter is None else None
    return None if setting == "rpc" else setting


def engine_args(spec: LLMPolicySpec, folder: Path, adapter: Path | None, device: str) -> AsyncEngineArgs:
    """vLLM's engine arguments for a policy folder: prefix caching and chunked prefill on, raw log-probs,
    a context of at most ``max_input_length + max_new_tokens``, the spec's KV cache size (by default a
    fixed one on CPU, vLLM's share of memory on a GPU), eager mode on CPU."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config()
    limits = spec.limits
    context = limits.max_input_length + limits.max_new_tokens
    positions = getattr(config, "max_position_embeddings", None)
    on_cpu = device != "cuda"
    lora: dict[str, Any] = {}
    folders = [*([adapter] if adapter is not None else []), *spec.adapters.values()]
    if folders:
        rank = max(json.loads((f / "adapter_config.json").read_text())["r"] for f in folders)
        # the served adapter counts twice: a weight update adds its new version before removing the old
        slots = len(spec.adapters) + (2 if adapter is not None else 0)
        lora = {"enable_lora": True, "max_lora_rank": min(r for r in get_args(MaxLoRARanks) if r >= rank),
                "max_loras": slots, "max_cpu_loras": slots}
    return AsyncEngineArgs(
        model=str(folder),
        tokenizer=str(folder),
        dtype=spec.dtype,
        max_model_len=min(context, positions) if positions else context,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        enforce_eager=on_cpu,
        kv_cache_memory_bytes=spec.kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if on_cpu else None),
        logprobs_mode="raw_logprobs",
        max_logprobs=max(MIN_MAX_LOGPROBS, 2 * limits.max_num_samples),
        worker_extension_cls=WORKER_EXTENSION,
        logits_processors=[PROCESSOR],  # safe_logits (vllm_logits)
        disable_log_stats=True,
        # structured outputs as compact JSON: small models otherwise loop on whitespace until their limit
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        weight_transfer_config={"backend": backend} if (backend := transfer_backend(spec, device)) else None,
        **lora,
    )
