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
    # init args: policy name, model bytes (not a path: nodes share no files), format, use_gpu, and
    # a recurrent policy's state section (None: feed-forward)
    assert deployment.init_args == ("arm", b"model", "export", gpus_available, None)


def test_replicas_accept_every_batch_the_gateway_may_have_in_flight() -> None:
    # Serve's default max_ongoing_requests (5) would queue batches the gateway already sent.
    deployment = build_deployment(spec(num_replicas=2, max_concurrent_batches=6), b"m", "export", False)._bound_deployment
    assert deployment.max_ongoing_requests >= 6


def test_num_replicas_auto_gives_serve_its_autoscaling_config_and_room_for_the_target() -> None:
    resources = {"num_replicas": "auto", "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4,
                 "upscale_delay_s": 0, "look_back_period_s": 12}
    deployment = build_deployment(spec(**resources), b"m", "export", False)._bound_deployment
    config = deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 3, 4.0)
    assert (config.upscale_delay_s, config.look_back_period_s, config.downscale_delay_s) == (0.0, 12.0, 600.0)  # Serve's default
    # a replica takes everything the gateway may have in flight (target × max_replicas = 12) while Serve scales
    assert deployment.max_ongoing_requests >= 12


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_an_llm_deployment_autoscales_and_its_cap_stays_above_the_target(tmp_path: Path, engine: str) -> None:
    from policy_server.schema.llm import LLMPolicySpec
    from policy_server.serving.llm_deployment import build_llm_deployment

    resources = {"num_replicas": "auto", "max_replicas": 2, "target_ongoing_requests": 500}
    llm = LLMPolicySpec(path=tmp_path, engine=engine, resources=resources)
    deployment = build_llm_deployment(llm, False)._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 2
    assert deployment.max_ongoing_requests == 500  # above max_queued + max_batch_prompts (320)
