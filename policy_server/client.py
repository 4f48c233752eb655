"""A Python client for one policy of a policy-server: act, send experience, control training.

The counterpart of RLlib's ``PolicyClient``, over the server's plain JSON API (never pickles)::

    client = PolicyClient("http://127.0.0.1:8000", api_key="...", inference="local")
    stats = run_env(client, gym.make("CartPole-v1"), max_episodes=10)

* **Inference.** ``remote``: every action comes from ``POST /predict`` (or ``/predict_raw`` for a
  flat vector). ``local``: the client downloads the model once (``GET /model``) and its weights
  (``GET /weights``), samples actions itself with the server's own action-space maths (so the
  ``log_prob`` is the one ``/predict`` would return), and refreshes the weights when the server
  publishes a new version. For a DQN policy, actions are epsilon-greedy with the server's epsilon.
* **Experience.** ``log_step`` gathers consecutive steps into fragments (one model version each,
  cut where an episode ends) and posts them to ``/train/experience`` every ``fragment_steps``
  steps.
* **Failures.** Connection errors, 429 and 503 are retried with exponential backoff and jitter
  (``Retry-After`` is honoured); every other error raises ``PolicyClientError`` at once, carrying
  the server's error envelope.

Imports only numpy, httpx, torch and policy-server's model modules (no Ray, no FastAPI).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Self

import httpx
import numpy as np

from policy_server.policies.codec import decode_weights
from policy_server.policies.spaces import ActionSpace, BoxSpace, DiscreteSpace, TupleSpace
from policy_server.policies.torch_policy import TorchPolicy, load_module

Inference = Literal["remote", "local"]
ActionValue = int | list[int] | list[float]
Observation = Sequence[float] | np.ndarray | Mapping[str, Any]
RETRY_STATUSES = (429, 503)

__all__ = [
    "ActResult",
    "ClientStats",
    "EnvStats",
    "PolicyClient",
    "PolicyClientError",
    "run_env",
]


class PolicyClientError(Exception):
    """The server refused a request (its error envelope), or could not be reached.

    ``status`` is the HTTP status, or None when no answer came (``code`` "connection_error");
    ``code``, ``message`` and ``fields`` are the server's envelope.
    """

    def __init__(
        self, status: int | None, code: str, message: str, fields: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status, self.code, self.message, self.fields = status, code, message, fields or []

    @classmethod
    def from_response(cls, response: httpx.Response) -> PolicyClientError:
        try:
            error = response.json()["error"]
            return cls(response.status_code, error["code"], error["message"], error.get("fields"))
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, "http_error", response.text[:500] or response.reason_phrase)


class ActResult(NamedTuple):
    """One chosen action, the log-probability of choosing it, and the model version that chose it."""

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


@dataclass
class _Fragment:
    """Consecutive steps acted by one model version: T+1 observations for T steps."""

    model_version: int
    observations: list[Any]
    actions: list[ActionValue] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    log_probs: list[float | None] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False

    def wire(self) -> dict[str, Any]:
        known = None if any(lp is None for lp in self.log_probs) else self.log_probs
        return {
            "model_version": self.model_version,
            "observations": self.observations,
            "actions": self.actions,
            "rewards": self.rewards,
            "log_probs": known,
            "terminated": self.terminated,
            "truncated": self.truncated,
        }


class _LocalModel:
    """The policy's model in this process: forward passes and the server's action-space maths."""

    def __init__(self, policy: TorchPolicy, space: ActionSpace, fields: list[str]) -> None:
        self.policy, self.space, self.fields = policy, space, fields

    def heads(self, obs: Observation) -> list[np.ndarray]:
        return self.policy.forward(_flat(obs, self.fields)[None]).heads


class PolicyClient:
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
    ) -> None:
        """
        Args:
            base_url: the server, with the schema's ``url_path`` if it has one.
            inference: ask the server for every action, or act here with downloaded weights.
            client_id: this client's id for training; None lets the server make one.
            fragment_steps: steps per experience post; local weights are checked this often.
            max_retries: retries of a request after a connection error, 429 or 503.
            backoff_base_s, backoff_cap_s: retry ``k`` waits about ``min(cap, base * 2**k)``.
            wait_for_training_s: how long experience waits for paused training to run again.
            seed: seed of local action sampling and of the retry jitter.
            info: sent to the server when registering (shown in its client list).
        """
        if fragment_steps < 1:
            raise ValueError(f"fragment_steps must be at least 1, not {fragment_steps}")
        if inference not in ("remote", "local"):
            raise ValueError(f"inference must be 'remote' or 'local', not {inference!r}")
        self.inference = inference
        self.policy = policy
        self.prefix = f"/policies/{policy}" if policy else ""
        self.client_id = client_id
        self.fragment_steps = fragment_steps
        self.max_retries, self.backoff_base_s, self.backoff_cap_s = max_retries, backoff_base_s, backoff_cap_s
        self.wait_for_training_s = wait_for_training_s
        self.info = info
        self.stats = ClientStats()
        self.algorithm: str | None = None
        """"ppo" or "dqn" for a trained policy, "" for one that is only served; None: not asked yet."""
        self.training_state: str | None = None
        self.epsilon: float | None = None
        self.server_version: int | None = None
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"access-token": api_key} if api_key else {},
            timeout=timeout,
        )
        self._rng = np.random.default_rng(seed)
        self._jitter = random.Random(seed)
        self._local: _LocalModel | None = None
        self._description: dict[str, Any] | None = None
        self._acts_since_check = 0
        self._registered = False
        self._heartbeat_interval_s = 10.0
        self._last_contact = 0.0
        self._open: _Fragment | None = None
        self._closed: list[_Fragment] = []
        self._last_act_version: int | None = None
        self._last_next_obs: Any = None

    # --- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """Send one request, retrying connection errors, 429 and 503; raise on any other error.

        A 304 is returned, not raised. Raises PolicyClientError after the last retry. A request
        whose answer was lost (a read timeout) is sent again, so the server may get an experience
        post twice.
        """
        for attempt in range(self.max_retries + 1):
            last_try = attempt == self.max_retries
            try:
                response = self._http.request(method, path, json=json, headers=headers)
            except httpx.TransportError as exc:
                if last_try:
                    raise PolicyClientError(None, "connection_error", f"{method} {path}: {exc!r}") from exc
                self._sleep_before_retry(attempt, None)
                continue
            if response.status_code < 400:
                return response
            if response.status_code not in RETRY_STATUSES or last_try:
                raise PolicyClientError.from_response(response)
            self._sleep_before_retry(attempt, _retry_after(response))
        raise AssertionError("unreachable")

    def _sleep_before_retry(self, attempt: int, retry_after: float | None) -> None:
        """Equal jitter: half the exponential delay, plus up to as much again at random."""
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2**attempt)
        self.stats.retries += 1
        time.sleep(max(retry_after or 0.0, delay / 2 + self._jitter.uniform(0, delay / 2)))

    def _get(self, path: str) -> dict[str, Any]:
        return self.request("GET", self.prefix + path).json()

    def _post(self, path: str, json: Any = None) -> dict[str, Any]:
        return self.request("POST", self.prefix + path, json=json).json()

    # --- inference ------------------------------------------------------------------------

    def act(self, obs: Observation) -> ActResult:
        """Choose an action for one observation: a flat vector or the schema's observation object.

        A DQN policy acts epsilon-greedily (the server's epsilon); others sample from the policy.
        """
        if self.algorithm is None:
            self.algorithm = (self.describe().get("training") or {}).get("algorithm", "")
        if self.inference == "local":
            result = self._act_local(obs)
        elif self.algorithm == "dqn":
            answer = self._predict(obs, "predict_deterministic")
            result = self._epsilon_greedy(answer["action"], answer["model_version"])
        else:
            answer = self._predict(obs, "predict")
            result = ActResult(answer["action"], answer["log_prob"], answer["model_version"])
        self._last_act_version = result.model_version
        self._maybe_heartbeat()
        return result

    def _predict(self, obs: Observation, endpoint: str) -> dict[str, Any]:
        if isinstance(obs, Mapping):
            return self._post(f"/{endpoint}", _wire_obs(obs))
        if endpoint == "predict":
            return self._post("/predict_raw", {"obs": _wire_obs(obs)})
        # no raw form of the deterministic endpoint: the batch form takes flat vectors
        answer = self._post(f"/{endpoint}/batch", {"observations": [self._as_object(obs)]})
        return answer["results"][0] | {"model_version": answer["model_version"]}

    def _as_object(self, obs: Observation) -> dict[str, Any]:
        """A flat vector as the schema's observation object (remote DQN on a raw vector)."""
        flat, out, i = _wire_obs(obs), {}, 0
        for name, (kind, width) in self.describe()["fields"].items():
            cast = {"int": int, "bool": bool}.get(kind.removeprefix("List[").removesuffix("]"), float)
            out[name] = cast(flat[i]) if width is None else [cast(v) for v in flat[i : i + width]]
            i += width or 1
        return out

    def _act_local(self, obs: Observation) -> ActResult:
        if self._local is None:
            self.load_model()
        elif self._acts_since_check >= self.fragment_steps:
            self.refresh()
        self._acts_since_check += 1
        local = self._local
        assert local is not None
        heads = local.heads(obs)
        if self.algorithm == "dqn":
            return self._epsilon_greedy(local.space.mode(heads)[0].action, local.policy.version)
        sample = local.space.sample(heads, self._rng)[0]
        return ActResult(sample.action, sample.log_prob, local.policy.version)

    def _epsilon_greedy(self, greedy: ActionValue, version: int) -> ActResult:
        """With probability epsilon a uniformly random action, else the greedy one; the log-prob
        is that of the behaviour policy: ``eps / |A| + (1 - eps) [a = greedy]``."""
        eps = self.epsilon or 0.0
        sizes = self._action_sizes()
        action: ActionValue = greedy
        if self._rng.random() < eps:
            drawn = [int(self._rng.integers(n)) for n in sizes]
            action = drawn[0] if isinstance(greedy, int) else drawn
        p = eps / float(np.prod(sizes)) + (1 - eps) * (action == greedy)
        return ActResult(action, float(np.log(p)), version)

    def _action_sizes(self) -> list[int]:
        space = self.describe()["action_space"]
        if space["type"] == "discrete":
            return [int(space["n"])]
        if space["type"] == "tuple":
            return [int(n) for n in space["nvec"]]
        raise PolicyClientError(None, "unsupported", "epsilon-greedy needs a discrete or tuple action space")

    def describe(self) -> dict[str, Any]:
        """The policy as the server resolved it: ``obs_dim``, ``action_space`` (sizes from the
        model), ``observations`` (field names in input order), ``fields`` (name → (type,
        columns), columns None for a scalar) and ``training`` (the schema's section, or None)."""
        if self._description is None:
            status = self.request("GET", "/").json()
            name = self.policy or status["default_policy"]
            described = dict(status["policies"][name])
            schema = self.request("GET", "/schema").json()["policies"][name]
            described["fields"] = _fields(schema.get("observations") or {}, described["obs_dim"])
            described["training"] = schema.get("training")
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
        self._local = _LocalModel(policy, _space(description["action_space"]), fields)
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

    # --- training: registration, experience -----------------------------------------------

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
    ) -> None:
        """Record one environment step; posts experience every ``fragment_steps`` steps.

        ``model_version`` is the version that chose ``action`` (default: that of the last
        ``act``). A step that does not continue the previous one (``obs`` differs from its
        ``next_obs``) or was acted by another version starts a new fragment.
        """
        if not self._registered:
            self.register()
        version = model_version if model_version is not None else self._last_act_version
        if version is None:
            raise ValueError("log_step needs the model_version that acted (no act() call yet)")
        frag = self._open
        # run_env hands the previous next_obs back as obs: then it is converted and continuous already
        follows = frag is not None and obs is self._last_next_obs
        wire_obs = frag.observations[-1] if follows else _wire_obs(obs)  # type: ignore[union-attr]
        if frag is not None and (frag.model_version != version or not (follows or frag.observations[-1] == wire_obs)):
            self._close_open()
            frag = None
        if frag is None:
            frag = self._open = _Fragment(version, [wire_obs])
        frag.observations.append(_wire_obs(next_obs))
        self._last_next_obs = next_obs
        frag.actions.append(_wire_action(action))
        frag.rewards.append(float(reward))
        frag.log_probs.append(None if log_prob is None else float(log_prob))
        self.stats.steps_logged += 1
        if terminated or truncated:
            frag.terminated, frag.truncated = bool(terminated), bool(truncated) and not terminated
            self._close_open()
        if self.pending_steps >= self.fragment_steps:
            self.flush()
        else:
            self._maybe_heartbeat()

    @property
    def pending_steps(self) -> int:
        """Steps logged but not yet posted."""
        return sum(len(f.rewards) for f in self._closed) + (len(self._open.rewards) if self._open else 0)

    def _close_open(self) -> None:
        if self._open is not None and self._open.rewards:
            self._closed.append(self._open)
        self._open = None

    def flush(self) -> dict[str, Any] | None:
        """Post every pending step now; returns the server's answer (None if nothing was pending).

        When every step is stale (409 stale_samples), the steps are dropped, the local weights
        refreshed, and ``stats.stale_posts`` counted. When training is paused or stopped (409
        training_not_running), the steps are dropped too (they would be stale when training runs
        again) and the call waits, polling the heartbeat, until it runs again; after
        ``wait_for_training_s`` it raises the 409.
        """
        self._close_open()
        fragments, self._closed = self._closed, []
        if not fragments:
            return None
        steps = sum(len(f.rewards) for f in fragments)
        body = {"client_id": self.client_id, "fragments": [f.wire() for f in fragments]}
        try:
            answer = self._post("/train/experience", body)
        except PolicyClientError as exc:
            if exc.status != 409 or exc.code not in ("stale_samples", "training_not_running"):
                raise
            self.stats.dropped_steps += steps
            if exc.code == "stale_samples":
                self.stats.stale_posts += 1
                if self.inference == "local":
                    self.refresh()
            else:
                self._wait_for_training(exc)
            return None
        self.stats.posts += 1
        self.stats.samples_accepted += int(answer.get("accepted", 0))
        self.stats.samples_rejected += int(answer.get("rejected", 0))
        self._note_training(answer)
        if self.inference == "local" and self._local is not None:
            self._acts_since_check = 0  # the answer told the version: no need to ask
            if self.server_version != self._local.policy.version:
                self.refresh()
        return answer

    def _wait_for_training(self, refused: PolicyClientError) -> None:
        self.stats.not_running_waits += 1
        deadline = time.monotonic() + self.wait_for_training_s
        attempt = 0
        while self.heartbeat().get("state") != "running":
            if time.monotonic() >= deadline:
                raise refused
            delay = min(self.backoff_cap_s, self.backoff_base_s * 2**attempt)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
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

    def version(self) -> int:
        """The version of the weights the server serves now."""
        return int(self._get("/version")["model_version"])


