"""Acting: ``ActingClient`` chooses actions for one policy, remotely (``/predict``) or with the
policy's downloaded model and weights, and the conversions between observations and JSON.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, NamedTuple, Self

import gymnasium.spaces as gs
import httpx
import numpy as np

from policy_server.client.http import HttpSession, PolicyClientError
from policy_server.client.masks import both, epsilon_greedy, observation_mask, stacked
from policy_server.client.spaces import model_rows, served_observation_space, space_json
from policy_server.policies.codec import decode_weights
from policy_server.policies.spaces import ActionSpace, BoxSpace, DiscreteSpace, MultiBinarySpace, TupleSpace
from policy_server.policies.torch_policy import TorchPolicy, load_module

Inference = Literal["remote", "local"]
BINARY_ABOVE = 1024
"""``binary=None``: remote acting sends an observation of more values than this as ``.npy``."""
NPY = "application/x-npy"
ActionValue = int | list[int] | list[float]
Observation = Sequence[Any] | np.ndarray | Mapping[str, Any] | int
"""A flat vector or the schema's observation object (Pathmind ``observations``), or an observation
of the policy's ``observation_space`` (an array, an int, a dict, a tuple)."""
SPACE_BATCH_KEY = "obs"
"""The batch forms' key for observations of an ``observation_space``: ``{"obs": [obs, ...]}``."""


class ActResult(NamedTuple):
    """One chosen action, the log-probability of choosing it, and the model version that chose it
    (the policy's version that answered, ``stable`` or ``canary``, is the client's ``last_variant``)."""

    action: ActionValue
    log_prob: float | None
    model_version: int


@dataclass
class ClientStats:
    """What the client did so far (counters only grow)."""

    steps_logged: int = 0
    posts: int = 0
    samples_accepted: int = 0
    samples_rejected: int = 0
    stale_posts: int = 0
    """Posts answered 409 stale_samples: their steps are dropped and the weights refreshed."""
    dropped_steps: int = 0
    """Steps refused as a whole (stale, or training not running) and not sent again."""
    not_running_waits: int = 0
    retries: int = 0
    weight_refreshes: int = 0


class _LocalModel:
    """The policy's model in this process: forward passes and the server's action-space maths."""

    def __init__(
        self, policy: TorchPolicy, space: ActionSpace, fields: list[str], obs_space: gs.Space[Any] | None,
        mask_key: str | None = None,
    ) -> None:
        self.policy, self.space, self.obs_space = policy, space, obs_space
        self.mask_key = mask_key if isinstance(obs_space, gs.Dict) and mask_key in obs_space.spaces else None
        self.mask_field = mask_key if obs_space is None and mask_key in fields else None
        """A Pathmind observation that holds the action mask (``action_space.mask``): no model input."""
        self.fields = [name for name in fields if name != self.mask_field]

    def heads(self, observations: Sequence[Observation]) -> list[np.ndarray]:
        """The model's heads for a batch of observations, one row each (the observation that holds
        the action mask under ``action_space.mask`` is left out of the model input, as the server
        leaves it out)."""
        if self.obs_space is None:
            return self.policy.forward(np.stack([_flat(obs, self.fields) for obs in observations])).heads
        if self.mask_key is None:
            return self.policy.forward(model_rows(self.obs_space, observations)).heads
        assert isinstance(self.obs_space, gs.Dict)
        rest = gs.Dict({k: v for k, v in self.obs_space.spaces.items() if k != self.mask_key})
        rows = model_rows(rest, [{k: obs[k] for k in rest.spaces} for obs in observations])  # type: ignore[index]
        return self.policy.forward(rows).heads


