"""What a schema asks Ray for, checked against the cluster before anything is deployed.

Ray Serve waits without end for a replica that no node can place (and, with ``log_to_driver``
off, says nothing), so start-up refuses such a schema up front, naming the fields to change. Pure
functions: tested without Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policy_server.errors import SchemaError, StartupError
from policy_server.schema.config import DEFAULT_POLICY, ServerSchema
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.serving.runtime.placement import HOW_TO

SLACK = 1e-6
"""Ray keeps resources in units of 1e-4; sums of fractions such as 0.1 need the slack."""


@dataclass(frozen=True)
class ResourceRequest:
    """One Ray actor kind the schema starts: ``replicas`` actors of ``num_cpus`` and ``num_gpus``.

    ``field`` is the schema section that sets them (``llm.policy.resources``), ``what`` says what
    runs there, ``name`` is its Serve app (or actor) name after the server's ``serve_app_prefix``.
    """

    field: str
    what: str
    num_cpus: float
    num_gpus: float
    replicas: int = 1
    max_replicas: int | None = None
    """With ``num_replicas: auto``: the most replicas Serve may start (``replicas`` is how many it
    starts with, which is what must fit)."""
    name: str = ""

    def ask(self) -> dict[str, float]:
        """What each of its actors asks Ray for (Ray's resource names)."""
        return {"CPU": self.num_cpus, "GPU": self.num_gpus}

    def describe(self, resource: str) -> str:
        amount = self.num_cpus if resource == "CPU" else self.num_gpus
        count = f" × {self.replicas} replicas" if self.replicas > 1 else ""
        if self.max_replicas is not None:
            count = f" × {self.replicas} replicas at start, autoscaled up to {self.max_replicas}"
        key = "num_cpus" if resource == "CPU" else "num_gpus"
        return f"{self.field}.{key}: {amount:g}{count} ({self.what})"


def resource_requests(schema: ServerSchema, gpus_in_cluster: bool) -> list[ResourceRequest]:
    """Every actor the gateway will start for ``schema``, with what each asks Ray for.

    GPU requests count only when the cluster has GPUs: without them the deployments serve on CPU.
    """
    gpus = 1.0 if gpus_in_cluster else 0.0  # scales each GPU request
    requests = []
    for name, spec in schema.policies.items():
        field = "parameters" if name == DEFAULT_POLICY else f"policies.{name}"
        res = spec.resources
        requests.append(ResourceRequest(
            f"{field}.resources", f"policy {name}'s replicas", res.num_cpus, gpus * res.num_gpus, res.start_count,
            res.max_replicas, name))
        if spec.canary is not None:  # the candidate runs on replicas of its own, with the same resources
            requests.append(ResourceRequest(
                f"{field}.resources", f"policy {name}'s candidate replicas (canary)", res.num_cpus,
                gpus * res.num_gpus, res.start_count, res.max_replicas, f"{name}-canary"))
        if spec.training is not None:
            requests.append(ResourceRequest(
                f"{field}.training", f"policy {name}'s trainer", spec.training.num_cpus, gpus * spec.training.num_gpus,
                name=f"{name}-trainer"))
    if schema.llm is not None:
        for key, llm_spec in (("policy", schema.llm.policy), ("value", schema.llm.value)):
            if llm_spec is not None:
                requests.extend(_llm_requests(key, llm_spec, gpus))
    return requests


def _llm_requests(key: str, spec: LLMPolicySpec | LLMValueSpec, gpus: float) -> Iterable[ResourceRequest]:
    """The LLM model's deployments; the names are ``serving.llm_deployment``'s app names (that
    module imports the engines, so not here)."""
    field, res = f"llm.{key}", spec.resources
    yield ResourceRequest(f"{field}.resources", f"the LLM {key}'s replicas", res.num_cpus, gpus * res.num_gpus,
                          res.start_count, res.max_replicas, f"llm-{key}")
    if isinstance(spec, LLMPolicySpec):  # its deployment sets num_cpus 0 (Serve's default is 1)
        yield ResourceRequest("llm.policy", "the LLM's tasks and sessions", 0.0, 0.0, name="llm-tasks")
    training = spec.training
    if training is None or not training.allow_training:
        return
    trainers = [("x1's trainer", f"llm-x1-{key}")] + ([("GRPO runs", "llm-grpo")] if isinstance(spec, LLMPolicySpec) else [])
    for what, name in trainers:
        yield ResourceRequest(f"{field}.training", what, training.num_cpus, gpus * training.num_gpus, name=name)


def check_fits(
    requests: list[ResourceRequest], cluster: Mapping[str, float], nodes: list[Mapping[str, float]]
) -> None:
    """Refuse a schema that the cluster cannot place.

    ``cluster`` is the cluster's total resources (``ray.cluster_resources()``), ``nodes`` each alive
    node's (``ray.nodes()[i]["Resources"]``). Totals are compared, not what is free: another
    gateway of the same apps redeploys them in place.

    Raises:
        SchemaError: naming each field that asks for the resource, the sum and what the cluster has.
    """
    for resource in ("CPU", "GPU"):
        asked = [r for r in requests if _amount(r, resource) > 0]
        total = sum(_amount(r, resource) * r.replicas for r in asked)
        have = cluster.get(resource, 0.0)
        if total > have + SLACK:
            raise SchemaError(
                f"the schema asks Ray for {total:g} {resource}s and the cluster has {have:g}: "
                + "; ".join(r.describe(resource) for r in asked)
                + f". Lower them (a fraction such as 0.5 shares one {resource}) or give Ray more "
                "(RAY_ADDRESS of a larger cluster)"
            )
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        for r in asked:
            if _amount(r, resource) > largest + SLACK:
                raise SchemaError(
                    f"{r.describe(resource)} asks for more {resource}s than any one node has "
                    f"(the largest has {largest:g}): one replica runs on one node"
                )


def check_free(requests: list[ResourceRequest], free: Mapping[str, float], held: Mapping[str, float],
               advice: str = HOW_TO) -> None:
    """Refuse a schema whose actors need more than the cluster has free now.

    ``free`` is ``ray.available_resources()``; ``held`` what this server's own Serve apps, already
    running on the cluster, hold (``held_by``): a second gateway of the same apps redeploys them in
    place, so that much comes back. ``advice`` ends the refusal: what to do about it.

    Raises:
        StartupError: naming each field that asks for the resource, the sum and what is free.
    """
    for resource in ("CPU", "GPU"):
        asked = [r for r in requests if _amount(r, resource) > 0]
        total = sum(_amount(r, resource) * r.replicas for r in asked)
        have, own = free.get(resource, 0.0), held.get(resource, 0.0)
        if total > have + own + SLACK:
            mine = f" (and this server's running apps hold {own:g} it redeploys in place)" if own > 0 else ""
            raise StartupError(
                f"the schema asks Ray for {total:g} {resource}s and the cluster has {have:g} free{mine}: "
                + "; ".join(r.describe(resource) for r in asked) + f". Other jobs hold the rest: {advice}"
            )


def held_by(requests: list[ResourceRequest], prefix: str, running: set[str]) -> dict[str, float]:
    """What the requests whose Serve app (``<prefix>-<name>``) is in ``running`` hold, in Ray's names."""
    held = {"CPU": 0.0, "GPU": 0.0}
    for r in requests:
        if f"{prefix}-{r.name}" in running:
            held["CPU"] += r.num_cpus * r.replicas
            held["GPU"] += r.num_gpus * r.replicas
    return held


def resource_report(requests: list[ResourceRequest], machine: Mapping[str, float]) -> dict[str, Any]:
    """What ``requests`` ask Ray for, per actor kind and in all, against ``machine`` (this machine's
    ``CPU``, ``GPU`` and ``memory`` in bytes, as Ray names them): ``asks``, ``total``, ``machine``,
    and ``fits`` (None) or why not (``check_fits``'s message). Memory is shown, not asked: the
    schema sets no memory for Ray."""
    try:
        check_fits(requests, machine, [machine])
        verdict = None
    except SchemaError as exc:
        verdict = exc.message
    return {
        "asks": [
            {"field": r.field, "what": r.what, "replicas": r.replicas, "num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
            for r in requests
        ],
        "total": {resource: sum(_amount(r, resource) * r.replicas for r in requests) for resource in ("CPU", "GPU")},
        "machine": dict(machine),
        "does_not_fit": verdict,
    }


def _amount(request: ResourceRequest, resource: str) -> float:
    return request.num_cpus if resource == "CPU" else request.num_gpus
