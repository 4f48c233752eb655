"""x1 samples (policy_server.llm.datasets): parsing, the documented form, files, subsets, masks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from policy_server.errors import Forbidden, InvalidRequest, NotFound
from policy_server.llm.datasets import (
    PolicySample,
    ValueSample,
    encode_last_message,
    load_dataset_file,
    parse_samples,
    save_samples,
    subset,
)

CHAT = [
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "Add the units.<|eois_id|>The answer is 3."},
]
DOCUMENTED = {
    "question": "What is 1 + 2?",
    "context": "Add the units.<|eois_id|>",
    "current_node": "The answer is 3.",
    "value": 0.5,
}


@pytest.fixture(scope="module")
def tokenizer(llm_dirs: dict[str, Path]) -> Any:
    return AutoTokenizer.from_pretrained(llm_dirs["policy"], local_files_only=True)


def test_policy_and_value_samples_parse() -> None:
    policy = parse_samples([{"messages": CHAT, "GAE": 1.5}, {"messages": CHAT, "advantage": -1}], "policy")
    assert policy == [PolicySample(CHAT, 1.5), PolicySample(CHAT, -1.0)]
    value = parse_samples([{"messages": CHAT, "value_target": -0.25}], "value")
    assert value == [ValueSample(CHAT, -0.25)]


def test_documented_form_maps_to_messages() -> None:
    (policy,) = parse_samples([DOCUMENTED], "policy")
    (value,) = parse_samples([DOCUMENTED], "value")
    assert policy.messages == CHAT and value.messages == CHAT
    assert policy.advantage == 0.5 and value.value_target == 0.5
    assert policy.judged_from == value.judged_from == len(DOCUMENTED["context"])


@pytest.mark.parametrize(
    ("sample", "kind", "field"),
    [
        ({"messages": CHAT}, "policy", "dataset.1.GAE"),
        ({"messages": CHAT, "GAE": "high"}, "policy", "dataset.1.GAE"),
        ({"messages": CHAT, "GAE": True}, "policy", "dataset.1.GAE"),
        ({"messages": CHAT[:1], "GAE": 1.0}, "policy", "dataset.1.messages.0.role"),
        ({"messages": [{"role": "user"}], "GAE": 1.0}, "policy", "dataset.1.messages.0.content"),
        ({"messages": CHAT, "GAE": 1.0, "gea": 2}, "policy", "dataset.1.gea"),
        ({"messages": CHAT, "GAE": 1.0, "logprobs": [0.5]}, "policy", "dataset.1.logprobs.0"),
        ({"messages": CHAT, "value_target": 2.0}, "value", "dataset.1.value_target"),
        ({**DOCUMENTED, "value": None}, "value", "dataset.1.value"),
        ({**DOCUMENTED, "current_node": ""}, "policy", "dataset.1.current_node"),
        ("text", "value", "dataset.1"),
        # numbers that are finite as float64 but not as the float32 the loss is computed in
        ({"messages": CHAT, "GAE": 1e39}, "policy", "dataset.1.GAE"),
        ({"messages": CHAT, "advantage": -1e39}, "policy", "dataset.1.advantage"),
        ({"messages": CHAT, "GAE": float("nan")}, "policy", "dataset.1.GAE"),
        ({"messages": CHAT, "GAE": 1.0, "logprobs": [-1e39]}, "policy", "dataset.1.logprobs.0"),
        ({**DOCUMENTED, "value": 1e39}, "policy", "dataset.1.value"),
        ({"messages": CHAT, "value_target": float("nan")}, "value", "dataset.1.value_target"),
        ({"messages": CHAT, "value_target": 1e39}, "value", "dataset.1.value_target"),
        ({**DOCUMENTED, "value": float("inf")}, "value", "dataset.1.value"),
        # strings and booleans are no numbers, numbers no strings
        ({"messages": CHAT, "value_target": "0.5"}, "value", "dataset.1.value_target"),
        ({"messages": CHAT, "value_target": False}, "value", "dataset.1.value_target"),
        ({"messages": [{"role": 1, "content": "hi"}, CHAT[1]], "GAE": 1.0}, "policy", "dataset.1.messages.0.role"),
        # texts a tokenizer cannot encode: a lone UTF-16 surrogate
        ({"messages": [{"role": "user", "content": "\ud800"}, CHAT[1]], "GAE": 1.0}, "policy",
         "dataset.1.messages.0.content"),
        ({"messages": [CHAT[0], {"role": "assistant", "content": "ok\udfff"}], "value_target": 0.0}, "value",
         "dataset.1.messages.1.content"),
        ({**DOCUMENTED, "question": "\ud800?"}, "policy", "dataset.1.question"),
        ({**DOCUMENTED, "context": "\udc00"}, "value", "dataset.1.context"),
        ({**DOCUMENTED, "current_node": "x\ud83d"}, "policy", "dataset.1.current_node"),
    ],
)
def test_invalid_samples_name_the_field(sample: Any, kind: str, field: str) -> None:
    good = {"messages": CHAT, "GAE": 1.0} if kind == "policy" else {"messages": CHAT, "value_target": 0.0}
    with pytest.raises(InvalidRequest) as info:
        parse_samples([good, sample], kind)  # type: ignore[arg-type]
    assert info.value.fields[0].field == field
    assert info.value.message.startswith(field)


def test_a_bad_sample_in_a_file_is_named_under_the_given_field(tmp_path: Path) -> None:
    good = {"messages": CHAT, "value_target": 0.5}
    lines = [good, {"messages": CHAT, "value_target": 1e39}, {**DOCUMENTED, "question": "\ud800"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in lines))  # "\ud800" escaped
    raw = load_dataset_file(tmp_path, "d.jsonl")
    with pytest.raises(InvalidRequest) as info:
        parse_samples(raw, "value", "dataset_path")
    assert info.value.fields[0].field == "dataset_path.1.value_target"
    with pytest.raises(InvalidRequest) as info:
        parse_samples([good, raw[2]], "value", "dataset_path")
    assert info.value.fields[0].field == "dataset_path.1.question"
    assert "surrogate" in info.value.fields[0].message


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(DOCUMENTED).replace("What", "W\xe4t").encode("latin-1"))
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        load_dataset_file(tmp_path, "latin1.jsonl")


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="^dataset: "):
        parse_samples([], "policy")


def test_load_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([DOCUMENTED, DOCUMENTED]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps(DOCUMENTED) + "\n\n" + json.dumps(DOCUMENTED) + "\n")
    assert load_dataset_file(tmp_path, "a.json") == [DOCUMENTED, DOCUMENTED]
    assert load_dataset_file(tmp_path, "sub/b.jsonl") == [DOCUMENTED, DOCUMENTED]
    (tmp_path / "bad.jsonl").write_text(json.dumps(DOCUMENTED) + "\n{oops\n")
    with pytest.raises(InvalidRequest, match="line 2"):
        load_dataset_file(tmp_path, "bad.jsonl")


def test_paths_outside_the_data_folder_are_forbidden(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps([DOCUMENTED]))
    os.symlink(secret, data / "link.json")
    os.symlink(tmp_path, data / "up")
    for path in ("../secret.json", str(secret), "link.json", "up/secret.json", "sub/../../secret.json"):
        with pytest.raises(Forbidden, match="outside the data folder"):
            load_dataset_file(data, path)
    with pytest.raises(NotFound):
        load_dataset_file(data, "missing.json")


def test_subset_is_seeded_ordered_and_at_least_one() -> None:
    items = list(range(100))
    half = subset(items, 0.5, seed=3)
    assert len(half) == 50 and half == sorted(half) and half == subset(items, 0.5, seed=3)
    assert half != subset(items, 0.5, seed=4)
    assert len(subset(items, 0.001, seed=0)) == 1 and subset(items, 1.0, seed=0) == items
    with pytest.raises(InvalidRequest, match="percent_of_data"):
        subset(items, 0.0, seed=0)


def test_save_samples_writes_jsonl_atomically(tmp_path: Path) -> None:
    path = save_samples([DOCUMENTED, {"messages": CHAT, "GAE": 1.0}], tmp_path / "datasets")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [DOCUMENTED, {"messages": CHAT, "GAE": 1.0}]
    assert path.suffix == ".jsonl"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert save_samples([DOCUMENTED], tmp_path / "datasets") != path


def masked_text(tokenizer: Any, ids: list[int], mask: list[int]) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)


def test_mask_covers_only_the_last_message(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *CHAT]
    ids, mask = encode_last_message(tokenizer, messages, max_length=512)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert masked_text(tokenizer, ids, mask) == CHAT[1]["content"] + "<|eot_id|>"
    assert mask[-1] == 1 and sum(mask[: len(ids) - sum(mask)]) == 0  # one contiguous block at the end


def test_mask_of_documented_form_covers_only_the_current_node(tokenizer: Any) -> None:
    (sample,) = parse_samples([DOCUMENTED], "policy")
    ids, mask = encode_last_message(tokenizer, sample.messages, 512, sample.judged_from)
    assert masked_text(tokenizer, ids, mask) == "The answer is 3.<|eot_id|>"


def test_too_long_chat_is_refused(tokenizer: Any) -> None:
    with pytest.raises(InvalidRequest, match="max_length=8"):
        encode_last_message(tokenizer, CHAT, max_length=8, field="dataset.0.messages")
