"""examples/llm: its schema serves the models its script builds (through the same loading code)."""

from __future__ import annotations

from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llm"


def test_the_example_schema_serves_the_built_models(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    # on the transformers engine: tests/cli/test_generate.py serves this example's copy on vLLM
    # through uvicorn (one vLLM engine start in CI, not two)
    doc = yaml.safe_load((EXAMPLE / "schema.yaml").read_text())
    doc["llm"]["policy"]["engine"] = "transformers"
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / "models").symlink_to(llm_dirs["policy"].parent, target_is_directory=True)
    settings = Settings(schema_path=tmp_path / "schema.yaml", backend="local", gateway_metrics_port=0)
    with TestClient(build_app(settings), headers={"access-token": "1234567asdfgh"}) as client:
        answer = client.post("/llm/direct_forward", json={"input_string": "What is 12 + 30?", "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["stop_strings"][0] in ("<|eois_id|>", "<|eot_id|>", "")
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
        conv = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
        assert -1 <= client.post("/value/forward", json={"messages": conv}).json()["result"][0] <= 1
