"""GRPO benchmark: our control-flow-reversed GRPO over HTTP against TRL's `GRPOTrainer`, same run.

    python bench/grpo.py [--steps 50] [--repeats 1] [--backend local|serve] [--vllm] [--vllm-transfers rpc,gloo]
                         [--report bench/results/grpo.json]

Both train the tiny model of ``examples/llm`` (built afresh, full fine-tuning, no LoRA) on one task:
the prompt "What is 3 + 4?" as one user chat message, 8 completions per step (one group), at most
16 new tokens, temperature 1.0, reward = occurrences of " 7" in the decoded completion per
completion token (``sevens``, the same function for both), AdamW at a constant lr 1e-3 with
weight decay 0.01 and no gradient clipping, the clipped GRPO loss (``loss_type="grpo"``, ε 0.2)
with β 0.04 against the initial model, one torch thread, CPU.

- ours: ``uvicorn app:app`` (``--backend local``: the run in a thread of the gateway process, no
  Ray; ``serve``: on its own Ray Serve deployment), driven by this process as a client: one cycle =
  POST completions, score them here, POST rewards (the server trains one step before it answers).
- ours on vLLM (``--vllm``, a third design): the same client loop against a server whose policy runs
  on the vLLM engine, the run started with ``serve: true``: vLLM samples each group and the run
  publishes its weights into vLLM after every cycle (reported beside the others, no target). With
  ``--vllm-transfers rpc,gloo`` once per ``llm.policy.weight_transfer``: ``rpc`` (what ``auto``
  is on CPU) and ``gloo`` (the trainer broadcasting into vLLM's worker) as separate designs.
- TRL: ``GRPOTrainer`` in its own process, one step = generate 8 completions, score, one optimiser
  step; timed by a ``TrainerCallback`` from ``on_step_begin`` to ``on_step_end``.

Repeat ``r`` seeds both with ``seed + r``; the designs run one after the other within a repeat.
Before each design the script waits (up to ``--quiet-wait``, 60 s) until other processes use under
0.3 cores, and it records the cores each design and everything else used while it trained.
Targets: our mean cycle time ≤ TRL's, and our mean reward over the last 10 cycles ≥ TRL's minus
``--reward-tolerance`` (both over all repeats). Results: ``bench/results/grpo.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
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

from bench.cpu import machine_busy_s, processes_busy_s, wait_for_quiet
from bench.servers import ServerSpec, running_server

RESULTS = ROOT / "bench" / "results"
KEY = "bench-key"
PROMPT = "What is 3 + 4?"
GROUP = 8
MAX_NEW_TOKENS = 16
TEMPERATURE = 1.0
LR = 1e-3
BETA = 0.04
CLIP_EPS = 0.2
WEIGHT_DECAY = 0.01
"""torch.optim.AdamW's default, which our run uses; TRL's own default is 0."""
WINDOW = 10
QUIET_CORES = 0.3
"""Cycles averaged for the first and last reward."""


def sevens(text: str, n_tokens: int) -> float:
    """The task's reward: how often the completion says " 7", per completion token."""
    return text.count(" 7") / max(1, n_tokens)


def build_model(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "examples" / "llm"))
    import build_tiny_model

    return build_tiny_model.build(out, seed=0, lora=False)["policy"]


