"""Training benchmark: solve CartPole-v1 through the server with rollout clients, against one process.

    python bench/training.py [--repeats 1] [--clients 4] [--seed 1] [--json OUT]

In the same run, interleaved per repeat (seed ``seed + r``):

* ``single``: ``examples/cartpole/train_policy.py``'s cleanrl-style PPO in one process, 4
  synchronous environments, stopping as soon as the mean return of its last 20 training episodes
  reaches 475 (``stop_return``): the floor;
* ``ours``: ``examples/cartpole/train.py --clients N --no-keep-serving``: a fresh policy, the
  server (``uvicorn app:app``, Ray Serve) training it with PPO with the same hyper-parameters, N
  rollout client processes acting locally; it stops when the server's mean return of the last 20
  episodes reaches 475.

Reports environment steps and wall-clock to solve, steps per second, and the wall-clock ratio,
with PASS/FAIL for the targets (solved within 300k environment steps; wall-clock at most 2× the
single process). Wall-clock runs from the first environment step to the target in both designs;
the server's and the clients' start-up are reported beside it. Results go to
``bench/results/training.json`` (and ``--json OUT``); train.py's output to ``bench/results/logs/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/training.py` as well as `python -m bench.training`
    sys.path.insert(0, str(ROOT))

from bench.cpu import machine_busy_s, wait_for_quiet  # noqa: E402

CARTPOLE = ROOT / "examples" / "cartpole"
RESULTS_DIR = ROOT / "bench" / "results"
TARGET_RETURN = 475.0
MAX_STEPS = 500_000
STEPS_TARGET = 300_000
WALL_RATIO_TARGET = 2.0
QUIET_CORES = 0.3


@dataclass
class Run:
    design: str
    repeat: int
    seed: int
    solved: bool
    env_steps: int
    wall_s: float
    mean_return: float | None
    busy_cores: float
    """cores the whole machine used during the run (this run's processes and anything else)"""
    quiet_before: float
    """cores other processes used just before the run (above 0.3: a noisy run)"""
    extra: dict[str, Any]

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.wall_s if self.wall_s > 0 else 0.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the two designs ----------------------------------------------------------------------------


def single_process(seed: int) -> dict[str, Any]:
    """train_policy.train with stop_return (runs in a fresh spawned process: one torch thread)."""
    import importlib.util

    import torch

    torch.set_num_threads(1)  # as train_policy.main does
    spec = importlib.util.spec_from_file_location("train_policy", CARTPOLE / "train_policy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_policy"] = module
    spec.loader.exec_module(module)
    result = module.train(module.Args(seed=seed, total_timesteps=MAX_STEPS, stop_return=TARGET_RETURN))
    return {"solved": result.solved, "env_steps": result.steps, "wall_s": result.wall_s,
            "mean_return": result.mean_return}


def run_single(seed: int) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(single_process, seed).result()


def run_ours(seed: int, clients: int, backend: str, log_path: Path) -> dict[str, Any]:
    """examples/cartpole/train.py in its own process; its --json summary."""
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, str(CARTPOLE / "train.py"), "--clients", str(clients), "--seed", str(seed),
               "--backend", backend, "--workdir", str(Path(tmp) / "work"), "--max-steps", str(MAX_STEPS),
               "--target-return", str(TARGET_RETURN), "--no-keep-serving", "--json", str(out)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"train.py failed with status {done.returncode}; see {log_path}")
        return json.loads(out.read_text())


def measure(design: str, repeat: int, seed: int, args: argparse.Namespace) -> Run:
    quiet = wait_for_quiet([], args.quiet_wait, QUIET_CORES) if args.quiet_wait > 0 else float("nan")
    t0, busy0 = time.monotonic(), machine_busy_s()
    if design == "single":
        result, extra = run_single(seed), {}
    else:
        result = run_ours(seed, args.clients, args.backend, RESULTS_DIR / "logs" / f"training-ours-{repeat}.log")
        extra = {k: result[k] for k in ("server_start_s", "clients_start_s", "updates", "model_version",
                                        "samples_received", "samples_rejected", "episodes", "clients")}
    busy = (machine_busy_s() - busy0) / (time.monotonic() - t0)
    return Run(design, repeat, seed, bool(result["solved"]), int(result["env_steps"]), float(result["wall_s"]),
               result["mean_return"], round(busy, 2), round(quiet, 2), extra)


# --- report -------------------------------------------------------------------------------------------


def median_of(runs: list[Run], design: str, attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs if r.design == design]
    return statistics.median(values) if values else None


