"""The Ray side of the error map, on a real Ray actor: what a trainer raises reaches the gateway as
one of our errors, never as a raw RayTaskError (a 500 ``internal_error``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from policy_server.errors import BackendUnavailable, ModelError, NotFound
from policy_server.serving.runtime.remote import ActorPolicyTrainer


@ray.remote
class FailingTrainer:
    """Stands in for ``TrainerActor``: the same method names, each failing in its own way."""

    def status(self) -> dict[str, Any]:
        raise ValueError("boom in the trainer")

    def checkpoints(self) -> dict[str, Any]:
        raise NotFound("no checkpoint 'x'")


@pytest.fixture(scope="module")
def actor(ray_session: int) -> Iterator[Any]:
    handle = FailingTrainer.remote()
    yield handle
    ray.kill(handle)


def test_a_plain_exception_in_the_trainer_is_a_500_model_error(actor: Any) -> None:
    with pytest.raises(ModelError, match="ValueError: boom in the trainer"):
        asyncio.run(ActorPolicyTrainer(actor).status())


def test_our_error_in_the_trainer_comes_back_as_itself(actor: Any) -> None:
    with pytest.raises(NotFound, match="no checkpoint 'x'"):
        asyncio.run(ActorPolicyTrainer(actor).checkpoints())


def test_a_dead_trainer_is_a_503(actor: Any) -> None:
    ray.kill(actor)
    with pytest.raises(BackendUnavailable, match="the trainer is unavailable"):
        asyncio.run(ActorPolicyTrainer(actor).status())
