"""The ``training:`` section of a policy in schema.yaml: algorithm, hyper-parameters, checkpoints.

Hyper-parameters are pydantic dataclasses: typed, validated once when the schema loads, with the
defaults documented beside each field (cleanrl's for CartPole where they apply). This module
imports neither torch nor Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from policy_server.errors import SchemaError

_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


@dataclass(frozen=True, config=_CONFIG)
class PPOConfig:
    """Proximal policy optimisation (Schulman et al. 2017) with GAE, in cleanrl's formulation."""

    learning_rate: float = Field(2.5e-4, gt=0)
    """Adam learning rate."""
    anneal_lr_samples: int | None = Field(None, gt=0)
    """Anneal the learning rate linearly to 0 over this many samples; None keeps it constant."""
    rollout_samples: int = Field(512, gt=1)
    """Samples (environment steps over all clients) gathered before each update."""
    num_minibatches: int = Field(4, ge=1)
    """Minibatches per update epoch."""
    update_epochs: int = Field(4, ge=1)
    """Epochs over each rollout."""
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount factor."""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """Lambda of generalised advantage estimation."""
    clip_coef: float = Field(0.2, gt=0)
    """Surrogate clipping coefficient epsilon."""
    clip_vloss: bool = True
    """Clip the value loss around the old values, as cleanrl does."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    ent_coef: float = Field(0.01, ge=0)
    """Entropy bonus coefficient."""
    vf_coef: float = Field(0.5, ge=0)
    """Value loss coefficient."""
    max_grad_norm: float = Field(0.5, gt=0)
    """Global gradient-norm clip."""
    target_kl: float | None = Field(None, gt=0)
    """Stop an update's epochs early when the approximate KL exceeds this."""
    normalize_rewards: bool = False
    """Scale rewards by a running standard deviation of the discounted return."""
    critic_hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the value network (tanh MLP on the same observations)."""
    max_sample_delay: int = Field(1, ge=0)
    """Accept samples acted by a model at most this many versions old; their ratio against the
    acting policy uses the log-probability the client sent (PPO stays on-policy up to this)."""


@dataclass(frozen=True, config=_CONFIG)
class DQNConfig:
    """Deep Q-learning (Mnih et al. 2015), double DQN by default; the model's logits are Q-values."""

    learning_rate: float = Field(2.5e-4, gt=0)
    """Adam learning rate."""
    buffer_size: int = Field(10_000, gt=0)
    """Replay buffer capacity in transitions."""
    batch_size: int = Field(128, gt=0)
    """Transitions per gradient step."""
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount factor."""
    learning_starts: int = Field(1_000, ge=0)
    """Transitions received before the first gradient step."""
    train_frequency: int = Field(10, gt=0)
    """Received transitions per gradient step."""
    target_network_frequency: int = Field(500, gt=0)
    """Received transitions between target-network updates."""
    tau: float = Field(1.0, gt=0, le=1)
    """Target-network update rate (1: copy)."""
    double_dqn: bool = True
    """Choose the next action with the online network (van Hasselt et al. 2016)."""
    max_grad_norm: float = Field(10.0, gt=0)
    """Global gradient-norm clip."""
    start_epsilon: float = Field(1.0, ge=0, le=1)
    """Exploration rate at the start, which clients read from the server."""
    end_epsilon: float = Field(0.05, ge=0, le=1)
    """Exploration rate after the decay."""
    exploration_samples: int = Field(10_000, gt=0)
    """Received transitions over which epsilon decays linearly."""
    publish_frequency: int = Field(10, gt=0)
    """Gradient steps per published model version (each publication bumps the version)."""
    max_sample_delay: int = Field(50, ge=0)
    """Accept transitions acted by a model at most this many versions old."""


@dataclass(frozen=True, config=_CONFIG)
class TrainingSpec:
    """How the server trains one policy from the experience clients send."""

    algorithm: Literal["ppo", "dqn"] = "ppo"
    """The algorithm; its hyper-parameters are the `ppo` or `dqn` section."""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """PPO hyper-parameters."""
    dqn: DQNConfig = Field(default_factory=DQNConfig)
    """DQN hyper-parameters."""
    autostart: bool = True
    """Start training when the server starts; otherwise wait for `POST .../train/start`."""
    resume: bool = False
    """At start-up, resume from the newest checkpoint in `checkpoint_dir` if there is one (and add
    the experience journaled after it). A trainer that Ray restarts after its process died always resumes."""
    journal: bool = True
    """Write each accepted batch to `<checkpoint_dir>/<policy>/experience.journal` (fsynced) before
    answering, until a checkpoint holds it: a trainer that dies loses no acknowledged experience."""
    checkpoint_dir: Path = Path("checkpoints")
    """Where checkpoints go (relative to the schema's folder; the trainer's node must see it)."""
    checkpoint_every: int = Field(20, ge=1)
    """Write a checkpoint every this many updates."""
    keep_checkpoints: int = Field(5, ge=1)
    """Periodic checkpoints kept (older ones are deleted; best and saved ones are kept)."""
    return_window: int = Field(20, ge=1)
    """Episodes in the moving average of the return that decides the best model."""
    client_timeout_s: float = Field(30.0, gt=0)
    """A client is active while it sent experience or a heartbeat within this many seconds."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs of the trainer's Ray actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs of the trainer's Ray actor; used when the cluster has them."""
    seed: int | None = None
    """Seed of the trainer's torch and numpy generators."""
    from_log: Path | None = None
    """DQN only: fill the replay buffer at start-up with the transitions of this experience log
    folder (``experience_log.path`` of a server; relative to the schema's folder). PPO is refused:
    it learns from its own current actions only."""

    @property
    def max_sample_delay(self) -> int:
        return self.ppo.max_sample_delay if self.algorithm == "ppo" else self.dqn.max_sample_delay


def resolve_from_log(training: TrainingSpec, base_dir: Path, where: str) -> Path | None:
    """``training.from_log`` made absolute (relative to the schema's folder); raises SchemaError
    naming ``where`` for an algorithm that cannot start from a log."""
    if training.from_log is None:
        return None
    if training.algorithm != "dqn":
        raise SchemaError(
            f"{where}: {training.algorithm} is on-policy: it learns only from the actions of the model it "
            "trains, so logged decisions of other versions would bias its updates; start a dqn policy from "
            "the log, or export the log to Minari (`python generate.py export_minari`) for offline RL"
        )
    return (base_dir / training.from_log).resolve()
