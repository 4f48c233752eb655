"""``Runtime``: where the models, trainers and LLM state run; the one plug point between the
gateway and Ray. ``make_runtime`` (in ``runtime/__init__``) picks one from ``settings.backend``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from policy_server.policies.spaces import ActionSpace
    from policy_server.schema.config import PolicySpec, ServerSchema
    from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
    from policy_server.serving.api import (
        GRPORunsAPI,
        LLMModel,
        MultiplexedModel,
        PolicyModel,
        PolicyTrainer,
        TasksAndSessionsAPI,
        ValueModel,
        X1Training,
    )

X1Kind = Literal["policy", "value"]


class Runtime(ABC):
    """Starts each service of a schema and hands it out as its typed interface (``serving.api``).

    The gateway calls ``start``, then asks for the services it serves (each call returns once the
    service is up: seconds to minutes), and ``stop`` when it shuts down. Policies are asked for
    before their trainers, the LLM policy before its tasks and sessions, GRPO runs and x1 trainer.
    """

    starts_concurrently = True
    """Whether services that do not depend on each other may start at once."""

    @abstractmethod
    async def start(self, schema: ServerSchema) -> None:
        """Start (or join) whatever the services run on; refuse (SchemaError) a ``schema`` that it
        cannot run."""

    def cancel_start(self) -> None:
        """Make a start that is under way stop at its next check (the user pressed Ctrl-C)."""

    @abstractmethod
    async def policy_model(self, spec: PolicySpec) -> PolicyModel: ...

    @abstractmethod
    async def multiplexed_model(self, spec: PolicySpec) -> MultiplexedModel:
        """The policies of ``spec.policies_dir``, loaded on demand per policy id."""

    @abstractmethod
    async def candidate_model(self, spec: PolicySpec) -> PolicyModel:
        """The policy's candidate version (``spec.canary.model``), served like the policy's model
        and beside it (on Serve: its own app, ``<prefix>-<policy>-canary``)."""

    @abstractmethod
    async def policy_trainer(self, spec: PolicySpec, space: ActionSpace, obs_dim: int) -> PolicyTrainer:
        """The trainer of ``spec``'s policy, publishing to the model ``policy_model`` started."""

    @abstractmethod
    async def llm_model(self, spec: LLMPolicySpec) -> LLMModel: ...

    @abstractmethod
    async def tasks_and_sessions(self, spec: LLMPolicySpec, tokenizer: Any) -> TasksAndSessionsAPI:
        """x1's tasks and sessions, generating through the model ``llm_model`` started; ``tokenizer``
        is the gateway's (a Serve deployment loads its own from ``spec.path`` instead)."""

    @abstractmethod
    async def value_model(self, spec: LLMValueSpec) -> ValueModel: ...

    @abstractmethod
    async def grpo_runs(self, spec: LLMPolicySpec) -> GRPORunsAPI: ...

    @abstractmethod
    async def x1_training(self, kind: X1Kind, spec: LLMPolicySpec | LLMValueSpec) -> X1Training:
        """x1's trainer of the policy or value model, publishing to the model already started."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop every service this runtime started (from the event loop that started them)."""
