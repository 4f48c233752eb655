"""What both baselines share with the server: the schema's observation model, input order and
action space, so that only the serving architecture differs between the three designs.

Every baseline reads the schema named by ``SCHEMA_PATH`` (its default policy) and answers
``POST /predict`` with the same JSON body as the server, and ``GET /`` once it is ready.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Header, HTTPException
from pydantic import BaseModel

from policy_server.policies.served import ServedPolicy, resolve_policy
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy
from policy_server.schema.config import load_schema
from policy_server.schema.observations import flatten


@dataclass(frozen=True)
class BaselinePolicy:
    """The default policy of a schema, loaded and checked the way the server loads it."""

    served: ServedPolicy
    policy: TorchPolicy
    model_path: Path
    api_key: str | None

    @property
    def observation_model(self) -> type[BaseModel]:
        if self.served.observation_model is None:
            raise ValueError("the baselines need a schema with `observations`")
        return self.served.observation_model

    def to_input(self, obs: BaseModel) -> np.ndarray:
        """One observation → ``(1, obs_dim)`` float32, in schema order."""
        return flatten([obs])

    def answer(self, out: PolicyOutput, rng: np.random.Generator) -> dict[str, Any]:
        """The server's `/predict` answer: a sampled action, its probability and the version."""
        sample = self.served.space.sample(out.heads, rng)[0]
        return {
            "action": sample.action,
            "action_name": sample.action_name,
            "probability": sample.probability,
            "log_prob": sample.log_prob,
            "model_version": out.version,
        }

    def key_checker(self) -> Callable[..., Awaitable[None]]:
        """A dependency that checks the `access-token` header, as the server does.

        ``async``: FastAPI runs a sync dependency in its thread pool, one more hop per request.
        """
        secret = self.api_key.encode() if self.api_key else None

        async def check(access_token: str | None = Header(None, alias="access-token")) -> None:
            if secret is not None and not hmac.compare_digest((access_token or "").encode(), secret):
                raise HTTPException(403, "missing or wrong api key")

        return check


def load_baseline_policy() -> BaselinePolicy:
    schema = load_schema(Path(os.environ.get("SCHEMA_PATH", "schema.yaml")))
    spec = schema.policies[schema.default_policy]
    served, policy = resolve_policy(spec)
    key = schema.api_key.get_secret_value() if schema.api_key else None
    return BaselinePolicy(served, policy, spec.model, key)
