"""schema.yaml: its typed form, its loader, and the pydantic models built from it."""

from policy_server.schema.config import (
    ActionSpaceSpec,
    BoxSpec,
    DiscreteSpec,
    MultiBinarySpec,
    ObservationSpec,
    PolicySpec,
    ResourceSpec,
    ServerSchema,
    TupleSpec,
    load_schema,
)

__all__ = [
    "ActionSpaceSpec",
    "BoxSpec",
    "DiscreteSpec",
    "MultiBinarySpec",
    "ObservationSpec",
    "PolicySpec",
    "ResourceSpec",
    "ServerSchema",
    "TupleSpec",
    "load_schema",
]
