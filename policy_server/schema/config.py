"""The typed form of schema.yaml.

The Pathmind format (``observations`` + ``parameters: {discrete, tuple, api_key, url_path}``) is
valid as it is. Everything else is an optional extension:

* ``parameters.model``: the model file (default: the one ``.pt``/``.pt2`` file in ``models/``),
* ``observation_space``: a Gymnasium space instead of ``observations`` (``schema.gym_spaces``),
* ``parameters.action_space``: the exact action space (``schema.actions``: discrete, multi_discrete
  alias tuple, multi_binary, box clipped or tanh-squashed; an action mask),
* ``parameters.resources``: replicas, GPUs and batching of the policy's deployment,
* ``parameters.training``: train the policy online from clients' experience (PPO or DQN),
* ``parameters.policies_dir``: many policies of one architecture, one model file per policy id
  (``schema.policy_ids``), loaded on demand on the replicas,
* ``parameters.canary``: a candidate model answering a share of requests, or in shadow (``schema.canary``),
* ``parameters.recurrent``: the state tensors of a recurrent (LSTM/GRU) policy (``schema.recurrent``),
* ``policies``: several named policies, each with the keys above plus its own ``observations``
  and ``api_keys`` (keys that open only that policy's routes),
* ``parameters.api_keys``: more server-wide keys beside ``api_key`` (all valid at once).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from policy_server.errors import SchemaError
from policy_server.fields import check_text
from policy_server.schema.actions import (  # noqa: F401 (the action specs are re-exported here)
    ActionSpaceSpec,
    ActionSpecs,
    BoxSpec,
    DiscreteSpec,
    MultiBinarySpec,
    TupleSpec,
    mask_field,
)
from policy_server.schema.canary import CanaryEntry, CanarySpec, resolve_canary
from policy_server.schema.experience_log import ExperienceLogSpec
from policy_server.schema.gym_spaces import describe_space, parse_space
from policy_server.schema.llm import LLMPolicySpec, LLMSection
from policy_server.schema.policy_ids import MODEL_SUFFIXES, is_name, resolve_policies_dir
from policy_server.schema.recurrent import RecurrentSpec, check_recurrent
from policy_server.schema.replicas import Replicas, refused
from policy_server.schema.training import TrainingSpec, resolve_from_log

OBSERVATION_TYPES = ("int", "float", "bool", "List[int]", "List[float]", "List[bool]")
DEFAULT_POLICY = "default"


class _SchemaLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.1's timestamp constructor of its own: vLLM's dependency
    lm-format-enforcer replaces ``SafeLoader``'s on import, process-wide, so that dates read as
    text. A schema reads the same whatever the process imported before it."""


_SchemaLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.constructor.SafeConstructor.construct_yaml_timestamp)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _observation_name(name: Any) -> str:
    """A schema key as a JSON field name. YAML reads some unquoted keys as other types (``1:`` an
    int, ``yes:`` a boolean, ``~:`` null); their text is ambiguous, so they are refused."""
    if not isinstance(name, str):
        kind = {bool: "a boolean (unquoted yes/no/on/off/true/false)", int: "an integer", type(None): "null"}
        raise PydanticCustomError(
            "observation_name",
            "the name {name} is read by YAML as {kind}, not as text; quote it to use it as an "
            "observation name",
            {"name": yaml.safe_dump(name).removesuffix("\n...\n").strip(),  # as YAML writes it: true, null
             "kind": kind.get(type(name), f"a {type(name).__name__}")},
        )
    if not name:
        raise PydanticCustomError("observation_name", "an observation name cannot be empty")
    try:
        return check_text(name)
    except ValueError as exc:
        raise PydanticCustomError(
            "observation_name", "the name {name} is {error}", {"name": ascii(name), "error": str(exc)}
        ) from None


ObservationName = Annotated[str, BeforeValidator(_observation_name)]
"""Any text is a valid JSON field name: dots, spaces, dashes, unicode, leading underscores."""


