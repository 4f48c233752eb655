"""The LLM parts of the app: which services a schema's `llm:` section makes, and where their
models, state and trainers run (Ray Serve deployments, or this process with the local backend)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any

from policy_server.gateway.llm.service import (
    HandleBackend,
    HandleState,
    LLMService,
    LocalState,
    Remote,
    ThreadLink,
    ValueService,
    load_tokenizer,
)
from policy_server.gateway.llm.service import LocalBackend as LLMLocalBackend
from policy_server.schema.config import ServerSchema


@dataclass
class LLMServices:
    """The LLM policy and value services of a schema (None where it has none)."""

    policy: LLMService | None = None
    value: ValueService | None = None
    grpo: Remote | None = None
    x1_policy: Remote | None = None
    x1_value: Remote | None = None

    async def attach_serve(self, runtime: Any) -> None:
        """Deploy the models, their state and their trainers on Ray Serve and attach them."""
        if self.policy is not None:
            spec = self.policy.spec
            backend = HandleBackend(await asyncio.to_thread(runtime.deploy_llm, spec))
            state = HandleState(await asyncio.to_thread(runtime.deploy_llm_state, spec, self.policy.tokenizer))
            self.policy.attach(backend, state)
            if self.grpo is not None:
                self.grpo.attach(HandleState(await asyncio.to_thread(runtime.deploy_grpo, spec)))
            if self.x1_policy is not None:
                handle = await asyncio.to_thread(runtime.deploy_x1_trainer, "policy", spec)
                self.x1_policy.attach(HandleState(handle))
        if self.value is not None:
            self.value.attach(HandleBackend(await asyncio.to_thread(runtime.deploy_llm, self.value.spec)))
            if self.x1_value is not None:
                handle = await asyncio.to_thread(runtime.deploy_x1_trainer, "value", self.value.spec)
                self.x1_value.attach(HandleState(handle))

    def attach_local(self) -> list[Any]:
        """Load the models into this process (blocking); returns the engines to close."""
        from policy_server.llm.engine import LLMEngine, ValueScorer
        from policy_server.llm.grpo_runs import GRPORuns
        from policy_server.llm.models import load_policy, load_value
        from policy_server.llm.x1_trainer import X1Trainer

        engines: list[Any] = []
        if self.policy is not None:
            spec = self.policy.spec
            engines.append(LLMEngine(spec, spec.path, spec.adapter, spec.device))
            backend = LLMLocalBackend(engines[-1])
            state = self.policy.new_state(backend.generate)
            engines.append(state)
            self.policy.attach(backend, LocalState(state))
            if self.grpo is not None:
                assert spec.training is not None
                self.grpo.attach(ThreadLink(GRPORuns(spec.path, spec.adapter, spec.training.save_dir / "grpo")))
            if self.x1_policy is not None:
                assert spec.training is not None
                load = partial(load_policy, spec.path, spec.adapter, spec.dtype, spec.device)
                self.x1_policy.attach(ThreadLink(X1Trainer("policy", load, spec.training, engines[0].set_weights)))
        if self.value is not None:
            spec = self.value.spec
            scorer = ValueScorer(spec, spec.path, spec.adapter, spec.device)
            self.value.attach(LLMLocalBackend(scorer))
            if self.x1_value is not None:
                assert spec.training is not None
                load = partial(
                    load_value, spec.path, spec.adapter, spec.dtype, spec.device, position=spec.position
                )
                self.x1_value.attach(ThreadLink(X1Trainer("value", load, spec.training, scorer.set_weights)))
        return engines



def llm_services(schema: ServerSchema) -> LLMServices:
    if schema.llm is None:
        return LLMServices()
    policy, value = schema.llm.policy, schema.llm.value
    trainable = policy is not None and _allows_training(policy)
    return LLMServices(
        policy=LLMService(policy, load_tokenizer(policy.path)) if policy else None,
        value=ValueService(value) if value else None,
        grpo=Remote("GRPO training") if trainable else None,
        x1_policy=Remote("the policy's trainer") if trainable else None,
        x1_value=Remote("the value model's trainer") if value is not None and _allows_training(value) else None,
    )


def _allows_training(spec: Any) -> bool:
    return spec.training is not None and spec.training.allow_training
