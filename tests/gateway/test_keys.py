"""Key sets and the keys file, without HTTP: scopes, parsing, re-reading on change."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from support import wait_until

from policy_server.gateway.keys import (
    LLM_SCOPE,
    RACY_NS,
    KeySet,
    KeysFile,
    KeysFileError,
    parse_keys,
    policy_scope,
)

POLICIES = ("cart", "lpoc")
CART, LPOC = policy_scope("cart"), policy_scope("lpoc")


def parse(text: str) -> KeySet:
    return parse_keys(text, POLICIES, has_llm=True)


def test_a_server_key_opens_every_scope_and_a_scoped_key_only_its_own() -> None:
    keys = KeySet.of(["server-1", "server-2"], {CART: ["cart-1"], LLM_SCOPE: ["llm-1"]})
    for scope in (CART, LPOC, LLM_SCOPE, None):
        assert keys.admits(["server-2"], scope)
    assert keys.admits(["cart-1"], CART) and not keys.admits(["cart-1"], LPOC)
    assert not keys.admits(["cart-1"], LLM_SCOPE) and keys.admits(["llm-1"], LLM_SCOPE)
    assert keys.admits(["cart-1"], None)  # any valid key (the client SDKs)
    assert not keys.admits(["nope"], None) and not keys.admits([], CART)
    assert keys.admits(["nope", "cart-1"], CART)  # one of the sent keys (header, query, cookie) fits


def test_key_sets_unite_and_keep_only_digests() -> None:
    both = KeySet.of(["a"], {CART: ["c"]}) | KeySet.of(["b"], {CART: ["d"], LPOC: ["e"]})
    assert len(both) == 5 and both.admits(["d"], CART) and both.admits(["a"], LPOC)
    assert len(KeySet.of([""])) == 0  # an empty string is no key
    secret = KeySet.of(["plain-secret"])
    assert "plain-secret" not in repr(secret) and [len(d) for d in secret.server] == [32]


def test_the_keys_file_format() -> None:
    keys = parse("server: [s1]\npolicies:\n  cart: [c1, c2]\nllm: [l1]\n")
    assert keys.admits(["c2"], CART) and not keys.admits(["c1"], LPOC)
    assert keys.admits(["l1"], LLM_SCOPE) and keys.admits(["s1"], LPOC)
    assert len(parse("")) == 0 and len(parse('{"server": ["s1"]}')) == 1  # JSON is YAML


@pytest.mark.parametrize(("text", "message"), [
    ("server: [secret-1\npolicies: {", "not valid YAML at line"),
    ("- secret-1\n", "the file: Input should be a valid dictionary"),
    ("servers: [secret-1]\n", "servers: Extra inputs are not permitted"),
    ("server: [12345]\n", "server.0: Input should be a valid string"),
    ("server: ['']\n", "server.0: a key must be non-empty"),
    ("policies:\n  cartpole: [secret-1]\n", "policies.cartpole: the schema has no such policy"),
])
def test_an_invalid_keys_file_names_where_it_is_wrong_but_never_a_key(text: str, message: str) -> None:
    with pytest.raises(KeysFileError, match=message) as caught:
        parse(text)
    assert "secret" not in str(caught.value) and "12345" not in str(caught.value)


def test_llm_keys_need_an_llm_section() -> None:
    with pytest.raises(KeysFileError, match="no llm section"):
        parse_keys("llm: [l1]\n", POLICIES, has_llm=False)


def test_a_rewritten_file_is_read_at_the_next_check(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("server: [old-key]\n")
    keys = KeysFile(path, parse)
    assert keys.current().admits(["old-key"], CART)
    path.write_text("server: [new-key]\n")  # same size, likely the same mtime tick: the racy case
    wait_until(lambda: keys.current().admits(["new-key"], CART), timeout=1.0, message="new key not read in 1 s")
    assert not keys.current().admits(["old-key"], CART)
    replacement = tmp_path / "keys.yaml.tmp"  # an atomic replace (a Kubernetes secret's symlink swap too)
    replacement.write_text("policies: {cart: [cart-key]}\n")
    os.replace(replacement, path)
    assert keys.current().admits(["cart-key"], CART) and not keys.current().admits(["new-key"], CART)


def test_an_unchanged_old_file_costs_one_stat_per_check(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("server: [k]\n")
    reads = []

    def counting(text: str) -> KeySet:
        reads.append(text)
        return parse(text)

    later = path.stat().st_mtime_ns + 2 * RACY_NS  # read long after it was written: not racy
    keys = KeysFile(path, counting, clock_ns=lambda: later)
    for _ in range(100):
        assert keys.current().admits(["k"], None)
    assert len(reads) == 1


def test_a_broken_or_missing_file_keeps_the_last_keys_and_logs_once_without_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("server: [good-key]\n")
    keys = KeysFile(path, parse)
    with caplog.at_level(logging.ERROR, logger="policy_server.gateway.keys"):
        path.write_text("server: [half-written-key\n")
        for _ in range(20):
            assert keys.current().admits(["good-key"], None)
        path.unlink()
        for _ in range(20):
            assert keys.current().admits(["good-key"], None)
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 2, errors
    assert "not valid YAML at line" in errors[0] and "cannot read it (No such file or directory)" in errors[1]
    assert all("keeping the 1 keys read before" in e for e in errors)
    assert not any("half-written" in e or "good-key" in e for e in errors)
    path.write_text("server: [fixed-key]\n")
    assert keys.current().admits(["fixed-key"], None)


def test_a_file_that_is_bad_at_start_up_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cannot read it"):
        KeysFile(tmp_path / "missing.yaml", parse)
    (tmp_path / "bad.yaml").write_text("server: secret-key\n")
    with pytest.raises(KeysFileError, match="server: Input should be a valid list"):
        KeysFile(tmp_path / "bad.yaml", parse)
