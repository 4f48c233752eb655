"""Many policies per replica: does the gateway's micro-batching per policy id help?

    python bench/multiplexed.py [--duration 8] [--ids 200]

Writes ``--ids`` policy files (4 float inputs, 3 actions), then starts ``uvicorn app:app`` twice on
that ``policies_dir`` schema (2 replicas, LRU of 32): with batching (``max_batch_size: 256``) and
without (``max_batch_size: 1``: one forward call per request). Each is loaded with ``wrk -t1`` at
16 clients, once on one hot id and once spread over 16 ids; prints requests/s and latencies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support import write_policy_files  # the tests' builder of a policies_dir

from bench.loadgen import find_wrk, parse_wrk
from bench.servers import ServerSpec, running_server

OBS = {"a": 0.5, "b": -1.0, "c": 2.0, "d": 0.25}


def lua(ids: list[str]) -> str:
    """POST ``OBS`` to ``/ids/<id>/predict``, the id picked at random per request among ``ids``."""
    names = ", ".join(f'"{i}"' for i in ids)
    return (
        f'ids = {{{names}}}\nwrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(OBS))}\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        'request = function() return wrk.format(nil, "/ids/" .. ids[math.random(#ids)] .. "/predict") end\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--ids", type=int, default=200)
    args = parser.parse_args()
    wrk = find_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-mux-") as tmp:
        root = Path(tmp)
        ids = [f"c{i:04d}" for i in range(args.ids)]
        write_policy_files(root / "customers", ids)
        for batch in (256, 1):
            schema = {
                "observations": {name: {"type": "float"} for name in OBS},
                "parameters": {"policies_dir": "customers", "resources": {
                    "num_replicas": 2, "num_cpus": 0.25, "max_models_per_replica": 32, "max_batch_size": batch}},
            }
            (root / f"schema-{batch}.yaml").write_text(yaml.safe_dump(schema))
            spec = ServerSpec(f"mux-{batch}", "app:app", env={"SCHEMA_PATH": str(root / f"schema-{batch}.yaml"),
                                                              "POLICY_SERVER_GATEWAY_METRICS_PORT": "0"},
                              ready_path="/health/ready")
            with running_server(spec, ROOT, root / "logs") as server:
                for label, spread in (("1 hot id", ids[:1]), ("16 ids", ids[:16])):
                    script = root / "post.lua"
                    script.write_text(lua(spread))
                    cmd = [wrk, "-t1", "-c16", "-d2s", "-s", str(script), server.base_url]
                    subprocess.run(cmd, capture_output=True, check=True)  # warm-up: every id loaded
                    cmd[3] = f"-d{args.duration}s"
                    out = parse_wrk(subprocess.run(cmd + ["--latency"], capture_output=True, text=True, check=True).stdout)
                    print(f"max_batch_size {batch:>3}, {label:>8}, 16 clients: {out.requests_per_s:7.0f} rps, "
                          f"p50 {out.p50_ms:.1f} ms, p99 {out.p99_ms:.1f} ms, failed {out.failed}", flush=True)


if __name__ == "__main__":
    main()
