"""LLM generation benchmark: 16 concurrent `/direct_forward` requests against the server, versus
the same model calling `generate` once per request, sequentially, in one process.

    python bench/llm.py [--requests 16] [--new-tokens 32] [--rounds 3] [--backend serve]

Both generate exactly ``--new-tokens`` tokens per request (sampling at temperature 0.7; the
server's `min_new_tokens` and transformers' `min_new_tokens`), from the same prompts, with the tiny model of ``examples/llm`` built
afresh. Reported: generated tokens per second, p50 / p99 request latency, and the ratio; the
target is ≥ 4× on the tiny model on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.servers import ServerSpec, running_server

RESULTS = ROOT / "bench" / "results"
KEY = "bench-key"
TARGET = 4.0


def prompts(n: int) -> list[str]:
    return [f"What is {i} + {2 * i + 1}? Think in steps." for i in range(n)]


def build_model(out: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "examples" / "llm"))
    import build_tiny_model

    return build_tiny_model.build(out, seed=0, lora=False)


def sequential(policy: Path, texts: list[str], new_tokens: int, device: str) -> dict[str, Any]:
    """The baseline: transformers' `generate`, one request after the other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(policy), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(policy), local_files_only=True).to(device).eval()
    latencies, tokens = [], 0
    start = time.perf_counter()
    for text in texts:
        t0 = time.perf_counter()
        ids = tokenizer(text, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(
                **ids, do_sample=True, temperature=0.7, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "latencies": latencies}


async def concurrent(url: str, texts: list[str], new_tokens: int) -> dict[str, Any]:
    """Ours: every request in flight at once against `/llm/direct_forward`."""
    async with httpx.AsyncClient(base_url=url, headers={"access-token": KEY}, timeout=600) as client:
        async def one(text: str) -> tuple[int, float]:
            t0 = time.perf_counter()
            # no max_output_length: the server's max_new_tokens (= new_tokens) caps every sample
            body = {"input_string": text, "max_input_length": 256, "min_new_tokens": new_tokens,
                    "return_tokens": True, "temperature": 0.7}
            answer = await client.post("/llm/direct_forward", json=body)
            answer.raise_for_status()
            record = answer.json()["records"][0]
            return len(record["tokens"]) - record["prompt_length"], time.perf_counter() - t0

        start = time.perf_counter()
        results = await asyncio.gather(*(one(t) for t in texts))
        wall = time.perf_counter() - start
    return {"tokens": sum(n for n, _ in results), "wall_s": wall, "latencies": [s for _, s in results]}


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(s for r in runs for s in r["latencies"])
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall_s"] for r in runs)
    return {
        "design": name,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=["serve", "local"], default="serve")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    dirs = build_model(work / "models")
    limits = {"max_new_tokens": args.new_tokens, "max_batch_prompts": 64, "max_input_length": 256}
    schema = {"parameters": {"api_key": KEY},
              "llm": {"policy": {"path": str(dirs["policy"]), "device": args.device, "limits": limits}}}
    (work / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    texts = prompts(args.requests)

    env = {"SCHEMA_PATH": str(work / "schema.yaml"), "POLICY_SERVER_BACKEND": args.backend,
           "POLICY_SERVER_GATEWAY_METRICS_PORT": "0", "POLICY_SERVER_RAY_METRICS_PORT": "0"}
    spec = ServerSpec("ours-llm", "app:app", env=env, ready_path="/health/ready")
    ours_runs, base_runs = [], []
    with running_server(spec, ROOT, RESULTS / "logs") as server:
        asyncio.run(concurrent(server.base_url, texts[:2], args.new_tokens))  # warm-up
        for _ in range(args.rounds):
            ours_runs.append(asyncio.run(concurrent(server.base_url, texts, args.new_tokens)))
    code = (
        "import json, sys; sys.path.insert(0, %r); from bench.llm import sequential; "
        "print(json.dumps(sequential(__import__('pathlib').Path(%r), %r, %d, %r)))"
    )
    for _ in range(args.rounds):  # in its own process, as a user's script would run it
        out = subprocess.run(
            [sys.executable, "-c", code % (str(ROOT), str(dirs["policy"]), texts, args.new_tokens, args.device)],
            check=True, capture_output=True, text=True,
        )
        base_runs.append(json.loads(out.stdout.strip().splitlines()[-1]))

    ours, base = summarise("ours: 16 concurrent /direct_forward", ours_runs), summarise("sequential generate", base_runs)
    ratio = ours["tokens_per_s"] / base["tokens_per_s"]
    print(f"\n{args.requests} requests × {args.new_tokens} new tokens, {args.rounds} rounds, device {args.device}\n")
    print("| design | tokens/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for row in (base, ours):
        print(f"| {row['design']} | {row['tokens_per_s']:,} | {row['p50_ms']:,} | {row['p99_ms']:,} |")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"\n{verdict}: ours / sequential = {ratio:.1f}× tokens/s (target ≥ {TARGET:.0f}×)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llm.json").write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "args": vars(args),
        "ours": ours, "sequential": base, "ratio": ratio,
    }, indent=2))
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
