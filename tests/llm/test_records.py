"""Token records and sessions: masks, exact token reuse across turns, linear and tree modes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from policy_server.errors import Conflict, NotFound, QueueFull
from policy_server.llm.records import MASK, SessionStore, TokenRecord, record_from_sample

BOS = 1


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    log_probs: list[float]
    finish_reason: str = "stop"
    stop_string: str | None = None


def chars(text: str) -> list[int]:
    return [ord(c) + 100 for c in text]


class CharTokenizer:
    """One id per character (ord + 100), bos first; records every call to tell the two encoders apart."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def encode(self, text: str) -> list[int]:
        self.calls.append(("encode", text))
        return [BOS] + chars(text)

    def encode_suffix(self, text: str) -> list[int]:
        self.calls.append(("encode_suffix", text))
        return chars(text)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer()


def turn(
    store: SessionStore,
    tok: CharTokenizer,
    prompt: str,
    completion_ids: list[int],
    completion_text: str,
    version: int = 3,
    session: str = "s",
) -> tuple[str, list[int], str | None]:
    """One generation through the store, as the server does it; returns the node id, prompt ids, parent."""
    prompt_ids, parent = store.prefix_for(session, prompt, tok.encode, tok.encode_suffix)
    sample = Sample(prompt_ids, completion_ids, [-0.5 - i for i in range(len(completion_ids))])
    node_id = store.add(session, parent, record_from_sample(sample, version), prompt + completion_text)
    return node_id, prompt_ids, parent


def test_a_record_masks_exactly_the_prompt_positions() -> None:
    record = record_from_sample(Sample([1, 5, 6], [7, 8], [-0.1, -0.2], "length"), model_version=4)
    assert record.tokens == [1, 5, 6, 7, 8]
    assert record.masked_tokens == [MASK, MASK, MASK, 7, 8]
    assert record.log_probs == [1.0, 1.0, 1.0, -0.1, -0.2]
    assert (record.prompt_length, record.finish_reason, record.model_version) == (3, "length", 4)
    assert all(m == MASK for m in record.masked_tokens[: record.prompt_length])
    assert json.loads(json.dumps(record.to_dict())) == record.to_dict()


def test_a_sample_whose_logprobs_do_not_match_its_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="1 logprobs for 2 completion tokens"):
        record_from_sample(Sample([1], [7, 8], [-0.1]), 0)
    with pytest.raises(ValueError, match="one mask and one logprob per token"):
        TokenRecord([1, 2], [MASK], [1.0, 1.0], "stop", 0, 1)


def test_a_new_prompt_is_encoded_whole(tok: CharTokenizer) -> None:
    store = SessionStore()
    assert store.prefix_for("s", "hi", tok.encode, tok.encode_suffix) == ([BOS, *chars("hi")], None)
    assert tok.calls == [("encode", "hi")]


def test_extending_a_node_reuses_its_tokens_and_keeps_its_completion_trainable(tok: CharTokenizer) -> None:
    store = SessionStore()
    # The model's completion ids differ from what re-tokenising "ok" would give (ord + 100).
    first, first_prompt, _ = turn(store, tok, "Q:", [900, 901], "ok")
    tok.calls.clear()
    second, prompt_ids, parent = turn(store, tok, "Q:ok\nQ2:", [902], "!", version=5)
    assert parent == first
    assert prompt_ids == first_prompt + [900, 901] + chars("\nQ2:")
    assert tok.calls == [("encode_suffix", "\nQ2:")]  # no bos, and never the whole text again
    [leaf] = store.nodes("s")  # linear: the extension replaced its parent
    p1, suffix = len(first_prompt), len("\nQ2:")
    assert leaf["tokens"] == prompt_ids + [902]
    assert leaf["masked_tokens"] == [MASK] * p1 + [900, 901] + [MASK] * suffix + [902]
    assert leaf["logprobs"] == [1.0] * p1 + [-0.5, -1.5] + [1.0] * suffix + [-0.5]
    assert leaf["prompt_length"] == len(prompt_ids)
    assert leaf["model_version"] == 3  # the oldest version that generated any of its tokens
    assert second != first


def test_the_longest_matching_node_is_continued(tok: CharTokenizer) -> None:
    store = SessionStore(mode="tree")
    short, _, _ = turn(store, tok, "A", [900], "b")
    long, long_prompt, _ = turn(store, tok, "Ab c", [901], "d")
    _, prompt_ids, parent = turn(store, tok, "Ab cd e", [902], "f")
    assert parent == long != short
    assert prompt_ids == long_prompt + [901] + chars(" e")


