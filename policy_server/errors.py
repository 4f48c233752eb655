"""The error hierarchy of policy-server.

Every error the server raises on purpose is a ``PolicyServerError``. Each class carries the HTTP
status and the machine-readable ``code`` it is answered with; the gateway translates all of them
(and the framework's own validation errors) into one JSON envelope at a single boundary
(``policy_server.gateway.errors``)::

    PolicyServerError                500 internal_error
    ├── SchemaError                  (start-up only: schema.yaml or model file is wrong)
    ├── SettingsError                (start-up only: a setting, e.g. a certificate file, is wrong)
    ├── InvalidRequest               422 invalid_request
    │   └── ModelOverflow            422 model_overflow
    ├── Unauthorized                 401 unauthorized
    ├── Forbidden                    403 forbidden
    ├── NotFound                     404 not_found
    │   └── NotTrainable             404 not_trainable
    ├── Conflict                     409 conflict
    │   ├── StaleSamples             409 stale_samples
    │   ├── TrainingNotRunning       409 training_not_running
    │   ├── StaleGroup               409 stale_group
    │   ├── RunFinished              409 run_finished
    │   └── TooManyRuns              409 too_many_runs
    ├── TaskLost                     410 task_lost
    ├── GroupLost                    410 group_lost
    ├── PayloadTooLarge              413 payload_too_large
    ├── ModelError                   500 model_error
    ├── ClientGenerationFailed       500 client_generation_failed
    ├── Overloaded                   429 overloaded
    │   └── QueueFull                429 queue_full
    ├── BackendUnavailable           503 backend_unavailable
    ├── ClientsNotReady              503 clients_not_ready
    └── GatewayTimeout               504 gateway_timeout

``serving.errors.domain_error`` maps every exception Ray and Serve raise into this tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One invalid field: a dotted location such as ``body.observations.3.is_up_free``."""

    field: str
    message: str


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def summary(exc: BaseException) -> str:
    """The last non-empty line of an exception's message (where torch and Ray put the cause)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class PolicyServerError(Exception):
    status: int = 500
    code: str = "internal_error"
    retry_after_s: int | None = None  # a 429 or 503 answer's Retry-After, when not the default

    def __init__(self, message: str, fields: list[FieldError] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or []

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled (across Ray) without calling __init__: the default calls ``cls(*args)``, which an
        # InvalidRequest refuses (no fields) and a subclass with other arguments misreads
        return _rebuilt, (type(self), self.args, self.__dict__)


class SchemaError(PolicyServerError):
    """schema.yaml or its model is invalid; raised while the app is built, never per request."""

    code = "schema_error"


class StartupError(PolicyServerError):
    """What the schema describes could not be started: a deployment failed or did not run in time,
    or start-up was cancelled. Raised while the server starts, never per request."""

    code = "startup_error"


class InvalidRequest(PolicyServerError):
    """The request is invalid; names each bad field (a 422 always says which)."""

    status = 422
    code = "invalid_request"

    def __init__(self, message: str, fields: list[FieldError]) -> None:
        if not fields:
            raise TypeError(f"{type(self).__name__} names at least one field: {message!r}")
        super().__init__(message, fields)

    @classmethod
    def at(cls, field: str, message: str) -> InvalidRequest:
        """One bad field, e.g. ``InvalidRequest.at("body.stream", "streaming is not supported")``;
        the message says ``"body.stream: streaming is not supported"``."""
        return cls(f"{field}: {message}", [FieldError(field, message)])


class ModelOverflow(InvalidRequest):
    """A valid observation whose values overflow the model's float32 layers (NaN or inf outputs):
    a bound that depends on the weights, so no request schema can state it."""

    code = "model_overflow"


class SettingsError(PolicyServerError):
    """A server setting (an environment variable or ``.env`` entry) is invalid; raised at start-up,
    never per request. The message names the variable, never a secret's value."""

    code = "settings_error"


class UnsupportedMediaType(PolicyServerError):
    """A request body of a ``Content-Type`` the route does not read."""

    status = 415
    code = "unsupported_media_type"


class Unauthorized(PolicyServerError):
    """No credentials, or (on the OpenAI routes) wrong ones. Answered with a ``WWW-Authenticate``
    header carrying ``challenge`` (RFC 9110 §11.6.1), e.g. ``Bearer realm="policy-server"``."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, challenge: str = 'APIKey realm="policy-server", header="access-token"') -> None:
        super().__init__(message)  # the default: the access-token scheme (an error rebuilt by name has no other)
        self.challenge = challenge


class Forbidden(PolicyServerError):
    status = 403
    code = "forbidden"


class NotFound(PolicyServerError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """A model id (OpenAI's ``model``) this server does not serve; names the field that gave it."""

    code = "model_not_found"  # OpenAI's


class NotTrainable(NotFound):
    """The policy has no ``training`` section in the schema."""

    code = "not_trainable"


class TaskLost(PolicyServerError):
    """A queued task was held by a replica whose process died (Serve replaced it): its request and
    result are gone; submit it again."""

    status = 410
    code = "task_lost"


class GroupLost(PolicyServerError):
    """A GRPO group was handed out by a process that died before its rewards came: the run was
    resumed from disk without it (a group waiting for rewards is kept in memory only); ask for new
    completions."""

    status = 410
    code = "group_lost"


class Conflict(PolicyServerError):
    """The request is valid but conflicts with the server's current state."""

    status = 409
    code = "conflict"


class StaleSamples(Conflict):
    """Every sample was acted by a model version older than the trainer accepts."""

    code = "stale_samples"


class TrainingNotRunning(Conflict):
    """Training is paused or stopped: experience is not stored."""

    code = "training_not_running"


class StaleGroup(Conflict):
    """Rewards for a GRPO group generated by a model version older than the run accepts."""

    code = "stale_group"


class RunFinished(Conflict):
    """The GRPO run was stopped: it hands out no completions and takes no rewards."""

    code = "run_finished"


class TooManyRuns(Conflict):
    """As many GRPO runs as the server keeps are running already."""

    code = "too_many_runs"


class NoCandidate(Conflict):
    """The policy has no candidate version (no ``canary`` section in its schema) to route to,
    promote or roll back."""

    code = "no_candidate"


class NotPromotable(Conflict):
    """Weights cannot move between a policy's versions: the two models' parameters (names, shapes)
    differ, or a trainer owns the stable model's versions."""

    code = "not_promotable"


class PayloadTooLarge(PolicyServerError):
    status = 413
    code = "payload_too_large"


class ModelError(PolicyServerError):
    """The model raised or returned something unusable while answering a request."""

    code = "model_error"


class ClientGenerationFailed(PolicyServerError):
    """Generating the client SDKs failed (a generator crashed, timed out or is missing)."""

    code = "client_generation_failed"


class Overloaded(PolicyServerError):
    """Too much work is queued; retry after a moment (the answer carries Retry-After)."""

    status = 429
    code = "overloaded"


class QueueFull(Overloaded):
    """A bounded queue (generations, tasks, sessions) is full; retry after ``retry_after_s`` seconds."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(PolicyServerError):
    """The deployment serving a policy is not reachable (starting, restarting or gone)."""

    status = 503
    code = "backend_unavailable"


class ClientsNotReady(PolicyServerError):
    """The client SDKs are still being generated; retry after the answer's Retry-After."""

    status = 503
    code = "clients_not_ready"
    retry_after_s = 5


class GatewayTimeout(PolicyServerError):
    """A replica or actor did not answer in time (it may still be working on the request)."""

    status = 504
    code = "gateway_timeout"
