"""A Stable-Baselines3 ``.zip`` served as a policy: read with SB3's own ``load``, heads from the SB3
policy's own distribution, so actions, log-probs and probabilities are the ones SB3 computes.

Heads per algorithm (``(B, k)`` arrays, what ``ActionSpace`` reads):

- PPO, A2C, sb3-contrib's MaskablePPO: ``policy.get_distribution(obs)``: the logits of a
  ``Discrete`` action, one logits head per component of a ``MultiDiscrete``, the Bernoulli logits
  of a ``MultiBinary``, the mean and log-std of a ``Box`` (SB3 clips the mean to the bounds in
  ``predict``, as the server's box space does). A clipped box's log-prob is the server's, of the
  answered action (the censored Gaussian's): SB3's density of the raw draw wherever the action is
  inside the bounds, the probability mass at a bound where it is clipped.
  A mask (MaskablePPO) is applied by the server's action space to these unmasked logits, which is
  what MaskablePPO's masked distribution is.
- SAC: ``actor.get_action_dist_params(obs)``: the mean and (clamped) log-std of the Gaussian that
  ``tanh`` squashes; the schema's box must say ``squash: tanh``. Its log-prob is of the action in
  the bounds: SB3's (of the action in [-1, 1]) minus ``Σ log((high - low) / 2)``, and without
  SB3's ``1e-6`` inside ``log(1 - tanh² + 1e-6)``.
- RecurrentPPO: ``policy.get_distribution(obs, (hidden, cell), episode_starts=0)``; the schema's
  ``recurrent.state`` names two tensors of per-row shape ``(lstm layers, lstm size)``, the actor
  LSTM's hidden and cell states (the zero state starts an episode, as SB3's ``episode_start``
  does), and the new states follow the heads.
- DQN: SB3's ``predict`` is epsilon-greedy with the saved ``exploration_rate`` ε: the greedy
  action (argmax of the q-values) with probability 1-ε+ε/n, every other with ε/n. The head is the
  log of those probabilities (floored at float32's smallest normal, -87.3, for ε = 0), so
  ``/predict`` samples what ``model.predict(obs)`` samples, ``/predict_deterministic`` is
  ``model.predict(obs, deterministic=True)`` and ``/distribution`` is that mixture, not q-values.

Observations reach ``forward`` as the server's model input (a ``Box`` as its batch, any other space
as Gymnasium's flattening, or a Pathmind float batch ``(B, flatdim)``) and are turned back into
SB3's own form (indices for ``Discrete``, a dict for ``Dict``) before SB3's ``obs_to_tensor`` and
feature extractor, which scale images by 1/255 and one-hot ``Discrete`` as SB3 does.

A ``.zip`` holds cloudpickled objects: loading one runs code, as SB3 warns; serve trusted files only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from policy_server.errors import Conflict, SchemaError
from policy_server.policies.recurrent import StateLayout
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy, refuse_updates

ALGORITHMS = ("PPO", "A2C", "DQN", "SAC", "MaskablePPO", "RecurrentPPO")
# Schedules are pickled lambdas that may not load in another Python; inference does not need them
# (SB3's documented way to load a model for prediction only).
_INFERENCE_ONLY = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0,
                   "exploration_schedule": lambda _: 0.0}
_MIN_LOG_PROB = float(np.log(np.finfo(np.float32).tiny))


def algorithm_of(data: dict[str, Any]) -> str:
    """The SB3 algorithm that saved a ``.zip`` (its ``data`` as SB3's ``load_from_zip_file`` reads
    it), from its policy class; raises ValueError for one that is not served (TypeError for a class
    that did not load)."""
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.dqn.policies import DQNPolicy
    from stable_baselines3.sac.policies import SACPolicy

    policy_class = data.get("policy_class")
    name = getattr(policy_class, "__name__", str(policy_class))
    if not isinstance(policy_class, type):
        raise TypeError(f"its policy class {name} does not load")
    if data.get("use_sde"):
        raise ValueError("a gSDE policy (use_sde=True) is not served: its noise is a state-dependent matrix, not heads")
    if issubclass(policy_class, RecurrentActorCriticPolicy):
        return "RecurrentPPO"
    if issubclass(policy_class, MaskableActorCriticPolicy):
        return "MaskablePPO"
    if issubclass(policy_class, ActorCriticPolicy):
        return "PPO" if "clip_range" in data else "A2C"
    if issubclass(policy_class, DQNPolicy):
        return "DQN"
    if issubclass(policy_class, SACPolicy):
        return "SAC"
    raise ValueError(f"policy class {name} is none of {', '.join(ALGORITHMS)}'")


def load_model(data: bytes, device: str = "cpu") -> Any:
    """The SB3 algorithm object of a ``.zip`` file's bytes, loaded by its own class's ``load``.

    Raises ValueError for an algorithm that is not served (see ``algorithm_of``), and what SB3
    raises for a file it cannot read.
    """
    from sb3_contrib import MaskablePPO, RecurrentPPO
    from stable_baselines3 import A2C, DQN, PPO, SAC
    from stable_baselines3.common.save_util import load_from_zip_file

    saved, _, _ = load_from_zip_file(io.BytesIO(data), device="cpu", custom_objects=_INFERENCE_ONLY,
                                     load_data=True, print_system_info=False)
    classes = {"PPO": PPO, "A2C": A2C, "DQN": DQN, "SAC": SAC, "MaskablePPO": MaskablePPO, "RecurrentPPO": RecurrentPPO}
    cls = classes[algorithm_of(saved)]
    return cls.load(io.BytesIO(data), device=device, custom_objects=_INFERENCE_ONLY)


def to_sb3(space: spaces.Space, x: np.ndarray) -> Any:
    """The server's model input for ``space`` (its batch ``(B, *shape)``, or Gymnasium's flattening
    ``(B, flatdim)``) → SB3's batch of that space (indices for ``Discrete`` / ``MultiDiscrete``,
    a dict of batches for ``Dict``).

    Our own code: Gymnasium's ``unflatten`` takes one sample, not a batch.
    """
    batch = len(x)
    if isinstance(space, spaces.Box):
        return np.asarray(x).reshape(batch, *space.shape).astype(space.dtype, copy=False)
    x = np.asarray(x).reshape(batch, -1)
    if isinstance(space, spaces.Discrete):
        return x.argmax(axis=1) + int(space.start)
    if isinstance(space, spaces.MultiDiscrete) and space.nvec.ndim == 1:
        parts = np.split(x, np.cumsum(space.nvec)[:-1], axis=1)
        return np.stack([p.argmax(axis=1) for p in parts], axis=1) + space.start
    if isinstance(space, spaces.MultiBinary):
        return x.reshape(batch, *space.shape).astype(space.dtype)
    if isinstance(space, spaces.Dict):
        widths = [spaces.flatdim(sub) for sub in space.spaces.values()]
        columns = np.split(x, np.cumsum(widths)[:-1], axis=1)
        return {key: to_sb3(sub, col) for (key, sub), col in zip(space.spaces.items(), columns)}
    raise ValueError(f"observation space {space} is not served for SB3 models")


def schema_action_type(space: spaces.Space) -> str:
    """The schema's ``action_space.type`` of a Gymnasium action space."""
    kinds = {spaces.Discrete: "discrete", spaces.MultiDiscrete: "multi_discrete",
             spaces.MultiBinary: "multi_binary", spaces.Box: "box"}
    for cls, kind in kinds.items():
        if isinstance(space, cls):
            return kind
    raise ValueError(f"action space {space} is not served")


