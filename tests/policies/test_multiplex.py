"""A ``policies_dir``'s files, each loaded and checked against the schema's shapes, and the
listing the gateway checks ids against."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from support import write_policy_files

from policy_server.errors import ModelError, NotFound
from policy_server.policies.multiplex import PolicyCatalog, Signature, load_policy
from policy_server.policies.torch_policy import TorchPolicy

SIGNATURE = Signature(obs_dim=4, heads=((3,),))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write_policy_files(tmp_path / "p", ["acme", "globex"])
    return tmp_path / "p"


def test_each_id_loads_its_own_file(folder: Path) -> None:
    obs = np.ones((2, 4), dtype=np.float32)
    acme, globex = (load_policy(folder, i, SIGNATURE).forward(obs).heads[0] for i in ("acme", "globex"))
    expected = TorchPolicy.from_file(folder / "acme.pt").forward(obs).heads[0]
    np.testing.assert_array_equal(acme, expected)
    assert not np.allclose(acme, globex)
    assert Signature.of(TorchPolicy.from_file(folder / "acme.pt"), 4) == SIGNATURE


@pytest.mark.parametrize("policy_id", ["initech", "../p/acme", ""])
def test_an_id_without_a_file_is_not_found_naming_it(folder: Path, policy_id: str) -> None:
    with pytest.raises(NotFound) as caught:
        load_policy(folder, policy_id, SIGNATURE)
    assert repr(policy_id) in caught.value.message


def test_a_file_that_does_not_load_or_fit_is_a_model_error_naming_the_id(folder: Path) -> None:
    (folder / "broken.pt").write_bytes(b"not a model")
    write_policy_files(folder, ["wide"], obs_dim=5)
    write_policy_files(folder, ["two"], actions=2)
    messages = {}
    for policy_id in ("broken", "wide", "two"):
        with pytest.raises(ModelError) as caught:
            load_policy(folder, policy_id, SIGNATURE)
        messages[policy_id] = caught.value.message
    assert messages["broken"].startswith("policy id 'broken': cannot load broken.pt: ")
    assert messages["wide"].startswith("policy id 'wide': wide.pt rejects inputs of width 4")
    assert messages["two"].startswith("policy id 'two': two.pt answers outputs of shapes (B, 2) but the "
                                      "policy's action space needs (B, 3)")


def test_the_catalog_sees_files_added_and_removed_at_run_time(folder: Path) -> None:
    catalog = PolicyCatalog(folder)
    assert catalog.ids() == ["acme", "globex"]
    with pytest.raises(NotFound, match="'initech' is not served: p/ holds no model file initech"):
        catalog.check("initech")
    write_policy_files(folder, ["initech"])
    assert catalog.check("initech") == "initech"
    (folder / "acme.pt").unlink()
    os.utime(folder, ns=(0, os.stat(folder).st_mtime_ns + 1))  # a file system whose clock ticks coarsely
    assert catalog.ids() == ["globex", "initech"]
    with pytest.raises(NotFound, match="not a valid id"):
        catalog.check("a/b")