class ObservationSpec(_Strict):
    """One observation field; its position in the mapping is its position in the input vector."""

    type: Literal["int", "float", "bool", "List[int]", "List[float]", "List[bool]"]
    min_items: int | None = Field(None, ge=0)
    max_items: int | None = Field(None, ge=0)
    description: str | None = None

    @property
    def is_list(self) -> bool:
        return self.type.startswith("List")

    @property
    def width(self) -> int | None:
        """Number of input columns, or None for a list whose length the schema leaves open."""
        if not self.is_list:
            return 1
        if self.min_items is not None and self.min_items == self.max_items:
            return self.min_items
        return None

    @model_validator(mode="after")
    def _check_items(self) -> ObservationSpec:
        if not self.is_list and (self.min_items is not None or self.max_items is not None):
            raise ValueError(f"min_items/max_items only apply to List types, not {self.type}")
        if self.min_items is not None and self.max_items is not None:
            if self.min_items > self.max_items:
                raise ValueError(f"min_items {self.min_items} > max_items {self.max_items}")
        return self




class ResourceSpec(Replicas):
    """How the policy's Ray Serve deployment runs (replica fields: ``schema.replicas``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; used when present.")
    max_batch_size: int = Field(256, ge=1, description="Most observations in one forward pass.")
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Extra wait for a fuller batch. 0: a batch leaves as soon as a replica slot "
        "is free, and requests that arrive meanwhile form the next one.",
    )
    max_concurrent_batches: int | None = Field(
        None,
        ge=1,
        description="Batches in flight at once; default 2 per replica (`auto`: per max_replicas, and at "
        "least target_ongoing_requests per max_replicas).",
    )
    max_models_per_replica: int = Field(
        32, ge=1, description="`policies_dir` only: policy ids each replica keeps loaded (an LRU)."
    )

    @model_validator(mode="after")
    def _check_concurrency(self) -> ResourceSpec:
        # Serve scales to (batches in flight) / target: a gateway that never has more in flight
        # than this never asks for max_replicas
        if self.autoscaled and self.max_concurrent_batches is not None:
            needed = self.saturating(0)
            if self.max_concurrent_batches < needed:
                raise refused(
                    f"max_concurrent_batches {self.max_concurrent_batches} is below target_ongoing_requests "
                    f"{self.target:g} × max_replicas {self.max_count} = {needed}: Serve scales to the batches "
                    "in flight ÷ the target, so it would never reach max_replicas; raise it or leave it unset"
                )
        return self

    @property
    def concurrent_batches(self) -> int:
        """Batches the gateway keeps in flight: 2 per replica, or the schema's number."""
        return self.max_concurrent_batches or self.saturating(2)


class PolicySpec(_Strict):
    """One served policy, as resolved from the schema (model path absolute)."""

    name: str
    observations: dict[ObservationName, ObservationSpec] | None
    action_space: ActionSpecs
    observation_space: dict[str, Any] | None = None
    """A Gymnasium space in its normalised YAML form (``schema.gym_spaces``), instead of ``observations``."""
    model: Path
    resources: ResourceSpec
    training: TrainingSpec | None = None
    policies_dir: Path | None = None
    """Many policies of this one architecture: ``<policies_dir>/<policy id>.pt`` (``model``: one of them)."""
    canary: CanarySpec | None = None
    recurrent: RecurrentSpec | None = None
    """A recurrent policy's state tensors (``schema.recurrent``); None: feed-forward."""
    experience_log: ExperienceLogSpec | None = None
    """Log every served decision (``policy_server.experience_log``); path absolute."""


