"""A policy's ``canary`` section: read, refused with the field named, and its model checked
against the policy's (``policies.served.resolve_candidate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import LPOC_OBSERVATIONS

from policy_server.errors import SchemaError
from policy_server.export import MLPPolicy, export_module
from policy_server.policies.served import resolve_candidate, resolve_policy
from policy_server.schema.config import load_schema


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("canary-schema")
    export_module(MLPPolicy(11, [8], nvec=[4]), 11, root / "stable.pt2")
    export_module(MLPPolicy(11, [16], nvec=[4]), 11, root / "new.pt2")
    export_module(MLPPolicy(12, [8], nvec=[4]), 12, root / "wide.pt2")
    export_module(MLPPolicy(11, [8], nvec=[5]), 11, root / "five.pt2")
    return root


def schema(models: Path, tmp_path: Path, canary: Any, single: bool = False) -> Path:
    entry = {"observations": LPOC_OBSERVATIONS, "model": str(models / "stable.pt2"), "canary": canary}
    doc = ({"observations": entry.pop("observations"), "parameters": entry} if single
           else {"policies": {"lpoc": entry}})
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_split_and_a_shadow_canary_are_read(models: Path, tmp_path: Path) -> None:
    split = load_schema(schema(models, tmp_path, {"model": str(models / "new.pt2"), "share": 0.25}))
    canary = split.policies["lpoc"].canary
    assert canary is not None and (canary.model, canary.mode, canary.share) == (models / "new.pt2", "split", 0.25)
    shadow = load_schema(schema(models, tmp_path, {"model": str(models / "new.pt2"), "mode": "shadow"}, single=True))
    assert shadow.policies["default"].canary.mode == "shadow"  # type: ignore[union-attr]
    assert shadow.public()["policies"]["default"]["canary"] == {"model": "new.pt2", "mode": "shadow", "share": 0.0}
    assert load_schema(schema(models, tmp_path, None)).policies["lpoc"].canary is None


@pytest.mark.parametrize(("canary", "message"), [
    ({"model": "new.pt2"}, r"policies\.lpoc\.canary: share is required"),
    ({"model": "new.pt2", "mode": "shadow", "share": 0.5}, r"policies\.lpoc\.canary: share is for mode split"),
    ({"model": "new.pt2", "share": 0}, r"policies\.lpoc\.canary\.share: Input should be greater than 0"),
    ({"model": "new.pt2", "share": 1.5}, r"policies\.lpoc\.canary\.share: Input should be less than or equal to 1"),
    ({"model": "new.pt2", "share": 0.1, "weight": 2}, r"policies\.lpoc\.canary\.weight: unknown key"),
    ({"model": "new.pt2", "mode": "mirror"}, r"policies\.lpoc\.canary\.mode"),
    ({"model": "missing.pt2", "share": 0.1}, r"policies\.lpoc\.canary\.model: model file not found"),
])
def test_a_contradictory_canary_is_refused_naming_the_field(models: Path, tmp_path: Path, canary: Any,
                                                            message: str) -> None:
    (tmp_path / "new.pt2").write_bytes((models / "new.pt2").read_bytes())
    with pytest.raises(SchemaError, match=message):
        load_schema(schema(models, tmp_path, canary))


@pytest.mark.parametrize(("model", "message"), [
    ("wide.pt2", r"policies\.lpoc\.canary\.model: wide\.pt2: .*width"),
    ("five.pt2", r"policies\.lpoc\.canary\.model: five\.pt2 acts in .*'n': 5"),
])
def test_a_candidate_that_does_not_fit_its_policy_is_refused(models: Path, tmp_path: Path, model: str,
                                                            message: str) -> None:
    spec = load_schema(schema(models, tmp_path, {"model": str(models / model), "share": 0.1})).policies["lpoc"]
    served, _ = resolve_policy(spec)
    with pytest.raises(SchemaError, match=message):
        resolve_candidate(served)


def test_a_candidate_of_another_architecture_with_the_same_interface_is_served(models: Path, tmp_path: Path) -> None:
    spec = load_schema(schema(models, tmp_path, {"model": str(models / "new.pt2"), "share": 0.1})).policies["lpoc"]
    candidate = resolve_candidate(resolve_policy(spec)[0])
    assert candidate is not None and candidate.get_weights()["body.0.weight"].shape == (16, 11)


def test_a_canary_beside_a_policies_dir_is_refused(models: Path, tmp_path: Path) -> None:
    """Each policy id of a ``policies_dir`` is its own model: a new one rolls out as a new id."""
    path = schema(models, tmp_path, {"model": str(models / "new.pt2"), "share": 0.5})
    doc = yaml.safe_load(path.read_text())
    doc["policies"]["lpoc"]["policies_dir"] = str(models)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SchemaError, match=r"policies\.lpoc\.canary: not with `policies_dir`"):
        load_schema(path)


def test_a_policy_named_as_another_policys_candidate_app_is_refused(models: Path, tmp_path: Path) -> None:
    path = schema(models, tmp_path, {"model": str(models / "new.pt2"), "share": 0.5})
    doc = yaml.safe_load(path.read_text())
    doc["policies"]["lpoc-canary"] = {"observations": LPOC_OBSERVATIONS, "model": str(models / "stable.pt2")}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SchemaError, match=r"policies\.lpoc-canary: the name of policy lpoc's candidate app"):
        load_schema(path)
