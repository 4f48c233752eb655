"""Start-up refuses a model folder that cannot be served, naming the folder and the reason."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import llm_schema, make_client

from policy_server.errors import SchemaError
from policy_server.llm.checkpoint import check_checkpoint, head_size, replicas_on_cpu
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec


@pytest.fixture
def copy_policy(llm_dirs: dict[str, Path], tmp_path: Path) -> Callable[[], Path]:
    """A fresh copy of the tiny policy folder, to break."""
    def copy() -> Path:
        return Path(shutil.copytree(llm_dirs["policy"], tmp_path / "policy"))

    return copy


def policy(folder: Path, engine: str = "transformers") -> LLMPolicySpec:
    return LLMPolicySpec(path=folder, engine=engine)  # type: ignore[arg-type]


def refused(spec: LLMPolicySpec | LLMValueSpec, reason: str, on_cpu: bool = True) -> None:
    with pytest.raises(SchemaError, match=re.escape(f"llm.policy.path: {spec.path}: ") + reason):
        check_checkpoint(spec, "llm.policy", on_cpu=on_cpu)


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def test_a_missing_folder_is_refused_as_every_node_must_read_it(tmp_path: Path) -> None:
    refused(policy(tmp_path / "nowhere"), "no such folder .every node that runs a replica must read it")


def test_a_folder_without_config_json_is_refused(copy_policy: Callable[[], Path]) -> None:
    folder = copy_policy()
    (folder / "config.json").unlink()
    refused(policy(folder), re.escape("not a save_pretrained model folder (no config.json)"))


@pytest.mark.parametrize(("content", "reason"), [
    (b"{not json", "config.json cannot be read: Expecting property name"),
    (b"\xff\xfe", "config.json cannot be read: 'utf-8' codec can't decode"),
    (b"[1, 2]", "config.json is not a JSON object"),
])
def test_an_unreadable_config_is_refused(copy_policy: Callable[[], Path], content: bytes, reason: str) -> None:
    folder = copy_policy()
    (folder / "config.json").write_bytes(content)
    refused(policy(folder), reason)


def test_a_folder_without_weights_is_refused(copy_policy: Callable[[], Path]) -> None:
    folder = copy_policy()
    (folder / "model.safetensors").unlink()
    refused(policy(folder), re.escape("no weights file (none of *.safetensors, pytorch_model*.bin"))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.safetensors.index.json"])
def test_other_weights_layouts_are_accepted(copy_policy: Callable[[], Path], weights: str) -> None:
    folder = copy_policy()
    (folder / "model.safetensors").rename(folder / weights)
    check_checkpoint(policy(folder), "llm.policy", on_cpu=True)


def test_a_folder_without_tokenizer_is_refused(copy_policy: Callable[[], Path]) -> None:
    folder = copy_policy()
    (folder / "tokenizer.json").unlink()
    refused(policy(folder), re.escape("no tokenizer (none of tokenizer.json, tokenizer.model"))


def test_a_value_model_folder_is_checked_too(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(llm_dirs["value"], tmp_path / "value"))
    check_checkpoint(LLMValueSpec(path=folder), "llm.value", on_cpu=True)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SchemaError, match=re.escape(f"llm.value.path: {folder}: no tokenizer")):
        check_checkpoint(LLMValueSpec(path=folder), "llm.value", on_cpu=True)


def test_vllm_refuses_an_architecture_it_does_not_implement(copy_policy: Callable[[], Path]) -> None:
    folder = copy_policy()
    edit_config(folder, architectures=["MadeUpForCausalLM"])
    refused(policy(folder, "vllm"), re.escape("vLLM implements none of its architectures ['MadeUpForCausalLM']"))
    edit_config(folder, architectures=[])
    refused(policy(folder, "vllm"), re.escape("vLLM implements none of its architectures []"))
    check_checkpoint(policy(folder, "transformers"), "llm.policy", on_cpu=True)  # our loop reads the folder


def test_vllm_on_cpu_refuses_a_head_size_its_attention_does_not_run(copy_policy: Callable[[], Path]) -> None:
    folder = copy_policy()
    edit_config(folder, head_dim=16)  # the old tiny example's
    refused(policy(folder, "vllm"), re.escape("head size 16 is not one vLLM's CPU attention runs ([32, 64,")
            + r".*\]\) " + re.escape("(or set `engine: transformers`)"))
    check_checkpoint(policy(folder, "vllm"), "llm.policy", on_cpu=False)  # GPU attention runs it
    check_checkpoint(policy(folder, "transformers"), "llm.policy", on_cpu=True)


def test_the_tiny_model_passes_on_both_engines(llm_dirs: dict[str, Path]) -> None:
    for engine in ("vllm", "transformers"):
        check_checkpoint(policy(llm_dirs["policy"], engine), "llm.policy", on_cpu=True)


def test_head_size_reads_head_dim_else_hidden_over_heads() -> None:
    assert head_size({"head_dim": 64, "hidden_size": 128, "num_attention_heads": 8}) == 64
    assert head_size({"hidden_size": 2048, "num_attention_heads": 32}) == 64
    assert head_size({"hidden_size": 2048}) is None


def test_serve_replicas_run_on_cpu_unless_the_schema_gives_them_gpus(tmp_path: Path) -> None:
    import torch

    gpu = {"resources": {"num_gpus": 1}}
    assert replicas_on_cpu(LLMPolicySpec(path=tmp_path), "serve")
    assert not replicas_on_cpu(LLMPolicySpec(path=tmp_path, **gpu), "serve")
    assert replicas_on_cpu(LLMPolicySpec(path=tmp_path, device="cpu", **gpu), "serve")
    assert replicas_on_cpu(LLMPolicySpec(path=tmp_path, **gpu), "local") == (not torch.cuda.is_available())


def test_build_app_refuses_the_folder_before_anything_starts(copy_policy: Callable[[], Path], tmp_path: Path) -> None:
    folder = copy_policy()
    (folder / "model.safetensors").unlink()
    schema = llm_schema({"policy": folder, "value": folder})
    with pytest.raises(SchemaError, match=re.escape(f"llm.policy.path: {folder}: no weights file")):
        make_client(tmp_path, schema)
