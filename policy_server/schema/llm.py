"""The ``llm:`` section of schema.yaml: a causal-LM policy and an LLM value model.

Folders are ``save_pretrained`` outputs on local disk (relative to the schema's folder); nothing
is downloaded. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from policy_server.schema.replicas import Replicas

CPU_THREADS_BIND = re.compile(r"auto|nobind|\d+(-\d+)?(,\d+(-\d+)?)*")
"""vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for one worker: ``auto``, ``nobind`` or a core list (``0-2,5``)."""
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:@+-]*")
"""A model id on the OpenAI routes: one URL path segment (``/v1/models/{id}``) as it is written."""
STEP_TOKEN = "<|eois_id|>"
END_TOKEN = "<|eot_id|>"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class LLMLimits(_Strict):
    """What one request may ask for; beyond it a request gets a 422 naming the field."""

    max_input_length: int = Field(1024, gt=0)
    """Most prompt tokens a request may set as its `max_input_length`."""
    max_new_tokens: int = Field(512, gt=0)
    """Most tokens generated per sample."""
    max_num_samples: int = Field(16, gt=0)
    """Most samples (`num_samples`, OpenAI `n`) per request."""
    max_queued: int = Field(256, gt=0)
    """Requests waiting for generation; beyond it 429 with Retry-After."""
    max_batch_prompts: int = Field(64, gt=0)
    """Most prompts × samples in one batched generate call."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """How long a batch waits for more compatible requests."""
    task_ttl_s: float = Field(600.0, gt=0)
    """How long `/forward` results wait to be fetched."""


class LLMResources(Replicas):
    """Replicas (fixed or `num_replicas: auto`: ``schema.replicas``), CPUs and GPUs of a deployment."""

    num_cpus: float = Field(1.0, ge=0)
    """CPUs per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica; used when the cluster has them."""


class LLMTrainingSpec(_Strict):
    """x1's `/train_from_dataset` on this model (PPO for the policy, MSE for the value model)."""

    allow_training: bool = True
    """Accept training requests."""
    data_dir: Path = Path("data")
    """`dataset_path` is read from here (relative to the schema); nothing outside it."""
    samples_dir: Path = Path("datasets")
    """Where `save_samples` stores a request's samples."""
    save_dir: Path = Path("trained")
    """Where trained models (or adapters) are saved."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs of the trainer's Ray actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs of the trainer's Ray actor; used when the cluster has them."""


class _ModelSpec(_Strict):
    path: Path
    """The `save_pretrained` folder of the model and its tokenizer."""
    adapter: Path | None = None
    """A peft LoRA adapter folder for it."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: the GPU when the replica has one."""
    resources: LLMResources = LLMResources()
    """Replicas, CPUs and GPUs of the deployment."""
    training: LLMTrainingSpec | None = None
    """Training through the server; None: no training endpoints."""


