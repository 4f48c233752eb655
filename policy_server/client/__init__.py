"""A Python client for one policy of a policy-server: act, send experience, control training.

The counterpart of RLlib's ``PolicyClient``, over the server's plain JSON API (never pickles)::

    client = PolicyClient("http://127.0.0.1:8000", api_key="...", inference="local")
    stats = run_env(client, gym.make("CartPole-v1"), max_episodes=10)

* **Inference.** ``remote``: every action comes from ``POST /predict`` (or ``/predict_raw`` for a
  flat vector). ``local``: the client downloads the model once (``GET /model``) and its weights
  (``GET /weights``), samples actions itself with the server's own action-space maths (so the
  ``log_prob`` is the one ``/predict`` would return), and refreshes the weights when the server
  publishes a new version. For a DQN policy, actions are epsilon-greedy with the server's epsilon.
* **Binary bodies.** With remote inference an observation array travels as an ``.npy`` body
  (``binary=True``, or above ``acting.BINARY_ABOVE`` values with ``binary=None``, the default): an
  84×84×4 image is 28 kB instead of ~100 kB of JSON text. Answers stay JSON.
* **Experience.** ``log_step`` gathers consecutive steps into fragments (one model version each,
  cut where an episode ends) and posts them to ``/train/experience`` every ``fragment_steps``
  steps.
* **Failures.** Connection errors, 429 and 503 are retried with exponential backoff and jitter
  (``Retry-After`` is honoured); every other error raises ``PolicyClientError`` at once, carrying
  the server's error envelope.

Modules: ``http`` (the session, its retries, the error envelope), ``acting`` (``ActingClient``:
actions, the model and its weights), ``experience`` (``PolicyClient``: experience fragments and
training control), ``env`` (``run_env``, the Gymnasium loop).

Imports only numpy, httpx, torch and policy-server's model modules (no Ray, no FastAPI).
"""

from policy_server.client.acting import ActingClient, ActResult, ClientStats
from policy_server.client.env import EnvStats, run_env
from policy_server.client.experience import PolicyClient
from policy_server.client.http import ErrorEnvelope, PolicyClientError, error_envelope
from policy_server.client.spaces import SpaceMismatch

__all__ = [
    "ActResult",
    "ActingClient",
    "ClientStats",
    "EnvStats",
    "ErrorEnvelope",
    "PolicyClient",
    "PolicyClientError",
    "SpaceMismatch",
    "error_envelope",
    "run_env",
]
