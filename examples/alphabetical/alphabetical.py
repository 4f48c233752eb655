"""Teach the tiny policy to sort letters with GRPO through the server, the reward computed here.

    python examples/alphabetical/pretrain.py                # once: build and pre-train the policy (20 s)
    python examples/alphabetical/alphabetical.py            # 800 cycles, group 16, lr 3e-4

grpo_server's control-flow reversal: the server samples and trains, this client only scores. The
script starts ``uvicorn app:app`` on ``schema.yaml`` next to it (or uses ``--server URL``), starts a
GRPO run, and for ``--cycles`` cycles draws random letters, asks for a group of completions of
"Sort these letters: d b a c", scores each completion with ``score`` and posts the rewards (one
optimiser step on the server). A progress bar shows each cycle's mean reward and the model version;
at the end the reward curve (mean per block of ``--block`` cycles) is printed (and written to
``--json``) and the run is stopped, which checkpoints it under ``runs/grpo``.
"""

from __future__ import annotations

import json
import random
import signal
import string
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # policy_server from a checkout
    sys.path.insert(0, str(ROOT))
from policy_server.launch import start_server, stop_server, wait_ready  # noqa: E402

MIN_LETTERS, MAX_LETTERS = 4, 8
PARTIAL_MAX = 0.8
"""Most a wrong answer can earn: the exact answer (1.0) is always strictly better."""
LENGTH_PENALTY = 0.02
"""Taken off a wrong answer per character beyond the exact answer's length."""


# --- the task ------------------------------------------------------------------------------------


def make_problem(rng: random.Random) -> tuple[str, str, list[str]]:
    """A random problem: (prompt, exact answer, its distinct letters in prompt order)."""
    letters = rng.sample(string.ascii_lowercase, rng.randint(MIN_LETTERS, MAX_LETTERS))
    return f"Sort these letters: {' '.join(letters)}", " ".join(sorted(letters)), letters


def score(answer: str, letters: list[str]) -> float:
    """The reward of ``answer`` to the problem of sorting ``letters``, in [0, 1].

    1.0 for the exact answer (the sorted letters separated by single spaces, surrounding space
    ignored). Otherwise, with ``seq`` the answer's characters that are letters of the problem (in
    the order written, repeats kept, case ignored) and ``expected`` the exact answer::

        order    = #(i: seq[i] < seq[i+1]) / (len(seq) - 1)      (0 when len(seq) < 2)
        coverage = #distinct(seq) / #distinct(letters)
        extra    = max(0, len(answer.strip()) - len(expected))
        reward   = max(0, 0.8 * order * coverage - 0.02 * extra)

    so a repeated or missing letter, a pair out of order, and rambling past the answer all cost.
    """
    expected = " ".join(sorted(letters))
    text = answer.strip()
    if text == expected:
        return 1.0
    wanted = set(letters)
    seq = [c for c in text.lower() if c in wanted]
    order = sum(a < b for a, b in pairwise(seq)) / (len(seq) - 1) if len(seq) >= 2 else 0.0
    coverage = len(set(seq)) / len(wanted)
    extra = max(0, len(text) - len(expected))
    return max(0.0, PARTIAL_MAX * order * coverage - LENGTH_PENALTY * extra)


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Args:
    cycles: int = 800
    """GRPO cycles: one group of completions, scored and trained on, per cycle"""
    group_size: int = 16
    """completions per prompt"""
    lr: float = 3e-4
    """the run's AdamW learning rate"""
    beta: float = 0.0
    """KL penalty to the starting policy (0: none, and no reference forward pass)"""
    temperature: float = 1.0
    """sampling temperature of the completions"""
    max_completion_length: int = 24
    """most tokens per completion (an answer of 8 letters takes about 16)"""
    lora: bool = False
    """train a LoRA adapter instead of the whole (tiny) model"""
    seed: int = 0
    """seeds the problems and the server's sampling"""
    block: int = 10
    """cycles per point of the printed reward curve"""
    server: str = ""
    """URL of a running server with this schema's GRPO; empty: start one"""
    backend: str = "local"
    """the started server's backend: local (in-process, fastest to start) or serve (Ray Serve)"""
    api_key: str = "1234567asdfgh"
    """the server's api key"""
    json: str = ""
    """write the curve to this JSON file"""


