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


# --- llm.policy.adapters: more model ids on the policy, as LoRA adapters --------------------------


@pytest.fixture
def copy_adapter(llm_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the tiny policy's LoRA adapter, to break."""
    return Path(shutil.copytree(llm_dirs["policy_lora"], tmp_path / "lora"))


def with_adapters(llm_dirs: dict[str, Path], engine: str = "vllm", **adapters: Path) -> LLMPolicySpec:
    return LLMPolicySpec(path=llm_dirs["policy"], engine=engine, adapters=adapters)  # type: ignore[arg-type]


def adapter_refused(spec: LLMPolicySpec, name: str, reason: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(f"llm.policy.adapters.{name}: {spec.adapters[name]}: ") + reason):
        check_checkpoint(spec, "llm.policy", on_cpu=True)


def test_two_lora_adapters_of_the_policy_pass(llm_dirs: dict[str, Path]) -> None:
    check_checkpoint(with_adapters(llm_dirs, a=llm_dirs["policy_lora"], b=llm_dirs["policy_lora_1"]),
                     "llm.policy", on_cpu=True)


def test_a_missing_adapter_folder_is_refused_naming_its_id(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    spec = with_adapters(llm_dirs, good=llm_dirs["policy_lora"], gone=tmp_path / "nowhere")
    adapter_refused(spec, "gone", "no such folder")


@pytest.mark.parametrize(("break_it", "reason"), [
    (lambda f: (f / "adapter_config.json").unlink(), r"not a peft adapter folder \(adapter_config.json cannot be read"),
    (lambda f: (f / "adapter_config.json").write_text("{nope"), r"not a peft adapter folder \(adapter_config.json cannot be read"),
    (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "IA3", "r": 4}'), r"adapter_config.json is not a LoRA adapter's \(peft_type LORA and an integer r\)"),
    (lambda f: (f / "adapter_config.json").write_text('[1]'), r"adapter_config.json is not a LoRA adapter's \(peft_type LORA and an integer r\)"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 16), "adapter_model.safetensors cannot be read"),
])
def test_a_folder_that_is_no_lora_adapter_is_refused(
    llm_dirs: dict[str, Path], copy_adapter: Path, break_it: Callable[[Path], Any], reason: str,
) -> None:
    break_it(copy_adapter)
    adapter_refused(with_adapters(llm_dirs, bad=copy_adapter), "bad", reason)


def test_a_model_folder_given_as_adapter_is_refused(llm_dirs: dict[str, Path]) -> None:
    adapter_refused(with_adapters(llm_dirs, base=llm_dirs["value"]), "base", "not a peft adapter folder")


def edit_adapter(folder: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    save_file(change(load_file(file)), str(file))


def test_an_adapter_of_another_base_is_refused(llm_dirs: dict[str, Path], copy_adapter: Path) -> None:
    import torch

    def renamed(w: dict[str, Any]) -> dict[str, Any]:  # a module the tiny policy does not have
        return {k.replace("layers.0.", "layers.99."): v for k, v in w.items()}

    edit_adapter(copy_adapter, renamed)
    adapter_refused(with_adapters(llm_dirs, other=copy_adapter), "other",
                    re.escape("it adapts model.layers.99.self_attn.q_proj, which the model does not have"))

    def wider(w: dict[str, Any]) -> dict[str, Any]:  # lora_A for inputs twice as wide as the model's
        return {k: torch.cat([v, v], 1) if ".lora_A." in k else v for k, v in w.items()}

    shutil.rmtree(copy_adapter)
    shutil.copytree(llm_dirs["policy_lora"], copy_adapter)
    edit_adapter(copy_adapter, wider)
    adapter_refused(with_adapters(llm_dirs, other=copy_adapter), "other",
                    r"model.layers.0.self_attn.(q|v)_proj: the adapter fits a \(\d+, \d+\) weight; the model's is")


def test_an_adapter_whose_rank_disagrees_with_its_config_is_refused(llm_dirs: dict[str, Path], copy_adapter: Path) -> None:
    config = json.loads((copy_adapter / "adapter_config.json").read_text())
    (copy_adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    adapter_refused(with_adapters(llm_dirs, r8=copy_adapter), "r8", r".*are not \(r, in\) and \(out, r\) with r = 8")


def test_adapters_need_the_vllm_engine(llm_dirs: dict[str, Path]) -> None:
    with pytest.raises(SchemaError, match=re.escape("llm.policy.adapters needs engine: vllm")):
        check_checkpoint(with_adapters(llm_dirs, "transformers", a=llm_dirs["policy_lora"]), "llm.policy", on_cpu=True)


def test_build_app_refuses_a_bad_adapter_before_anything_starts(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    schema = llm_schema(llm_dirs)
    schema["llm"]["policy"] |= {"engine": "vllm", "adapters": {"tiny-x": str(llm_dirs["value"])}}
    with pytest.raises(SchemaError, match=re.escape(f"llm.policy.adapters.tiny-x: {llm_dirs['value']}: not a peft")):
        make_client(tmp_path, schema)


def test_an_adapter_rank_vllm_cannot_serve_is_refused(llm_dirs: dict[str, Path], copy_adapter: Path) -> None:
    import torch

    config = json.loads((copy_adapter / "adapter_config.json").read_text())
    (copy_adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 1024}))
    edit_adapter(copy_adapter, lambda w: {k: torch.zeros(1024, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 1024)
                                          for k, v in w.items()})
    adapter_refused(with_adapters(llm_dirs, big=copy_adapter), "big", re.escape("rank 1024 is above vLLM's largest LoRA rank 512"))


def test_nccl_weight_transfer_needs_gpu_replicas(llm_dirs: dict[str, Path]) -> None:
    from policy_server.llm.vllm_args import transfer_backend

    spec = LLMPolicySpec(path=llm_dirs["policy"], weight_transfer="nccl")
    with pytest.raises(SchemaError, match=re.escape("llm.policy.weight_transfer: nccl needs the replicas on a GPU")):
        check_checkpoint(spec, "llm.policy", on_cpu=True)
    check_checkpoint(spec, "llm.policy", on_cpu=False)
    with pytest.raises(ValueError, match="needs the policy's replicas on a GPU"):
        transfer_backend(spec, "cpu")  # a replica that got no GPU all the same
    assert transfer_backend(spec, "cuda") == "nccl"
    auto = LLMPolicySpec(path=llm_dirs["policy"])
    assert (transfer_backend(auto, "cuda"), transfer_backend(auto, "cpu")) == ("nccl", None)
    with_adapter = LLMPolicySpec(path=llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
    assert transfer_backend(with_adapter, "cuda") is None  # adapters load from files
    assert transfer_backend(LLMPolicySpec(path=llm_dirs["policy"], weight_transfer="gloo"), "cpu") == "gloo"
    assert transfer_backend(LLMPolicySpec(path=llm_dirs["policy"], weight_transfer="rpc"), "cuda") is None


def test_an_adapter_built_for_another_model_is_refused(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The tiny example's adapter (hidden 128) on a model of hidden 256: refused at start-up, as
    the `adapters` are (a fresh user left the example's `adapter:` beside a bigger model)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(llm_dirs["policy"])
    config.hidden_size, config.intermediate_size = 256, 512
    bigger = tmp_path / "bigger"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(bigger)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llm_dirs["policy"] / name, bigger / name)
    check_checkpoint(LLMPolicySpec(path=llm_dirs["policy"], adapter=llm_dirs["policy_lora"]), "llm.policy", on_cpu=True)
    spec = LLMPolicySpec(path=bigger, adapter=llm_dirs["policy_lora"], engine="transformers")
    with pytest.raises(SchemaError, match=re.escape(f"llm.policy.adapter: {llm_dirs['policy_lora']}: ")):
        check_checkpoint(spec, "llm.policy", on_cpu=True)
