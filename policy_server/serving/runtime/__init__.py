"""The runtime plug point: ``make_runtime(settings)`` picks where the services run, once."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from policy_server.serving.runtime.base import Runtime
from policy_server.settings import Settings

if TYPE_CHECKING:
    from policy_server.policies.torch_policy import TorchPolicy

log = logging.getLogger(__name__)
ROUTER_LOOP = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"

__all__ = ["Runtime", "make_runtime"]


def make_runtime(settings: Settings, loaded: dict[str, TorchPolicy] | None = None) -> Runtime:
    """``LocalRuntime`` for ``backend: local`` (no Ray imported), serving the policies already
    ``loaded`` as they are, else ``ServeRuntime`` (whose replicas load their own)."""
    if settings.backend == "local":
        from policy_server.serving.runtime.local import LocalRuntime

        return LocalRuntime(loaded)
    if not settings.direct_transport:
        _route_in_callers_loop()
    from policy_server.serving.runtime.serve import ServeRuntime

    return ServeRuntime(settings)


def _route_in_callers_loop() -> None:
    """Ray Serve's documented ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`` for the gateway: every
    handle's router runs in the event loop that calls it, a thread hop less per call.

    Only when every batch goes through a handle (``direct_transport: false``). With the direct
    transport, handles carry only control calls, and routers in the gateway's loop cost the
    batches that share it: measured with ``bench/serving.py`` on 2 cores, 16 and 64 clients got
    10-17 % fewer requests/s with the variable set than with Ray's default.

    Serve reads it once, when ``ray.serve`` is first imported. It is for this process only:
    replicas and trainer actors call handles synchronously from threads, which needs the router's
    own loop, and Ray's workers inherit the environment of the process that starts Ray, so it is
    removed again before Ray starts. A value the operator set is left as it is.
    """
    if ROUTER_LOOP in os.environ:
        return
    if "ray.serve" in sys.modules:
        log.warning("ray.serve was imported before the runtime: Serve's routers run in their own loop")
        return
    os.environ[ROUTER_LOOP] = "0"
    try:
        import ray.serve  # noqa: F401 - reads the variable now
    finally:
        del os.environ[ROUTER_LOOP]
