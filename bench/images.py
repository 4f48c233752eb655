"""Image observations: JSON against the ``.npy`` body, in observations/s, measured with ``wrk``.

    python bench/images.py [--duration 10] [--batch 16] [--json OUT]

Builds a tiny CNN policy for 84×84×4 uint8 frames (Atari's stacked frames; ``export.CNNPolicy``:
two strided convolutions and an MLP head over 4 actions, the frame scaled by 1/255 inside the
model, as SB3's ``CnnPolicy`` does) with ``observation_space`` a uint8 Box, starts ``uvicorn
app:app`` on it (the default backend: Ray Serve, gateway micro-batching) and loads it with ``wrk
-t1`` at 1 and 16 clients: ``/predict`` with one frame per request and ``/predict/batch`` with
``--batch`` frames, each once as JSON (``{"obs": <nested lists of 28,224 integers>}``) and once as
``.npy`` (uint8). Before each point the server is waited on until idle. Both forms of one request are first checked to
get the same answer from ``/predict_deterministic``. Prints a table with the ratio and writes the
results to ``bench/results/images.json`` (and ``--json OUT``). Exit status 1 when a request failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/images.py` as well as `python -m bench.images`
    sys.path.insert(0, str(ROOT))

from bench.loadgen import find_wrk, run_wrk
from bench.servers import ServerSpec, running_server
from policy_server.export import CNNPolicy, export_module

FRAME = (84, 84, 4)
NPY = "application/x-npy"
RESULTS_DIR = ROOT / "bench" / "results"


def write_policy(folder: Path) -> Path:
    """The CNN (seeded; ``export.CNNPolicy``: uint8 frames scaled inside the model) and its
    schema.yaml (``observation_space``: a uint8 Box of 84×84×4) in ``folder``; returns the schema."""
    torch.manual_seed(0)
    export_module(CNNPolicy(FRAME, 4), FRAME, folder / "cnn", dtype=torch.uint8)
    schema = {
        "observation_space": {"type": "box", "shape": list(FRAME), "dtype": "uint8", "low": 0, "high": 255},
        "parameters": {"model": "cnn.pt2", "resources": {"num_cpus": 1}},
    }
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    return path


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def bodies(frames: np.ndarray) -> dict[tuple[str, str], tuple[bytes | dict[str, Any], dict[str, str]]]:
    """(route, form) → (body, headers): one frame, and all of ``frames`` as a batch."""
    return {
        ("/predict", "json"): ({"obs": frames[0].tolist()}, {}),
        ("/predict", "npy"): (npy(frames[0]), {"Content-Type": NPY}),
        ("/predict/batch", "json"): ({"obs": frames.tolist()}, {}),
        ("/predict/batch", "npy"): (npy(frames), {"Content-Type": NPY}),
    }


def post(url: str, body: bytes | dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **headers}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (after 2 s of warm-up)")
    parser.add_argument("--batch", type=int, default=16, help="frames per /predict/batch request")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    wrk = find_wrk()
    frames = np.random.default_rng(0).integers(0, 256, (args.batch, *FRAME), dtype=np.uint8)
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        schema = write_policy(Path(tmp))
        env = {"SCHEMA_PATH": str(schema), "POLICY_SERVER_GATEWAY_METRICS_PORT": "0",
               "POLICY_SERVER_API_KEY": "bench-key"}
        spec = ServerSpec("images", "app:app", env=env, ready_path="/health/ready")
        auth = {"access-token": "bench-key"}
        with running_server(spec, ROOT, RESULTS_DIR / "logs") as server:
            check_same_answers(server.base_url, frames, auth)
            for (route, form), (body, headers) in bodies(frames).items():
                per_request = args.batch if route.endswith("batch") else 1
                for clients in (int(c) for c in args.clients.split(",")):
                    url = server.base_url + route
                    run_wrk(wrk, url, body, auth | headers, clients, 2)
                    wait_idle(server.base_url)
                    result = run_wrk(wrk, url, body, auth | headers, clients, args.duration)
                    points.append({"route": route, "form": form, "clients": clients, "frames_per_request": per_request,
                                   "observations_per_s": result.requests_per_s * per_request, **result.as_dict()})
                    print(f"{route} {form:>4} {clients:>2} clients: {points[-1]['observations_per_s']:8.1f} obs/s, "
                          f"p50 {result.p50_ms:.1f} ms, failed {result.failed}", flush=True)
    report(points, args)
    return 1 if any(p["non_2xx"] or p["socket_errors"] for p in points) else 0


def check_same_answers(base: str, frames: np.ndarray, auth: dict[str, str]) -> None:
    """JSON and ``.npy`` bodies of the same frames get the same deterministic actions."""
    for route in ("/predict", "/predict/batch"):
        deterministic = route.replace("/predict", "/predict_deterministic")
        answers = [post(base + deterministic, body, auth | headers)
                   for (r, _), (body, headers) in bodies(frames).items() if r == route]
        if answers[0] != answers[1]:
            raise SystemExit(f"{deterministic}: JSON and .npy answers differ: {answers}")


def wait_idle(base: str, timeout_s: float = 120.0) -> None:
    """Until the server answers ``/health/live`` within 50 ms: wrk leaves the requests it sent last
    queued in the server, and the next point must not start behind them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        start = time.monotonic()
        with urllib.request.urlopen(base + "/health/live", timeout=60):
            pass
        if time.monotonic() - start < 0.05:
            return
        time.sleep(0.2)


def report(points: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The markdown table (one row per route and client count, ratio .npy / JSON), and the JSON file."""
    print("\n| request | clients | JSON obs/s | .npy obs/s | ratio | JSON p50 ms | .npy p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for p in points:
        if p["form"] != "json":
            continue
        twin = next(q for q in points if q["form"] == "npy" and q["route"] == p["route"] and q["clients"] == p["clients"])
        label = f"{p['route']} ({p['frames_per_request']} frame{'s' if p['frames_per_request'] > 1 else ''})"
        print(f"| {label} | {p['clients']} | {p['observations_per_s']:,.0f} | {twin['observations_per_s']:,.0f} | "
              f"{twin['observations_per_s'] / p['observations_per_s']:.1f}× | {p['p50_ms']:.1f} | {twin['p50_ms']:.1f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    results = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
               "load_average": os.getloadavg(), "duration_s": args.duration, "points": points}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for path in filter(None, (RESULTS_DIR / "images.json", args.json)):
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
