"""Weight publishing benchmark: a trainer's new weights into a vLLM replica on Ray Serve, through
Serve (``rpc``, the default on CPU) against a direct broadcast (``gloo``), on the same replica.

    python bench/weight_transfer.py [--models tiny,76m,1.2g] [--repeats 5]

Per model (the tiny example, a random ~76M-parameter Llama, a random ~1.2 GB float32 Llama), one
``LLMPolicyDeployment`` replica on CPU with ``weight_transfer: gloo``; this process is the
trainer. ``rpc`` is ``set_weights`` on every replica through the Serve handle (the weights travel
through Ray's object store to the replica, then as one safetensors message to vLLM's worker);
``gloo`` is ``WeightPublisher``: vLLM's weight-transfer API, the trainer broadcasting straight into
the worker over TCP. Every publish carries every weight, changed (two perturbed copies, taking
turns); after each the replica answers one greedy request, which must name the new version.

Reported per model and path: the median seconds of ``--repeats`` publishes after one warm-up
(``rpc``'s warm-up reads the master copy from the folder; ``gloo``'s opens the group, reported
as ``first``), and rpc / gloo. NCCL (GPU to GPU) needs a GPU and is not measured here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
APP = "bench-weight-transfer"


def build_models(out: Path, which: list[str]) -> dict[str, Path]:
    """The tiny example policy, the bench's 76M Llama, and the examples' ~1.2 GB one (the real-size test's)."""
    from bench.llm import build_models as llm_models

    folders = llm_models(out, ["tiny", *(m for m in which if m not in ("tiny", "1.2g"))])  # tiny: its tokenizer
    if "1.2g" in which:
        import build_tiny_model  # on sys.path since bench.llm's build_models

        folders["1.2g"] = build_tiny_model.build_real_size(out / "1.2g", folders["tiny"])
    return {name: folders[name] for name in which}


def perturbed(folder: Path) -> list[dict[str, Any]]:
    """Two full sets of new weights: the checkpoint's, each scaled by 1 ± 1e-3."""
    from policy_server.llm.checkpoint import read_weights

    weights = read_weights(folder)
    return [{n: t * (1 + sign * 1e-3) for n, t in weights.items()} for sign in (1, -1)]


def measure(folder: Path, repeats: int) -> dict[str, Any]:
    from ray import serve

    from policy_server.llm.params import GenerationParams
    from policy_server.llm.weight_publish import ServeReplicas, WeightPublisher
    from policy_server.schema.llm import LLMPolicySpec
    from policy_server.serving.llm_deployment import LLMPolicyDeployment

    spec = LLMPolicySpec(path=folder, weight_transfer="gloo")
    handle = serve.run(LLMPolicyDeployment.options(ray_actor_options={"num_cpus": 1}).bind(spec, "cpu"),
                       name=APP, route_prefix=None)
    replicas = ServeReplicas(handle, timeout_s=600)
    publisher = WeightPublisher(replicas, "127.0.0.1", trainer_gpus=())
    sets = perturbed(folder)
    size = sum(t.numel() * t.element_size() for t in sets[0].values())
    probe = GenerationParams(temperature=0.0, max_new_tokens=8)

    def check(version: int) -> None:
        _, served = handle.generate.remote([5, 6, 7], probe).result(timeout_s=120)
        assert served == version, (served, version)

    def rpc(i: int) -> float:
        version = handle.version.remote().result() + 1
        start = time.perf_counter()
        replicas.set_weights(sets[i % 2], version)
        seconds = time.perf_counter() - start
        check(version)
        return seconds

    def gloo(i: int) -> float:
        start = time.perf_counter()
        version = publisher.publish(sets[i % 2])
        seconds = time.perf_counter() - start
        assert publisher.path == "gloo"
        check(version)
        return seconds

    try:
        rpc_first = rpc(0)
        rpc_times = [rpc(i) for i in range(1, repeats + 1)]
        gloo_first = gloo(0)
        gloo_times = [gloo(i) for i in range(1, repeats + 1)]
    finally:
        publisher.close()
        serve.delete(APP)
    return {"bytes": size, "rpc_first_s": rpc_first, "rpc_s": statistics.median(rpc_times), "rpc_all_s": rpc_times,
            "gloo_first_s": gloo_first, "gloo_s": statistics.median(gloo_times), "gloo_all_s": gloo_times}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | weights | rpc, s | gloo, s | rpc / gloo | gloo's first (opens the group), s |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, r in results.items():
        lines.append(f"| {model} | {r['bytes'] / 2**20:,.0f} MiB | {r['rpc_s']:.3f} | {r['gloo_s']:.3f} | "
                     f"{r['rpc_s'] / r['gloo_s']:.2f} | {r['gloo_first_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,76m,1.2g",
                        help="comma-separated, of tiny, 76m and 1.2g (default: all three)")
    parser.add_argument("--repeats", type=int, default=5, help="timed publishes per path after the warm-up (default 5)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    which = args.models.split(",")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-weight-transfer-") as work:
        folders = build_models(Path(work), which)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        try:
            for model, folder in folders.items():
                results[model] = measure(folder, args.repeats)
                print(f"{model}: rpc {results[model]['rpc_s']:.3f} s, gloo {results[model]['gloo_s']:.3f} s", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(table(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (RESULTS / "weight_transfer.json").write_text(json.dumps({"when": stamp, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