class SB3Policy(TorchPolicy):
    """An SB3 algorithm's policy behind ``TorchPolicy``'s interface. Its weights are fixed: an
    update is refused (``Conflict``), and start-up refuses ``training`` and ``canary`` for it."""

    format_name = "Stable-Baselines3 .zip"

    def __init__(self, model: Any, device: str = "cpu", state: StateLayout | None = None) -> None:
        super().__init__(model.policy, device, state=state)
        self.model = model
        self.algorithm = type(model).__name__
        self.observation_space: spaces.Space = model.observation_space
        self.action_space: spaces.Space = model.action_space
        self.module.set_training_mode(False)

    @classmethod
    def from_bytes(  # type: ignore[override]
        cls, data: bytes, fmt: Any = "sb3", device: str = "cpu", state: StateLayout | None = None
    ) -> SB3Policy:
        return cls(load_model(data, device), device, state)

    @classmethod
    def from_file(  # type: ignore[override]
        cls, path: Path, device: str = "cpu", state: StateLayout | None = None
    ) -> SB3Policy:
        return cls.from_bytes(Path(path).read_bytes(), "sb3", device, state)

    def lstm_shape(self) -> tuple[int, int] | None:
        """RecurrentPPO's per-row shape of its actor's LSTM hidden and cell states, (layers, size)."""
        if self.algorithm != "RecurrentPPO":
            return None
        layers, _, size = self.module.lstm_hidden_state_shape
        return int(layers), int(size)

    def input_width(self) -> int | None:
        return int(spaces.flatdim(self.observation_space))

    def exact_width(self) -> bool:
        return True

    def heads(self, obs: Any) -> list[torch.Tensor]:
        """The heads for a batch in SB3's own form (see the module docstring)."""
        policy = self.module
        tensor, _ = policy.obs_to_tensor(obs)
        if self.algorithm == "SAC":
            mean, log_std, _ = policy.actor.get_action_dist_params(tensor)
            return [mean, log_std]
        if self.algorithm == "DQN":
            q = policy.q_net(tensor)
            n, eps = q.shape[-1], float(self.model.exploration_rate)
            greedy = torch.nn.functional.one_hot(q.argmax(dim=-1), n).to(q.dtype)
            probs = (1.0 - eps) * greedy + eps / n
            return [probs.log().clamp(min=_MIN_LOG_PROB)]
        return self._dist_heads(policy.get_distribution(tensor).distribution)

    @staticmethod
    def _dist_heads(dist: Any) -> list[torch.Tensor]:
        if isinstance(dist, list):  # MultiCategorical: one Categorical per component
            return [d.logits for d in dist]
        if isinstance(dist, torch.distributions.Normal):
            return [dist.loc, dist.scale.log()]
        return [dist.logits]  # Categorical, Bernoulli

    def forward(self, obs: np.ndarray) -> PolicyOutput:
        """The server's model input ``(B, ...)`` → SB3's heads (see the module docstring). For
        RecurrentPPO the rows are ``[obs | hidden | cell]`` (``policies.recurrent``) and the new
        hidden and cell states follow the heads, as a torch recurrent policy answers."""
        if self.state is None:
            native = to_sb3(self.observation_space, obs)
            with self._lock, torch.inference_mode():
                heads, version = self.heads(native), self.version
            return PolicyOutput([h.detach().to("cpu", torch.float32).numpy().copy() for h in heads], version)
        rows = np.asarray(obs, dtype=np.float32)
        native = to_sb3(self.observation_space, rows[:, :rows.shape[1] - self.state.width])
        hidden, cell = self.state.unpack(rows[:, rows.shape[1] - self.state.width:]).values()
        with self._lock, torch.inference_mode():
            tensor, _ = self.module.obs_to_tensor(native)
            states = tuple(torch.as_tensor(np.ascontiguousarray(s.transpose(1, 0, 2)), device=self.device)
                           for s in (hidden, cell))  # (B, layers, size) → SB3's (layers, B, size)
            starts = torch.zeros(len(rows), device=self.device)  # a new episode's state is the zero state
            dist, new = self.module.get_distribution(tensor, states, starts)
            version = self.version
        heads = self._dist_heads(dist.distribution) + [s.transpose(0, 1).reshape(len(rows), -1) for s in new]
        return PolicyOutput([h.detach().to("cpu", torch.float32).numpy().copy() for h in heads], version)

    def set_weights(self, weights: Any, version: int) -> int:
        raise Conflict(f"a {self.format_name} policy's weights are fixed: export it with torch.export to update them")

    def check_spec(self, spec: Any, where: str) -> None:
        """Refuse a schema that does not fit the file: the action space's type, sizes and bounds,
        a box without ``squash: tanh`` for SAC, and ``training`` / ``canary`` (fixed weights).
        Raises SchemaError naming the field and both values."""
        refuse_updates(spec, where, self.format_name, recurrent_ok=True)
        self._check_state(spec, where)
        model_type = schema_action_type(self.action_space)
        schema_type = {"tuple": "multi_discrete"}.get(spec.action_space.type, spec.action_space.type)
        if schema_type != model_type:
            raise SchemaError(f"{where}.action_space.type: the schema says {spec.action_space.type!r} but "
                              f"{spec.model.name} ({self.algorithm}) acts in {self.action_space}")
        if isinstance(self.action_space, spaces.Box):
            self._check_box(spec.action_space, where, spec.model.name)

    def _check_state(self, spec: Any, where: str) -> None:
        lstm, recurrent = self.lstm_shape(), getattr(spec, "recurrent", None)
        if lstm is None and recurrent is not None:
            raise SchemaError(f"{where}.recurrent: {spec.model.name} ({self.algorithm}) is feed-forward; remove it")
        if lstm is None:
            return
        wanted = {"hidden": list(lstm), "cell": list(lstm)}
        if recurrent is None or [list(shape) for shape in recurrent.shapes.values()] != list(wanted.values()):
            given = {k: list(v) for k, v in recurrent.shapes.items()} if recurrent is not None else None
            raise SchemaError(f"{where}.recurrent.state: {spec.model.name} (RecurrentPPO) carries its LSTM's hidden "
                              f"and cell states, per row {wanted}; the schema says {given}")

    def _check_box(self, box: Any, where: str, name: str) -> None:
        squash = getattr(box, "squash", None)
        if (self.algorithm == "SAC") != (squash == "tanh"):
            need = "squash: tanh (SAC squashes its Gaussian)" if self.algorithm == "SAC" else "no squash"
            raise SchemaError(f"{where}.action_space.squash: {name} ({self.algorithm}) needs {need}; "
                              f"the schema says {squash!r}")
        for bound in ("low", "high"):
            given = getattr(box, bound)
            theirs = getattr(self.action_space, bound).reshape(-1)
            if given is not None and not np.allclose(np.broadcast_to(np.asarray(given, float), theirs.shape), theirs):
                raise SchemaError(f"{where}.action_space.{bound}: the schema says {given} but {name} "
                                  f"({self.algorithm}) has {theirs.tolist()}")