def check_targets(runs: list[Run]) -> list[tuple[str, bool | None, str]]:
    steps, ours_wall = median_of(runs, "ours", "env_steps"), median_of(runs, "ours", "wall_s")
    single_wall = median_of(runs, "single", "wall_s")
    all_solved = all(r.solved for r in runs if r.design == "ours")
    checks: list[tuple[str, bool | None, str]] = []
    if steps is None or ours_wall is None:
        return [("ours measured", None, "not measured")]
    checks.append((f"ours solves within {STEPS_TARGET:,} environment steps",
                   all_solved and steps <= STEPS_TARGET,
                   f"median {steps:,.0f} steps" + ("" if all_solved else " (a run did not solve)")))
    if single_wall is not None:
        ratio = ours_wall / single_wall
        checks.append((f"ours wall-clock ≤ {WALL_RATIO_TARGET:g}× the single process", ratio <= WALL_RATIO_TARGET,
                       f"median {ours_wall:.1f} s vs {single_wall:.1f} s = {ratio:.2f}×"))
    return checks


def markdown(runs: list[Run], meta: dict[str, Any]) -> str:
    single_wall = {r.repeat: r.wall_s for r in runs if r.design == "single"}
    out = [
        (f"CartPole-v1 to a mean return ≥ {TARGET_RETURN:g} over the last 20 training episodes; "
         f"{meta['date']}, {meta['cpus']} CPUs, commit {meta['commit']}, {meta['repeats']} repeat(s), "
         f"{meta['clients']} clients, backend {meta['backend']}"),
        "",
        ("| design | repeat | seed | solved | env steps | wall-clock s | steps/s | wall / same repeat's single "
         "| machine cores | other cores before |"),
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ratio = f"{r.wall_s / single_wall[r.repeat]:.2f}×" if r.repeat in single_wall else "–"
        out.append(f"| {DESIGNS[r.design]} | {r.repeat} | {r.seed} | {'yes' if r.solved else 'no'} | "
                   f"{r.env_steps:,} | {r.wall_s:.1f} | {r.steps_per_s:,.0f} | {ratio} | "
                   f"{r.busy_cores:.2f} | {r.quiet_before:.2f} |")
    ours = [r for r in runs if r.design == "ours"]
    if ours:
        header = ("| ours, repeat | server start s | clients start s | updates | samples received "
                  "| stale samples | episodes |")
        out += ["", header, "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ours:
            e = r.extra
            start = f"{e['server_start_s']:.1f}" if e.get("server_start_s") is not None else "–"
            out.append(f"| {r.repeat} | {start} | {e['clients_start_s']:.1f} | {e['updates']} | "
                       f"{e['samples_received']:,} | {e['samples_rejected']['stale']:,} | {e['episodes']} |")
    out += ["", "**targets**", ""]
    verdicts = {True: "PASS", False: "FAIL", None: "SKIP"}
    out += [f"- **{verdicts[ok]}** {name}: {detail}" for name, ok, detail in check_targets(runs)]
    return "\n".join(out)


DESIGNS = {"single": "single process (train_policy.py)", "ours": "ours: server + rollout clients (train.py)"}


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "policy_server", "app.py", "examples"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return done.stdout.strip() + (" (modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each design, interleaved (default 1)")
    parser.add_argument("--clients", type=int, default=4, help="rollout client processes of ours (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of repeat 0; repeat r uses seed + r")
    parser.add_argument("--backend", choices=("serve", "local"), default="serve",
                        help="the server's backend (default serve: Ray Serve and a trainer actor)")
    parser.add_argument("--designs", default="single,ours", help="comma-separated: single, ours")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help=f"before each run, wait up to this many seconds for other processes to use under "
                        f"{QUIET_CORES} cores (0: never wait)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="measure nothing: print the tables and targets of a results file")
    return parser.parse_args(argv)


def load_runs(path: Path) -> tuple[list[Run], dict[str, Any]]:
    data = json.loads(path.read_text())
    fields = set(Run.__dataclass_fields__)
    return [Run(**{k: v for k, v in r.items() if k in fields}) for r in data["runs"]], data["meta"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        runs, meta = load_runs(args.report)
        print(markdown(runs, meta))
        return 0
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if unknown := set(designs) - set(DESIGNS):
        raise SystemExit(f"unknown design(s) {sorted(unknown)}; choose from {list(DESIGNS)}")
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "command": "python bench/training.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "repeats": args.repeats,
        "clients": args.clients,
        "backend": args.backend,
        "target_return": TARGET_RETURN,
        "max_steps": MAX_STEPS,
    }
    runs: list[Run] = []
    for repeat in range(args.repeats):
        for design in designs:
            _log(f"repeat {repeat}: {DESIGNS[design]} (seed {args.seed + repeat}) ...")
            run = measure(design, repeat, args.seed + repeat, args)
            _log(f"  {'solved' if run.solved else 'NOT solved'}: {run.env_steps:,} steps, {run.wall_s:.1f} s")
            runs.append(run)
    data = {"meta": meta, "runs": [asdict(r) | {"steps_per_s": round(r.steps_per_s, 1)} for r in runs]}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for path in [RESULTS_DIR / "training.json"] + ([args.json] if args.json else []):
        path.write_text(json.dumps(data, indent=2))
    print(markdown(runs, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
