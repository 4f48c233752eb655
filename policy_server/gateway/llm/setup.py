"""The LLM parts of the app: which services a schema's `llm:` section makes; the runtime starts
their models, tasks and sessions, and trainers (``LLMServices.start``)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from policy_server.errors import BackendUnavailable
from policy_server.gateway.llm.service import LLMService, ValueService, load_tokenizer
from policy_server.gateway.startup import start_together
from policy_server.llm.checkpoint import check_section
from policy_server.schema.config import ServerSchema
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.serving.api import GRPORunsAPI, X1Training
from policy_server.serving.runtime import Runtime

S = TypeVar("S")


class Starting(Generic[S]):
    """A service the runtime is still starting: 503 until it is attached."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.service: S | None = None

    def attach(self, service: S) -> None:
        self.service = service

    def require(self) -> S:
        if self.service is None:
            raise BackendUnavailable(f"{self.what} is still starting; retry shortly")
        return self.service


@dataclass
class LLMServices:
    """The LLM policy and value services of a schema (None where it has none)."""

    policy: LLMService | None = None
    value: ValueService | None = None
    grpo: Starting[GRPORunsAPI] | None = None
    x1_policy: Starting[X1Training] | None = None
    x1_value: Starting[X1Training] | None = None

    async def start(self, runtime: Runtime) -> None:
        """Start the models, their tasks and sessions, and their trainers, and attach them: the
        policy's and the value model's at once, and what needs the policy once it runs."""
        await start_together(runtime, self._start_policy(runtime), self._start_value(runtime))

    async def _start_policy(self, runtime: Runtime) -> None:
        if self.policy is None:
            return
        spec, policy = self.policy.spec, self.policy
        model = await runtime.llm_model(spec)

        async def tasks() -> None:
            policy.attach(model, await runtime.tasks_and_sessions(spec, policy.tokenizer))

        steps = [tasks()]
        if self.grpo is not None:
            steps.append(_attach(self.grpo, runtime.grpo_runs(spec)))
        if self.x1_policy is not None:
            steps.append(_attach(self.x1_policy, runtime.x1_training("policy", spec)))
        await start_together(runtime, *steps)

    async def _start_value(self, runtime: Runtime) -> None:
        if self.value is None:
            return
        self.value.attach(await runtime.value_model(self.value.spec))
        if self.x1_value is not None:
            self.x1_value.attach(await runtime.x1_training("value", self.value.spec))


async def _attach(starting: Starting[S], service: Awaitable[S]) -> None:
    starting.attach(await service)


def llm_services(schema: ServerSchema, backend: Literal["serve", "local"] = "serve") -> LLMServices:
    """The services of the schema's `llm:` section, after refusing a model folder that cannot be
    served (SchemaError naming it and why). The gateway loads the policy's tokenizer only; replicas
    load the models from their paths."""
    if schema.llm is None:
        return LLMServices()
    policy, value = schema.llm.policy, schema.llm.value
    check_section(schema.llm, backend)
    trainable = policy is not None and _allows_training(policy)
    return LLMServices(
        policy=LLMService(policy, load_tokenizer(policy.path)) if policy else None,
        value=ValueService(value) if value else None,
        grpo=Starting("GRPO training") if trainable else None,
        x1_policy=Starting("the policy's trainer") if trainable else None,
        x1_value=Starting("the value model's trainer") if value is not None and _allows_training(value) else None,
    )


def _allows_training(spec: LLMPolicySpec | LLMValueSpec) -> bool:
    return spec.training is not None and spec.training.allow_training
