"""The experience logs of a schema's policies (``experience_log:``), counted in the gateway's metrics."""

from __future__ import annotations

import logging

from prometheus_client import Counter

from policy_server.experience_log.writer import DropReason, ExperienceLog, LogCounters
from policy_server.gateway.metrics import GatewayMetrics
from policy_server.policies.served import ServedPolicy

log = logging.getLogger(__name__)


class PrometheusLogCounters(LogCounters):
    def __init__(self, written: Counter, dropped: Counter, policy: str) -> None:
        self._written, self._dropped, self.policy = written.labels(policy), dropped, policy

    def written(self, rows: int) -> None:
        self._written.inc(rows)

    def dropped(self, reason: DropReason, rows: int) -> None:
        self._dropped.labels(self.policy, reason).inc(rows)


def experience_logs(policies: dict[str, ServedPolicy], metrics: GatewayMetrics) -> dict[str, ExperienceLog]:
    """An (unopened) log for each policy with an ``experience_log`` section."""
    logged = {name: p for name, p in policies.items() if p.spec.experience_log is not None}
    if not logged:
        return {}
    from policy_server.experience_log.spaces import spaces_doc  # imports Minari: only when a policy logs

    written = Counter("policy_server_experience_log_records", "Rows (decisions and rewards) written to the "
                      "experience log.", ("policy",), registry=metrics.registry)
    dropped = Counter("policy_server_experience_log_dropped", "Rows the experience log dropped: its queue was "
                      "full (`queue_full`) or the disk failed (`write_error`).", ("policy", "reason"),
                      registry=metrics.registry)
    logs = {}
    for name, policy in logged.items():
        assert policy.spec.experience_log is not None
        try:
            spaces = spaces_doc(policy)
        except ValueError as exc:  # the log still works; only its Minari export needs the spaces
            log.warning("policy %r: the experience log cannot record its spaces: %s", name, exc)
            spaces = None
        logs[name] = ExperienceLog(policy.spec.experience_log, name, spaces, PrometheusLogCounters(written, dropped, name))
    return logs
