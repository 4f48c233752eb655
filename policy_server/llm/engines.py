"""The factory of LLM policy engines: the one ``llm.policy.engine`` names.

``vllm`` is vLLM's async engine (``llm.vllm_engine.VLLMEngine``); ``transformers`` our batched
loop (``llm.engine.LLMEngine``). vLLM is imported only when its engine is asked for, so the
transformers engine runs where vLLM is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from policy_server.devices import resolve_device
from policy_server.llm.engine import BatchObserver, LLMEngine
from policy_server.schema.llm import LLMPolicySpec

if TYPE_CHECKING:
    from policy_server.llm.vllm_engine import VLLMEngine


def open_policy_engine(
    spec: LLMPolicySpec, folder: Path, adapter: Path | None, device: str, on_batch: BatchObserver | None = None
) -> LLMEngine | VLLMEngine:
    """The engine of ``spec.engine`` serving the model in ``folder`` (with its LoRA ``adapter``) on ``device``
    (``"auto"``: the GPU when torch sees one; ``"cuda"``; ``"cpu"``); ``on_batch`` hears each generate
    call (vLLM: each finished request). The one place that picks the engine."""
    if spec.engine == "transformers":
        return LLMEngine(spec, folder, adapter, device, on_batch)
    from policy_server.llm.vllm_engine import VLLMEngine

    return VLLMEngine(spec, folder, adapter, resolve_device(device).type, on_batch)
