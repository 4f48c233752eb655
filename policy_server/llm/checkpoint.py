"""Refuse, at start-up, a model folder that no replica could serve, naming the folder and why.

Replicas load models from their path (every node must read the same folder), so whatever can be
checked from the folder is checked once in the gateway before any replica starts: the folder, its
``config.json``, a weights file, a tokenizer; and for ``engine: vllm`` what vLLM refuses (an
architecture it does not implement, a head size its CPU attention does not run). vLLM is imported
only for ``engine: vllm`` (a ~10-30 s import).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

from policy_server.errors import SchemaError
from policy_server.schema.llm import LLMPolicySpec, LLMSection, LLMValueSpec

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
"""Names of the weights files ``from_pretrained`` reads (single or sharded with an index)."""
TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""Any one of them lets ``AutoTokenizer`` load a tokenizer from the folder."""


def check_section(llm: LLMSection, backend: Literal["serve", "local"] = "serve") -> None:
    """Check the folders of the `llm:` section's policy and value model (``check_checkpoint``)."""
    for where, spec in (("llm.policy", llm.policy), ("llm.value", llm.value)):
        if spec is not None:
            check_checkpoint(spec, where, on_cpu=replicas_on_cpu(spec, backend))


def replicas_on_cpu(spec: LLMPolicySpec | LLMValueSpec, backend: Literal["serve", "local"]) -> bool:
    """Whether the model will run on CPU: asked for, or no GPU in this process (local backend), or
    none in the schema's resources (a Serve replica gets a GPU only through ``num_gpus``)."""
    if spec.device == "cpu":
        return True
    if backend == "local":
        import torch

        return not torch.cuda.is_available()
    return spec.resources.num_gpus == 0


def check_checkpoint(spec: LLMPolicySpec | LLMValueSpec, where: str, on_cpu: bool) -> None:
    """Raise SchemaError ``"<where>.path: <folder>: <reason>"`` if the model folder cannot be served.

    ``where``: the schema's name for the spec (``llm.policy``); ``on_cpu``: the replicas run on CPU
    (vLLM's CPU attention then limits the head size).
    """
    config = read_config(spec.path, where)
    if isinstance(spec, LLMPolicySpec) and spec.engine == "vllm":
        reason = vllm_refusal(config, on_cpu)
        if reason is not None:
            raise _refused(spec.path, where, f"{reason} (or set `engine: transformers`)")


def read_config(folder: Path, where: str) -> dict[str, Any]:
    """The folder's ``config.json``, after checking it holds weights and a tokenizer too."""
    if not folder.is_dir():
        raise _refused(folder, where, "no such folder (every node that runs a replica must read it at this path)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise _refused(folder, where, "not a save_pretrained model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refused(folder, where, f"config.json cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise _refused(folder, where, "config.json is not a JSON object")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHTS):
        raise _refused(folder, where, f"no weights file (none of {', '.join(WEIGHTS)})")
    if not any((folder / name).is_file() for name in TOKENIZER):
        raise _refused(folder, where, f"no tokenizer (none of {', '.join(TOKENIZER)}): save it with the model")
    return config


def head_size(config: dict[str, Any]) -> int | None:
    """Per-head size of the attention: ``head_dim``, else ``hidden_size / num_attention_heads``."""
    if isinstance(config.get("head_dim"), int):
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def vllm_refusal(config: dict[str, Any], on_cpu: bool) -> str | None:
    """Why vLLM would refuse this model (None if it would load it)."""
    from vllm import ModelRegistry

    architectures = config.get("architectures") or []
    supported = ModelRegistry.get_supported_archs()
    if not any(arch in supported for arch in architectures):
        return f"vLLM implements none of its architectures {architectures}"
    size = head_size(config)
    if on_cpu and size is not None:
        with warnings.catch_warnings():  # its import uses torch.jit.script_method (deprecated): vLLM's to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if size not in sizes:
            return f"head size {size} is not one vLLM's CPU attention runs ({sizes})"
    return None


def _refused(folder: Path, where: str, reason: str) -> SchemaError:
    return SchemaError(f"{where}.path: {folder}: {reason}")