class ServerSchema(_Strict):
    policies: dict[str, PolicySpec]
    default_policy: str | None
    llm: LLMSection | None = None
    api_key: SecretStr | None = None
    api_keys: tuple[SecretStr, ...] = ()
    """Every server-wide key: ``parameters.api_key`` first, then ``parameters.api_keys``."""
    policy_keys: dict[str, tuple[SecretStr, ...]] = {}
    """Each policy's own keys (``policies.<name>.api_keys``): they open only its routes."""
    llm_keys: tuple[SecretStr, ...] = ()
    """The ``llm`` section's own keys (``llm.api_keys``): they open only the LLM routes."""
    url_path: str = ""

    def public(self) -> dict[str, Any]:
        """The schema as `/schema` shows it: everything but the api key."""
        return {
            "default_policy": self.default_policy,
            "url_path": self.url_path,
            "policies": {
                name: p.model_dump(mode="json", exclude={"model", "training", "policies_dir", "canary", "experience_log"})
                | {"model": p.model.name, "training": _public_training(p.training),
                   "canary": p.canary and p.canary.model_dump(mode="json") | {"model": p.canary.model.name}}
                | ({"policies_dir": p.policies_dir.name} if p.policies_dir else {})
                for name, p in self.policies.items()
            },
            "llm": _public_llm(self.llm),
        }


def _public_training(training: TrainingSpec | None) -> dict[str, Any] | None:
    if training is None:
        return None
    public = TypeAdapter(TrainingSpec).dump_python(training, mode="json")
    public["checkpoint_dir"] = training.checkpoint_dir.name  # not the server's file system layout
    return public


def _public_llm(llm: LLMSection | None) -> dict[str, Any] | None:
    """The LLM section without the server's folder layout."""
    if llm is None:
        return None
    public = llm.model_dump(mode="json")
    for key, spec in (("policy", llm.policy), ("value", llm.value)):
        if spec is not None:
            public[key]["path"] = spec.path.name
            public[key]["adapter"] = spec.adapter.name if spec.adapter else None
            if isinstance(spec, LLMPolicySpec):
                public[key]["adapters"] = {name: folder.name for name, folder in spec.adapters.items()}
            if spec.training is not None:  # folder names, not the server's file system layout
                for folder in ("data_dir", "samples_dir", "save_dir"):
                    public[key]["training"][folder] = getattr(spec.training, folder).name
    return public


# --- the file format -------------------------------------------------------------------------


class _PolicyFields(_Strict):
    """Keys shared by `parameters` (single policy) and each entry of `policies`."""

    discrete: bool | None = None
    tuple: bool | None = None
    model: str | None = None
    action_space: ActionSpaceSpec | None = None
    resources: ResourceSpec = ResourceSpec()
    training: TrainingSpec | None = None
    policies_dir: str | None = None
    canary: CanaryEntry | None = None
    recurrent: RecurrentSpec | None = None
    experience_log: ExperienceLogSpec | None = None


ApiKeyList = list[Annotated[str, Field(min_length=1)]]


class _Parameters(_PolicyFields):
    api_key: str | None = None
    api_keys: ApiKeyList = []
    url_path: str | None = None
    default_policy: str | None = None


class _PolicyEntry(_PolicyFields):
    observations: dict[ObservationName, ObservationSpec] | None = None
    observation_space: dict[str, Any] | None = None
    api_keys: ApiKeyList = []


class _SchemaFile(_Strict):
    observations: dict[ObservationName, ObservationSpec] | None = None
    observation_space: dict[str, Any] | None = None
    parameters: _Parameters = _Parameters()
    policies: dict[str, _PolicyEntry] | None = None
    llm: LLMSection | None = None


