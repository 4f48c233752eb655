"""How many Serve replicas a deployment runs: a fixed ``num_replicas``, or ``num_replicas: auto``
with Ray Serve's autoscaling fields (named as Ray Serve 2.60's ``AutoscalingConfig`` names them).

Shared by a policy's ``resources`` and an LLM model's ``resources``. Imports no Ray: the schema
is validated once, here, and ``serving`` hands ``autoscaling_config()`` to Serve as it is.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

AUTO = "auto"
SERVE_TARGET_ONGOING_REQUESTS = 2.0
"""Ray Serve 2.60's default ``target_ongoing_requests`` (``ray.serve._private.constants``)."""
SERVE_METRICS_INTERVAL_S = 10.0
"""Ray Serve 2.60's ``AutoscalingConfig.metrics_interval_s`` (and push interval of its handles' metrics)."""
AUTOSCALING_FIELDS = (
    "min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
    "upscale_delay_s", "downscale_delay_s", "look_back_period_s",
)


def _replica_count(value: Any) -> Any:
    """``auto`` or a whole number of at least 1, with one message for anything else."""
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise PydanticCustomError(
        "num_replicas", "must be a whole number of at least 1 or `auto` (Serve's autoscaling), not {value}",
        {"value": repr(value)},
    )


def refused(message: str) -> PydanticCustomError:
    """A cross-field error whose message is all the user reads (no "Value error, " before it)."""
    return PydanticCustomError("replicas", message)


ReplicaCount = Annotated[int | Literal["auto"], BeforeValidator(_replica_count)]


class Replicas(BaseModel):
    """The replica fields of a deployment's ``resources``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    num_replicas: ReplicaCount = 1
    """Serve replicas of the deployment, or `auto`: Serve starts and stops replicas between
    `min_replicas` and `max_replicas` to keep about `target_ongoing_requests` per replica."""
    min_replicas: int | None = Field(None, ge=1)
    """`auto` only: fewest replicas (default 1; scaling to zero is not offered: weight updates
    and version checks need a running replica)."""
    max_replicas: int | None = Field(None, ge=1)
    """`auto` only, required: most replicas. The start-up check counts `min_replicas`; the
    cluster needs room for `max_replicas` to reach it."""
    initial_replicas: int | None = Field(None, ge=1)
    """`auto` only: replicas at start (default `min_replicas`)."""
    target_ongoing_requests: float | None = Field(None, gt=0)
    """`auto` only: requests (gateway batches, LLM requests) in flight per replica that Serve
    aims at (Serve's default 2)."""
    upscale_delay_s: float | None = Field(None, ge=0)
    """`auto` only: how long load must stay above target before Serve adds replicas (Serve's
    default 30 s)."""
    downscale_delay_s: float | None = Field(None, ge=0)
    """`auto` only: how long load must stay below target before Serve removes replicas (Serve's
    default 600 s)."""
    look_back_period_s: float | None = Field(None, gt=SERVE_METRICS_INTERVAL_S)
    """`auto` only: the window Serve averages the load over (Serve's default 30 s), longer than
    Serve's 10 s metrics interval (Serve warns about a shorter one, and will refuse it)."""

    @model_validator(mode="after")
    def _check_replicas(self) -> Replicas:
        given = [name for name in AUTOSCALING_FIELDS if getattr(self, name) is not None]
        if self.num_replicas != AUTO:
            if given:
                raise refused(
                    f"{given[0]} applies only to `num_replicas: auto`, and num_replicas is "
                    f"{self.num_replicas} (a fixed count); set `num_replicas: auto` or remove {', '.join(given)}"
                )
            return self
        if self.max_replicas is None:
            raise refused("`num_replicas: auto` needs max_replicas (the most replicas Serve may start)")
        if self.min_count > self.max_replicas:
            raise refused(f"min_replicas {self.min_count} is above max_replicas {self.max_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_count <= initial <= self.max_replicas:
            raise refused(
                f"initial_replicas {initial} is outside min_replicas..max_replicas "
                f"({self.min_count}..{self.max_replicas})"
            )
        return self

    @property
    def autoscaled(self) -> bool:
        return self.num_replicas == AUTO

    @property
    def min_count(self) -> int:
        """Fewest replicas: ``min_replicas`` (default 1), or the fixed count."""
        if isinstance(self.num_replicas, int):
            return self.num_replicas
        return self.min_replicas or 1

    @property
    def max_count(self) -> int:
        """Most replicas: ``max_replicas``, or the fixed count."""
        if isinstance(self.num_replicas, int):
            return self.num_replicas
        assert self.max_replicas is not None  # the validator requires it with `auto`
        return self.max_replicas

    @property
    def start_count(self) -> int:
        """Replicas Serve starts with (and that must fit the cluster for start-up to finish)."""
        return self.initial_replicas or self.min_count

    @property
    def target(self) -> float:
        """Requests in flight per replica that Serve aims at, Serve's default when not set."""
        return self.target_ongoing_requests or SERVE_TARGET_ONGOING_REQUESTS

    def saturating(self, per_replica: float) -> int:
        """Requests in flight that keep every replica busy: ``per_replica`` each over the most
        replicas, and for ``auto`` at least the target each, so that a full load asks Serve for
        ``max_replicas`` (Serve scales to in-flight requests ÷ target)."""
        if not self.autoscaled:
            return math.ceil(per_replica * self.max_count)
        return math.ceil(max(per_replica, self.target) * self.max_count)

    def serve_options(self) -> dict[str, Any]:
        """``num_replicas`` and ``autoscaling_config`` as ``Deployment.options`` takes them; Serve's
        defaults fill what the schema leaves out."""
        if not self.autoscaled:
            return {"num_replicas": self.num_replicas}
        config = {"min_replicas": self.min_count, "max_replicas": self.max_count}
        config |= {name: getattr(self, name) for name in AUTOSCALING_FIELDS[2:] if getattr(self, name) is not None}
        return {"num_replicas": None, "autoscaling_config": config}
