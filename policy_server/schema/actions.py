"""The action space of a policy in schema.yaml (``parameters.action_space`` /
``policies.<name>.action_space``), as Gymnasium names its spaces.

``discrete``, ``multi_discrete`` (alias ``tuple``: the two answer alike), ``multi_binary`` and
``box`` (diagonal Gaussian: clipped to its bounds, or tanh-squashed into them). Discrete and
multi-discrete spaces may name the observation that holds the legal-action mask (``mask``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MASK_DOC = ("The observation (a `List[bool]` field) that holds the legal-action mask, True = allowed, "
            "one entry per action (all components' actions side by side); it is not part of the model's input.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiscreteSpec(_Strict):
    """One categorical action out of ``n``; ``names`` label the actions in answers."""

    type: Literal["discrete"] = "discrete"
    n: int | None = Field(None, gt=0, description="Default: the model's number of outputs.")
    names: list[str] | None = None
    mask: str | None = Field(None, description=MASK_DOC)

    @model_validator(mode="after")
    def _check_names(self) -> DiscreteSpec:
        if self.names is not None:
            if self.n is not None and len(self.names) != self.n:
                raise ValueError(f"names has {len(self.names)} entries but n is {self.n}")
            if len(set(self.names)) != len(self.names):
                raise ValueError("names must be unique")
        return self


class TupleSpec(_Strict):
    """Independent categorical actions, component ``i`` out of ``nvec[i]`` (Gymnasium's
    ``MultiDiscrete``; ``tuple`` is Pathmind's name for it)."""

    type: Literal["tuple", "multi_discrete"] = "tuple"
    nvec: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, description="Default: the sizes of the model's output heads."
    )
    names: list[list[str]] | None = None
    mask: str | None = Field(None, description=MASK_DOC)

    @model_validator(mode="after")
    def _check_names(self) -> TupleSpec:
        if self.names is not None and self.nvec is not None:
            sizes = [len(n) for n in self.names]
            if sizes != list(self.nvec):
                raise ValueError(f"names have sizes {sizes} but nvec is {list(self.nvec)}")
        return self


class MultiBinarySpec(_Strict):
    """``n`` independent bits; the model gives one Bernoulli logit per bit, ``(B, n)``."""

    type: Literal["multi_binary"] = "multi_binary"
    n: int | None = Field(None, gt=0, description="Default: the model's number of outputs.")


class BoxSpec(_Strict):
    """A continuous action: a diagonal Gaussian (the model gives mean and log-std), clipped to the
    bounds, or with ``squash: tanh`` squashed into them (SAC-style; the bounds must be finite)."""

    type: Literal["box"] = "box"
    shape: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, description="Default: the shape of the model's mean output."
    )
    low: float | list[float] | None = None
    high: float | list[float] | None = None
    squash: Literal["tanh"] | None = Field(
        None, description="`tanh`: action = low + (tanh(u) + 1)/2 · (high - low), u the Gaussian draw."
    )

    @model_validator(mode="after")
    def _check_squash(self) -> BoxSpec:
        if self.squash == "tanh" and (self.low is None or self.high is None):
            missing = "low" if self.low is None else "high"
            raise ValueError(f"squash: tanh needs finite bounds; set {missing}")
        return self


ActionSpecs = DiscreteSpec | TupleSpec | MultiBinarySpec | BoxSpec
ActionSpaceSpec = Annotated[ActionSpecs, Field(discriminator="type")]


def mask_field(spec: ActionSpecs) -> str | None:
    """The observation that holds the action mask, if the schema names one."""
    return spec.mask if isinstance(spec, (DiscreteSpec, TupleSpec)) else None
