"""A recurrent policy's state (``recurrent:``): the names and per-row shapes of its state tensors.

```yaml
recurrent:
  state: {h: [1, 64], c: [1, 64]}   # name: per-row shape; float32; in the model's argument order
  state_ttl_s: 600                  # server-kept state of an episode id expires after this idle time
  max_episodes: 10000               # at most this many episode ids kept (least recently used go first)
```

The model's forward takes ``(obs, *state)``, each state tensor ``(B, *shape)`` (batch first, in
the order of ``state``), and returns ``(*heads, *new_state)``: the action heads as a feed-forward
policy returns them, then the new state tensors in the same order and shapes.
``policies.served.resolve_policy`` checks it at start-up with a zero state.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy_server.errors import SchemaError
from policy_server.schema.replicas import refused

StateShape = list[Annotated[int, Field(ge=1)]]


class RecurrentSpec(BaseModel):
    """``recurrent:`` of a policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    state: dict[str, StateShape] = Field(min_length=1)
    """The state tensors, name → per-row shape (float32), in the order the model takes and returns them."""
    state_ttl_s: float = Field(600.0, gt=0)
    """Seconds an episode id's server-kept state lives after its last request."""
    max_episodes: int = Field(10_000, ge=1)
    """Episode ids whose state the gateway keeps at most; the least recently used is dropped first."""
    bptt_steps: int = Field(16, ge=1)
    """Training (PPO): the model is re-run over chunks of this many steps (truncated backpropagation through time)."""

    @model_validator(mode="after")
    def _names(self) -> RecurrentSpec:
        bad = [name for name in self.state if not name.isidentifier()]
        if bad:
            raise refused(f"state name {bad[0]!r}: use letters, digits and _ (a JSON key and a Python name)")
        return self

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(shape) for name, shape in self.state.items()}


def check_recurrent(
    recurrent: RecurrentSpec | None, canary: bool, policies_dir: bool, where: str, algorithm: str | None = None
) -> None:
    """Refuse what a recurrent policy cannot have (yet): a canary, a ``policies_dir``, DQN training."""
    if recurrent is None:
        return
    if algorithm not in (None, "ppo"):
        raise SchemaError(f"{where}.training.algorithm: a recurrent policy trains with ppo, not {algorithm!r}")
    if canary:
        raise SchemaError(f"{where}.canary: not with `recurrent` (a candidate would need the stable "
                          "model's state of every episode); roll the new model out as a new policy")
    if policies_dir:
        raise SchemaError(f"{where}.policies_dir: not with `recurrent`")
