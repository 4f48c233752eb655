"""Build a tiny Llama policy, value model and LoRA adapter from ``corpus.txt``, offline, in seconds.

Tests and examples cannot download a model, so they build one here and load it through the same
code a real model takes. The output mirrors a Llama-3 style checkpoint:

    out_dir/policy/       LlamaForCausalLM + byte-level BPE tokenizer with a chat template
    out_dir/value/        the same LM + ``value_head.safetensors`` (Linear(hidden, 1)) + ``value_head.json``
    out_dir/policy-lora/  a peft LoRA adapter (r=4 on q_proj/v_proj, B nonzero so it changes outputs)

Each corpus line is ``question || step || ... || final answer``. It becomes one chat: the user asks
the question, the assistant answers with the steps joined by ``STEP_TOKEN`` and ended by
``END_TOKEN`` (the chat template's end-of-message token).

The tokenizer adds ``<|begin_of_text|>`` in front of plain text, as Llama-3's does; the chat template
starts with it too, so tokenize a rendered chat with ``add_special_tokens=False``.

    python examples/llm/build_tiny_model.py --out-dir examples/llm/models

``python generate.py copy_server_files examples/llm`` calls ``build_models`` when the example has no
``models/`` yet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = Path(__file__).with_name("corpus.txt")
BOS_TOKEN = "<|begin_of_text|>"
END_TOKEN = "<|eot_id|>"
"""Ends an answer (the tokenizer's eos)."""
STEP_TOKEN = "<|eois_id|>"
"""Ends an intermediate reasoning step."""
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, END_TOKEN, STEP_TOKEN, PAD_TOKEN, "<|start_header_id|>", "<|end_header_id|>"]
VOCAB_SIZE = 768
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
TRAIN_STEPS = 400
TRAIN_BATCH = 16
TRAIN_WINDOW = 128
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called after each unit of work of a named stage."""


def read_problems(corpus: Path = CORPUS) -> list[list[str]]:
    """Each non-comment line split into ``[question, step, ..., answer]``."""
    lines = corpus.read_text().splitlines()
    return [line.split(" || ") for line in lines if line.strip() and not line.startswith("#")]


def train_tokenizer(problems: list[list[str]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the problems' text, wrapped with bos/eos/pad and the chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [piece for problem in problems for piece in problem] + ["user", "assistant", "system", "\n\n"]
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[STEP_TOKEN, "<|start_header_id|>", "<|end_header_id|>"],
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat(problem: list[str]) -> list[dict[str, str]]:
    question, *steps = problem
    return [{"role": "user", "content": question}, {"role": "assistant", "content": STEP_TOKEN.join(steps)}]


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        # head_dim 64 (128 / 2 heads): vLLM's CPU attention refuses 16 and runs 64
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def fit(
    model: LlamaForCausalLM, stream: torch.Tensor, seed: int, steps: int = TRAIN_STEPS, progress: Progress | None = None
) -> float:
    """A few hundred AdamW steps on random windows of the token stream; returns the last loss.
    ``progress("training", step, steps)`` hears each step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from a second thread, and on a busy 2-core machine
    # two threads were 5x slower than one (51 s against 9 s); one thread is also the same on every machine.
    torch.set_num_threads(1)
    model.train()
    loss = torch.tensor(float("nan"))
    try:
        for step in range(1, steps + 1):
            starts = torch.randint(0, len(stream) - TRAIN_WINDOW, (TRAIN_BATCH,), generator=gen)
            batch = torch.stack([stream[s : s + TRAIN_WINDOW] for s in starts.tolist()])  # (B, T)
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress is not None:
                progress("training the tiny model", step, steps)
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return loss.item()


def build_lora(model: LlamaForCausalLM, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    # A regex rather than a list: peft keeps a list as a set, whose order in adapter_config.json varies.
    # init_lora_weights=False leaves B randomly initialised (not zero), so the adapter changes outputs.
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|v_proj)",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    peft_model.unload()  # restores the plain model in place for the caller


def build(
    out_dir: Path, seed: int = 0, lora: bool = True, train_steps: int = TRAIN_STEPS, progress: Progress | None = None,
    extra_loras: int = 0,
) -> dict[str, Path]:
    """Write the policy, value model and (if ``lora``) adapter folders under ``out_dir``; deterministic per seed.
    ``progress`` hears each training step; ``extra_loras`` more adapters with other random weights
    (``policy-lora-<i>``, keys ``policy_lora_<i>``, i from 1: several model ids on one base model)."""
    out_dir = Path(out_dir)
    problems = read_problems()
    tokenizer = train_tokenizer(problems)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if train_steps:
        ids = [tokenizer.apply_chat_template(chat(p), tokenize=True, return_dict=False) for p in problems]
        fit(model, torch.tensor([i for seq in ids for i in seq]), seed, train_steps, progress)

    paths = {"policy": out_dir / "policy", "value": out_dir / "value"}
    for key in ("policy", "value"):
        model.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])

    torch.manual_seed(seed + 2)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()},
        paths["value"] / "value_head.safetensors",
    )
    (paths["value"] / "value_head.json").write_text(json.dumps({"position": "last"}) + "\n")

    if lora:
        paths["policy_lora"] = out_dir / "policy-lora"
        build_lora(model, paths["policy_lora"], seed)
    for i in range(1, extra_loras + 1):
        paths[f"policy_lora_{i}"] = out_dir / f"policy-lora-{i}"
        build_lora(model, paths[f"policy_lora_{i}"], seed + 100 * i)
    return paths


def build_models(out_dir: Path, progress: Progress | None = None) -> dict[str, Path]:
    """What ``examples/llm/schema.yaml`` serves, under ``out_dir``: policy, value model and LoRA adapter."""
    return build(out_dir, progress=progress)


def build_real_size(folder: Path, tiny: Path) -> Path:
    """A randomly initialised float32 Llama of ~1.2 GB (hidden 2048, 32 heads of 64, 6 layers) in
    ``folder`` with the tokenizer of ``tiny`` (a policy folder ``build`` made): the real-size
    checkpoint of the tests and benchmarks, built in seconds, no downloads."""
    config = transformers.LlamaConfig(
        vocab_size=768, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=32,
        num_key_value_heads=32, head_dim=64, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        pad_token_id=3, tie_word_embeddings=True, dtype="float32",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)  # allocated once, on the CPU
    model.save_pretrained(folder)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).with_name("models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    paths = build(args.out_dir, seed=args.seed, lora=args.lora, train_steps=args.train_steps)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
