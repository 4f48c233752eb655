"""The one error map: every exception class of Ray and Serve becomes one of ours, with the status
intended for it; a class that a new Ray adds fails here until it is placed (like httpx's test)."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import ray.exceptions
import ray.serve.exceptions
from ray.exceptions import RayTaskError

from policy_server.errors import (
    BackendUnavailable,
    GatewayTimeout,
    ModelError,
    NotFound,
    PolicyServerError,
    QueueFull,
)
from policy_server.serving.errors import domain_error, local, remote

MODEL, UNAVAILABLE, TIMEOUT = 500, 503, 504
# Each class Ray 2.60 and Serve define, with the status it must be answered with.
INTENDED = {
    "UserCodeException": MODEL, "UnserializableException": MODEL, "CrossLanguageError": MODEL,
    "GetTimeoutError": TIMEOUT, "ObjectFetchTimedOutError": TIMEOUT, "RayChannelTimeoutError": TIMEOUT,
    **dict.fromkeys([
        "ActorAlreadyExistsError", "ActorDiedError", "ActorHandleNotFoundError", "ActorPlacementGroupRemoved",
        "ActorUnavailableError", "ActorUnschedulableError", "AsyncioActorExit", "AuthenticationError",
        "LocalRayletDiedError", "NodeDiedError", "ObjectFreedError", "ObjectLostError",
        "ObjectReconstructionFailedError", "ObjectRefStreamEndOfStreamError", "ObjectStoreFullError",
        "OufOfBandObjectRefSerializationException", "OutOfDiskError", "OutOfMemoryError", "OwnerDiedError",
        "PendingCallsLimitExceeded", "PlasmaObjectNotAvailable", "RayActorError", "RayCgraphCapacityExceeded",
        "RayChannelError", "RayDirectTransportError", "RayError", "RaySystemError",
        "ReferenceCountingAssertionError", "RpcError", "RuntimeEnvSetupError",
        "StreamingGeneratorReplayInconsistentError", "TaskCancelledError", "TaskPlacementGroupRemoved",
        "TaskUnschedulableError", "WorkerCrashedError", "BackPressureError", "DeploymentUnavailableError",
        "RayServeException", "ReplicaUnavailableError", "RequestCancelledError", "gRPCStatusError",
    ], UNAVAILABLE),
}


def _ray_classes() -> list[type[BaseException]]:
    found = {
        cls
        for module in (ray.exceptions, ray.serve.exceptions)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception)
    }
    return sorted(found - {RayTaskError}, key=lambda c: c.__name__)


def _instance(cls: type[BaseException]) -> BaseException:
    """One of ``cls``; Ray's constructors want fields the map must not need."""
    try:
        return cls()
    except TypeError:
        return cls.__new__(cls)


def test_every_ray_and_serve_exception_class_has_an_intended_status() -> None:
    names = {cls.__name__ for cls in _ray_classes()}
    assert names - INTENDED.keys() == set(), "new Ray or Serve exceptions: decide their status in serving.errors"
    assert INTENDED.keys() - names == set()


@pytest.mark.parametrize("cls", _ray_classes(), ids=lambda c: c.__name__)
def test_each_ray_and_serve_exception_maps_to_its_domain_error(cls: type[BaseException]) -> None:
    mapped = domain_error(_instance(cls), "the policy's deployment")
    assert isinstance(mapped, PolicyServerError) and mapped.status == INTENDED[cls.__name__]
    expected = {MODEL: ModelError, UNAVAILABLE: BackendUnavailable, TIMEOUT: GatewayTimeout}[mapped.status]
    assert type(mapped) is expected
    if mapped.status == UNAVAILABLE:
        assert mapped.message.startswith("the policy's deployment is unavailable")


def _task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("forward", "Traceback: ...", cause)


@pytest.mark.parametrize(
    "cause", [NotFound("no run 'x'"), QueueFull("the generation queue is full", retry_after_s=7)],
    ids=lambda e: type(e).__name__,
)
def test_a_domain_error_a_replica_raised_comes_back_as_itself(cause: PolicyServerError) -> None:
    for raised in (_task_error(cause), _task_error(cause).as_instanceof_cause()):
        assert domain_error(raised) is cause


def test_anything_else_a_replica_raised_is_a_model_error_naming_it() -> None:
    mapped = domain_error(_task_error(ValueError("mat1 and mat2 shapes cannot be multiplied")))
    assert type(mapped) is ModelError and mapped.status == 500
    assert mapped.message == "the model raised ValueError: mat1 and mat2 shapes cannot be multiplied"


def test_a_ray_error_inside_a_replica_is_mapped_as_the_ray_error() -> None:
    """A replica whose own handle call failed (the tasks deployment calling a dead policy replica)."""
    inner = _instance(ray.exceptions.ActorDiedError)
    assert type(domain_error(_task_error(inner))) is BackendUnavailable


def test_a_plain_exception_is_a_model_error() -> None:
    assert type(domain_error(RuntimeError("CUDA out of memory"))) is ModelError


def test_remote_and_local_raise_only_domain_errors() -> None:
    async def replica_raised() -> None:
        raise _task_error(KeyError("w"))

    def model_raised() -> None:
        raise ZeroDivisionError("division by zero")

    with pytest.raises(ModelError, match="KeyError"):
        asyncio.run(remote("the trainer", replica_raised))
    with pytest.raises(ModelError, match="ZeroDivisionError: division by zero"):
        asyncio.run(local(model_raised))


def test_an_unavailable_replica_is_a_503_with_retry_after_and_a_timeout_a_504() -> None:
    import json

    from policy_server.gateway.errors import error_response

    unavailable = error_response(domain_error(_instance(ray.exceptions.ActorDiedError)))
    assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "1"
    timeout = error_response(domain_error(_instance(ray.exceptions.GetTimeoutError)))
    assert timeout.status_code == 504
    assert json.loads(timeout.body)["error"]["code"] == "gateway_timeout"


def test_an_unavailable_backend_names_its_kind_not_rays_text(caplog: pytest.LogCaptureFixture) -> None:
    """Ray's text (addresses, process ids, advice for the cluster's operator) goes to the log only."""
    from ray.exceptions import NodeDiedError

    mapped = domain_error(NodeDiedError("node 10.1.2.3 died; try `ray stop --force`"), "the trainer")
    assert mapped.message == "the trainer is unavailable (NodeDiedError: restarting, or its node is gone); retry shortly"
    assert "10.1.2.3" in caplog.text
