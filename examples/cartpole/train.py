"""Train a fresh CartPole-v1 policy through the policy server, with rollout clients in other processes.

    python examples/cartpole/train.py --clients 4

Writes a fresh actor (``MLPPolicy(4, [64, 64], nvec=[2])``, cleanrl's initialisation) and a
``schema.yaml`` with a PPO ``training`` section (the hyper-parameters of ``train_policy.py``) into
``--workdir``, starts ``uvicorn app:app`` on it (or uses ``--server URL``), and runs ``--clients``
processes, each a ``PolicyClient`` (local inference) playing Gymnasium's CartPole-v1 and sending
its experience. A progress bar shows the server's mean return over the last 20 episodes, samples
per second, the model version and the environment steps. Training stops when that mean reaches
``--target-return`` (or after ``--max-steps``); then the clients stop, ``POST /train/stop`` saves
the checkpoint "final", a summary is printed (and written to ``--json``), and the server keeps
serving the trained policy until Ctrl-C (``--no-keep-serving``: exit at once).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
import yaml
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]  # the repository root (runs from a checkout) and train_policy.py
from train_policy import OBSERVATIONS, make_actor  # noqa: E402

from policy_server.cli import parse_dataclass_args  # noqa: E402
from policy_server.client import PolicyClient, PolicyClientError, run_env  # noqa: E402
from policy_server.export import export_module  # noqa: E402
from policy_server.launch import start_server, stop_server, wait_ready  # noqa: E402

POLL_S = 0.5


@dataclass
class Args:
    clients: int = 4
    """rollout client processes"""
    server: str = ""
    """URL of a running server whose policy has a training section; empty: start one on --workdir"""
    policy: str = ""
    """the policy to train on --server (empty: its default policy)"""
    api_key: str = "1234567asdfgh"
    """the api key (of the started server, or of --server)"""
    workdir: str = str(HERE / "runs")
    """where the fresh model, schema.yaml, checkpoints and the server log go"""
    backend: str = "serve"
    """the started server's backend: serve (Ray Serve) or local (models in the gateway process)"""
    target_return: float = 475.0
    """stop when the server's mean return of the last 20 episodes reaches this"""
    max_steps: int = 1_000_000
    """stop after this many environment steps (over all clients) in any case"""
    model_format: str = "torchscript"
    """the fresh model's file format: torchscript (.pt) or export (torch.export, .pt2); TorchScript
    because each client acts with the model: 20 us per forward against 87 us (the README's numbers)"""
    fragment_steps: int = 128
    """environment steps per experience post of each client"""
    inference: str = "local"
    """local (clients download the weights) or remote (the server picks every action)"""
    seed: int = 1
    """seed of the initial weights, the trainer, and (seed + i) the environment of client i"""
    learning_rate: float = 2.5e-4
    """Adam learning rate"""
    anneal_lr_samples: int = 500_000
    """anneal the learning rate linearly to 0 over this many samples, like train_policy.py"""
    rollout_samples: int = 512
    """samples per PPO update (train_policy.py: 4 environments x 128 steps)"""
    num_minibatches: int = 4
    """minibatches per update epoch"""
    update_epochs: int = 4
    """epochs over each rollout"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalized advantage estimation"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    json: str = ""
    """also write the summary as JSON to this file"""
    keep_serving: bool = True
    """after training, keep the started server serving until Ctrl-C (--no-keep-serving: exit)"""


PPO_FIELDS = ("learning_rate", "anneal_lr_samples", "rollout_samples", "num_minibatches", "update_epochs",
              "gamma", "gae_lambda", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm")


@dataclass
class Summary:
    solved: bool
    target_return: float
    env_steps: int
    """environment steps of all clients when training stopped"""
    samples_received: int
    """experience steps the server had received by then"""
    wall_s: float
    """from the first client's first step to the target (or the step limit)"""
    clients_start_s: float
    """from starting the client processes to the first client's first step"""
    server_start_s: float | None
    """starting the server until ready (None: --server)"""
    model_version: int
    updates: int
    mean_return: float | None
    episodes: int
    samples_rejected: dict[str, int]
    clients: int
    url: str


# --- the fresh policy and its server --------------------------------------------------------------


def write_fresh_policy(args: Args, workdir: Path) -> Path:
    """A new actor (seeded) and a schema that trains it with PPO; returns the schema's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = workdir / "checkpoints"
    if checkpoints.exists():
        print(f"removing the checkpoints of an earlier run in {checkpoints}")
        shutil.rmtree(checkpoints)
    torch.manual_seed(args.seed)
    fmt = {"export": "export", "torchscript": "torchscript"}[args.model_format]
    model = export_module(make_actor(4, 2), 4, workdir / "models" / "cartpole.pt", fmt=fmt)
    schema = {
        "observations": {name: {"type": "float"} for name in OBSERVATIONS},
        "parameters": {
            "model": str(model.relative_to(workdir)),
            "action_space": {"type": "discrete", "n": 2, "names": ["left", "right"]},
            "api_key": args.api_key,
            "training": {
                "algorithm": "ppo",
                "ppo": {name: getattr(args, name) for name in PPO_FIELDS},
                "checkpoint_dir": "checkpoints",
                "seed": args.seed,
            },
        },
    }
    path = workdir / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


# --- rollout clients --------------------------------------------------------------------------------


class StepCounter(gym.Wrapper):
    """Counts the environment's steps into slot ``index`` of an array shared with the parent."""

    def __init__(self, env: gym.Env, counts: ctypes.Array[ctypes.c_longlong], index: int) -> None:
        super().__init__(env)
        self.counts, self.index = counts, index

    def step(self, action: Any) -> Any:
        self.counts[self.index] += 1
        return self.env.step(action)


