"""Per-forward latency of ONNX (onnxruntime) against TorchScript, as the server runs them.

Two models, both formats each, in one run: examples/cartpole's MLP (4 → 64 → 64 → 2, its
TorchScript file as committed, and the same weights exported to ONNX with torch's exporter) and
a Nature-CNN (SB3's ``NatureCNN``, 84×84×4 ``uint8`` in, scaled by 1/255 inside the model, 512
features, 6 logits; random weights, traced to TorchScript and exported to ONNX). Each forward is
the policy object's ``forward`` (``TorchPolicy`` / ``OnnxPolicy``: the numpy batch in, heads
out), at batch 1 and 64, with ``--threads`` threads each, on the CPU or the GPU (``--device cuda``: onnxruntime's CUDA provider
when it has one). Prints a table and writes JSON.

    python bench/onnx.py                     # about 1 minute on 2 cores
    python bench/onnx.py --seconds 10 --threads 2 --out onnx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and this file would shadow the onnx package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from policy_server.export import MLPPolicy, export_onnx
from policy_server.policies.onnx_policy import OnnxPolicy
from policy_server.policies.torch_policy import TorchPolicy

CARTPOLE = ROOT / "examples" / "cartpole" / "models" / "cartpole.pt"
BATCHES = (1, 64)


def nature_cnn(actions: int = 6) -> torch.nn.Module:
    """SB3's Nature-CNN feature extractor and a linear head over uint8 ``(B, 4, 84, 84)``."""
    from gymnasium import spaces
    from stable_baselines3.common.torch_layers import NatureCNN

    class Policy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = NatureCNN(spaces.Box(0, 255, (4, 84, 84), np.uint8), features_dim=512)
            self.head = torch.nn.Linear(512, actions)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x.float() / 255.0))

    return Policy().eval()


def build_models(folder: Path) -> dict[str, tuple[Path, Path, Callable[[int], np.ndarray]]]:
    """Per model: its TorchScript file, its ONNX file and a batch maker."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: deprecated, still served
        script = torch.jit.load(str(CARTPOLE))
    mlp = MLPPolicy(4, [64, 64], nvec=[2])
    mlp.load_state_dict(script.state_dict())
    export_onnx(mlp, torch.zeros(2, 4), folder / "cartpole.onnx")
    torch.manual_seed(0)
    cnn = nature_cnn()
    example = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(cnn, example), folder / "cnn.pt")
    export_onnx(cnn, example, folder / "cnn.onnx")
    rng = np.random.default_rng(0)
    return {
        "cartpole MLP": (CARTPOLE, folder / "cartpole.onnx",
                         lambda b: rng.normal(size=(b, 4)).astype(np.float32)),
        "Nature-CNN 84x84x4 uint8": (folder / "cnn.pt", folder / "cnn.onnx",
                                     lambda b: rng.integers(0, 256, (b, 4, 84, 84), dtype=np.uint8)),
    }


def latencies_ms(forwards: dict[str, Callable[[np.ndarray], object]], batch: np.ndarray, seconds: float,
                 rounds: int = 20) -> dict[str, dict[str, float]]:
    """Median and 90th percentile of one forward, in ms, per entry of ``forwards``, after a
    warm-up. The entries take turns in short rounds, so a burst of another process's load on
    this shared machine falls on both alike."""
    for forward in forwards.values():
        for _ in range(20):
            forward(batch)
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for i in range(rounds):
        order = list(forwards.items()) if i % 2 == 0 else list(forwards.items())[::-1]
        for name, forward in order:
            end = time.perf_counter() + seconds / rounds
            while time.perf_counter() < end:
                start = time.perf_counter()
                forward(batch)
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {"median_ms": 1e3 * statistics.median(values), "p90_ms": 1e3 * values[int(0.9 * (len(values) - 1))],
                     "calls": len(values)}
    return out


class _TorchScriptForward:
    """``TorchPolicy.forward`` for a traced module that takes a uint8 batch (it casts to float32)."""

    def __init__(self, path: Path, device: str) -> None:
        self.policy = TorchPolicy.from_file(path, device)

    def __call__(self, obs: np.ndarray) -> object:
        if obs.dtype == np.float32:
            return self.policy.forward(obs)
        x = torch.from_numpy(obs).to(self.policy.device)
        with torch.inference_mode():
            return self.policy.module(x).to("cpu").numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's and onnxruntime's threads (a Serve replica of num_cpus 1 has 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # OnnxPolicy gives onnxruntime as many
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (script, onnx, make) in build_models(Path(tmp)).items():
            torchscript = _TorchScriptForward(script, args.device)
            onnx_policy = OnnxPolicy.from_file(onnx, args.device)
            for batch in BATCHES:
                obs = make(batch)
                measured = latencies_ms({"torchscript": torchscript, "onnx": onnx_policy.forward}, obs, args.seconds)
                ts, ox = measured["torchscript"], measured["onnx"]
                rows.append({"model": name, "batch": batch, "torchscript": ts, "onnx": ox,
                             "onnx_over_torchscript": ox["median_ms"] / ts["median_ms"],
                             "providers": onnx_policy.session.get_providers()})
    print(f"device {args.device}, torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"{__import__('onnxruntime').__version__}; median (p90) ms per forward")
    print("| model | batch | TorchScript | ONNX | ONNX / TorchScript |")
    print("|---|---|---|---|---|")
    for r in rows:
        ts, ox = r["torchscript"], r["onnx"]
        print(f"| {r['model']} | {r['batch']} | {ts['median_ms']:.3f} ({ts['p90_ms']:.3f}) | "
              f"{ox['median_ms']:.3f} ({ox['p90_ms']:.3f}) | {r['onnx_over_torchscript']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
