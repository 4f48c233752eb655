"""``PolicyVersions``: a policy's candidate version in the gateway: its model, the routing between
it and the stable model, shadow runs, statistics, promote and rollback. Neither HTTP nor Ray.

The state lives in this gateway process: with several gateways, a share set, a rollback or a
promote through one of them routes that gateway's requests (promote's weights reach every
gateway, as they are the stable deployment's). Restarting a gateway restores the schema's routing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from policy_server.errors import BackendUnavailable, NotPromotable, summary
from policy_server.gateway.policy.versions import (
    VARIANTS,
    EpisodeReturns,
    ShadowStats,
    Variant,
    VariantStats,
    VersionRouter,
    mode_agreements,
)
from policy_server.policies.served import ServedPolicy
from policy_server.serving.api import PolicyModel, PolicyTrainer
from policy_server.serving.batcher import MicroBatcher

log = logging.getLogger(__name__)
SHADOW_REQUESTS_PER_SLOT = 64
"""Shadow runs in flight at most, per batch the candidate takes at once; more are skipped (counted).
The candidate's micro-batcher merges them (a full slot holds up to max_batch_size rows), so the
bound is on the gateway's memory, not on the candidate's load: a bound of 2 per slot skipped 37 %
of the comparisons at 4 clients."""


class VariantMetrics(Protocol):
    """Where a policy's per-version numbers go (``gateway.metrics``: Prometheus)."""

    def answered(self, variant: Variant, seconds: float) -> None: ...

    def shadowed(self, agreed: int, rows: int) -> None: ...

    def episode(self, variant: Variant, episode_return: float) -> None: ...


