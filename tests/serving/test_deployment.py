"""The Serve application of a policy carries the schema's resources; GPUs only where they exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_server.schema.config import DiscreteSpec, PolicySpec, ResourceSpec
from policy_server.serving.deployment import build_deployment


def spec(**resources: float) -> PolicySpec:
    return PolicySpec(
        name="arm",
        observations=None,
        action_space=DiscreteSpec(),
        model=Path("/models/arm.pt2"),
        resources=ResourceSpec(**resources),
    )


@pytest.mark.parametrize("gpus_available", [True, False])
def test_resources_come_from_the_schema_and_gpus_only_when_present(gpus_available: bool) -> None:
    app = build_deployment(spec(num_replicas=3, num_cpus=0.5, num_gpus=1), b"model", "export", gpus_available)
    deployment = app._bound_deployment
    assert deployment.name == "policy-arm"
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1.0 if gpus_available else 0.0}
    # init args: policy name, model bytes (not a path: nodes share no files), format, use_gpu
    assert deployment.init_args == ("arm", b"model", "export", gpus_available)


def test_replicas_accept_every_batch_the_gateway_may_have_in_flight() -> None:
    # Serve's default max_ongoing_requests (5) would queue batches the gateway already sent.
    deployment = build_deployment(spec(num_replicas=2, max_concurrent_batches=6), b"m", "export", False)._bound_deployment
    assert deployment.max_ongoing_requests >= 6
