"""Load causal-LM policies and LLM value models from local ``save_pretrained`` folders.

Plain objects, no Ray and no HTTP. Nothing is downloaded: every load passes ``local_files_only``,
and a folder that is missing or holds no model is refused with a ``ValueError`` naming it.

A value model folder is an LM folder (``AutoModelForCausalLM`` or ``AutoModel``) plus
``value_head.safetensors`` (``weight`` (1, hidden), ``bias`` (1,)) and ``value_head.json``
(``{"position": "last"}``): the score of a sequence is ``tanh(head(h))`` for the last layer's
hidden state ``h`` at one token.

LoRA adapters (peft folders) are applied on load. A policy keeps its adapter unmerged by default,
so a trainer can update and save the adapter alone; ``merge_adapter=True`` folds it into the base
weights for the fastest inference. A value model always merges its adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from policy_server.devices import resolve_device
from policy_server.schema.llm import END_TOKEN, STEP_TOKEN

Dtype = Literal["float32", "bfloat16", "float16"]
Position = Literal["last"] | int
VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"
Message = dict[str, Any]


@dataclass
class LoadedLM:
    """A causal LM policy ready for batched generation (tokenizer pads on the left)."""

    model: Any
    """A transformers causal LM (or a peft ``PeftModel`` around one), in eval mode, on ``device``."""
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    step_token: str
    """Ends one reasoning step."""
    end_token: str
    """Ends the answer."""
    name: str
    """The model folder's name."""

    @property
    def step_token_id(self) -> int | None:
        """The step token's id, or None when it is not a single token of the vocabulary."""
        return single_token_id(self.tokenizer, self.step_token)

    @property
    def end_token_id(self) -> int | None:
        """The end token's id, or None when it is not a single token of the vocabulary."""
        return single_token_id(self.tokenizer, self.end_token)


class ValueModel(nn.Module):
    """An LM backbone (hidden states out) with a value head: token sequences → scores in [-1, 1]."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        # Kept in float32 whatever the backbone's dtype: one (hidden → 1) product is cheap.
        self.value_head = value_head if value_head is not None else nn.Linear(hidden, 1)
        if tuple(self.value_head.weight.shape) != (1, hidden):
            raise ValueError(
                f"value head has shape {tuple(self.value_head.weight.shape)}, the backbone needs (1, {hidden})"
            )

    def scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position: Position = "last"
    ) -> torch.Tensor:
        """``tanh(head(h))`` at one token of each sequence: (B, T) ids and mask → (B,) in [-1, 1].

        ``position`` is ``"last"`` (the last non-pad token) or an index into each sequence's own
        tokens, negative from the end as in Python; padding may be on either side.
        """
        index = token_index(attention_mask, position)  # (B,)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding too
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state  # (B, T, H)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)
        return torch.tanh(self.value_head(picked.float())).squeeze(-1)


@dataclass
class LoadedValue:
    """A value model ready for scoring."""

    model: ValueModel
    tokenizer: Any
    device: torch.device
    position: Position
    """The token whose hidden state is scored (from ``value_head.json`` unless overridden)."""
    name: str
    """The model folder's name."""


def single_token_id(tokenizer: Any, token: str) -> int | None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def token_index(attention_mask: torch.Tensor, position: Position) -> torch.Tensor:
    """Column of the chosen token in each row of a (B, T) mask whose ones are contiguous → (B,).

    Naive equivalent: ``[row.nonzero().flatten()[position] for row in mask]`` (``-1`` for "last").
    """
    mask = attention_mask.bool()
    lengths = mask.sum(-1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError("cannot score an empty sequence (a row of the attention mask is all zeros)")
    first = mask.int().argmax(-1)  # (B,) first real token
    if position == "last":
        return first + lengths - 1
    if isinstance(position, bool) or not isinstance(position, int):
        raise ValueError(f"position must be 'last' or an int, got {position!r}")  # noqa: TRY004
    shortest = int(lengths.min())
    if not -shortest <= position < shortest:
        raise ValueError(f"position {position} is outside a sequence of {shortest} tokens")
    return first + (position if position >= 0 else lengths + position)


def resolve_dtype(dtype: Dtype | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def _model_folder(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{what} folder {folder} does not exist (expected a save_pretrained folder)")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a {what} folder: it has no config.json (save it with save_pretrained)"
        )
    return folder


def _adapter_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"adapter folder {folder} does not exist (expected a peft save_pretrained folder)")
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} is not a peft adapter folder: it has no adapter_config.json")
    return folder


def _load_tokenizer(folder: Path, padding_side: Literal["left", "right"]) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} holds no loadable tokenizer: {exc}") from exc
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _with_adapter(model: Any, adapter: str | Path, merge: bool) -> Any:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, _adapter_folder(adapter), is_trainable=False)
    return peft_model.merge_and_unload() if merge else peft_model


