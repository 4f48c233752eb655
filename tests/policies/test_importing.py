"""``generate.py import``: a schema written from an SB3 file's spaces serves it; a schema checked
against a file names the field and both values where they disagree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from policy_server.cli import check, import_model
from policy_server.errors import SchemaError

ROOT = Path(__file__).resolve().parents[2]


def test_import_writes_a_schema_that_start_up_serves(format_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"
    described = import_model(str(format_models["ppo"]), out=str(out))
    assert described["schema"] == str(out)
    doc = yaml.safe_load(out.read_text())
    assert doc["parameters"]["action_space"] == {"type": "discrete", "n": 2}
    assert (tmp_path / doc["parameters"]["model"]).resolve() == format_models["ppo"].resolve()
    assert check(str(out))["policies"]["default"]["obs_dim"] == 4


def test_import_checks_a_schema_against_the_file(format_models: dict[str, Path], tmp_path: Path) -> None:
    schema = tmp_path / "schema.yaml"
    observations = {f"obs_{i}": {"type": "float"} for i in range(4)}
    schema.write_text(yaml.safe_dump({"observations": observations, "parameters": {
        "model": str(format_models["onnx_twin"]), "action_space": {"type": "discrete", "n": 2}}}))
    for model in (format_models["ppo"], format_models["onnx"]):
        assert import_model(str(model), schema=str(schema))["obs_dim"] == 4
    schema.write_text(yaml.safe_dump({"observations": observations | {"obs_4": {"type": "float"}}, "parameters": {
        "model": str(format_models["onnx_twin"]), "action_space": {"type": "discrete", "n": 3}}}))
    with pytest.raises(SchemaError, match=r"^observations: the observation widths sum to 5 but the model ppo\.zip takes inputs of width 4"):
        import_model(str(format_models["ppo"]), schema=str(schema))
    with pytest.raises(SchemaError, match=r"cart\.onnx: an \.onnx file holds no observation or action spaces"):
        import_model(str(format_models["onnx"]), out=str(tmp_path / "onnx.yaml"))


def test_the_command_line_refuses_with_the_reason(
    format_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump({"parameters": {
        "model": str(format_models["onnx_twin"]), "action_space": {"type": "box"}}}))
    monkeypatch.syspath_prepend(str(ROOT))
    import generate

    monkeypatch.setattr(sys, "argv", ["generate.py", "import", str(format_models["ppo"]), "--schema", str(schema)])
    with pytest.raises(SystemExit) as exited:
        generate.main()
    assert str(exited.value.code) == (
        "policy-server: parameters.action_space.type: the schema says 'box' but ppo.zip (PPO) acts in Discrete(2)")
