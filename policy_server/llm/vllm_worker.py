"""The vLLM worker extension that loads new weights into a running engine, in place.

``VLLMEngine`` names this class as vLLM's ``worker_extension_cls``; vLLM mixes it into each of
its workers, and ``AsyncLLM.collective_rpc("load_safetensors", args=(blob,))`` runs it there,
between two scheduler steps. The weights travel as one safetensors blob: torch tensors passed as
``collective_rpc`` arguments arrive as lists, bytes arrive intact. vLLM's own ``reload_weights``
(layer-wise, checkpoint names such as ``model.layers.0.self_attn.q_proj.weight``) fuses and
processes them as its loader does at start-up; a bare ``model.load_weights`` fails on CPU after
that processing ("'Parameter' object has no attribute 'weight_loader'").

This module imports no vLLM: it is loaded by name inside vLLM's worker processes.
"""

from __future__ import annotations

from typing import Any

from safetensors.torch import load


class WeightLoader:
    """Mixed into vLLM's workers (``worker_extension_cls``); ``self`` is the worker."""

    reload_weights: Any  # the worker's own method

    def load_safetensors(self, blob: bytes) -> int:
        """Load every tensor of a safetensors ``blob`` (checkpoint names) in place; returns how many."""
        tensors = load(blob)
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)
