"""The ``experience_log`` section and ``training.from_log`` in schema.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_server.errors import SchemaError
from policy_server.schema.config import parse_schema


def schema(tmp_path: Path, **parameters: object) -> dict[str, object]:
    (tmp_path / "m.pt2").write_bytes(b"")
    return {"observations": {"x": {"type": "float"}}, "parameters": {"model": "m.pt2", **parameters}}


def test_the_log_folder_is_relative_to_the_schema_and_has_defaults(tmp_path: Path) -> None:
    spec = parse_schema(schema(tmp_path, experience_log={"path": "logs/decisions"}), tmp_path).policies["default"]
    log = spec.experience_log
    assert log is not None and log.path == (tmp_path / "logs/decisions").resolve()
    assert (log.format, log.max_file_mb, log.max_total_mb, log.flush_s) == ("parquet", 64.0, 1024.0, 1.0)


@pytest.mark.parametrize(("section", "named"), [
    ({"path": "x", "format": "csv"}, "parameters.experience_log.format"),
    ({"path": "x", "max_total_mb": 0}, "parameters.experience_log.max_total_mb"),
    ({"path": "x", "flush": 1}, "parameters.experience_log.flush"),
])
def test_a_bad_log_section_is_refused_naming_the_field(tmp_path: Path, section: dict[str, object], named: str) -> None:
    with pytest.raises(SchemaError, match=named):
        parse_schema(schema(tmp_path, experience_log=section), tmp_path)


def test_dqn_starts_from_a_log_and_ppo_is_refused_saying_why(tmp_path: Path) -> None:
    dqn = parse_schema(schema(tmp_path, training={"algorithm": "dqn", "from_log": "logs"}), tmp_path)
    training = dqn.policies["default"].training
    assert training is not None and training.from_log == (tmp_path / "logs").resolve()
    with pytest.raises(SchemaError, match=r"parameters\.training\.from_log: ppo is on-policy.*export_minari"):
        parse_schema(schema(tmp_path, training={"from_log": "logs"}), tmp_path)
