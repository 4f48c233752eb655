"""Build the tiny policy and pre-train it on the alphabetical task for 20 seconds on CPU.

    python examples/alphabetical/pretrain.py [--seconds 20]

Builds the tiny Llama of ``examples/llm/build_tiny_model.py`` into ``--out-dir`` (its corpus has
step-wise letter-sorting puzzles, in another format), then trains it with AdamW on chats
"Sort these letters: d b a c" → "a b c d<|eot_id|>" (loss on the answer and its end token only),
for ``--seconds`` of wall time on one torch thread. The aim is a policy that is often close and
sometimes right, so that GRPO (``alphabetical.py``) has something to improve. Saves the model and
tokenizer over ``<out-dir>/policy`` and prints the greedy exact-match rate on held-out problems.

``python generate.py copy_server_files examples/alphabetical`` calls ``build_models`` when the example
has no ``models/`` yet.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]
from alphabetical import make_problem

from policy_server.cli import parse_dataclass_args

IGNORE = -100
"""Label of the tokens the loss skips (the prompt and the padding)."""
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, as in ``build_tiny_model``."""


@dataclass
class Args:
    out_dir: str = str(HERE / "models")
    """where the tiny model is built; the pre-trained policy replaces ``<out-dir>/policy``"""
    seconds: float = 20.0
    """wall-clock seconds of pre-training"""
    lr: float = 2e-4
    """AdamW learning rate"""
    batch_size: int = 16
    """problems per step"""
    seed: int = 0
    """seeds the model's construction, the problems and the batches"""
    eval_problems: int = 100
    """held-out problems for the greedy exact-match rate printed at the end"""


def load_builder() -> ModuleType:
    """``examples/llm/build_tiny_model.py`` (a script, not a package)."""
    script = ROOT / "examples" / "llm" / "build_tiny_model.py"
    spec = importlib.util.spec_from_file_location("build_tiny_model", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat and its labels: the answer and its end token, the rest ``IGNORE``."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                         tokenize=True, return_dict=False)
    assert full[: len(head)] == head, "the chat template must extend the prompt"
    return list(full), [IGNORE] * len(head) + list(full[len(head):])


def batch(tokenizer: PreTrainedTokenizerBase, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
    """``size`` fresh problems, right-padded: input_ids, attention_mask, labels, each (B, T)."""
    pairs = [encode(tokenizer, *make_problem(rng)[:2]) for _ in range(size)]
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in pairs]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]),
        "labels": torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in pairs]),
    }


def exact_match(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, rng: random.Random, n: int) -> float:
    """Fraction of ``n`` problems whose greedy answer is exactly the sorted letters."""
    right = 0
    for _ in range(n):
        prompt, answer, _ = make_problem(rng)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        right += tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip() == answer
    return right / n


def pretrain(args: Args, progress: Progress | None = None) -> dict[str, float]:
    """Build, pre-train for ``args.seconds``, save; returns steps, last loss and exact-match rate.
    With ``progress``, it hears the build's steps and the pre-training's whole seconds instead of
    the printed log."""
    policy = Path(args.out_dir) / "policy"
    load_builder().build(Path(args.out_dir), seed=args.seed, lora=False, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = LlamaForCausalLM.from_pretrained(policy)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    torch.set_num_threads(1)  # this model is too small for a second thread to help (see build_tiny_model.fit)
    model.train()
    steps, loss, start = 0, float("nan"), time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        out = model(**batch(tokenizer, rng, args.batch_size))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        steps, loss = steps + 1, out.loss.item()
        if progress is not None:
            progress("pre-training on sorting letters (s)", min(int(time.perf_counter() - start), int(args.seconds)),
                     int(args.seconds))
        elif steps % 100 == 0:
            print(f"step {steps:5d}  {time.perf_counter() - start:5.1f} s  loss {loss:.4f}", flush=True)
    model.eval()
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    held_out = random.Random(args.seed + 1_000_003)
    summary = {"steps": steps, "loss": loss, "exact_match": exact_match(model, tokenizer, held_out, args.eval_problems)}
    print(f"{steps} steps in {args.seconds:.0f} s, last loss {loss:.4f}, "
          f"greedy exact match {summary['exact_match']:.0%} on {args.eval_problems} held-out problems; saved {policy}")
    return summary


def build_models(out_dir: Path, progress: Progress | None = None) -> None:
    """What ``examples/alphabetical/schema.yaml`` serves, under ``out_dir``: the pre-trained policy."""
    pretrain(Args(out_dir=str(out_dir)), progress)


if __name__ == "__main__":
    transformers.utils.logging.disable_progress_bar()
    pretrain(parse_dataclass_args(Args, __doc__))