def load_policy(
    path: str | Path,
    adapter: str | Path | None = None,
    dtype: Dtype | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    step_token: str = STEP_TOKEN,
    end_token: str = END_TOKEN,
    merge_adapter: bool = False,
) -> LoadedLM:
    """A causal LM and its tokenizer from ``path``, with an optional LoRA ``adapter`` folder."""
    folder = _model_folder(path, "model")
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    tokenizer = _load_tokenizer(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        model = _with_adapter(model, adapter, merge_adapter)
    model.to(torch_device).eval()
    return LoadedLM(model, tokenizer, torch_device, torch_dtype, step_token, end_token, folder.name)


def _load_backbone(folder: Path, dtype: torch.dtype, adapter: str | Path | None) -> nn.Module:
    """The hidden-state model of ``folder``; a causal LM folder gives its base model (adapter merged)."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    causal = any(name.endswith("ForCausalLM") for name in config.architectures or [])
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(folder, dtype=dtype, local_files_only=True)
    if adapter is not None:
        model = _with_adapter(model, adapter, merge=True)
    return model.base_model if causal else model


def load_value(
    path: str | Path,
    adapter: str | Path | None = None,
    dtype: Dtype | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    position: Position | None = None,
) -> LoadedValue:
    """A value model from ``path``; ``position`` overrides the one in ``value_head.json``.

    An ``adapter`` must have been made for the class the folder holds (a causal LM's adapter for a
    causal LM folder, as ``save_pretrained`` of the policy writes); it is merged.
    """
    folder = _model_folder(path, "value model")
    head_file = folder / VALUE_HEAD_WEIGHTS
    if not head_file.is_file():
        raise ValueError(
            f"{folder} is not a value model folder: it has no {VALUE_HEAD_WEIGHTS} (see save_value)"
        )
    head_config = folder / VALUE_HEAD_CONFIG
    saved = json.loads(head_config.read_text()) if head_config.is_file() else {}
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    tokenizer = _load_tokenizer(folder, padding_side="right")
    backbone = _load_backbone(folder, torch_dtype, adapter)
    weights = load_file(head_file)
    head = nn.Linear(weights["weight"].shape[1], 1)
    head.load_state_dict(weights)
    model = ValueModel(backbone, head).to(torch_device).eval()
    return LoadedValue(
        model,
        tokenizer,
        torch_device,
        saved.get("position", "last") if position is None else position,
        folder.name,
    )


def save_value(model: ValueModel, tokenizer: Any, path: str | Path, position: Position = "last") -> Path:
    """Write a folder that ``load_value`` reads: the backbone, the tokenizer and the value head."""
    if hasattr(model.backbone, "peft_config"):
        raise ValueError(
            "merge the adapter before saving: model.backbone = model.backbone.merge_and_unload()"
        )
    folder = Path(path)
    model.backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.value_head.state_dict().items()}
    save_file(state, folder / VALUE_HEAD_WEIGHTS)
    (folder / VALUE_HEAD_CONFIG).write_text(json.dumps({"position": position}) + "\n")
    return folder


def check_conversations(conversations: list[list[Message]]) -> None:
    """Raise ValueError naming the first malformed conversation or message.

    ValueError even for a wrong type: it is the request's content that is wrong, and callers answer
    every malformed request with one error.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("expected a non-empty list of conversations (each a list of messages)")
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or not conversation:
            raise ValueError(f"conversation {i} must be a non-empty list of messages")
        for j, message in enumerate(conversation):
            where = f"conversation {i}, message {j}"
            if not isinstance(message, dict):
                raise ValueError(  # noqa: TRY004
                    f"{where} must be an object with 'role' and 'content', got {type(message).__name__}"
                )
            for key in ("role", "content"):
                if key not in message:
                    raise ValueError(f"{where} has no {key!r}")
                if not isinstance(message[key], str):
                    raise ValueError(  # noqa: TRY004
                        f"{where}: {key!r} must be a string, got {type(message[key]).__name__}"
                    )


def score_messages(
    value: LoadedValue,
    conversations: list[list[Message]],
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[float]:
    """One score in [-1, 1] per conversation, rendered with the chat template (no generation prompt).

    Raises ValueError for malformed messages and, with ``max_length``, for a longer conversation.
    """
    check_conversations(conversations)
    tokenizer = value.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of value model {value.name} has no chat template")
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in conversations
    ]
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        # The template writes the special tokens (bos) itself.
        batch = tokenizer(
            texts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
        )
        if max_length is not None and batch["input_ids"].shape[1] > max_length:
            lengths = batch["attention_mask"].sum(-1).tolist()
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            raise ValueError(
                f"conversation {start + longest} has {lengths[longest]} tokens, more than max_length={max_length}"
            )
        with torch.inference_mode():
            out = value.model.scores(
                batch["input_ids"].to(value.device), batch["attention_mask"].to(value.device), value.position
            )
        scores.extend(out.tolist())
    return scores