@dataclass
class Curve:
    rewards: list[float]
    """Mean reward of each cycle's group, in cycle order."""
    block: int
    """Cycles per point of ``blocks``."""
    model_version: list[Any] = field(default_factory=list)
    """``[run_id, cycle]`` when the run stopped."""

    @property
    def blocks(self) -> list[float]:
        """Mean reward per block of ``block`` cycles (the last block may be shorter)."""
        chunks = [self.rewards[i : i + self.block] for i in range(0, len(self.rewards), self.block)]
        return [sum(c) / len(c) for c in chunks]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"blocks": self.blocks}


def grpo_settings(args: Args) -> dict[str, Any]:
    """The run's settings (``GRPOSettings`` on the server)."""
    return {"group_size": args.group_size, "lr": args.lr, "beta": args.beta, "temperature": args.temperature,
            "max_completion_length": args.max_completion_length, "chat": True, "lora": args.lora,
            "seed": args.seed}


def run(args: Args, client: httpx.Client | None = None) -> Curve:
    """Train for ``args.cycles`` cycles through ``client`` (default: one to ``--server`` or to a
    server started here), stop the run, print the curve; returns it."""
    if client is not None:
        return train(args, client)
    if args.server:
        with _client(args.server, args.api_key) as remote:
            return train(args, remote)
    log = Path(tempfile.mkstemp(prefix="alphabetical-server-", suffix=".log")[1])
    if not (HERE / "models" / "policy" / "config.json").is_file():
        raise SystemExit(f"no policy under {HERE / 'models'}: run examples/alphabetical/pretrain.py first")
    process, url = start_server(HERE / "schema.yaml", args.backend, log)
    try:
        wait_ready(url, process, log, timeout_s=300)
        with _client(url, args.api_key) as local:
            return train(args, local)
    finally:
        stop_server(process)


def train(args: Args, client: httpx.Client) -> Curve:
    """The GRPO loop against a ready server."""
    started = _ok(client.post("/llm/grpo/runs", json=grpo_settings(args)))
    run_id = started["run_id"]
    rng = random.Random(args.seed)
    curve = Curve(rewards=[], block=args.block)
    bar = tqdm(range(args.cycles), desc=f"GRPO {run_id[:8]}", unit="cycle")
    try:
        for _ in bar:
            prompt, _, letters = make_problem(rng)
            group = _ok(client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": prompt}))
            rewards = [score(c["text"], letters) for c in group["completions"]]
            answer = _ok(client.post(f"/llm/grpo/runs/{run_id}/rewards",
                                     json={"group_id": group["group_id"], "rewards": rewards}))
            curve.rewards.append(answer["mean_reward"])
            bar.set_postfix(reward=f"{answer['mean_reward']:.3f}", version=answer["model_version"][1])
    finally:
        bar.close()
        stopped = _ok(client.post(f"/llm/grpo/runs/{run_id}/stop"))
        curve.model_version = stopped["model_version"]
    print_curve(curve)
    if args.json:
        Path(args.json).write_text(json.dumps(curve.to_dict(), indent=1) + "\n")
    return curve


def print_curve(curve: Curve) -> None:
    print(f"mean reward per block of {curve.block} cycles (run {curve.model_version[0]}, "
          f"stopped at cycle {curve.model_version[1]}):")
    for i, mean in enumerate(curve.blocks):
        first = i * curve.block + 1
        last = min(first + curve.block - 1, len(curve.rewards))
        print(f"  cycles {first:4d}-{last:4d}  {mean:.3f}  {'#' * round(40 * mean)}")


def _client(url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"access-token": api_key}, timeout=120)


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path} answered "
                           f"{response.status_code}: {response.text}")
    return response.json()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    from policy_server.cli import parse_dataclass_args

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # unwinds through run()'s cleanup, which stops the server
    run(parse_dataclass_args(Args, __doc__))
