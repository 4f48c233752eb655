"""``policies_dir``: the ids of a folder, and the schema's checks of the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from policy_server.errors import SchemaError
from policy_server.schema.config import parse_schema
from policy_server.schema.policy_ids import is_policy_id, policy_file, policy_files

OBS = {"a": {"type": "float"}, "b": {"type": "float"}}


def touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_a_folder_holds_one_id_per_model_file_stem(tmp_path: Path) -> None:
    folder = touch(tmp_path / "p", "b.pt", "a.pt2", "a.pt", "c-1_x.ts", "notes.txt", "a.b.pt", ".hidden.pt", "tmp~.pt")
    (folder / "dir.pt").mkdir()
    assert policy_files(folder) == {"a": folder / "a.pt", "b": folder / "b.pt", "c-1_x": folder / "c-1_x.ts"}
    assert policy_file(folder, "a") == folder / "a.pt"  # the same file the listing serves
    assert policy_files(tmp_path / "missing") == {}


@pytest.mark.parametrize("text", ["../p/a", "a/b", "", "a.pt", "x" * 129, "a b"])
def test_ids_that_break_the_name_rule_name_no_file(tmp_path: Path, text: str) -> None:
    touch(tmp_path / "p", "a.pt")
    assert not is_policy_id(text)
    assert policy_file(tmp_path / "p", text) is None


def schema(**policy: Any) -> dict[str, Any]:
    return {"policies": {"fleet": {"observations": OBS, **policy}}}


def test_startup_checks_the_first_file_by_id_and_keeps_the_folder(tmp_path: Path) -> None:
    touch(tmp_path / "customers", "zeta.pt", "acme.pt")
    spec = parse_schema(schema(policies_dir="customers", resources={"max_models_per_replica": 4}), tmp_path)
    fleet = spec.policies["fleet"]
    assert fleet.policies_dir == (tmp_path / "customers").resolve()
    assert fleet.model == (tmp_path / "customers" / "acme.pt").resolve()
    assert fleet.resources.max_models_per_replica == 4
    assert spec.public()["policies"]["fleet"]["policies_dir"] == "customers"  # not the server's layout


def test_a_given_model_is_the_one_checked(tmp_path: Path) -> None:
    touch(tmp_path / "customers", "acme.pt")
    touch(tmp_path, "base.pt")
    fleet = parse_schema(schema(policies_dir="customers", model="base.pt"), tmp_path).policies["fleet"]
    assert fleet.model == (tmp_path / "base.pt").resolve()


@pytest.mark.parametrize(("policy", "message"), [
    ({"policies_dir": "missing"}, "policies.fleet.policies_dir: "),
    ({"policies_dir": "empty"}, "holds no policy file"),
    ({"policies_dir": "customers", "training": {"algorithm": "ppo"}}, "cannot be combined with `training`"),
    ({"model": "customers/acme.pt", "resources": {"max_models_per_replica": 3}},
     "policies.fleet.resources.max_models_per_replica: applies only with `policies_dir`"),
])
def test_what_is_refused_names_the_field(tmp_path: Path, policy: dict[str, Any], message: str) -> None:
    touch(tmp_path / "customers", "acme.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SchemaError) as caught:
        parse_schema(schema(**policy), tmp_path)
    assert message in caught.value.message


def test_a_single_policy_schema_takes_policies_dir_in_parameters(tmp_path: Path) -> None:
    touch(tmp_path / "customers", "acme.pt")
    spec = parse_schema({"observations": OBS, "parameters": {"policies_dir": "customers"}}, tmp_path)
    assert spec.policies["default"].policies_dir == (tmp_path / "customers").resolve()
