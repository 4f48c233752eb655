"""The `llm:` section of schema.yaml: `llm.policy.adapters`, its model ids and folders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from policy_server.errors import SchemaError
from policy_server.schema.config import parse_schema


@pytest.fixture
def schema_dir(tmp_path: Path) -> Path:
    """A schema folder with `models/tiny`, a folder the schema takes for a model (its config.json)."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    return tmp_path


def with_adapters(adapters: dict[str, Any], **policy: Any) -> dict[str, Any]:
    return {"parameters": {"api_key": "k"}, "llm": {"policy": {"path": "models/tiny", "adapters": adapters, **policy}}}


def test_adapter_folders_resolve_against_the_schema_folder_and_stay_private(schema_dir: Path) -> None:
    schema = parse_schema(with_adapters({"tiny-a": "loras/a", "ft:tiny-b@2": str(schema_dir / "elsewhere" / "b")}), schema_dir)
    assert schema.llm is not None and schema.llm.policy is not None
    assert schema.llm.policy.adapters == {"tiny-a": schema_dir / "loras" / "a", "ft:tiny-b@2": schema_dir / "elsewhere" / "b"}
    public = schema.public()["llm"]["policy"]
    assert public["adapters"] == {"tiny-a": "a", "ft:tiny-b@2": "b"}  # folder names, not the server's layout


def test_no_adapters_by_default(schema_dir: Path) -> None:
    schema = parse_schema({"parameters": {"api_key": "k"}, "llm": {"policy": {"path": "models/tiny"}}}, schema_dir)
    assert schema.llm is not None and schema.llm.policy is not None and schema.llm.policy.adapters == {}


@pytest.mark.parametrize("model_id", ["", "a/b", "a b", ".hidden", "-x", "é", "a?b", "a#b", "%2F"])
def test_a_model_id_that_is_not_one_url_path_segment_is_refused(schema_dir: Path, model_id: str) -> None:
    message = re.escape(f"llm.policy.adapters: Value error, the model id {model_id!r} is not one URL path segment")
    with pytest.raises(SchemaError, match=message):
        parse_schema(with_adapters({model_id: "lora"}), schema_dir)


@pytest.mark.parametrize(("policy", "taken"), [({"served_name": "tiny-chat"}, "tiny-chat"), ({}, "tiny")])
def test_an_adapter_may_not_take_the_policys_own_model_id(schema_dir: Path, policy: dict[str, Any], taken: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(f"llm.policy.adapters: Value error, {taken!r} is the policy's own")):
        parse_schema(with_adapters({taken: "lora"}, **policy), schema_dir)


def test_an_adapter_may_take_the_folder_name_when_served_name_differs(schema_dir: Path) -> None:
    schema = parse_schema(with_adapters({"tiny": "lora"}, served_name="base"), schema_dir)
    assert schema.llm is not None and schema.llm.policy is not None
    assert list(schema.llm.policy.adapters) == ["tiny"]


def test_an_adapter_folder_must_be_a_string(schema_dir: Path) -> None:
    with pytest.raises(SchemaError, match=re.escape("llm.policy.adapters.a:")):
        parse_schema(with_adapters({"a": ["not", "a", "path"]}), schema_dir)


def test_the_kv_cache_size_takes_units_and_needs_the_vllm_engine(schema_dir: Path) -> None:
    schema = parse_schema(with_adapters({}, kv_cache_memory_bytes="2GiB"), schema_dir)
    assert schema.llm is not None and schema.llm.policy is not None
    assert schema.llm.policy.kv_cache_memory_bytes == 2 << 30
    message = "llm.policy.kv_cache_memory_bytes: Value error, it sizes vLLM's KV cache: it needs engine: vllm"
    with pytest.raises(SchemaError, match=re.escape(message)):
        parse_schema(with_adapters({}, kv_cache_memory_bytes="2GiB", engine="transformers"), schema_dir)
    for bad in ("lots", 0, "0MiB"):
        with pytest.raises(SchemaError, match=re.escape("llm.policy.kv_cache_memory_bytes:")):
            parse_schema(with_adapters({}, kv_cache_memory_bytes=bad), schema_dir)