class PolicyVersions:
    """The candidate of one policy (``policy.spec.canary``) beside its stable model."""

    def __init__(self, policy: ServedPolicy, metrics: VariantMetrics | None = None) -> None:
        self.policy, self.metrics = policy, metrics
        self.router = VersionRouter(policy.spec.canary)
        self.stats = {variant: VariantStats() for variant in VARIANTS}
        self.shadow = ShadowStats()
        self.shadow_skipped = 0
        self.episodes = EpisodeReturns()  # of /collect_experience's calls
        self._sent = EpisodeReturns()  # of the experience clients send to /train/experience
        self.checkpoint: str | None = None  # the trainer's checkpoint the candidate serves, if one
        self.promoted: int | None = None  # the stable version the candidate's weights were published as
        self.backend: PolicyModel | None = None
        self._batcher: MicroBatcher | None = None
        self._shadow_runs: set[asyncio.Task[None]] = set()

    def attach(self, backend: PolicyModel, on_batch: Callable[[int], None] | None = None) -> None:
        """The candidate's model is up: batch its requests like the stable model's."""
        res = self.policy.spec.resources
        self.backend = backend
        self._batcher = MicroBatcher(
            backend.forward, res.max_batch_size, res.concurrent_batches, res.batch_wait_ms / 1000, on_batch
        )

    def batcher(self) -> MicroBatcher:
        """The candidate's batcher; BackendUnavailable (503) while it starts."""
        if self._batcher is None:
            raise BackendUnavailable(f"the candidate version of policy {self.policy.name!r} is still starting")
        return self._batcher

    def choose(self, rng: np.random.Generator, forced: Variant | None) -> Variant:
        return self.router.choose(rng, forced)

    def answered(self, variant: Variant, seconds: float) -> None:
        self.stats[variant].answered(seconds)
        if self.metrics is not None:
            self.metrics.answered(variant, seconds)

    # --- shadow -------------------------------------------------------------------------------

    def run_shadow(self, obs: np.ndarray, stable_heads: list[np.ndarray], mask: np.ndarray | None = None) -> None:
        """Run the candidate on ``obs`` (the model input ``(B, *obs_shape)``) off the request path
        and record whether its most likely allowed actions (under the request's ``mask``, bool
        ``(B, mask_width)``) agree with the stable model's (``stable_heads``). Never raises;
        skipped (counted) while too many runs are in flight or the candidate starts."""
        limit = SHADOW_REQUESTS_PER_SLOT * self.policy.spec.resources.concurrent_batches
        if self._batcher is None or len(self._shadow_runs) >= limit:
            self.shadow_skipped += 1
            return
        task = asyncio.get_running_loop().create_task(self._shadow(self._batcher, obs, stable_heads, mask))
        self._shadow_runs.add(task)
        task.add_done_callback(self._shadow_runs.discard)

    async def _shadow(
        self, batcher: MicroBatcher, obs: np.ndarray, stable_heads: list[np.ndarray], mask: np.ndarray | None
    ) -> None:
        try:
            out = await batcher.submit(obs)
        except Exception as exc:  # noqa: BLE001 - a shadow run fails nothing: the request it copies was answered
            self.shadow.failures += 1
            log.warning("policy %s: the shadow candidate failed: %s", self.policy.name, summary(exc))
            return
        agreed = mode_agreements(self.policy.space, stable_heads, out.heads, mask)
        self.shadow.compared(agreed)
        if self.metrics is not None:
            self.metrics.shadowed(sum(agreed), len(agreed))
        log.debug("policy %s: shadow candidate agreed on %d of %d observations", self.policy.name, sum(agreed), len(agreed))

    async def drain_shadow(self) -> None:
        """Wait for the shadow runs in flight."""
        while self._shadow_runs:
            await asyncio.gather(*self._shadow_runs, return_exceptions=True)

    async def close(self) -> None:
        """Cancel the shadow runs in flight (the gateway shuts down: nobody waits for their numbers)."""
        for task in list(self._shadow_runs):
            task.cancel()
        await asyncio.gather(*self._shadow_runs, return_exceptions=True)

    # --- episodes (``/collect_experience``) ---------------------------------------------------

    def collect_variant(self, client_id: str, reward: float, done: bool, forced: Variant | None) -> Variant | None:
        """Credit a ``/collect_experience`` call's reward to the client's episode (recording the
        episode's return when ``done`` ends it), and say which version acts its next step: ``forced``,
        else the version of its episode in progress while the candidate is routed (a whole episode
        goes one way), else None (the router picks)."""
        if not self.router.has_candidate:
            return forced
        ended = self.episodes.step_ended(client_id, reward, done)
        if ended is not None:
            self._episode(*ended)
        if forced is None and self.router.routing == "split":
            return self.episodes.variant_of(client_id)
        return forced

    def collect_acted(self, client_id: str, variant: Variant) -> None:
        if self.router.has_candidate:
            self.episodes.acted(client_id, variant)

    def experience(self, client_id: str, pieces: Iterable[tuple[Variant | None, Sequence[float], bool]]) -> None:
        """Episode returns per version from ``/train/experience``: ``pieces`` are a client's
        fragments and steps in order, each (the variant that acted it, its rewards, whether it
        ends an episode). A piece without a variant makes its episode count for neither version."""
        if not self.router.has_candidate:
            return
        for variant, rewards, ends in pieces:
            self._sent.acted(client_id, variant)
            ended = self._sent.step_ended(client_id, float(sum(rewards)), ends)
            if ended is not None:
                self._episode(*ended)

    def _episode(self, variant: Variant, episode_return: float) -> None:
        self.stats[variant].episode(episode_return)
        if self.metrics is not None:
            self.metrics.episode(variant, episode_return)

    # --- control --------------------------------------------------------------------------------

    def set_share(self, share: float | None, mode: Literal["split", "shadow"]) -> None:
        self.router.set_share(share, mode)

    def rollback(self) -> None:
        """Route no request to the candidate any more; its deployment keeps running (forced
        requests still reach it, and a share can be set again)."""
        self.router.stop()

    async def promote(self, stable: PolicyModel) -> int:
        """Publish the candidate's weights to every replica of the stable model, as the stable
        version after the one served now, and stop routing to the candidate; returns that version.

        Raises NoCandidate; NotPromotable when the policy is trained (its trainer numbers the
        stable versions, and its next update would replace the candidate's weights) or when the
        candidate's parameters (names, shapes) differ from the stable model's; BackendUnavailable
        while either starts.
        """
        self.router.require_candidate()
        if self.policy.spec.training is not None:
            raise NotPromotable(
                f"policy {self.policy.name!r} is trained by this server: its trainer owns the stable versions and "
                "its next update would replace the candidate's weights; make the candidate the schema's `model` "
                "(and restart), or use the trainer's checkpoints (/train/resume)")
        if self.backend is None:
            raise BackendUnavailable(f"the candidate version of policy {self.policy.name!r} is still starting")
        weights, _ = await self.backend.snapshot()
        current, version = await stable.snapshot()
        differ = parameter_mismatch(current, weights)
        if differ:
            raise NotPromotable(
                f"the candidate's parameters do not fit the stable model's ({differ}): serve it as the "
                "schema's `model` instead")
        version += 1
        await stable.set_weights(weights, version)
        self.router.stop()
        self.promoted = version
        return version

    async def report(self, stable: PolicyModel) -> dict[str, Any]:
        """``describe`` with the model version each version serves now (asked of its replicas)."""
        answer = self.describe()
        answer["stable"]["model_version"] = await stable.version()
        if answer["canary"] is not None:
            answer["canary"]["model_version"] = await self.backend.version() if self.backend is not None else None
        return answer

    async def from_checkpoint(self, trainer: PolicyTrainer, name: str) -> int:
        """Serve the trainer's checkpoint ``name`` as the candidate: its actor weights published to
        every candidate replica under the checkpoint's model version (returned). The routing stays
        as it is. Raises NoCandidate; NotFound (unknown checkpoint) and InvalidRequest as the
        trainer does; NotPromotable when the candidate's parameters differ from the checkpoint's."""
        self.router.require_candidate()
        if self.backend is None:
            raise BackendUnavailable(f"the candidate version of policy {self.policy.name!r} is still starting")
        saved = await trainer.checkpoint_weights(name)
        current, _ = await self.backend.snapshot()
        differ = parameter_mismatch(current, saved["weights"])
        if differ:
            raise NotPromotable(f"the checkpoint's parameters do not fit the candidate model's ({differ})")
        await self.backend.set_weights(saved["weights"], saved["model_version"])
        self.checkpoint = name
        return int(saved["model_version"])

    def describe(self) -> dict[str, Any]:
        """The candidate's routing and each version's numbers, as ``GET .../versions`` answers them."""
        spec = self.policy.spec
        return {
            "routing": self.router.routing,
            "share": self.router.share,
            "promoted_version": self.promoted,
            "candidate_checkpoint": self.checkpoint,
            "shadow": {"observations": self.shadow.rows, "agreed": self.shadow.agreed,
                       "agreement": self.shadow.agreement, "failures": self.shadow.failures,
                       "skipped": self.shadow_skipped},
            "stable": _variant(self.stats["stable"], spec.model.name),
            "canary": _variant(self.stats["canary"], spec.canary.model.name) if spec.canary else None,
        }


def _variant(stats: VariantStats, model: str) -> dict[str, Any]:
    return {"model": model, "model_version": None, "requests": stats.requests, "mean_latency_s": stats.mean_latency_s,
            "episodes": stats.episodes, "mean_episode_return": stats.mean_return}


def parameter_mismatch(current: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> str:
    """The first difference between two models' parameters (names, then shapes), or ''."""
    if set(current) != set(new):
        names = sorted(set(current) ^ set(new))
        return f"parameter {names[0]!r} is in only one of them"
    for name, value in current.items():
        if np.shape(value) != np.shape(new[name]):
            return f"{name}: shape {list(np.shape(new[name]))}, not {list(np.shape(value))}"
    return ""