def rollout_client(
    args: Args, url: str, index: int, stop: Event, counts: ctypes.Array[ctypes.c_longlong],
    started: ctypes.Array[ctypes.c_double],
) -> None:
    """One client process: play CartPole-v1 with the server's policy until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    torch.set_num_threads(1)
    env = StepCounter(gym.make("CartPole-v1"), counts, index)
    client = PolicyClient(url, args.api_key or None, policy=args.policy or None, inference=args.inference,  # type: ignore[arg-type]
                          client_id=f"cartpole-{index}", fragment_steps=args.fragment_steps,
                          seed=args.seed + index, info={"env": "CartPole-v1", "index": index})
    try:
        client.act([0.0] * 4)  # loads the model (local inference) before the clock starts
        started[index] = time.time()
        run_env(client, env, stop=stop.is_set, seed=args.seed + index)
    except PolicyClientError:
        if not stop.is_set():  # refusals after the stop (the trainer stopping) are expected
            raise
    finally:
        client.close()
        env.close()


# --- the driver ---------------------------------------------------------------------------------------


def train(args: Args) -> Summary:
    """Start (or join) the server, run the clients until the target, stop training; a summary."""
    workdir = Path(args.workdir).resolve()
    process, log_path, server_start_s = None, None, None
    url = args.server.rstrip("/")
    try:
        if not url:
            schema = write_fresh_policy(args, workdir)
            log_path = workdir / "server.log"
            start = time.monotonic()
            process, url = start_server(schema, args.backend, log_path)
            print(f"starting the server on {schema} (log: {log_path}) ...")
            wait_ready(url, process, log_path, timeout_s=300)
            server_start_s = time.monotonic() - start
            print(f"server ready at {url} after {server_start_s:.1f}s")
        else:
            wait_ready(url, None, None, timeout_s=60)
        control = PolicyClient(url, args.api_key or None, policy=args.policy or None)
        summary = run_clients(args, control, url, server_start_s)
        control.stop()  # training stops and writes the checkpoint "final"; serving goes on
        control.close()
        print_summary(summary, args)
        if args.keep_serving and process is not None:
            serve_until_interrupted(url, args)
        return summary
    finally:
        if process is not None:
            print("stopping the server ...")
            stop_server(process)


def run_clients(args: Args, control: PolicyClient, url: str, server_start_s: float | None) -> Summary:
    ctx = mp.get_context("spawn")
    stop, counts = ctx.Event(), ctx.Array("q", args.clients, lock=False)
    started = ctx.Array("d", args.clients, lock=False)  # time.time() of each client's first step
    workers = [ctx.Process(target=rollout_client, args=(args, url, i, stop, counts, started),
                           name=f"cartpole-client-{i}") for i in range(args.clients)]
    spawned = time.time()
    for worker in workers:
        worker.start()
    status: dict[str, Any] = {}
    bar = tqdm(total=args.max_steps, unit="step", dynamic_ncols=True, smoothing=0.1)
    try:
        while True:
            time.sleep(POLL_S)
            status, steps = control.status(), sum(counts)
            bar.update(min(steps, args.max_steps) - bar.n)
            mean = status["mean_return"]
            bar.set_postfix_str(f"return {mean if mean is None else round(mean, 1)}  "
                                f"{status['samples_per_second']:.0f} samples/s  version {status['model_version']}")
            if solved(status, args.target_return) or steps >= args.max_steps:
                break
            dead = [w.name for w in workers if w.exitcode not in (None, 0)]
            if dead or not any(w.is_alive() for w in workers):
                raise RuntimeError(f"rollout clients failed: {dead or 'all exited'}")
    finally:
        end = time.time()
        bar.close()
        stop.set()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
    first_step = min((t for t in started if t > 0), default=end)
    return Summary(
        solved=solved(status, args.target_return), target_return=args.target_return, env_steps=steps,
        samples_received=status["samples_received"], wall_s=round(end - first_step, 2),
        clients_start_s=round(first_step - spawned, 2), server_start_s=server_start_s,
        model_version=status["model_version"], updates=status["updates"], mean_return=status["mean_return"],
        episodes=status["episodes"], samples_rejected=status["samples_rejected"], clients=args.clients, url=url,
    )


def solved(status: dict[str, Any], target: float) -> bool:
    """The server's mean over a full window of episodes reached the target."""
    mean = status.get("mean_return")
    return mean is not None and len(status["recent_returns"]) >= status["return_window"] and mean >= target


def print_summary(summary: Summary, args: Args) -> None:
    verdict = "reached" if summary.solved else "did not reach"
    print(f"{verdict} a mean return of {args.target_return} over the last 20 episodes: "
          f"{summary.mean_return} after {summary.env_steps} environment steps "
          f"({summary.samples_received} received by the server) in {summary.wall_s:.1f}s with "
          f"{summary.clients} clients; model version {summary.model_version} ({summary.updates} updates)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(asdict(summary), indent=2))
        print(f"wrote {args.json}")


def serve_until_interrupted(url: str, args: Args) -> None:
    prefix = f"/policies/{args.policy}" if args.policy else ""
    print(f"serving the trained policy at {url}{prefix}/predict (access-token {args.api_key}); "
          f"docs at {url}/docs. Ctrl-C to stop.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def parse_args(argv: list[str] | None = None) -> Args:
    return parse_dataclass_args(Args, __doc__, argv)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    # Ctrl-C and SIGTERM both unwind through train()'s cleanup, which stops a server it started
    # (that server runs in its own session, so no signal reaches it directly).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    train(parse_args())
