"""The LLM endpoints in-process (TestClient; the tiny models in the gateway, no Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, CHAT_BODY, assert_422_naming, llm_schema, make_client, post_raw
from fastapi.testclient import TestClient
from support import wait_until

AUTH = {"access-token": API_KEY}
STEP, END = "<|eois_id|>", "<|eot_id|>"






@pytest.fixture(scope="module")
def client(llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory.mktemp("llm"), llm_schema(llm_dirs)) as c:
        yield c


def direct(client: TestClient, **body: Any) -> Any:
    return client.post("/llm/direct_forward", json={"input_string": "What is 2 + 3?", "max_output_length": 40} | body)


def test_the_server_status_of_an_llm_only_schema_has_no_default_policy(client: TestClient) -> None:
    status = client.get("/")
    assert status.status_code == 200, status.text
    assert status.json()["default_policy"] is None and status.json()["policies"] == {}


def test_status_is_x1s(client: TestClient) -> None:
    status = client.get("/llm/").json()
    assert status["allow_inference"] is True and status["allow_training"] is False
    assert status["stop_training_flag"] is False and "ALLOW_TRAINING" in status["status"]
    assert client.get("/value/").json()["model_version"] == 0


@pytest.mark.parametrize("strategy", ["temperature", "beam_search", "diverse_beam_search"])
def test_every_decoding_strategy_answers_num_samples_texts(client: TestClient, strategy: str) -> None:
    answer = direct(client, decoding_strategy=strategy, num_samples=3, seed=0)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["result"]) == 3 and len(body["stop_strings"]) == 3 and body["model_version"] == 0
    assert all(s in ("", STEP, END) for s in body["stop_strings"])
    assert all(r in ("stop", "length") for r in body["finish_reasons"])


def test_diverse_beam_search_takes_its_groups_and_penalty(client: TestClient) -> None:
    def groups(penalty: float) -> list[list[tuple[int, ...]]]:
        answer = direct(client, decoding_strategy="diverse_beam_search", num_samples=4, num_beam_groups=2,
                        diversity_penalty=penalty, return_tokens=True)
        assert answer.status_code == 200, answer.text
        tokens = [tuple(r["tokens"]) for r in answer.json()["records"]]
        return [tokens[:2], tokens[2:]]

    same = groups(0.0)
    assert same[0] == same[1]  # no penalty: the second group of two beams repeats the first
    penalised = groups(2.0)
    assert penalised[0] == same[0] and penalised[1] != same[1]  # the penalty moves the later group only
    one_group = direct(client, decoding_strategy="diverse_beam_search", num_samples=2, num_beam_groups=1)
    plain = direct(client, decoding_strategy="beam_search", num_samples=2)
    assert one_group.json()["result"] == plain.json()["result"]  # one group is plain beam search
    assert_422_naming(direct(client, decoding_strategy="diverse_beam_search", num_samples=3, num_beam_groups=2),
                      "body.num_beam_groups")
    assert_422_naming(direct(client, diversity_penalty=-1.0), "body.diversity_penalty")


def test_token_records_mask_the_prompt(client: TestClient) -> None:
    body = direct(client, return_tokens=True, num_samples=2, seed=1).json()
    for record in body["records"]:
        n = record["prompt_length"]
        assert n > 0 and len(record["tokens"]) == len(record["masked_tokens"]) == len(record["logprobs"])
        assert record["masked_tokens"][:n] == [-100] * n and record["logprobs"][:n] == [1.0] * n
        assert record["masked_tokens"][n:] == record["tokens"][n:] and all(lp <= 0 for lp in record["logprobs"][n:])
        assert record["model_version"] == 0 and record["finish_reason"] in ("stop", "length")


def test_returned_logprobs_equal_a_teacher_forced_pass(client: TestClient) -> None:
    record = direct(client, return_tokens=True, seed=2, temperature=1.0).json()["records"][0]
    n = record["prompt_length"]
    engine = client.app.state.llm.policy.backend.engine  # the in-process engine of the local backend
    forced = engine.generator.log_probs(record["tokens"][:n], record["tokens"][n:])
    assert forced == pytest.approx(record["logprobs"][n:], abs=1e-4)


def test_a_session_continues_the_earlier_nodes_tokens(client: TestClient) -> None:
    first = direct(client, session_id="s1", return_tokens=True, seed=3, stop_strings=[STEP], skip_special_tokens=False).json()
    prompt2 = "What is 2 + 3?" + first["result"][0] + " And then?"
    second = direct(client, input_string=prompt2, session_id="s1", return_tokens=True, seed=4).json()
    assert "records" in second, second
    earlier, later = first["records"][0]["tokens"], second["records"][0]["tokens"]
    assert later[: len(earlier)] == earlier  # continued, not re-tokenised
    nodes = client.get("/llm/sessions/s1").json()["nodes"]
    assert len(nodes) == 1 and nodes[0]["tokens"] == later
    assert client.delete("/llm/sessions/s1").json()["nodes"] == []


def test_a_queued_forward_is_fetched_once_done(client: TestClient) -> None:
    created = client.post("/llm/forward", json={"question": "Sort these letters: c a b", "num_samples": 2})
    assert created.status_code == 201, created.text
    task_id = created.json()["task_id"]

    def done() -> Any:
        answer = client.get(f"/llm/forward/{task_id}")
        assert answer.status_code != 202 or answer.json()["status"] == "pending"
        return answer if answer.status_code != 202 else None

    answer = wait_until(done, 30, message="the queued forward never finished")
    body = answer.json()
    assert answer.status_code == 200 and len(body["result"]) == 2 and len(body["is_final_step"]) == 2
    assert body["prompt"][0].endswith("assistant<|end_header_id|>\n\n") or "Sort these letters" in body["prompt"][0]
    assert client.get(f"/llm/forward/{task_id}").status_code == 404  # fetched: gone
    missing = client.get("/llm/forward/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input_string": "x " * 300, "max_input_length": 16}, "body.input_string"),
        ({"num_samples": 99}, "body.num_samples"),
        ({"max_output_length": 5000}, "body.max_output_length"),
        ({"decoding_strategy": "nucleus"}, "body.decoding_strategy"),
        ({"stop_strings": [""]}, "body.stop_strings.0"),
        ({"max_input_length": 10**6}, "body.max_input_length"),
    ],
)
def test_bad_generation_requests_are_422_naming_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    answer = direct(client, **body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert field in error["message"] or any(f["field"].startswith(field) for f in error["fields"])


def test_a_long_prompt_is_truncated_when_asked(client: TestClient) -> None:
    answer = direct(client, input_string="x " * 300, max_input_length=16, truncate=True, return_tokens=True)
    assert answer.status_code == 200 and answer.json()["records"][0]["prompt_length"] == 16


def test_value_scores_one_or_many_conversations(client: TestClient) -> None:
    conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]
    one = client.post("/value/forward", json={"messages": conv}).json()
    many = client.post("/value/forward", json={"messages": [conv, conv[:1]]}).json()
    assert len(one["result"]) == 1 and len(many["result"]) == 2
    assert all(-1 <= v <= 1 for v in many["result"]) and many["result"][0] == pytest.approx(one["result"][0], abs=1e-5)
    bad = client.post("/value/forward", json={"messages": [{"role": "user"}]})
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "body.messages.0.content"
    assert client.post("/value/forward", json={"messages": []}).status_code == 422


def test_a_full_queue_answers_429_with_a_retry_hint(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    with make_client(tmp_path, llm_schema(llm_dirs, max_queued=1, batch_wait_ms=50)) as small, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: direct(small, max_output_length=60, stop_strings=["@@@"]), range(8)))
    statuses = [a.status_code for a in answers]
    assert 200 in statuses and 429 in statuses, statuses
    limited = next(a for a in answers if a.status_code == 429)
    assert limited.headers["retry-after"] and limited.json()["error"]["status"] == 429


def test_the_llm_needs_the_key(client: TestClient) -> None:
    assert client.post("/llm/direct_forward", json={"input_string": "hi"}, headers={"access-token": "no"}).status_code == 403
    assert client.get("/v1/models", headers={"access-token": "", "authorization": "Bearer nope"}).status_code == 401








CONV = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "body.messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi \udfff there"}]}, "body.messages.1.content"),
        ("/v1/chat/completions", CHAT_BODY | {"stop": ["\n", "end\ud83d"]}, "body.stop"),
        ("/v1/completions", {"prompt": "\ud800"}, "body.prompt"),
        ("/v1/completions", {"prompt": ["fine", "x\udc00"]}, "body.prompt"),
        ("/v1/completions", {"prompt": "fine", "stop": "\ud800"}, "body.stop"),
        ("/llm/direct_forward", {"input_string": "\ud800"}, "body.input_string"),
        ("/llm/direct_forward", {"input_string": "Hi", "stop_strings": ["\ud800"]}, "body.stop_strings.0"),
        ("/llm/forward", {"question": "What is \ud800?"}, "body.question"),
        ("/llm/forward", {"question": "Hi", "context": "step one\udbff"}, "body.context"),
        ("/value/forward", {"messages": [{"role": "user", "content": "\ud800"}]}, "body.messages.0.content"),
        ("/value/forward", {"messages": [{"role": "\ud800", "content": "Hi"}]}, "body.messages.0.role"),
        ("/value/forward", {"messages": [CONV, [CONV[0], {"role": "assistant", "content": "\ud800"}]]},
         "body.messages.1.1.content"),
    ],
)
def test_a_lone_surrogate_in_any_text_for_the_tokenizer_is_422_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    answer = post_raw(client, path, body)
    if path.startswith("/v1/"):  # OpenAI's routes: its 400, the field named as the request named it
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field.removeprefix("body."), answer.text
        return
    error = assert_422_naming(answer, field)
    assert field in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/llm/direct_forward", {"max_output_length": "5"}, "body.max_output_length"),
        ("/llm/direct_forward", {"max_output_length": True}, "body.max_output_length"),
        ("/llm/direct_forward", {"max_input_length": "16"}, "body.max_input_length"),
        ("/llm/direct_forward", {"num_samples": True}, "body.num_samples"),
        ("/llm/direct_forward", {"seed": "1"}, "body.seed"),
        ("/llm/direct_forward", {"temperature": "0.5"}, "body.temperature"),
        ("/llm/direct_forward", {"temperature": False}, "body.temperature"),
        ("/llm/direct_forward", {"temperature": float("nan")}, "body.temperature"),
        ("/llm/direct_forward", {"temperature": 1e39}, "body.temperature"),
        ("/llm/direct_forward", {"truncate": 1}, "body.truncate"),
        ("/llm/direct_forward", {"return_tokens": "yes"}, "body.return_tokens"),
        ("/llm/direct_forward", {"input_string": 5}, "body.input_string"),
        ("/llm/forward", {"question": "Hi", "full_simulation": "off"}, "body.full_simulation"),
        ("/llm/forward", {"question": "Hi", "full_simulation": 0}, "body.full_simulation"),
        ("/llm/forward", {"question": "Hi", "num_samples": "2"}, "body.num_samples"),
        ("/value/forward", {"messages": [{"role": "user", "content": 5}]}, "body.messages.0.content"),
        ("/value/forward", {"messages": [{"role": "user", "content": "Hi", "name": "x"}]}, "body.messages.0.name"),
    ],
)
def test_x1_routes_take_json_types_strictly(client: TestClient, path: str, body: dict[str, Any], field: str) -> None:
    full = ({"input_string": "Hi"} | body) if path == "/llm/direct_forward" else body
    assert_422_naming(post_raw(client, path, full), field)






# --- issue 11: every 422 names its field; the OpenAI routes document what they answer -----------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/llm/direct_forward", {"input_string": "0", "max_output_length": 1}, "body.max_output_length"),
        ("/llm/forward", {"question": "0", "context": "", "max_output_length": 1}, "body.max_output_length"),
        ("/value/forward", {"messages": [[]]}, "body.messages.0"),
        ("/value/forward", {"messages": [CONV, []]}, "body.messages.1"),
        ("/value/forward", {"messages": []}, "body.messages"),
        ("/llm/direct_forward", {"input_string": "Hi", "stop_strings": ["", "x"]}, "body.stop_strings.0"),
    ],
)
def test_every_refusal_names_its_field(client: TestClient, path: str, body: dict[str, Any], field: str) -> None:
    error = assert_422_naming(post_raw(client, path, body), field)
    assert error["message"].startswith(field) or f" {field}:" in error["message"], error["message"]








def test_safe_logits_answers_how_many_non_finite_logits_it_replaced(client: TestClient) -> None:
    """A forward hook on the served model's LM head writes NaN into two tokens' logits: without
    `safe_logits` the request fails, with it each sample names how many it replaced (two per token)."""
    import torch

    engine = client.app.state.llm.policy.backend.engine  # the local backend's engine, in this process
    tokenizer = engine.lm.tokenizer
    bad = [tokenizer.convert_tokens_to_ids(t) for t in ("5", "6")]

    def nan_logits(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out.index_fill(-1, torch.tensor(bad, device=out.device), float("nan"))

    healthy = direct(client, num_samples=2, safe_logits=True).json()
    assert healthy["nonfinite_logits"] == [0, 0] and "nonfinite_logits" not in direct(client).json()
    handle = engine.lm.model.get_output_embeddings().register_forward_hook(nan_logits)
    try:
        assert direct(client).status_code == 500  # a model error: NaN logits
        answer = direct(client, num_samples=2, safe_logits=True, return_tokens=True).json()
    finally:
        handle.remove()
    generated = [sum(1 for m in r["masked_tokens"] if m != -100) for r in answer["records"]]
    assert answer["nonfinite_logits"] == [2 * n for n in generated] and min(generated) > 0