def test_the_cpu_binding_is_vllms_and_needs_the_vllm_engine(schema_dir: Path) -> None:
    for bind in ("auto", "nobind", "0-2,5"):
        schema = parse_schema(with_adapters({}, cpu_threads_bind=bind), schema_dir)
        assert schema.llm is not None and schema.llm.policy is not None
        assert schema.llm.policy.cpu_threads_bind == bind
    message = "llm.policy.cpu_threads_bind: Value error, it binds vLLM's CPU worker: it needs engine: vllm"
    with pytest.raises(SchemaError, match=re.escape(message)):
        parse_schema(with_adapters({}, cpu_threads_bind="nobind", engine="transformers"), schema_dir)
    for bad in ("all", "0-2|3", "1,,2"):
        with pytest.raises(SchemaError, match=re.escape(f"expected auto, nobind or a core list such as 0-2,5; got {bad!r}")):
            parse_schema(with_adapters({}, cpu_threads_bind=bad), schema_dir)


def test_a_direct_weight_transfer_needs_the_vllm_engine_and_no_adapter(schema_dir: Path) -> None:
    for transfer in ("auto", "rpc", "nccl", "gloo"):
        schema = parse_schema(with_adapters({}, weight_transfer=transfer), schema_dir)
        assert schema.llm is not None and schema.llm.policy is not None
        assert schema.llm.policy.weight_transfer == transfer
    message = "llm.policy.weight_transfer: Value error, it broadcasts into vLLM's workers: it needs engine: vllm"
    with pytest.raises(SchemaError, match=re.escape(message)):
        parse_schema(with_adapters({}, weight_transfer="gloo", engine="transformers"), schema_dir)
    (schema_dir / "lora").mkdir()
    with pytest.raises(SchemaError, match=re.escape("publishes its adapter as files: use auto or rpc")):
        parse_schema(with_adapters({}, weight_transfer="nccl", adapter="lora"), schema_dir)
    with pytest.raises(SchemaError, match=re.escape("llm.policy.weight_transfer:")):
        parse_schema(with_adapters({}, weight_transfer="ipc"), schema_dir)


def test_llm_resources_take_num_replicas_auto(schema_dir: Path) -> None:
    resources = {"num_replicas": "auto", "max_replicas": 4, "target_ongoing_requests": 16, "downscale_delay_s": 120}
    doc = {"parameters": {"api_key": "k"},
           "llm": {"policy": {"path": "models/tiny", "resources": resources}, "value": {"path": "models/tiny"}}}
    schema = parse_schema(doc, schema_dir)
    assert schema.llm is not None and schema.llm.policy is not None and schema.llm.value is not None
    assert schema.llm.policy.resources.serve_options() == {
        "num_replicas": None,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0,
                               "downscale_delay_s": 120.0},
    }
    assert schema.llm.value.resources.serve_options() == {"num_replicas": 1}
    assert schema.public()["llm"]["policy"]["resources"]["num_replicas"] == "auto"


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"num_replicas": 2, "target_ongoing_requests": 8}, ("llm.value.resources: target_ongoing_requests applies only "
         "to `num_replicas: auto`, and num_replicas is 2 (a fixed count)")),
        ({"num_replicas": "auto", "min_replicas": 3, "max_replicas": 2}, "llm.value.resources: min_replicas 3 is above max_replicas 2"),
        ({"num_replicas": "auto"}, "llm.value.resources: `num_replicas: auto` needs max_replicas"),
    ],
)
def test_llm_replica_fields_are_refused_with_the_field_named(schema_dir: Path, resources: dict[str, Any], message: str) -> None:
    doc = {"parameters": {"api_key": "k"}, "llm": {"value": {"path": "models/tiny", "resources": resources}}}
    with pytest.raises(SchemaError, match=re.escape(message)):
        parse_schema(doc, schema_dir)
