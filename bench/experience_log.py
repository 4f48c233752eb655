"""What the experience log costs ``/predict``: requests/s with and without it.

    python bench/experience_log.py [--duration 5] [--rounds 3] [--backend local]

Builds a small CartPole-shaped MLP (4 float inputs, 2 actions), then starts ``uvicorn app:app``
three times on it, side by side: without ``experience_log``, with a Parquet log and with a
JSON-lines log (``flush_s: 1``). Each round loads each server in turn with ``wrk -t1`` at 1 and
16 clients (a shared machine's load drifts; interleaving spreads the drift over all three);
prints the median requests/s, p50 and p99, the ratio to no log, and how many decisions each log
holds afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from statistics import median
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from bench.loadgen import WrkResult, find_wrk, run_wrk
from bench.servers import ServerSpec, running_server
from policy_server.experience_log.files import read_log
from policy_server.export import MLPPolicy, export_module

OBS = {"cart_position": 0.01, "cart_velocity": -0.2, "pole_angle": 0.03, "pole_angular_velocity": 0.1}


def schema(model: Path, log: dict[str, Any] | None) -> dict[str, Any]:
    parameters: dict[str, Any] = {"model": str(model), "action_space": {"type": "discrete", "n": 2}}
    if log is not None:
        parameters["experience_log"] = log
    return {"observations": {name: {"type": "float"} for name in OBS}, "parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=["local", "serve"], default="local")
    args = parser.parse_args()
    wrk = find_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-explog-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = export_module(MLPPolicy(4, [64, 64], nvec=[2]), 4, root / "cart.pt2")
        runs = {"no log": None, "parquet": {"path": str(root / "parquet"), "format": "parquet"},
                "jsonl": {"path": str(root / "jsonl"), "format": "jsonl"}}
        servers = {}
        with ExitStack() as stack:
            for label, log in runs.items():  # all three at once: the rounds below interleave them
                path = root / f"schema-{label.replace(' ', '-')}.yaml"
                path.write_text(yaml.safe_dump(schema(model, log)))
                spec = ServerSpec(f"explog-{label.replace(' ', '-')}", "app:app", ready_path="/health/ready",
                                  env={"SCHEMA_PATH": str(path), "POLICY_SERVER_BACKEND": args.backend,
                                       "POLICY_SERVER_GATEWAY_METRICS_PORT": "0"})
                servers[label] = stack.enter_context(running_server(spec, ROOT, root / "logs"))
                run_wrk(wrk, servers[label].base_url + "/predict", OBS, {}, 16, 2)  # warm-up
            results: dict[tuple[str, int], list[WrkResult]] = {}
            for _ in range(args.rounds):  # the machine's load drifts: each round runs every server in turn
                for clients in (1, 16):
                    for label, server in servers.items():
                        result = run_wrk(wrk, server.base_url + "/predict", OBS, {}, clients, args.duration)
                        results.setdefault((label, clients), []).append(result)
        print(f"backend {args.backend}, /predict, wrk -t1, {args.rounds} interleaved rounds of {args.duration} s: medians")
        print(f"{'log':>8} | {'clients':>7} | {'req/s':>7} | {'vs no log':>9} | {'p50 ms':>6} | {'p99 ms':>6} | failed")
        for (label, clients), rs in results.items():
            rps = median(r.requests_per_s for r in rs)
            base = median(r.requests_per_s for r in results[("no log", clients)])
            print(f"{label:>8} | {clients:>7} | {rps:7.0f} | {rps / base:9.2f} | {median(r.p50_ms for r in rs):6.2f} | "
                  f"{median(r.p99_ms for r in rs):6.2f} | {sum(r.failed for r in rs)}")
        for label, log in runs.items():
            if log is not None:
                print(f"{label}: {len(read_log(log['path'])):,} decisions in the log")

if __name__ == "__main__":
    main()
