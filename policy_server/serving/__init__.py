"""Where the models run: the runtime plug point (``runtime``), the typed services it hands out
(``api``), the one error map (``errors``), the Ray adapters, and the gateway's micro-batcher."""

from policy_server.serving.batcher import MicroBatcher

__all__ = ["MicroBatcher"]
