"""Where the models run: backends (Ray Serve or in-process) and the gateway's micro-batcher."""

from policy_server.serving.backend import LocalBackend, PolicyBackend
from policy_server.serving.batcher import MicroBatcher

__all__ = ["LocalBackend", "MicroBatcher", "PolicyBackend"]
