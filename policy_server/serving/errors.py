"""The one map from what a remote call can raise to the server's own errors (``policy_server.errors``).

Every call to a replica or an actor goes through ``remote`` (Serve side) or ``local`` (in-process
side), so the gateway only ever sees ``PolicyServerError``:

* our own error raised by a replica or actor (``RayTaskError.cause``): itself, class, code and
  status intact (they pickle whole, see ``PolicyServerError.__reduce__``);
* anything else the model or domain code raised: ``ModelError`` (500), naming the exception;
* a replica, actor, node or object store that is gone, restarting, full or unreachable:
  ``BackendUnavailable`` (503, with Retry-After: retrying is the remedy);
* a call that ran out of time: ``GatewayTimeout`` (504).

``tests/serving/test_error_map.py`` walks every exception class of ``ray.exceptions`` and
``ray.serve.exceptions``: a class that a new Ray adds fails it until it is placed here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

from policy_server.errors import BackendUnavailable, GatewayTimeout, ModelError, PolicyServerError, summary

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

# Ray raises these for the code it ran, not for its own machinery: the model's fault, not the cluster's.
_MODEL_FAULTS = ("UserCodeException", "UnserializableException", "CrossLanguageError")
# A deadline passed: Ray's get, an object fetch, a compiled-graph channel.
_TIMEOUTS = ("GetTimeoutError", "ObjectFetchTimedOutError", "RayChannelTimeoutError")


def domain_error(exc: BaseException, what: str = "the deployment") -> PolicyServerError:
    """``exc`` as the server's error; ``what`` names the remote side in the message ("the
    policy's deployment"). Never raises."""
    if not _from_ray(exc):
        return exc if isinstance(exc, PolicyServerError) else ModelError(f"the model raised {type(exc).__name__}: {_text(exc)}")
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        # the replica or actor raised: map what it raised (a nested Ray error included). Ray may
        # hand it out as a class deriving from both RayTaskError and the cause's: the cause is ours.
        return domain_error(exc.cause, what) if exc.cause is not None else ModelError(f"{what} failed: {_text(exc)}")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & set(_MODEL_FAULTS):
        return ModelError(f"the model raised {type(exc).__name__}: {_text(exc)}")
    if names & set(_TIMEOUTS):
        return GatewayTimeout(f"{what} did not answer in time: {_text(exc)}")
    # dead, restarting, unreachable, full, cancelled by Ray (we never cancel through Ray: our own
    # cancellation arrives as asyncio.CancelledError), or unplaceable: retrying is the remedy. The
    # client gets the kind; Ray's own text (process ids, addresses, advice for the cluster's
    # operator) goes to the gateway's log.
    log.warning("%s is unavailable: %s", what, _text(exc))
    return BackendUnavailable(f"{what} is unavailable ({type(exc).__name__}: restarting, or its node is gone); retry shortly")


async def remote(what: str, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await ``call(*args)`` (a ``handle.<method>.remote`` or ``actor.<method>.remote``), raising
    only ``PolicyServerError`` (see ``domain_error``)."""
    try:
        return await call(*args, **kwargs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise domain_error(exc, what) from exc


async def local(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run the blocking domain method ``call(*args)`` in a worker thread, raising only
    ``PolicyServerError`` (another exception is a ``ModelError``)."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except Exception as exc:
        raise domain_error(exc) from exc


async def local_async(call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await the domain coroutine ``call(*args)``, raising only ``PolicyServerError``."""
    try:
        return await call(*args, **kwargs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise domain_error(exc) from exc


async def mapped_stream(what: str, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """``items`` (a remote or local stream), raising only ``PolicyServerError``; closing this
    closes ``items``."""
    try:
        async for item in items:
            yield item
    except Exception as exc:
        raise domain_error(exc, what) from exc
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


def _from_ray(exc: BaseException) -> bool:
    """Whether Ray or Serve defined the exception's class (without importing Ray for the local runtime)."""
    return any(cls.__module__.startswith("ray.") for cls in type(exc).__mro__)


def _text(exc: BaseException) -> str:
    try:
        return summary(exc)
    except Exception:  # noqa: BLE001 - a Ray error built without its fields cannot print itself
        return type(exc).__name__