class ActingClient:
    """Actions from one policy (``policy=None``: the server's default policy); no training.

    Nothing is sent until the first call. Use it as a context manager, or call ``close()``.
    Not thread-safe: one client per thread or process. ``PolicyClient`` adds experience and
    training control.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        policy: str | None = None,
        inference: Inference = "local",
        refresh_every: int = 128,
        timeout: float = 10.0,
        max_retries: int = 8,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 5.0,
        seed: int | None = None,
        binary: bool | None = None,
    ) -> None:
        """
        Args:
            base_url: the server, with the schema's ``url_path`` if it has one.
            inference: ask the server for every action, or act here with downloaded weights.
            refresh_every: local inference checks the server's weight version every this many acts.
            binary: remote acting sends an observation array (not an object) as an ``.npy`` body
                (True), as JSON (False), or as ``.npy`` when it has more than ``BINARY_ABOVE``
                values (None): an 84×84×4 image is 28 kB of ``.npy``, ~100 kB of JSON text. Floats
                travel as float32, the models' precision; integers and bools as they are.
            max_retries: retries of a request after a connection error, 429 or 503.
            backoff_base_s, backoff_cap_s: retry ``k`` waits about ``min(cap, base * 2**k)``.
            seed: seed of local action sampling and of the retry jitter.
        """
        if inference not in ("remote", "local"):
            raise ValueError(f"inference must be 'remote' or 'local', not {inference!r}")
        self.inference = inference
        self.binary = binary
        self.policy = policy
        self.prefix = f"/policies/{policy}" if policy else ""
        self.refresh_every = refresh_every
        self.stats = ClientStats()
        self.algorithm: str | None = None
        """"ppo" or "dqn" for a trained policy, "" for one that is only served; None: not asked yet."""
        self.epsilon: float | None = None
        self.server_version: int | None = None
        self._http = HttpSession(base_url, api_key, timeout, max_retries, backoff_base_s, backoff_cap_s, seed,
                                on_retry=self._count_retry)
        self._rng = np.random.default_rng(seed)
        self._local: _LocalModel | None = None
        self._description: dict[str, Any] | None = None
        self._acts_since_check = 0
        self._last_act_version: int | None = None
        self.last_variant = "stable"
        """The policy's version that chose the last action: ``stable``, or ``canary`` (its candidate
        version, acting on the server); acting locally on the downloaded weights is acting with ``stable``."""
        self._episode_variant: str | None = None  # the policy's version that acts this episode (server-side acting)

    # --- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """``HttpSession.request``: retries connection errors, 429 and 503; raises
        PolicyClientError on any other error (a 304 is returned)."""
        return self._http.request(method, path, json=json, headers=headers, content=content)

    def _count_retry(self) -> None:
        self.stats.retries += 1

    def _get(self, path: str) -> dict[str, Any]:
        return self.request("GET", self.prefix + path).json()

    def _post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return self.request("POST", self.prefix + path, json=json, headers=headers).json()

    def _maybe_heartbeat(self) -> None:
        """Nothing: only a client that sends experience has a trainer to tell it is alive."""

    # --- acting ---------------------------------------------------------------------------

    def act(self, obs: Observation, action_mask: Sequence[bool] | np.ndarray | None = None) -> ActResult:
        """Choose an action for one observation: a flat vector or the schema's observation object,
        or an observation of the policy's ``observation_space``.

        A DQN policy acts epsilon-greedily with the server's epsilon (read from ``/train/status``
        at the first action, then kept up to date by ``register`` and its heartbeats); others
        sample from the policy.
        Never a masked action: the mask is the one the observation holds (``action_space.mask``;
        a Pathmind object's ``action_mask``) and ``action_mask`` (one bool per action, all
        components' side by side; sent as the request's ``action_mask``), an action allowed where
        both allow it; a DQN's random actions are drawn among the allowed ones.
        """
        if self.algorithm is None:
            self.algorithm = (self.describe().get("training") or {}).get("algorithm", "")
        mask = both(self._observation_mask(obs), action_mask)
        obs, action_mask = self._fold(obs, mask, action_mask)
        if self.inference == "local":
            result, self.last_variant = self._act_local([obs], [mask])[0], "stable"
        elif self.algorithm == "dqn":
            answer = self._predict(obs, "predict_deterministic", action_mask)
            result = self._epsilon_greedy(answer["action"], answer["model_version"], mask)
            self.last_variant = answer["variant"]
        else:
            answer = self._predict(obs, "predict", action_mask)
            result = ActResult(answer["action"], answer["log_prob"], answer["model_version"])
            self.last_variant = answer["variant"]
        self._last_act_version = result.model_version
        self._maybe_heartbeat()
        return result

    def act_batch(
        self, observations: Sequence[Observation], action_masks: Sequence[Sequence[bool] | np.ndarray] | None = None
    ) -> list[ActResult]:
        """Choose one action per observation with one request (``/predict/batch``, or the raw or
        deterministic batch form) or one local forward pass; as ``act`` otherwise (``action_masks``:
        one per observation, or None). The policy's version that answered is ``last_variant`` (one
        for the whole batch)."""
        if not observations:  # every sub-environment of a vector env resetting at once: nothing to ask
            return []
        if self.algorithm is None:
            self.algorithm = (self.describe().get("training") or {}).get("algorithm", "")
        given = list(action_masks) if action_masks is not None else [None] * len(observations)
        masks = [both(self._observation_mask(obs), m) for obs, m in zip(observations, given, strict=True)]
        folded = [self._fold(obs, mask, m) for obs, mask, m in zip(observations, masks, given, strict=True)]
        observations = [obs for obs, _ in folded]
        sent = [None if m is None else np.asarray(m, dtype=bool).reshape(-1) for _, m in folded]
        width = next((len(m) for m in sent if m is not None), 0)
        action_masks = stacked(sent, width)  # a row whose object carries its mask: all allowed beside it
        if self.inference == "local":
            results, self.last_variant = self._act_local(observations, masks), "stable"
        else:
            endpoint = "predict_deterministic" if self.algorithm == "dqn" else "predict"
            answer = self._predict_batch(observations, endpoint, action_masks)
            version, self.last_variant = int(answer["model_version"]), answer["variant"]
            if self.algorithm == "dqn":
                results = [self._epsilon_greedy(row["action"], version, mask)
                           for row, mask in zip(answer["results"], masks, strict=True)]
            else:
                results = [ActResult(row["action"], row["log_prob"], version) for row in answer["results"]]
        self._last_act_version = results[-1].model_version if results else self._last_act_version
        self._maybe_heartbeat()
        return results

    def wire(self, obs: Observation) -> Any:
        """An observation as JSON: in the form of the policy's ``observation_space`` (nested lists
        of a Box's shape, an object for a Dict, ...), else ``wire_obs``."""
        space = self._obs_space
        return wire_obs(obs) if space is None else space_json(space, obs)

    @cached_property
    def _obs_space(self) -> gs.Space[Any] | None:
        return served_observation_space(self.describe())

    def _observation_mask(self, obs: Observation) -> np.ndarray | None:
        """The action mask ``obs`` holds, as the server reads it (``masks.observation_mask``)."""
        mask = self.describe().get("mask")
        keys = [mask] if mask else []
        return observation_mask(obs, keys if self._obs_space is not None else [*keys, "action_mask"])

    def _fold(self, obs: Observation, mask: np.ndarray | None, action_mask: Any) -> tuple[Observation, Any]:
        """A Pathmind observation object carries a given ``action_mask`` as its mask field (the
        schema's ``action_space.mask``, else ``action_mask``): the server reads the one mask the
        client acts on. Anything else keeps it beside (sent as the request's ``action_mask``)."""
        if action_mask is None or mask is None or self._obs_space is not None or not isinstance(obs, Mapping):
            return obs, action_mask
        return {**obs, self._mask_field(): mask.tolist()}, None

    def _mask_field(self) -> str:
        """The field of a Pathmind observation object that carries the action mask."""
        return str(self.describe().get("mask") or "action_mask")

    def _predict(self, obs: Observation, endpoint: str, action_mask: Any = None) -> dict[str, Any]:
        # an episode begun by one version of a policy with a candidate stays with it
        pin = {"X-Policy-Version": self._episode_variant} if self._episode_variant else None
        masked = {} if action_mask is None else {"action_mask": plain(np.asarray(action_mask, dtype=bool))}
        if self._obs_space is not None:
            return self._post(f"/{endpoint}", {"obs": self.wire(obs)} | masked, pin)
        if isinstance(obs, Mapping):
            return self._post(f"/{endpoint}", wire_obs(obs) | masked, pin)
        array = np.asarray(obs)
        if not masked and (self.binary or (self.binary is None and array.size > BINARY_ABOVE)):
            headers = (pin or {}) | {"content-type": NPY}
            path = f"{self.prefix}/{'predict_raw' if endpoint == 'predict' else endpoint}"
            return self.request("POST", path, headers=headers, content=npy_obs(array)).json()
        if endpoint == "predict":
            return self._post("/predict_raw", {"obs": wire_obs(obs)} | masked, pin)
        # no raw form of the deterministic endpoint: the batch form takes flat vectors
        carried = {self._mask_field(): masked["action_mask"]} if masked else {}
        answer = self._post(f"/{endpoint}/batch", {"observations": [self._as_object(obs) | carried]}, pin)
        return answer["results"][0] | {"model_version": answer["model_version"], "variant": answer["variant"]}

    def _predict_batch(self, observations: Sequence[Observation], endpoint: str, action_masks: Any = None) -> dict[str, Any]:
        """One batch request for ``observations`` (no version pinned: a batch is one variant's);
        ``action_masks``: one per observation (None: none sent)."""
        masks = None if action_masks is None else [plain(np.asarray(m, dtype=bool)) for m in action_masks]
        masked = {} if masks is None else {"action_mask": masks}
        if self._obs_space is not None:
            return self._post(f"/{endpoint}/batch", {SPACE_BATCH_KEY: [self.wire(obs) for obs in observations]} | masked)
        if endpoint == "predict" and not any(isinstance(obs, Mapping) for obs in observations):
            return self._post("/predict_raw/batch", {"obs": [wire_obs(obs) for obs in observations]} | masked)
        # an object carries its own mask (``_fold``); a vector made an object carries the one given
        given = masks or [None] * len(observations)
        objects = [wire_obs(obs) if isinstance(obs, Mapping)
                   else self._as_object(obs) | ({} if m is None else {self._mask_field(): m})
                   for obs, m in zip(observations, given, strict=True)]
        return self._post(f"/{endpoint}/batch", {"observations": objects})

    def _as_object(self, obs: Observation) -> dict[str, Any]:
        """A flat vector as the schema's observation object (remote DQN on a raw vector)."""
        flat, out, i = wire_obs(obs), {}, 0
        for name, (kind, width) in self.describe()["fields"].items():
            cast = {"int": int, "bool": bool}.get(kind.removeprefix("List[").removesuffix("]"), float)
            out[name] = cast(flat[i]) if width is None else [cast(v) for v in flat[i : i + width]]
            i += width or 1
        return out

    def _act_local(self, observations: Sequence[Observation], masks: list[np.ndarray | None]) -> list[ActResult]:
        """Actions for a batch of observations from one forward pass of the local model, never a
        masked one (``masks``: each observation's, None: every action allowed)."""
        if self._local is None:
            self.load_model()
        elif self._acts_since_check >= self.refresh_every:
            self.refresh()
        self._acts_since_check += 1
        local = self._local
        assert local is not None
        heads, version = local.heads(observations), local.policy.version
        mask = stacked(masks, local.space.mask_width)
        if self.algorithm == "dqn":
            return [self._epsilon_greedy(greedy.action, version, row)  # type: ignore[arg-type]
                    for greedy, row in zip(local.space.mode(heads, mask), masks, strict=True)]
        return [ActResult(s.action, s.log_prob, version) for s in local.space.sample(heads, self._rng, mask)]

    def _epsilon_greedy(self, greedy: int | list[int], version: int, mask: np.ndarray | None = None) -> ActResult:
        """With probability epsilon a uniformly random allowed action, else the greedy one, and its
        log-prob under that behaviour policy (``masks.epsilon_greedy``)."""
        if self.epsilon is None:  # neither registered nor heartbeat yet: the trainer's epsilon now
            self.epsilon = float(self._get("/train/status").get("exploration", {}).get("epsilon", 0.0))
        action, log_prob = epsilon_greedy(greedy, self._action_sizes(), self.epsilon, self._rng, mask)
        return ActResult(action, log_prob, version)

    def _action_sizes(self) -> list[int]:
        space = self.describe()["action_space"]
        if space["type"] == "discrete":
            return [int(space["n"])]
        if space["type"] in ("tuple", "multi_discrete"):
            return [int(n) for n in space["nvec"]]
        raise PolicyClientError(None, "unsupported", "epsilon-greedy needs a discrete or tuple action space")

    # --- the policy and its weights -------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The policy as the server resolved it: its ``name``, ``obs_dim``, ``action_space`` (sizes from the
        model), ``observations`` (field names in input order), ``fields`` (name → (type,
        columns), columns None for a scalar), ``observation_space`` (the schema's YAML form, None
        with Pathmind ``observations``), ``mask`` (the observation holding the action mask, or
        None) and ``training`` (the schema's section, or None)."""
        if self._description is None:
            status = self.request("GET", "/").json()
            name = self.policy or status["default_policy"]
            described = dict(status["policies"][name])
            schema = self.request("GET", "/schema").json()["policies"][name]
            described["fields"] = _fields(schema.get("observations") or {}, described["obs_dim"])
            described["training"] = schema.get("training")
            described["observation_space"] = schema.get("observation_space")
            described["name"] = name
            described["mask"] = (schema.get("action_space") or {}).get("mask")
            self._description = described
        return self._description

    def load_model(self) -> None:
        """Download the model and its current weights (local inference)."""
        response = self.request("GET", self.prefix + "/model")
        fmt = response.headers.get("X-Model-Format", "export")
        if fmt not in ("export", "torchscript"):
            raise PolicyClientError(None, "unsupported", f"unknown model format {fmt!r} from the server")
        description = self.describe()
        policy = TorchPolicy(load_module(response.content, fmt), version=-1)  # type: ignore[arg-type]
        fields = description["observations"] if description.get("observations") else []
        self._local = _LocalModel(policy, _space(description["action_space"]), fields, self._obs_space,
                                  description.get("mask"))
        self.refresh()

    def refresh(self) -> bool:
        """Fetch the server's weights if its version differs from the local one; True if it did."""
        if self._local is None:
            self.load_model()
            return True
        self._acts_since_check = 0
        policy = self._local.policy
        headers = {"If-None-Match": f'"{policy.version}"'} if policy.version >= 0 else None
        response = self.request("GET", self.prefix + "/weights", headers=headers)
        if response.status_code == 304:
            return False
        body = response.json()
        policy.set_weights(decode_weights(body["weights"]), int(body["model_version"]))
        self.server_version = max(self.server_version or 0, policy.version)
        self.stats.weight_refreshes += 1
        return True

    @property
    def local_version(self) -> int | None:
        """The version of the local weights (local inference), None before the first download."""
        return None if self._local is None else self._local.policy.version

    def version(self) -> int:
        """The version of the weights the server serves now."""
        return int(self._get("/version")["model_version"])


# --- conversions ------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """numpy scalars and arrays → JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def wire_obs(obs: Observation) -> Any:
    """An observation as JSON: an object stays an object, anything else a flat float list."""
    if isinstance(obs, Mapping):
        return {str(k): plain(v) for k, v in obs.items()}
    return np.asarray(obs, dtype=np.float64).ravel().tolist()


def npy_obs(obs: np.ndarray) -> bytes:
    """An observation as an ``.npy`` body: the model's input row (flat, as today's models take it),
    floats as float32 (the server refuses float64: it would round), integers and bools as they are."""
    array = obs.ravel()
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def wire_action(action: Any) -> ActionValue:
    """An action (numpy or plain) as JSON: an int or a list."""
    value = plain(action)
    return value if isinstance(value, (int, list)) else int(value)


def _flat(obs: Observation, fields: list[str]) -> np.ndarray:
    """An observation as the model's input row, float32; objects in schema field order."""
    if not isinstance(obs, Mapping):
        return np.asarray(obs, dtype=np.float32).ravel()
    values: list[float] = []
    for name in fields:
        value = obs[name]
        values.extend(np.asarray(value, dtype=np.float32).ravel().tolist())
    return np.asarray(values, dtype=np.float32)


def _fields(observations: Mapping[str, Mapping[str, Any]], obs_dim: int) -> dict[str, tuple[str, int | None]]:
    """Type and columns of each observation field (None: a scalar); one open list takes the rest."""
    fields: dict[str, tuple[str, int | None]] = {}
    for name, spec in observations.items():
        kind = str(spec["type"])
        fixed = spec.get("min_items") if spec.get("min_items") == spec.get("max_items") else None
        fields[name] = (kind, (fixed if fixed is not None else -1) if kind.startswith("List") else None)
    for name, (kind, width) in fields.items():
        if width == -1:
            taken = sum(w or 1 for n, (_, w) in fields.items() if n != name)
            fields[name] = (kind, obs_dim - taken)
    return fields


def _space(description: Mapping[str, Any]) -> ActionSpace:
    """The action space from its resolved description (``GET /``: sizes are the model's)."""
    kind = description["type"]
    if kind == "discrete":
        return DiscreteSpace(int(description["n"]), description.get("names"))
    if kind in ("tuple", "multi_discrete"):
        return TupleSpace([int(n) for n in description["nvec"]], description.get("names"), kind=kind)
    if kind == "multi_binary":
        return MultiBinarySpace(int(description["n"]))
    dim = int(np.prod(description["shape"]))
    return BoxSpace(dim, _bounds(description["low"], -np.inf), _bounds(description["high"], np.inf),
                    description.get("squash", "clip"))


def _bounds(values: list[float | None], unbounded: float) -> np.ndarray:
    """Bounds as ``GET /`` writes them (None where infinite) → a float array."""
    return np.array([unbounded if v is None else v for v in values], dtype=np.float64)
