"""Loading the tiny LLM policy and value models (policy_server.llm.models)."""

from __future__ import annotations

from pathlib import Path


def test_build_writes_all_folders(llm_dirs: dict[str, Path]) -> None:
    assert (llm_dirs["policy"] / "config.json").is_file()
    assert (llm_dirs["value"] / "value_head.safetensors").is_file()
    assert (llm_dirs["policy_lora"] / "adapter_config.json").is_file()