def own_busy_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cores(wall: float, design_busy: float, machine_busy: float) -> dict[str, float]:
    """Average cores used by the design and by everything else on the machine (a busy neighbour)."""
    return {"design_cores": design_busy / wall, "other_cores": max(0.0, (machine_busy - design_busy) / wall)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------------------------
# Ours: a client of the HTTP API.


def run_ours(url: str, server_pids: list[int], steps: int, seed: int, serve: bool = False) -> dict[str, Any]:
    settings = {"group_size": GROUP, "lr": LR, "beta": BETA, "clip_eps": CLIP_EPS, "lora": False, "chat": True,
                "max_completion_length": MAX_NEW_TOKENS, "temperature": TEMPERATURE, "seed": seed, "serve": serve,
                "checkpoint_every": steps + 1}  # no checkpoint inside the timed cycles, as TRL's save_strategy="no"
    with httpx.Client(base_url=url, headers={"access-token": KEY}, timeout=600) as client:
        start = time.perf_counter()
        answer = client.post("/llm/grpo/runs", json=settings)
        answer.raise_for_status()
        run_id = answer.json()["run_id"]
        started = time.perf_counter() - start
        times, rewards = [], []
        loop, m0, o0, s0 = time.perf_counter(), machine_busy_s(), own_busy_s(), processes_busy_s(server_pids)
        for _ in range(steps):
            t0 = time.perf_counter()
            group = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": PROMPT})
            group.raise_for_status()
            body = group.json()
            scores = [sevens(c["text"], len(c["token_ids"])) for c in body["completions"]]
            done = client.post(f"/llm/grpo/runs/{run_id}/rewards", json={"group_id": body["group_id"], "rewards": scores})
            done.raise_for_status()
            times.append(time.perf_counter() - t0)
            rewards.append(sum(scores) / len(scores))
        s1 = processes_busy_s(server_pids)
        busy = own_busy_s() - o0 + sum(s1[p] - s0[p] for p in s1.keys() & s0.keys())
        cpu = cores(time.perf_counter() - loop, busy, machine_busy_s() - m0)
        wall = time.perf_counter() - start
        client.post(f"/llm/grpo/runs/{run_id}/stop").raise_for_status()
    return {"cycle_s": times, "rewards": rewards, "wall_s": wall, "setup_s": started} | cpu


def ours_repeat(
    policy: Path, work: Path, steps: int, seed: int, backend: str, quiet_wait: float, engine: str = "transformers",
    transfer: str = "auto",
) -> dict[str, Any]:
    """One run of ours; ``engine: vllm`` serves the policy on vLLM and trains it in place (``serve: true``),
    its weights going into vLLM as ``transfer`` says (``llm.policy.weight_transfer``)."""
    vllm = {"weight_transfer": transfer} if engine == "vllm" else {}
    schema = {"parameters": {"api_key": KEY},
              "llm": {"policy": {"path": str(policy), "engine": engine, **vllm,
                                 "training": {"save_dir": str(work / f"trained-{engine}-{transfer}-{seed}")}}}}
    (work / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    env = {"SCHEMA_PATH": str(work / "schema.yaml"), "POLICY_SERVER_BACKEND": backend, "OMP_NUM_THREADS": "1",
           "POLICY_SERVER_GATEWAY_METRICS_PORT": "0", "POLICY_SERVER_RAY_METRICS_PORT": "0"}
    spec = ServerSpec(f"ours-grpo-{backend}-{engine}", "app:app", env=env, ready_path="/health/ready")
    with running_server(spec, ROOT, RESULTS / "logs") as server:
        quiet = wait_for_quiet(server.pids(), quiet_wait, QUIET_CORES) if quiet_wait > 0 else float("nan")
        serve = engine == "vllm"
        return run_ours(server.base_url, server.pids(), steps, seed, serve) | {"other_cores_before": quiet}


# ---------------------------------------------------------------------------------------------
# TRL: GRPOTrainer in its own process.


def run_trl(policy: str, steps: int, seed: int, out_dir: str) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same model and task; run in a fresh process (``trl_repeat``)."""
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)

    def reward(completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [sevens(tokenizer.decode(ids, skip_special_tokens=True), len(ids)) for ids in completion_ids]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=out_dir, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=seed,
        max_steps=steps, per_device_train_batch_size=GROUP, num_generations=GROUP, gradient_accumulation_steps=1,
        max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, learning_rate=LR, beta=BETA,
        epsilon=CLIP_EPS, loss_type="grpo", scale_rewards="group", lr_scheduler_type="constant",
        optim="adamw_torch", weight_decay=WEIGHT_DECAY, max_grad_norm=0.0, gradient_checkpointing=False,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT}]}] * steps)
    timer = Timer()
    start = time.perf_counter()
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    setup = time.perf_counter() - start
    m0, o0 = machine_busy_s(), own_busy_s()
    trainer.train()
    wall = time.perf_counter() - start - setup
    cpu = cores(wall, own_busy_s() - o0, machine_busy_s() - m0)
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return {"cycle_s": timer.times, "rewards": rewards, "wall_s": wall, "setup_s": setup} | cpu


def trl_repeat(policy: Path, work: Path, steps: int, seed: int, quiet_wait: float) -> dict[str, Any]:
    code = (
        "import json, sys; sys.path.insert(0, %r); from bench.grpo import run_trl; "
        "print('RESULT ' + json.dumps(run_trl(%r, %d, %d, %r)))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true"}
    log = RESULTS / "logs" / f"trl-grpo-{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    quiet = wait_for_quiet([], quiet_wait, QUIET_CORES) if quiet_wait > 0 else float("nan")
    out = subprocess.run(
        [sys.executable, "-c", code % (str(ROOT), str(policy), steps, seed, str(work / f"trl-{seed}"))],
        check=False, capture_output=True, text=True, env=env,
    )
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"TRL run failed ({out.returncode}); log {log}:\n{out.stderr[-3000:]}")
    line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"other_cores_before": quiet}


# ---------------------------------------------------------------------------------------------
# Report.


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [s for r in runs for s in r["cycle_s"]]
    first = [x for r in runs for x in r["rewards"][:WINDOW]]
    last = [x for r in runs for x in r["rewards"][-WINDOW:]]
    return {
        "design": name,
        "steps": sum(len(r["cycle_s"]) for r in runs),
        "mean_s": statistics.fmean(times),
        "p50_s": statistics.median(times),
        "p90_s": percentile(times, 0.9),
        "wall_s": sum(r["wall_s"] for r in runs),
        "setup_s": sum(r["setup_s"] for r in runs),
        "reward_first": statistics.fmean(first),
        "reward_last": statistics.fmean(last),
    }


VLLM_DESIGNS = {"vllm": ("ours, vLLM serve", "rpc"), "vllm-gloo": ("ours, vLLM serve, gloo", "gloo")}
"""The vLLM designs by key: their name in the tables and their ``weight_transfer``."""


def report(results: dict[str, Any]) -> bool:
    a = results["args"]
    ours, trl = results["ours"], results["trl"]
    print(f"\nGRPO on the tiny model, {a['steps']} steps × {a['repeats']} repeat(s), group {GROUP}, "
          f"≤ {MAX_NEW_TOKENS} new tokens, backend {a['backend']}; {results['date']}, {results['machine']}\n")
    print(f"| design | steps | mean cycle s | p50 s | p90 s | total wall s | reward first {WINDOW} | "
          f"reward last {WINDOW} |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in (trl, ours, *(results.get(key) for key in VLLM_DESIGNS)):
        if row is None:
            continue
        print(f"| {row['design']} | {row['steps']} | {row['mean_s']:.3f} | {row['p50_s']:.3f} | {row['p90_s']:.3f} | "
              f"{row['wall_s']:.1f} | {row['reward_first']:.3f} | {row['reward_last']:.3f} |")
    print(f"\n| repeat | seed | design | mean cycle s | p90 s | reward first {WINDOW} | reward last {WINDOW} | "
          "design cores | other cores |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    repeats = len(results["runs"]["ours"])
    designs = {"trl": "TRL", "ours": "ours"} | {key: name for key, (name, _) in VLLM_DESIGNS.items()}
    for r in range(repeats):
        for name, run in ((name, (results["runs"].get(key) or [None] * repeats)[r]) for key, name in designs.items()):
            if run is None:
                continue
            print(f"| {r} | {a['seed'] + r} | {name} | {statistics.fmean(run['cycle_s']):.3f} | "
                  f"{percentile(run['cycle_s'], 0.9):.3f} | {statistics.fmean(run['rewards'][:WINDOW]):.3f} | "
                  f"{statistics.fmean(run['rewards'][-WINDOW:]):.3f} | {run['design_cores']:.2f} | {run['other_cores']:.2f} |")
    ratio = ours["mean_s"] / trl["mean_s"]
    time_ok = ours["mean_s"] <= trl["mean_s"]
    reward_ok = ours["reward_last"] >= trl["reward_last"] - a["reward_tolerance"]
    print(f"\n- **{'PASS' if time_ok else 'FAIL'}** mean cycle time, ours ≤ TRL's: {ours['mean_s']:.3f} vs "
          f"{trl['mean_s']:.3f} s = {ratio:.2f}× (TRL is {1 / ratio:.2f}× ours)")
    print(f"- **{'PASS' if reward_ok else 'FAIL'}** mean reward of the last {WINDOW} cycles, ours ≥ TRL's − "
          f"{a['reward_tolerance']}: {ours['reward_last']:.3f} vs {trl['reward_last']:.3f} "
          f"(first {WINDOW}: {ours['reward_first']:.3f} vs {trl['reward_first']:.3f})")
    return time_ok and reward_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["local", "serve"], default="local")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each design, wait up to this long for other processes to use < 0.3 cores")
    parser.add_argument("--reward-tolerance", type=float, default=0.02)
    parser.add_argument("--vllm", action="store_true",
                        help="also run ours with the policy on the vLLM engine and the run training it in place")
    parser.add_argument("--vllm-transfers", default="rpc",
                        help="with --vllm: one vLLM design per weight_transfer, of rpc and gloo")
    parser.add_argument("--json", type=Path, default=RESULTS / "grpo.json")
    parser.add_argument("--report", type=Path, help="measure nothing: re-print a results file")
    args = parser.parse_args(argv)
    if args.report:
        return 0 if report(json.loads(args.report.read_text())) else 1
    if args.steps < WINDOW:
        parser.error(f"--steps must be at least {WINDOW}")

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    policy = build_model(work / "models")
    transfers = args.vllm_transfers.split(",") if args.vllm else []
    vllm_keys = [key for key, (_, transfer) in VLLM_DESIGNS.items() if transfer in transfers]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []} | {key: [] for key in vllm_keys}
    for r in range(args.repeats):
        seed = args.seed + r
        runs["trl"].append(trl_repeat(policy, work, args.steps, seed, args.quiet_wait))
        print(f"repeat {r}: TRL done, {statistics.fmean(runs['trl'][-1]['cycle_s']):.3f} s per step", flush=True)
        runs["ours"].append(ours_repeat(policy, work, args.steps, seed, args.backend, args.quiet_wait))
        print(f"repeat {r}: ours done, {statistics.fmean(runs['ours'][-1]['cycle_s']):.3f} s per cycle", flush=True)
        for key in vllm_keys:
            transfer = VLLM_DESIGNS[key][1]
            runs[key].append(ours_repeat(policy, work, args.steps, seed, args.backend, args.quiet_wait, "vllm", transfer))
            print(f"repeat {r}: ours on vLLM ({transfer}) done, {statistics.fmean(runs[key][-1]['cycle_s']):.3f} s per cycle",
                  flush=True)
        for name in runs:
            if len(runs[name][-1]["rewards"]) != args.steps:
                raise RuntimeError(f"{name} recorded {len(runs[name][-1]['rewards'])} rewards for {args.steps} steps")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    results = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, commit {commit.stdout.strip()}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ours": summarise(f"ours: HTTP client loop, {args.backend} backend", runs["ours"]),
        "trl": summarise("TRL GRPOTrainer", runs["trl"]),
        "runs": runs,
    }
    for key in vllm_keys:
        transfer = VLLM_DESIGNS[key][1]
        results[key] = summarise(f"ours: HTTP client loop, vLLM engine, serve: true, weight_transfer: {transfer}, "
                                 f"{args.backend} backend", runs[key])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    return 0 if report(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
