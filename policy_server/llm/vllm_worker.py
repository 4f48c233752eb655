"""The vLLM worker extension: loads new weights into a running engine in place, reads
``safe_logits``' tallies (``vllm_logits``) back, and tells which cores it computes on.

``VLLMEngine`` names this class as vLLM's ``worker_extension_cls``; vLLM mixes it into each of
its workers, and ``AsyncLLM.collective_rpc("load_safetensors", args=(blob,))`` runs it there,
between two scheduler steps. The weights travel as one safetensors blob: torch tensors passed as
``collective_rpc`` arguments arrive as lists, bytes arrive intact. vLLM's own ``reload_weights``
(layer-wise, checkpoint names such as ``model.layers.0.self_attn.q_proj.weight``) fuses and
processes them as its loader does at start-up; a bare ``model.load_weights`` fails on CPU after
that processing ("'Parameter' object has no attribute 'weight_loader'").

Direct transfers from a trainer (``vllm_transfer``) use vLLM's own worker methods
(``init_weight_transfer_engine``, ``update_weights``, ...); importing this module, which vLLM does
in each worker before it loads the model, registers the ``gloo`` backend there.
"""

from __future__ import annotations

from typing import Any

from safetensors.torch import load

import policy_server.llm.vllm_transfer  # noqa: F401  # registers the gloo backend in this worker


class WeightLoader:
    """Mixed into vLLM's workers (``worker_extension_cls``); ``self`` is the worker."""

    reload_weights: Any  # the worker's own methods
    get_model: Any

    def load_safetensors(self, blob: bytes) -> int:
        """Load every tensor of a safetensors ``blob`` (checkpoint names) in place; returns how many."""
        tensors = load(blob)
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        self.retie_lm_head()
        return len(tensors)

    def cpu_worker(self) -> tuple[int, list[int]]:
        """This worker's pid and the cores its compute threads are bound to (``cpu_affinity``)."""
        from policy_server.llm.cpu_affinity import worker_of_this_process

        worker = worker_of_this_process()
        return worker.pid, sorted(worker.cores)

    def attach_safe_logits(self) -> bool:
        """Give the worker's ``SafeLogits`` processor its input batch (once, after start-up)."""
        from policy_server.llm.vllm_logits import attach

        return attach(self)

    def safe_logits_report(self, key: str, keep: bool) -> dict[str, Any]:
        """``SafeLogits.report``: the tallies of our request ``key``, by vLLM request id."""
        from policy_server.llm.vllm_logits import processor

        return processor(self).report(key, keep)

    def retie_lm_head(self) -> None:
        """A model whose output layer is its input embedding (tied): the layer-wise reload loads
        the embedding, but the output layer, which gets no weights of its own, keeps what it made
        of the old ones at start-up (on CPU, a packed matrix); tie it again and redo that."""
        model = self.get_model()
        lm_head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
        embed = getattr(inner, "embed_tokens", None)
        if lm_head is None or embed is None or lm_head is embed:
            return
        if lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr() or getattr(
            getattr(model, "config", None), "tie_word_embeddings", False
        ):
            lm_head.tie_weights(embed)
            lm_head.quant_method.process_weights_after_loading(lm_head)