def test_a_prompt_equal_to_a_node_text_continues_it_without_encoding(tok: CharTokenizer) -> None:
    store = SessionStore()
    first, first_prompt, _ = turn(store, tok, "Q:", [900], "x")
    tok.calls.clear()
    assert store.prefix_for("s", "Q:x", tok.encode, tok.encode_suffix) == (first_prompt + [900], first)
    assert tok.calls == []


def test_tree_mode_keeps_both_branches_and_linear_mode_keeps_one(tok: CharTokenizer) -> None:
    leaves = {}
    for mode in ("tree", "linear"):
        store = SessionStore(mode=mode)
        root, _, _ = turn(store, tok, "Q:", [900], "x")
        _, _, parent_a = turn(store, tok, "Q:x A?", [901], "a")
        _, _, parent_b = turn(store, tok, "Q:x B?", [902], "b")
        assert parent_a == parent_b == root
        leaves[mode] = [leaf["tokens"][-1] for leaf in store.nodes("s")]
    assert leaves == {"tree": [901, 902], "linear": [902]}


def test_linear_mode_keeps_separate_conversations(tok: CharTokenizer) -> None:
    store = SessionStore()
    turn(store, tok, "first", [900], "x")
    turn(store, tok, "second", [901], "y")
    assert [leaf["tokens"][-1] for leaf in store.nodes("s")] == [900, 901]


def test_samples_of_one_prompt_each_extend_the_parent(tok: CharTokenizer) -> None:
    store = SessionStore(mode="tree")
    root, _, _ = turn(store, tok, "Q:", [900], "x")
    prompt_ids, parent = store.prefix_for("s", "Q:x more", tok.encode, tok.encode_suffix)
    for token in (901, 902, 903):  # num_samples=3: all added after one prefix_for
        store.add("s", parent, record_from_sample(Sample(prompt_ids, [token], [-1.0]), 3), f"Q:x more{token}")
    assert [leaf["tokens"][-1] for leaf in store.nodes("s")] == [901, 902, 903]
    assert parent == root


def test_reset_empties_the_session(tok: CharTokenizer) -> None:
    store = SessionStore()
    first, _, _ = turn(store, tok, "Q:", [900], "x")
    store.reset("s")
    assert store.nodes("s") == []
    assert store.prefix_for("s", "Q:x", tok.encode, tok.encode_suffix).parent_node_id is None
    with pytest.raises(NotFound, match="no longer in session"):
        store.add("s", first, record_from_sample(Sample([1], [2], [-1.0]), 0), "Q:xy")


def test_a_record_that_does_not_continue_its_parent_is_refused(tok: CharTokenizer) -> None:
    store = SessionStore()
    first, _, _ = turn(store, tok, "Q:", [900], "x")
    with pytest.raises(ValueError, match="tokens of its parent"):
        store.add("s", first, record_from_sample(Sample([1, 2], [3], [-1.0]), 0), "Q:xy")


def test_sessions_expire_after_ttl_without_use(tok: CharTokenizer) -> None:
    clock = FakeClock()
    store = SessionStore(ttl_s=60, clock=clock)
    turn(store, tok, "Q:", [900], "x")
    clock.now += 59
    assert len(store.nodes("s")) == 1  # use refreshes the session
    clock.now += 59
    assert len(store.nodes("s")) == 1
    clock.now += 60
    with pytest.raises(NotFound, match="expired"):
        store.nodes("s")


def test_the_number_of_sessions_and_nodes_is_bounded(tok: CharTokenizer) -> None:
    clock = FakeClock()
    store = SessionStore(mode="tree", max_sessions=2, max_nodes=2, ttl_s=60, clock=clock)
    turn(store, tok, "a", [900], "x", session="one")
    turn(store, tok, "b", [900], "x", session="two")
    with pytest.raises(QueueFull, match="max_sessions=2") as info:
        turn(store, tok, "c", [900], "x", session="three")
    assert info.value.retry_after_s == 60
    turn(store, tok, "ax", [901], "y", session="one")
    with pytest.raises(Conflict, match="max_nodes=2"):
        turn(store, tok, "axy", [902], "z", session="one")
    store.delete("two")
    turn(store, tok, "c", [900], "x", session="three")
