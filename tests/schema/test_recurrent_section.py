"""``recurrent:`` in the schema: state shapes per policy, and what a recurrent policy cannot have."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_server.errors import SchemaError
from policy_server.schema.config import parse_schema


def _schema(tmp_path: Path, **parameters: object) -> dict:
    (tmp_path / "m.pt").write_bytes(b"")
    return {"observations": {"x": {"type": "float"}}, "parameters": {"model": "m.pt", **parameters}}


def test_the_state_shapes_and_store_settings_are_read_per_policy(tmp_path: Path) -> None:
    recurrent = {"state": {"h": [1, 64], "c": [1, 64]}, "state_ttl_s": 30, "max_episodes": 5}
    spec = parse_schema(_schema(tmp_path, recurrent=recurrent), tmp_path).policies["default"]
    assert spec.recurrent is not None
    assert spec.recurrent.shapes == {"h": (1, 64), "c": (1, 64)}
    assert (spec.recurrent.state_ttl_s, spec.recurrent.max_episodes) == (30, 5)


@pytest.mark.parametrize(("recurrent", "message"), [
    ({"state": {}}, "recurrent.state"),
    ({"state": {"h": [0]}}, "recurrent.state.h.0"),
    ({"state": {"h-1": [4]}}, "state name 'h-1'"),
    ({"state": {"h": [4]}, "state_ttl_s": 0}, "recurrent.state_ttl_s"),
])
def test_a_bad_recurrent_section_is_refused_naming_the_field(tmp_path: Path, recurrent: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        parse_schema(_schema(tmp_path, recurrent=recurrent), tmp_path)


def test_a_recurrent_policy_with_a_canary_is_refused(tmp_path: Path) -> None:
    schema = _schema(tmp_path, recurrent={"state": {"h": [4]}}, canary={"model": "m.pt", "share": 0.5})
    with pytest.raises(SchemaError, match=r"parameters.canary: not with `recurrent`"):
        parse_schema(schema, tmp_path)


def test_a_recurrent_policy_trains_with_ppo_only(tmp_path: Path) -> None:
    schema = _schema(tmp_path, recurrent={"state": {"h": [4]}}, action_space={"type": "discrete"},
                     training={"algorithm": "dqn"})
    with pytest.raises(SchemaError, match=r"parameters.training.algorithm: a recurrent policy trains with ppo"):
        parse_schema(schema, tmp_path)
