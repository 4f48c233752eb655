"""Ray metrics of the LLM deployments (exported as ``ray_policy_server_llm_*`` and
``ray_policy_server_grpo_*`` on Ray's metrics port), tagged with the model and its Serve application.

The engines know nothing of Ray: ``LLMEngine`` reports each generate call to an ``on_batch``
callback, and the GRPO deployment reports each answered rewards call; these classes turn those
reports into Ray metrics inside the replicas.
"""

from __future__ import annotations

from typing import Any

from ray.util import metrics

from policy_server.llm.engine import BatchReport

TAG_KEYS = ("model", "application")


class LLMServingMetrics:
    """Generate calls of one LLM policy replica: prompts per call, time, new tokens, queue, version."""

    def __init__(self, model: str, application: str) -> None:
        self._prompts = metrics.Histogram(
            "policy_server_llm_batch_prompts",
            description="Prompts per generate call on an LLM replica.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=TAG_KEYS,
        )
        self._seconds = metrics.Histogram(
            "policy_server_llm_generate_seconds",
            description="Time of one generate call on an LLM replica.",
            boundaries=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60],
            tag_keys=TAG_KEYS,
        )
        self._tokens = metrics.Counter(
            "policy_server_llm_generated_tokens",
            description="New tokens generated (every sample of every prompt).",
            tag_keys=TAG_KEYS,
        )
        self._queued = metrics.Gauge(
            "policy_server_llm_queued_requests",
            description="Requests waiting for a generate call when the last call ended.",
            tag_keys=TAG_KEYS,
        )
        self._version = metrics.Gauge(
            "policy_server_llm_model_version", description="Model version the replica serves.", tag_keys=TAG_KEYS
        )
        for m in (self._prompts, self._seconds, self._tokens, self._queued, self._version):
            m.set_default_tags({"model": model, "application": application})
        self._version.set(0)

    def on_batch(self, report: BatchReport) -> None:
        self._prompts.observe(report.prompts)
        self._seconds.observe(report.seconds)
        if report.new_tokens:
            self._tokens.inc(report.new_tokens)
        self._queued.set(report.queued)
        self._version.set(report.version)

    def on_version(self, version: int) -> None:
        self._version.set(version)


class GRPOMetrics:
    """GRPO runs of one LLM policy: each run's mean reward and cycle, as its rewards arrive."""

    def __init__(self, model: str, application: str) -> None:
        keys = (*TAG_KEYS, "run")
        self._reward = metrics.Gauge(
            "policy_server_grpo_mean_reward", description="Mean reward of a run's last group.", tag_keys=keys
        )
        self._cycle = metrics.Gauge(
            "policy_server_grpo_cycle", description="Optimiser steps a run has taken.", tag_keys=keys
        )
        self._groups = metrics.Counter(
            "policy_server_grpo_groups", description="Groups whose rewards were trained on.", tag_keys=keys
        )
        self._skipped = metrics.Counter(
            "policy_server_grpo_updates_skipped",
            description="Reward submissions whose step was refused as non-finite, by what was non-finite.",
            tag_keys=(*keys, "reason"),
        )
        for m in (self._reward, self._cycle, self._groups, self._skipped):
            m.set_default_tags({"model": model, "application": application})

    def on_rewards(self, run_id: str, answer: dict[str, Any]) -> None:
        tags = {"run": run_id}
        if answer.get("skipped"):
            self._skipped.inc(1, tags={**tags, "reason": answer["reason"]})
            return
        self._reward.set(float(answer["mean_reward"]), tags=tags)
        self._cycle.set(int(answer["model_version"][1]), tags=tags)
        self._groups.inc(1, tags=tags)
