"""``PolicyService``: everything the endpoints of one policy do, with neither HTTP nor Ray.

The service turns observations into the model's input array, sends it through the micro-batcher
to the policy's model (a ``serving.api.PolicyModel``), and turns the model's raw outputs into actions or distributions.
A policy with a candidate version (``canary``) sends each request to the version its
``candidate.PolicyVersions`` picks, and every answer names that version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from policy_server.errors import BackendUnavailable, FieldError, InvalidRequest, ModelOverflow
from policy_server.experience_log.records import Decisions, Outcomes
from policy_server.experience_log.writer import ExperienceLog
from policy_server.gateway.policy.candidate import PolicyVersions
from policy_server.gateway.policy.masks import check_mask, combine_masks
from policy_server.gateway.policy.versions import Variant
from policy_server.gateway.request_ids import asker
from policy_server.policies.served import ServedPolicy
from policy_server.policies.spaces import ActionSample
from policy_server.policies.torch_policy import PolicyOutput
from policy_server.schema.observations import flatten
from policy_server.schema.space_inputs import read_batch, read_one
from policy_server.serving.api import PolicyModel
from policy_server.serving.batcher import MicroBatcher

Mode = Literal["sample", "deterministic"]
Inputs = tuple[np.ndarray, np.ndarray | None]
"""The model input ``(B, *obs_shape)`` of ``obs_dtype``, and the action mask ``(B, k)`` bool or None."""


class PolicyService:
    def __init__(self, policy: ServedPolicy, rng: np.random.Generator, versions: PolicyVersions | None = None) -> None:
        self.policy = policy
        self.rng = rng
        self.versions = versions or PolicyVersions(policy)
        self._batcher: MicroBatcher | None = None
        self.backend: PolicyModel | None = None
        self.experience_log: ExperienceLog | None = None  # logs every action answered (`experience_log:`)

    def attach(self, backend: PolicyModel, on_batch: Callable[[int], None] | None = None) -> None:
        res = self.policy.spec.resources
        self.backend = backend
        self._batcher = MicroBatcher(
            backend.forward, res.max_batch_size, res.concurrent_batches, res.batch_wait_ms / 1000, on_batch
        )

    async def ready(self) -> bool:
        """Whether the policy's model answers now, and its candidate's when it has one (never raises)."""
        models = [self.backend] + ([self.versions.backend] if self.policy.spec.canary else [])
        return all([model is not None and await model.ready() for model in models])

    def require_backend(self) -> PolicyModel:
        if self.backend is None:
            raise BackendUnavailable(f"policy {self.policy.name!r} is still starting; retry shortly")
        return self.backend

    # --- inputs ---------------------------------------------------------------------------

    def from_observations(self, observations: list[BaseModel], model: type[BaseModel] | None = None) -> np.ndarray:
        """Validated observations of the policy's model → float32 ``(B, obs_dim)`` (``model``: read
        only its fields, of observations of a model derived from it; the action mask, when they
        carry one, is no model input: ``mask_of``)."""
        return flatten(observations, model, self.policy.mask_attribute)

    def mask_of(self, observations: list[BaseModel]) -> np.ndarray | None:
        """The action masks the observations carry, bool ``(B, mask_width)`` (a row without one
        allows every action), or None when none carries one."""
        attribute = self.policy.mask_attribute
        if attribute is None:
            return None
        return masks_of([getattr(obs, attribute) for obs in observations], self.policy.space.mask_width)

    def check_mask(self, mask: np.ndarray | None, where: Sequence[str], mask_at: Sequence[str] | None = None) -> None:
        """Raise InvalidRequest (422) naming each row's mask that allows no action in a component;
        ``mask_at``: where each row's mask is (default: ``<where>.<mask field>``)."""
        if mask is not None:
            check_mask(self.policy.space, mask, mask_at or [f"{w}.{self.policy.mask_name}" for w in where])

    def from_raw(self, rows: list[list[float]], field: str = "body.obs") -> np.ndarray:
        """Flat input vectors (each value already checked finite as float32) → float32 ``(B, obs_dim)``;
        raises InvalidRequest naming each row of the wrong width."""
        width = self.policy.obs_dim
        bad = [i for i, row in enumerate(rows) if len(row) != width]
        if bad:
            fields = [FieldError(f"{field}.{i}" if len(rows) > 1 else field,
                                 f"expected {width} values, got {len(rows[i])}") for i in bad[:10]]
            raise InvalidRequest(
                f"{field}: each observation needs {width} values (the sum of the observation "
                f"widths); got {len(rows[bad[0]])}", fields)
        flat = np.asarray(rows, dtype=np.float32).reshape(len(rows), width)
        if self.policy.obs_space is None:
            return flat
        dtype = self.policy.obs_dtype  # a space's model input: its shape and dtype
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            bad = np.flatnonzero(((flat < info.min) | (flat > info.max) | (flat != np.round(flat))).any(axis=1))
            if bad.size:
                fields = [FieldError(f"{field}.{i}" if len(rows) > 1 else field,
                                     f"the model reads {dtype}: integers in [{info.min}, {info.max}]") for i in bad[:10]]
                raise InvalidRequest(f"{fields[0].field}: {fields[0].message}", fields)
        return flat.astype(dtype).reshape(len(rows), *self.policy.obs_shape)

    def from_space(self, obs: Any, field: str, action_mask: Any = None, batch: bool = False) -> Inputs:
        """A space policy's observation at ``field`` (``batch``: a list of them) → the model input
        and the action mask: the space's mask entry and the request's ``action_mask`` combined (an
        action is allowed when both allow it). Raises InvalidRequest naming the first bad value, and
        the mask that allows no action (``masks.combine_masks``: ``body.obs.3.legal``,
        ``body.action_mask.3``, or both when only together they allow none)."""
        space = self.policy.obs_space
        assert space is not None, "a policy with an observation_space"
        read = read_batch if batch else read_one
        rows, entry = read(space, obs, field, self.policy.mask_key)
        parts = [] if entry is None else [(entry, _at(field, len(rows), batch, f".{self.policy.mask_key}"))]
        if action_mask is not None:
            given = self._action_mask(action_mask if batch else [action_mask], len(rows), batch)
            parts.append((given, _at("body.action_mask", len(rows), batch)))
        return rows, combine_masks(self.policy.space, parts)

    def _action_mask(self, masks: list[list[bool]], rows: int, batch: bool, field: str = "body.action_mask") -> np.ndarray:
        """The request's ``action_mask`` rows (booleans already checked) as ``(B, k)`` bool."""
        width = self.policy.space.mask_width or None
        if width is None:
            raise InvalidRequest.at(field, f"a {self.policy.space.kind} action space takes no mask")
        if len(masks) != rows:
            raise InvalidRequest.at(field, f"{len(masks)} masks for {rows} observations")
        for i, mask in enumerate(masks):
            if len(mask) != width:
                raise InvalidRequest.at(f"{field}.{i}" if batch else field,
                                        f"expected {width} booleans (one per action), got {len(mask)}")
        return np.asarray(masks, dtype=bool).reshape(rows, width)

    # --- model calls ----------------------------------------------------------------------

    async def _submit(self, obs: np.ndarray, policy_id: str | None) -> PolicyOutput:
        """One batched call to the stable model (``policy_id``: of a ``policies_dir`` policy only)."""
        if self._batcher is None:
            raise BackendUnavailable(f"policy {self.policy.name!r} is still starting; retry shortly")
        return await self._batcher.submit(obs)

    async def forward(
        self, obs: np.ndarray, where: Sequence[str], policy_id: str | None = None, forced: Variant | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[PolicyOutput, Variant]:
        """The outputs for float32 ``(B, obs_dim)`` rows of the version that answers them (``forced``,
        or as the policy's versions route the request), and that version; ``where`` names each
        row's field (``body.observations.3``); ``policy_id`` picks the model of a ``policies_dir``
        policy (which has no candidate). In shadow mode the candidate also runs, off the request
        path, and its actions are compared with stable's under the request's action ``mask``.

        Raises ModelOverflow naming each row whose outputs are not finite: the weights are
        (replicas refuse others), so a finite input that overflows the model's float32 layers
        (values near 1e38, say) is the only way there. NoCandidate (409) when ``forced`` is
        ``canary`` and the policy has none.
        """
        variant = self.versions.choose(self.rng, forced)
        start = time.perf_counter()
        if variant == "stable":
            out = await self._submit(obs, policy_id)
        else:
            batcher = self.versions.batcher()
            if batcher is None:
                raise BackendUnavailable(f"policy {self.policy.name!r}'s candidate is still starting; retry shortly")
            out = await batcher.submit(obs)
        self.versions.answered(variant, time.perf_counter() - start)
        finite = np.logical_and.reduce([np.isfinite(h).reshape(len(h), -1).all(axis=1) for h in out.heads])
        if not finite.all():
            message = ("the model's outputs are not finite (NaN or inf) for this observation: its "
                       "values overflow the model's float32 layers; scale them down")
            fields = [FieldError(where[i], message) for i in np.flatnonzero(~finite)[:10]]
            raise ModelOverflow(f"{fields[0].field}: {message}", fields)
        if variant == "stable" and self.versions.router.shadows:
            self.versions.run_shadow(obs, out.heads, mask)
        return out, variant

    async def act(
        self, obs: np.ndarray, mode: Mode, where: Sequence[str], policy_id: str | None = None,
        forced: Variant | None = None, mask: np.ndarray | None = None, mask_at: Sequence[str] | None = None, *,
        client_id: str | None = None,
    ) -> tuple[list[ActionSample], int, Variant]:
        """Actions for ``(B, *obs_shape)`` rows (never a masked one: ``mask`` bool
        ``(B, mask_width)``), the model version and the version (variant) that chose them; raises
        as ``forward``, and InvalidRequest when a mask allows no action (``check_mask``). With an
        experience log, the decisions are queued for it (named by the request's id, ``client_id``
        and episode id)."""
        self.check_mask(mask, where, mask_at)
        out, variant = await self.forward(obs, where, policy_id, forced, mask)
        space = self.policy.space
        samples = space.sample(out.heads, self.rng, mask) if mode == "sample" else space.mode(out.heads, mask)
        if self.experience_log is not None:
            self.experience_log.submit(Decisions(
                time.time_ns(), self.policy.name, asker(client_id, policy_id), obs, samples, out.version, variant))
        return samples, out.version, variant

    def log_outcomes(self, outcomes: Outcomes) -> None:
        """Queue rewards reported for earlier decisions for the experience log, if there is one."""
        if self.experience_log is not None:
            self.experience_log.submit(outcomes)

    def log_collected(self, time_ns: int, client_id: str, reward: float, done: bool, obs: np.ndarray) -> None:
        """What a ``/collect_experience`` call reports of the client's previous decision: its reward and
        whether it ended the episode (``obs``, ``(1, *shape)``, is the observation after it)."""
        self.log_outcomes(Outcomes(time_ns, self.policy.name, asker(client_id), [None], [reward], [done], [False], obs))

    async def distribution(
        self, obs: np.ndarray, where: Sequence[str], policy_id: str | None = None, forced: Variant | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[list[dict[str, Any]], int, Variant]:
        """The exact distributions (masked actions: probability 0); raises as ``act``."""
        self.check_mask(mask, where)
        out, variant = await self.forward(obs, where, policy_id, forced, mask)
        return self.policy.space.distribution(out.heads, mask), out.version, variant


def _at(field: str, rows: int, batch: bool, suffix: str = "") -> list[str]:
    """Where each row's mask is: ``body.obs.legal``; in a batch ``body.obs.3.legal``, ``body.action_mask.3``."""
    return [f"{field}.{i}{suffix}" for i in range(rows)] if batch else [f"{field}{suffix}"]


def masks_of(rows: Sequence[list[bool] | None], width: int) -> np.ndarray | None:
    """Per-row masks (None: every action allowed) → bool ``(B, width)``; None when no row has one."""
    if all(row is None for row in rows):
        return None
    return np.array([[True] * width if row is None else row for row in rows], dtype=bool)