class LLMPolicySpec(_ModelSpec):
    """A causal LM that generates steps: x1's policy server, plus token records and OpenAI routes."""

    route_prefix: str = "llm"
    """Paths of its endpoints: `/<route_prefix>/...`."""
    engine: Literal["vllm", "transformers"] = "vllm"
    """`vllm`: vLLM's async engine (continuous batching, paged KV cache, prefix caching);
    `transformers`: our batched loop on transformers (exact raw log-probs, no vLLM needed)."""
    kv_cache_memory_bytes: ByteSize | None = Field(None, gt=0)
    """vLLM's KV cache (`engine: vllm`), in bytes or with a unit (`2GiB`). Default: 256 MiB on CPU
    (vLLM's own default, a share of the machine's memory, is refused on a small one), vLLM's share
    of the GPU's memory on a GPU. On CPU every running sequence holds at least one 128-token block:
    256 MiB runs about 20 sequences of a 76M-parameter float32 model at once, vLLM queues the rest."""
    cpu_threads_bind: str | None = None
    """How vLLM binds its CPU worker's threads (`engine: vllm`, on CPU), as vLLM's
    `VLLM_CPU_OMP_THREADS_BIND` names it: `auto` (vLLM's default: one core kept for its scheduler,
    the worker bound to the rest), `nobind` (every thread on every core), or a core list (`0-2,5`).
    Default: that variable when the environment sets it, else `nobind` on a machine of 2 cores or
    fewer, where `auto` leaves the worker one core, else `auto`. With `nobind` the worker runs one
    thread per core (`OMP_NUM_THREADS`), as vLLM gives a bound worker one per bound core."""
    weight_transfer: Literal["auto", "rpc", "nccl", "gloo"] = "auto"
    """How trained weights (GRPO runs, x1 training) reach vLLM's workers. `rpc`: through Serve to
    each replica, then into its worker as one safetensors message. `nccl`: broadcast by the trainer
    straight into every replica's worker over NCCL (vLLM's weight-transfer API), GPU to GPU; needs
    the replicas and the trainer on GPUs. `gloo`: the same broadcast over TCP with CPU tensors.
    `auto`: `nccl` when the replicas and the trainer have GPUs, else `rpc`. An adapter's weights
    always go as `rpc` (vLLM loads adapters from files)."""
    served_name: str | None = None
    """Its model id on the OpenAI routes (default: the folder's name)."""
    adapters: dict[str, Path] = {}
    """More model ids on the OpenAI routes: id → a peft LoRA adapter folder on this model (vLLM
    multi-LoRA; `engine: vllm` only). Fixed: training and weight updates touch only the served
    model (with its `adapter`)."""
    step_token: str = STEP_TOKEN
    """Ends one reasoning step."""
    end_token: str = END_TOKEN
    """Ends the answer."""
    limits: LLMLimits = LLMLimits()
    """Request limits and queueing."""

    @property
    def model_id(self) -> str:
        return self.served_name or self.path.name

    @field_validator("kv_cache_memory_bytes")
    @classmethod
    def _vllm_only(cls, size: ByteSize | None, info: ValidationInfo) -> ByteSize | None:
        if size is not None and info.data.get("engine") != "vllm":
            raise ValueError("it sizes vLLM's KV cache: it needs engine: vllm")
        return size

    @field_validator("cpu_threads_bind")
    @classmethod
    def _bind(cls, bind: str | None, info: ValidationInfo) -> str | None:
        if bind is None:
            return bind
        if info.data.get("engine") != "vllm":
            raise ValueError("it binds vLLM's CPU worker: it needs engine: vllm")
        if not CPU_THREADS_BIND.fullmatch(bind):
            raise ValueError(f"expected auto, nobind or a core list such as 0-2,5; got {bind!r}")
        return bind

    @field_validator("weight_transfer")
    @classmethod
    def _transfer(cls, transfer: str, info: ValidationInfo) -> str:
        if transfer in ("nccl", "gloo"):
            if info.data.get("engine") != "vllm":
                raise ValueError("it broadcasts into vLLM's workers: it needs engine: vllm")
            if info.data.get("adapter") is not None:
                raise ValueError("a policy with an adapter publishes its adapter as files: use auto or rpc")
        return transfer

    @field_validator("adapters")
    @classmethod
    def _adapter_ids(cls, adapters: dict[str, Path], info: ValidationInfo) -> dict[str, Path]:
        own = info.data.get("served_name") or getattr(info.data.get("path"), "name", None)
        for name in adapters:
            if not MODEL_ID.fullmatch(name):
                raise ValueError(
                    f"the model id {name!r} is not one URL path segment "
                    "(a letter or digit, then letters, digits and ._~:@+-)"
                )
            if name == own:
                raise ValueError(f"{name!r} is the policy's own model id (served_name, or its folder's name)")
        return adapters


class LLMValueSpec(_ModelSpec):
    """An LM with a value head: messages → scores in [-1, 1] (x1's value server)."""

    route_prefix: str = "value"
    """Paths of its endpoints: `/<route_prefix>/...`."""
    position: Literal["last"] | int = "last"
    """The token whose hidden state is scored: the last one, or an index (negative from the end)."""
    max_conversations: int = Field(64, gt=0)
    """Most conversations per request."""
    max_input_length: int = Field(2048, gt=0)
    """Most tokens per conversation."""


class LLMSection(_Strict):
    policy: LLMPolicySpec | None = None
    value: LLMValueSpec | None = None
    api_keys: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, exclude=True)
    """Keys that open only the LLM routes (x1, GRPO, value, OpenAI); read into
    ``ServerSchema.llm_keys`` and dropped by ``resolved``, never dumped."""

    @model_validator(mode="after")
    def _distinct_prefixes(self) -> LLMSection:
        if self.policy and self.value and self.policy.route_prefix == self.value.route_prefix:
            raise ValueError(f"policy and value share the route_prefix {self.policy.route_prefix!r}")
        return self

    def resolved(self, base_dir: Path) -> LLMSection:
        """Folders relative to the schema's folder made absolute."""
        def fix(spec: _ModelSpec | None) -> dict[str, object]:
            if spec is None:
                return {}
            training = spec.training
            if training is not None:
                training = training.model_copy(update={
                    key: (base_dir / getattr(training, key)).resolve()
                    for key in ("data_dir", "samples_dir", "save_dir")
                })
            return {"path": (base_dir / spec.path).resolve(),
                    "adapter": (base_dir / spec.adapter).resolve() if spec.adapter else None,
                    "training": training}

        adapters = {"adapters": {name: (base_dir / folder).resolve() for name, folder in self.policy.adapters.items()}
                    } if self.policy else {}
        return LLMSection(
            policy=self.policy.model_copy(update=fix(self.policy) | adapters) if self.policy else None,
            value=self.value.model_copy(update=fix(self.value)) if self.value else None,
        )
