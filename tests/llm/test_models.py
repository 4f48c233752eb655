"""Loading the tiny LLM policy and value models (policy_server.llm.models)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from policy_server.llm.models import (
    LoadedLM,
    LoadedValue,
    ValueModel,
    load_policy,
    load_value,
    save_value,
    score_messages,
    token_index,
)

QUESTION = [{"role": "user", "content": "What is 12 + 34?"}]
CONVERSATIONS = [
    [*QUESTION, {"role": "assistant", "content": "Add the units: 2 + 4 = 6.<|eois_id|>The answer is 46."}],
    [{"role": "user", "content": "Sort the letters of cab alphabetically."}],
    [{"role": "system", "content": "Solve in steps."}, *QUESTION],
]


@pytest.fixture(scope="module")
def policy(llm_dirs: dict[str, Path]) -> LoadedLM:
    return load_policy(llm_dirs["policy"])


@pytest.fixture(scope="module")
def value(llm_dirs: dict[str, Path]) -> LoadedValue:
    return load_value(llm_dirs["value"])


def logits(lm: LoadedLM, texts: list[str]) -> torch.Tensor:
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return lm.model(**batch).logits


def test_build_writes_all_folders(llm_dirs: dict[str, Path]) -> None:
    assert (llm_dirs["policy"] / "config.json").is_file()
    assert (llm_dirs["value"] / "value_head.safetensors").is_file()
    assert (llm_dirs["policy_lora"] / "adapter_config.json").is_file()


def test_policy_loads_for_batched_generation(policy: LoadedLM) -> None:
    assert not policy.model.training
    assert policy.device == torch.device("cpu") and policy.dtype == torch.float32
    assert policy.tokenizer.padding_side == "left" and policy.tokenizer.pad_token == "<|pad|>"
    assert policy.name == "policy"
    assert policy.step_token_id == policy.tokenizer.convert_tokens_to_ids("<|eois_id|>")
    assert policy.end_token_id == policy.tokenizer.eos_token_id


def test_policy_generates_greedy_steps(policy: LoadedLM) -> None:
    prompt = policy.tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    runs = [policy.model.generate(**prompt, max_new_tokens=40, do_sample=False) for _ in range(2)]
    new = runs[0][0, prompt["input_ids"].shape[1] :]
    assert torch.equal(runs[0], runs[1])
    assert len(new) > 0
    # The builder trains on step-wise answers, so the first step ends with the step token.
    assert policy.step_token_id in new.tolist()


def test_lora_adapter_changes_logits(policy: LoadedLM, llm_dirs: dict[str, Path]) -> None:
    with_lora = load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"])
    merged = load_policy(llm_dirs["policy"], adapter=llm_dirs["policy_lora"], merge_adapter=True)
    texts = ["What is 1 + 2?", "hi"]
    base, adapted = logits(policy, texts), logits(with_lora, texts)
    assert (base - adapted).abs().max() > 1e-2
    torch.testing.assert_close(logits(merged, texts), adapted, atol=1e-4, rtol=1e-4)


def test_policy_loads_in_bfloat16(llm_dirs: dict[str, Path]) -> None:
    lm = load_policy(llm_dirs["policy"], dtype="bfloat16", device="auto")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16


def test_value_scores_in_range_and_batched_equals_single(value: LoadedValue) -> None:
    batched = score_messages(value, CONVERSATIONS, batch_size=8)
    single = [score_messages(value, [c])[0] for c in CONVERSATIONS]
    assert all(-1.0 <= s <= 1.0 for s in batched)
    assert len(set(batched)) == len(batched)
    assert batched == pytest.approx(single, abs=1e-5)


def test_value_scores_do_not_depend_on_padding_side(value: LoadedValue, llm_dirs: dict[str, Path]) -> None:
    left = load_value(llm_dirs["value"])
    left.tokenizer.padding_side = "left"
    assert score_messages(left, CONVERSATIONS) == pytest.approx(
        score_messages(value, CONVERSATIONS), abs=1e-5
    )


def naive_scores(model: ValueModel, sequences: list[list[int]], position: int) -> list[float]:
    """One unpadded forward per sequence, head on the chosen token."""
    out = []
    for ids in sequences:
        hidden = model.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, position]
        out.append(torch.tanh(model.value_head(hidden)).item())
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_position_last_and_int_match_naive(value: LoadedValue, side: str) -> None:
    sequences = [[0, 5, 6, 7, 8, 9], [0, 11, 12], [0, 20, 21, 22]]
    batch = value.tokenizer.pad({"input_ids": sequences}, padding_side=side, return_tensors="pt")
    with torch.inference_mode():
        last = value.model.scores(batch["input_ids"], batch["attention_mask"], "last")
        minus_one = value.model.scores(batch["input_ids"], batch["attention_mask"], -1)
        first = value.model.scores(batch["input_ids"], batch["attention_mask"], 1)
        assert last.tolist() == pytest.approx(naive_scores(value.model, sequences, -1), abs=1e-5)
        assert first.tolist() == pytest.approx(naive_scores(value.model, sequences, 1), abs=1e-5)
    torch.testing.assert_close(last, minus_one)
    assert not torch.allclose(last, first)


def test_token_index_matches_naive() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    for position in ["last", 0, 1, 2, -1, -3]:
        naive = [row.nonzero().flatten()[-1 if position == "last" else position].item() for row in mask]
        assert token_index(mask, position).tolist() == naive
    with pytest.raises(ValueError, match="position 3 is outside a sequence of 3 tokens"):
        token_index(mask, 3)
    with pytest.raises(ValueError, match="empty sequence"):
        token_index(torch.tensor([[1, 1], [0, 0]]), "last")


def test_load_value_position_override(llm_dirs: dict[str, Path]) -> None:
    assert load_value(llm_dirs["value"]).position == "last"
    assert load_value(llm_dirs["value"], position=0).position == 0


def test_value_with_adapter_changes_scores(value: LoadedValue, llm_dirs: dict[str, Path]) -> None:
    adapted = load_value(llm_dirs["value"], adapter=llm_dirs["policy_lora"])
    plain = score_messages(value, CONVERSATIONS)
    assert score_messages(adapted, CONVERSATIONS) != pytest.approx(plain, abs=1e-3)


def test_save_value_round_trip(value: LoadedValue, tmp_path: Path) -> None:
    save_value(value.model, value.tokenizer, tmp_path / "saved", position=-1)
    again = load_value(tmp_path / "saved")
    assert again.position == -1
    assert score_messages(again, CONVERSATIONS) == pytest.approx(
        score_messages(value, CONVERSATIONS), abs=1e-6
    )


@pytest.mark.parametrize(
    ("conversations", "message"),
    [
        ([], "non-empty list of conversations"),
        ([[]], "conversation 0 must be a non-empty list"),
        ([QUESTION, "hello"], "conversation 1 must be a non-empty list"),
        ([[{"role": "user"}]], "conversation 0, message 0 has no 'content'"),
        ([[{"content": "hi"}]], "conversation 0, message 0 has no 'role'"),
        ([[{"role": "user", "content": 3}]], "'content' must be a string, got int"),
        ([[*QUESTION, ["user", "hi"]]], "conversation 0, message 1 must be an object"),
    ],
)
def test_malformed_messages_raise(value: LoadedValue, conversations: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_messages(value, conversations)


def test_too_long_conversation_raises(value: LoadedValue) -> None:
    with pytest.raises(ValueError, match="conversation 0 has .* tokens, more than max_length=4"):
        score_messages(value, CONVERSATIONS, max_length=4)


def test_missing_or_wrong_folders_are_named(tmp_path: Path, llm_dirs: dict[str, Path]) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape(f"{missing} does not exist")):
        load_policy(missing)
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path} is not a model folder: it has no config.json")
    ):
        load_policy(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{llm_dirs['policy']} is not a value model folder")):
        load_value(llm_dirs["policy"])
    with pytest.raises(ValueError, match=re.escape(f"{llm_dirs['value']} is not a peft adapter folder")):
        load_policy(llm_dirs["policy"], adapter=llm_dirs["value"])
    with pytest.raises(ValueError, match=re.escape(f"adapter folder {missing} does not exist")):
        load_value(llm_dirs["value"], adapter=missing)
