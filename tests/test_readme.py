"""The README's YAML examples are YAML: each ```yaml block parses (a user copies them as they are)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = [(README[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```yaml\n(.*?)```", README, re.DOTALL)]


@pytest.mark.parametrize(("line", "block"), BLOCKS, ids=[f"line-{line}" for line, _ in BLOCKS])
def test_every_yaml_example_parses(line: int, block: str) -> None:
    assert yaml.safe_load(block) is not None, f"README.md:{line}: an empty example"
