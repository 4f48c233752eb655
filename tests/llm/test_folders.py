"""Model folders as bytes: pack, unpack (never outside the target), and a model with its adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_server.llm.folders import pack_folder, unpack_folder, unpack_model
from policy_server.llm.models import load_policy


def test_folders_travel_as_bytes_and_refuse_escapes(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    files = pack_folder(llm_dirs["value"])
    assert "value_head.safetensors" in files
    unpack_folder(files, tmp_path / "copy")
    assert (tmp_path / "copy" / "config.json").read_bytes() == (
        llm_dirs["value"] / "config.json"
    ).read_bytes()
    with pytest.raises(ValueError, match="outside"):
        unpack_folder({"../evil": b"x"}, tmp_path / "other")


def test_a_model_and_its_adapter_unpack_side_by_side_and_load(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model, adapter = pack_folder(llm_dirs["policy"]), pack_folder(llm_dirs["policy_lora"])
    folder, lora = unpack_model(model, adapter, "test-unpack-", tmp_path)
    assert lora is not None and folder.parent == lora.parent and folder.parent.name.startswith("test-unpack-")
    assert pack_folder(folder) == model and pack_folder(lora) == adapter
    loaded = load_policy(folder, lora)
    assert any("lora_" in name for name, _ in loaded.model.named_parameters())


def test_a_model_without_adapter_unpacks_alone(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = pack_folder(llm_dirs["value"])
    folder, lora = unpack_model(model, None, "test-unpack-", tmp_path)
    assert folder.parent.parent == tmp_path
    assert lora is None and pack_folder(folder) == model
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]
