"""Experience and training: ``PolicyClient`` is an ``ActingClient`` that also registers with the
policy's trainer, posts the steps it logs as episode fragments, and controls training.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policy_server.client.acting import (
    ActingClient,
    ActionValue,
    Inference,
    Observation,
    wire_action,
)
from policy_server.client.http import PolicyClientError

REFUSALS = ("stale_samples", "training_not_running")
POST_VALUES = 150_000
"""Observation values that make an experience post go out before ``fragment_steps``: JSON spends
up to ~20 bytes on a float, so a post stays under the server's 4 MiB body limit
(``POLICY_SERVER_MAX_BODY_BYTES``) however large the observations (84×84×4 frames: 5 a post)."""
"""The 409 codes of an experience post whose steps are dropped rather than raised."""


@dataclass
class _Fragment:
    """Consecutive steps acted by one model version: T+1 observations for T steps."""

    model_version: int
    observations: list[Any]
    actions: list[ActionValue] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    log_probs: list[float | None] = field(default_factory=list)
    action_masks: list[list[bool] | None] = field(default_factory=list)  # one per observation, None: unknown
    terminated: bool = False
    truncated: bool = False
    variant: str = "stable"  # the policy's version that acted (a policy with a candidate counts returns per version)

    def wire(self) -> dict[str, Any]:
        known = None if any(log_prob is None for log_prob in self.log_probs) else self.log_probs
        return {
            "variant": self.variant,
            "model_version": self.model_version,
            "observations": self.observations,
            "actions": self.actions,
            "rewards": self.rewards,
            "log_probs": known,
            "action_masks": _masks(self.action_masks),
            "terminated": self.terminated,
            "truncated": self.truncated,
        }


class PolicyClient(ActingClient):
    """A synchronous client of one policy (``policy=None``: the server's default policy).

    Nothing is sent until the first call; ``register()`` happens by itself on the first
    ``log_step``. Use it as a context manager, or call ``close()``; neither flushes pending
    experience (call ``flush()``). Not thread-safe: one client per thread or process.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        policy: str | None = None,
        inference: Inference = "local",
        client_id: str | None = None,
        fragment_steps: int = 128,
        timeout: float = 10.0,
        max_retries: int = 8,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 5.0,
        wait_for_training_s: float = 60.0,
        seed: int | None = None,
        info: dict[str, Any] | None = None,
        binary: bool | None = None,
    ) -> None:
        """
        Args:
            base_url: the server, with the schema's ``url_path`` if it has one.
            inference: ask the server for every action, or act here with downloaded weights.
            client_id: this client's id for training; None lets the server make one.
            fragment_steps: steps per experience post (fewer when their observations hold over
                ``POST_VALUES`` values, as images do); local weights are checked this often.
            max_retries: retries of a request after a connection error, 429 or 503.
            backoff_base_s, backoff_cap_s: retry ``k`` waits about ``min(cap, base * 2**k)``.
            wait_for_training_s: how long experience waits for paused training to run again.
            seed: seed of local action sampling and of the retry jitter.
            info: sent to the server when registering (shown in its client list).
            binary: how remote acting sends an observation array (``ActingClient``): ``.npy``
                (True), JSON (False), ``.npy`` above ``BINARY_ABOVE`` values (None). Experience
                is sent as JSON.
        """
        if fragment_steps < 1:
            raise ValueError(f"fragment_steps must be at least 1, not {fragment_steps}")
        super().__init__(base_url, api_key, policy, inference, fragment_steps, timeout, max_retries,
                         backoff_base_s, backoff_cap_s, seed, binary)
        self.client_id = client_id
        self.fragment_steps = fragment_steps
        self.wait_for_training_s = wait_for_training_s
        self.info = info
        self.training_state: str | None = None
        self._registered = False
        self._heartbeat_interval_s = 10.0
        self._last_contact = 0.0
        self._open: dict[int, _Fragment] = {}  # by stream: one per sub-environment of a vector env
        self._closed: list[_Fragment] = []
        self._last_next_obs: dict[int, Any] = {}
        self._pending_values = 0  # observation values logged but not posted

    # --- registration ---------------------------------------------------------------------

    def register(self) -> dict[str, Any]:
        """Register with the policy's trainer; adopts the server's client id if this had none."""
        answer = self._post("/train/clients", {"client_id": self.client_id, "info": self.info})
        self.client_id = answer["client_id"]
        self._registered = True
        self._heartbeat_interval_s = float(answer.get("heartbeat_interval_s", self._heartbeat_interval_s))
        self._note_training(answer)
        return answer

    def heartbeat(self) -> dict[str, Any]:
        """Tell the trainer this client is alive; returns (and adopts) its state and exploration."""
        if not self._registered:
            return self.register()
        answer = self._post(f"/train/clients/{self.client_id}/heartbeat")
        self._note_training(answer)
        return answer

    def _maybe_heartbeat(self) -> None:
        if self._registered and time.monotonic() - self._last_contact >= self._heartbeat_interval_s:
            self.heartbeat()

    def _note_training(self, answer: Mapping[str, Any]) -> None:
        self._last_contact = time.monotonic()
        self.algorithm = answer.get("algorithm", self.algorithm)
        self.training_state = answer.get("state", self.training_state)
        if "model_version" in answer:
            self.server_version = int(answer["model_version"])
        if "exploration" in answer:
            self.epsilon = answer["exploration"].get("epsilon")

    # --- experience -----------------------------------------------------------------------

    def log_step(
        self,
        obs: Observation,
        action: ActionValue,
        reward: float,
        terminated: bool,
        truncated: bool,
        next_obs: Observation,
        log_prob: float | None = None,
        model_version: int | None = None,
        variant: str | None = None,
        stream: int = 0,
        action_mask: Sequence[bool] | None = None,
        next_action_mask: Sequence[bool] | None = None,
    ) -> None:
        """Record one environment step; posts experience every ``fragment_steps`` steps.

        ``model_version`` is the version that chose ``action`` (default: that of the last
        ``act``), ``variant`` the policy's version that answered (``stable`` or ``canary``;
        default: that of the last ``act``). A step that does not continue the previous one (``obs``
        differs from its ``next_obs``) or was acted by another version starts a new fragment.
        Acting on the server, the rest of an episode is asked of the version that acted its first step.
        ``stream`` tells interleaved episodes apart (the sub-environment of a vector environment):
        each stream's steps form their own fragments. ``action_mask`` / ``next_action_mask``: the
        legal actions at ``obs`` / ``next_obs`` (an env's ``action_masks()``), sent with the
        experience for the trainer (named observations may carry theirs instead).
        """
        if not self._registered:
            self.register()
        version = model_version if model_version is not None else self._last_act_version
        if version is None:
            raise ValueError("log_step needs the model_version that acted (no act() call yet)")
        variant = variant or self.last_variant
        self._episode_variant = None if terminated or truncated or self.inference == "local" else variant
        frag = self._fragment_for(obs, version, variant, stream)
        mask = None if action_mask is None else [bool(m) for m in action_mask]
        if len(frag.action_masks) < len(frag.observations):  # a new fragment: its first observation's
            frag.action_masks.append(mask)
        elif mask is not None:
            frag.action_masks[-1] = mask
        frag.action_masks.append(None if next_action_mask is None else [bool(m) for m in next_action_mask])
        frag.observations.append(self.wire(next_obs))
        self._pending_values += obs_values(next_obs) * (1 if len(frag.observations) > 2 else 2)
        self._last_next_obs[stream] = next_obs
        frag.actions.append(wire_action(action))
        frag.rewards.append(float(reward))
        frag.log_probs.append(None if log_prob is None else float(log_prob))
        self.stats.steps_logged += 1
        if terminated or truncated:
            frag.terminated, frag.truncated = bool(terminated), bool(truncated) and not terminated
            self._close_open(stream)
        if self.pending_steps >= self.fragment_steps or self._pending_values >= POST_VALUES:
            self.flush()
        else:
            self._maybe_heartbeat()

    def _fragment_for(self, obs: Observation, version: int, variant: str, stream: int) -> _Fragment:
        """The stream's open fragment if the step acted by ``version`` (of ``variant``) from ``obs``
        continues it, else a new one."""
        frag = self._open.get(stream)
        # run_env hands the previous next_obs back as obs: then it is converted and continuous already
        follows = frag is not None and obs is self._last_next_obs.get(stream)
        obs_json = frag.observations[-1] if follows else self.wire(obs)  # type: ignore[union-attr]
        continues = follows or (frag is not None and frag.observations[-1] == obs_json)
        if frag is not None and (frag.model_version != version or frag.variant != variant or not continues):
            self._close_open(stream)
            frag = None
        if frag is None:
            frag = self._open[stream] = _Fragment(version, [obs_json], variant=variant)
        return frag

    @property
    def pending_steps(self) -> int:
        """Steps logged but not yet posted."""
        return sum(len(f.rewards) for f in [*self._closed, *self._open.values()])

    def _close_open(self, stream: int | None = None) -> None:
        """Close the stream's open fragment (None: every stream's)."""
        for key in list(self._open) if stream is None else [stream]:
            frag = self._open.pop(key, None)
            if frag is not None and frag.rewards:
                self._closed.append(frag)

    def flush(self) -> dict[str, Any] | None:
        """Post every pending step now; returns the server's answer (None if nothing was pending).

        When every step is stale (409 stale_samples), the steps are dropped, the local weights
        refreshed, and ``stats.stale_posts`` counted. When training is paused or stopped (409
        training_not_running), the steps are dropped too (they would be stale when training runs
        again) and the call waits, polling the heartbeat, until it runs again; after
        ``wait_for_training_s`` it raises the 409.
        """
        self._close_open()
        fragments, self._closed, self._pending_values = self._closed, [], 0
        if not fragments:
            return None
        body = {"client_id": self.client_id, "fragments": [f.wire() for f in fragments]}
        try:
            answer = self._post("/train/experience", body)
        except PolicyClientError as exc:
            if exc.status != 409 or exc.code not in REFUSALS:
                raise
            self._dropped(exc, sum(len(f.rewards) for f in fragments))
            return None
        self._accepted(answer)
        return answer

    def _dropped(self, refused: PolicyClientError, steps: int) -> None:
        """Count ``steps`` refused by a 409 as dropped; refresh if stale, else wait for training."""
        self.stats.dropped_steps += steps
        if refused.code == "stale_samples":
            self.stats.stale_posts += 1
            if self.inference == "local":
                self.refresh()
        else:
            self._wait_for_training(refused)

    def _accepted(self, answer: Mapping[str, Any]) -> None:
        """Count an accepted post; refresh the local weights if the answer names a newer version."""
        self.stats.posts += 1
        self.stats.samples_accepted += int(answer.get("accepted", 0))
        self.stats.samples_rejected += int(answer.get("rejected", 0))
        self._note_training(answer)
        if self.inference == "local" and self._local is not None:
            self._acts_since_check = 0  # the answer told the version: no need to ask
            if self.server_version != self._local.policy.version:
                self.refresh()

    def _wait_for_training(self, refused: PolicyClientError) -> None:
        self.stats.not_running_waits += 1
        deadline = time.monotonic() + self.wait_for_training_s
        attempt = 0
        while self.heartbeat().get("state") != "running":
            if time.monotonic() >= deadline:
                raise refused
            time.sleep(min(self._http.backoff_s(attempt), max(0.0, deadline - time.monotonic())))
            attempt += 1

    # --- training control -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The trainer's status: state, version, updates, samples, returns, clients."""
        return self._get("/train/status")

    def start(self) -> dict[str, Any]:
        return self._post("/train/start")

    def pause(self) -> dict[str, Any]:
        return self._post("/train/pause")

    def stop(self) -> dict[str, Any]:
        """Pause training and write the checkpoint "final"."""
        return self._post("/train/stop")

    def save(self) -> dict[str, Any]:
        """Write a checkpoint now; returns its name and model version."""
        return self._post("/train/save")

    def resume(self, checkpoint: str | None = None) -> dict[str, Any]:
        """Load a checkpoint (None: the newest) into the trainer and the served policy."""
        return self._post("/train/resume", {"checkpoint": checkpoint})

    def checkpoints(self) -> list[dict[str, Any]]:
        return self._get("/train/checkpoints")["checkpoints"]


def _masks(masks: list[list[bool] | None]) -> list[list[bool]] | None:
    """A fragment's masks on the wire: None when none is known, else one per observation (an
    unknown one allows every action)."""
    known = next((m for m in masks if m is not None), None)
    return None if known is None else [[True] * len(known) if m is None else m for m in masks]


def obs_values(obs: Any) -> int:
    """How many numbers an observation holds (a Dict's or Tuple's parts added up)."""
    if isinstance(obs, Mapping):
        return sum(obs_values(v) for v in obs.values())
    if isinstance(obs, tuple):
        return sum(obs_values(v) for v in obs)
    return int(np.size(obs))
