"""The multiplexed deployment's pieces that run without Serve (the deployment itself runs in
``tests/integration/test_many_policies.py``)."""

from __future__ import annotations

from pathlib import Path

from support import write_policy_files

from policy_server.policies.torch_policy import TorchPolicy
from policy_server.serving.multiplexed import _Loaded


def test_an_evicted_model_is_counted_once(tmp_path: Path) -> None:
    write_policy_files(tmp_path, ["acme"])
    evicted: list[str] = []
    loaded = _Loaded("acme", TorchPolicy.from_file(tmp_path / "acme.pt"), evicted.append)
    loaded.__del__()  # Serve's eviction calls it ...
    del loaded  # ... and Python's collection again
    assert evicted == ["acme"]