def load_schema(path: Path | str) -> ServerSchema:
    """Read and validate a schema.yaml; raise SchemaError naming the offending field."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"schema file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_SchemaLoader) or {}
    except yaml.YAMLError as exc:
        raise SchemaError(f"{path}: not valid YAML: {exc}") from exc
    return parse_schema(raw, base_dir=path.parent)


def parse_schema(raw: Any, base_dir: Path) -> ServerSchema:
    try:
        parsed = _SchemaFile.model_validate(raw)
    except ValidationError as exc:
        raise SchemaError(_describe(exc)) from exc
    params = parsed.parameters
    if parsed.policies:
        entries = parsed.policies
        for key in ("observations", "observation_space"):
            if getattr(parsed, key) is not None:
                raise SchemaError(f"{key}: with `policies`, give {key} per policy")
        per_policy = sorted(set(_PolicyFields.model_fields) & params.model_fields_set)
        if per_policy:
            raise SchemaError(
                f"parameters.{per_policy[0]}: with `policies`, set {', '.join(per_policy)} per policy"
            )
    elif parsed.llm is not None and parsed.observations is parsed.observation_space is None and params.model is None:
        entries = {}  # an LLM-only server
    else:
        entries = {
            DEFAULT_POLICY: _PolicyEntry(
                observations=parsed.observations, observation_space=parsed.observation_space,
                **params.model_dump(include=set(_PolicyFields.model_fields), exclude_unset=True),
            )
        }
    default = params.default_policy or next(iter(entries), None)
    if entries and default not in entries:
        raise SchemaError(
            f"parameters.default_policy: {default!r} is not one of {sorted(entries)}"
        )
    for name, entry in entries.items():  # the candidate's Serve app is <prefix>-<name>-canary
        if entry.canary is not None and f"{name}-canary" in entries:
            raise SchemaError(f"policies.{name}-canary: the name of policy {name}'s candidate app; rename this policy")
    policies = {name: _resolve(name, e, base_dir) for name, e in entries.items()}
    return ServerSchema(
        policies=policies,
        default_policy=default,
        llm=_resolve_llm(parsed.llm, base_dir),
        api_key=SecretStr(params.api_key) if params.api_key else None,
        api_keys=_secrets([params.api_key or "", *params.api_keys]),
        policy_keys={name: _secrets(e.api_keys) for name, e in entries.items() if e.api_keys},
        llm_keys=_secrets(parsed.llm.api_keys) if parsed.llm else (),
        url_path=(params.url_path or "").strip("/"),
    )


def _secrets(keys: list[str]) -> tuple[SecretStr, ...]:
    return tuple(SecretStr(k) for k in keys if k)


def _resolve_llm(llm: LLMSection | None, base_dir: Path) -> LLMSection | None:
    if llm is None:
        return None
    llm = llm.resolved(base_dir)
    for key, spec in (("policy", llm.policy), ("value", llm.value)):
        if spec is None:
            continue
        if not (spec.path / "config.json").is_file():
            problem = ("is no such folder (every node that runs a replica must read it at this path)"
                       if not spec.path.exists() else "is not a save_pretrained model folder (no config.json)")
            raise SchemaError(
                f"llm.{key}.path: {spec.path} {problem}; "
                f"for the examples' tiny models run `python examples/llm/build_tiny_model.py --out-dir {spec.path.parent}`"
                " (or `python generate.py copy_server_files examples/llm`, which builds them)"
            )
        if spec.adapter is not None and not (spec.adapter / "adapter_config.json").is_file():
            raise SchemaError(f"llm.{key}.adapter: {spec.adapter} is not a peft adapter folder (no adapter_config.json)")
    return llm


def _resolve(name: str, entry: _PolicyEntry, base_dir: Path) -> PolicySpec:
    where = "parameters" if name == DEFAULT_POLICY else f"policies.{name}"
    if not is_name(name):
        raise SchemaError(f"policies.{name}: a policy name may hold letters, digits, - and _")
    space = entry.action_space or _legacy_space(entry, where)
    if entry.discrete is False and space.type != "box" and entry.action_space is not None:
        raise SchemaError(f"{where}.discrete is False but action_space.type is {space.type!r}")
    _check_mask(entry, space, where)
    folder, model = None, None
    if entry.policies_dir is not None and entry.canary is not None:
        raise SchemaError(f"{where}.canary: not with `policies_dir` (each policy id is its own model; "
                          "roll a new one out as a new policy id instead)")
    check_recurrent(entry.recurrent, entry.canary is not None, entry.policies_dir is not None, where,
                    entry.training.algorithm if entry.training else None)
    if entry.policies_dir is not None:
        folder, model = resolve_policies_dir(entry.policies_dir, entry.model, base_dir, where, entry.training is not None)
    elif "max_models_per_replica" in entry.resources.model_fields_set:
        raise SchemaError(f"{where}.resources.max_models_per_replica: applies only with `policies_dir`")
    space_where = "observation_space" if name == DEFAULT_POLICY else f"{where}.observation_space"
    if entry.observation_space is not None and entry.observations is not None:
        raise SchemaError(f"{space_where}: give either `observations` (Pathmind's fields) or "
                          "`observation_space` (a Gymnasium space), not both")
    return PolicySpec(
        name=name,
        observations=entry.observations,
        observation_space=entry.observation_space and describe_space(parse_space(entry.observation_space, space_where)),
        action_space=space,
        model=model or _find_model(entry.model, base_dir, where),
        resources=entry.resources,
        training=_resolve_training(entry.training, space, base_dir, where),
        policies_dir=folder,
        canary=resolve_canary(entry.canary, base_dir, where),
        recurrent=entry.recurrent,
        experience_log=entry.experience_log and entry.experience_log.resolved(base_dir),
    )


def _check_mask(entry: _PolicyEntry, space: ActionSpecs, where: str) -> None:
    """An action space's ``mask`` names a ``List[bool]`` observation of the policy (a key of a Dict
    ``observation_space``: checked against the space by ``policies.served.resolve_policy``)."""
    name = mask_field(space)
    if name is None or entry.observation_space is not None:
        return
    spec = (entry.observations or {}).get(name)
    if spec is None:
        raise SchemaError(f"{where}.action_space.mask: {name!r} is not one of the policy's observations")
    if spec.type != "List[bool]":
        raise SchemaError(f"{where}.action_space.mask: the observation {name!r} is {spec.type}; a mask is List[bool]")


def _resolve_training(
    training: TrainingSpec | None, space: ActionSpecs, base_dir: Path, where: str
) -> TrainingSpec | None:
    if training is None:
        return None
    if training.algorithm == "dqn" and space.type != "discrete":
        raise SchemaError(
            f"{where}.training.algorithm: dqn needs a discrete action space, not {space.type!r}; use ppo"
        )
    return dataclasses.replace(training, checkpoint_dir=(base_dir / training.checkpoint_dir).resolve(),
                               from_log=resolve_from_log(training, base_dir, f"{where}.training.from_log"))


def _legacy_space(entry: _PolicyEntry, where: str) -> ActionSpecs:
    """Pathmind's `discrete` / `tuple` flags: sizes come from the model's outputs."""
    if entry.discrete is False:
        if entry.tuple:
            raise SchemaError(f"{where}: tuple of continuous actions is not supported")
        return BoxSpec()
    return TupleSpec() if entry.tuple else DiscreteSpec()


def _find_model(model: str | None, base_dir: Path, where: str) -> Path:
    if model is not None:
        path = (base_dir / model).resolve()
        if not path.is_file():
            raise SchemaError(f"{where}.model: model file not found: {path}")
        return path
    folder = base_dir / "models"
    found = sorted(p for p in folder.glob("*") if p.suffix in MODEL_SUFFIXES) if folder.is_dir() else []
    if len(found) != 1:
        what = "no model file" if not found else f"{len(found)} model files"
        raise SchemaError(
            f"{where}.model: not set, and {folder.resolve()} holds {what} "
            f"({', '.join(MODEL_SUFFIXES)}); set `model:` to the file to serve"
        )
    return found[0].resolve()


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        parts = err["loc"][:-2] if err["loc"][-1:] == ("[key]",) else err["loc"]  # the message names a bad key
        loc = ".".join(str(p) for p in parts) or "(top level)"
        msg = err["msg"]
        if err["type"] == "literal_error" and loc.endswith(".type"):
            msg = (
                f"unknown type {err['input']!r}; expected one of {', '.join(OBSERVATION_TYPES)}"
                if loc.startswith(("observations", "policies")) and "action_space" not in loc
                else msg
            )
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "invalid schema: " + "; ".join(lines)