# --- the environment loop -----------------------------------------------------------------------


@dataclass
class EnvStats:
    """What ``run_env`` played."""

    steps: int = 0
    episodes: int = 0
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    def mean_return(self, last: int | None = None) -> float | None:
        window = self.returns[-last:] if last else self.returns
        return float(np.mean(window)) if window else None


def run_env(
    client: PolicyClient,
    env: Any,
    max_steps: int | None = None,
    max_episodes: int | None = None,
    stop: Callable[[], bool] | None = None,
    seed: int | None = None,
    on_episode: Callable[[EnvStats], None] | None = None,
    train: bool = True,
) -> EnvStats:
    """Play a Gymnasium environment with the client's policy, sending the experience.

    Runs until ``max_steps`` steps, ``max_episodes`` episodes, or ``stop()`` is true (checked
    every step), whichever comes first; then flushes. ``seed`` seeds the first ``reset``;
    ``on_episode`` is called with the stats after each episode. ``train=False`` only acts.
    """
    stats, start = EnvStats(), time.monotonic()
    obs, _ = env.reset(seed=seed)
    ep_return, ep_len = 0.0, 0
    while not (
        (max_steps is not None and stats.steps >= max_steps)
        or (max_episodes is not None and stats.episodes >= max_episodes)
        or (stop is not None and stop())
    ):
        action, log_prob, version = client.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(_env_action(action))
        if train:
            client.log_step(obs, action, float(reward), terminated, truncated, next_obs, log_prob, version)
        stats.steps += 1
        ep_return, ep_len = ep_return + float(reward), ep_len + 1
        if terminated or truncated:
            stats.episodes += 1
            stats.returns.append(ep_return)
            stats.lengths.append(ep_len)
            ep_return, ep_len = 0.0, 0
            if on_episode is not None:
                on_episode(stats)
            obs, _ = env.reset()
        else:
            obs = next_obs
    if train:
        client.flush()
    stats.wall_s = time.monotonic() - start
    return stats


# --- conversions ------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars and arrays → JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _wire_obs(obs: Observation) -> Any:
    """An observation as JSON: an object stays an object, anything else a flat float list."""
    if isinstance(obs, Mapping):
        return {str(k): _plain(v) for k, v in obs.items()}
    return np.asarray(obs, dtype=np.float64).ravel().tolist()


def _wire_action(action: Any) -> ActionValue:
    plain = _plain(action)
    return plain if isinstance(plain, (int, list)) else int(plain)


def _env_action(action: ActionValue) -> Any:
    return np.asarray(action) if isinstance(action, list) else action


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
    if kind == "tuple":
        return TupleSpace([int(n) for n in description["nvec"]], description.get("names"))
    dim = int(np.prod(description["shape"]))
    return BoxSpace(dim, _bounds(description["low"], -np.inf), _bounds(description["high"], np.inf))


def _bounds(values: list[float | None], unbounded: float) -> np.ndarray:
    """Bounds as ``GET /`` writes them (None where infinite) → a float array."""
    return np.array([unbounded if v is None else v for v in values], dtype=np.float64)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
