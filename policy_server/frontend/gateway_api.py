"""``DemoClient``: the gateway's HTTP API as the streamlit demo calls it, and its errors as exceptions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from policy_server.client.http import error_envelope

KEY_HEADER = "access-token"


class DemoError(Exception):
    """Anything that kept the demo from getting an answer."""


class Unreachable(DemoError):
    """No server answers at the URL (refused, timed out, not HTTP)."""


@dataclass
class ServerError(DemoError):
    """The server answered with its error envelope ``{"error": {code, message, status, fields}}``."""

    status: int
    code: str
    message: str
    fields: list[dict[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServerError:
        """The envelope of an error answer (``http_error`` when it is not our envelope)."""
        return cls(*error_envelope(response))


def policy_path(policy: str, default_policy: str | None, endpoint: str) -> str:
    """``/predict`` for the default policy, ``/policies/<name>/predict`` for the others."""
    return f"/{endpoint}" if policy == default_policy else f"/policies/{policy}/{endpoint}"


class DemoClient:
    """The demo's calls to one server. ``base_url`` includes the schema's ``url_path`` if it has one.

    Every method returns the decoded JSON answer, or raises ``ServerError`` (the server's
    envelope) or ``Unreachable``.
    """

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {KEY_HEADER: api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in range(2):
            try:
                response = self._http.request(method, path, json=body)
                break
            except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                # a kept-alive connection the server closed: a GET is safe to send again, once
                if method != "GET" or attempt:
                    raise Unreachable(f"no answer from {self.base_url}: {exc!r}") from exc
            except httpx.TransportError as exc:
                raise Unreachable(f"no answer from {self.base_url}: {exc!r}") from exc
        if response.status_code >= 400:
            raise ServerError.from_response(response)
        return response.json()

    # --- the server ------------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether a server answers ``/health/live``."""
        try:
            return self._http.get("/health/live", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def schema(self) -> dict[str, Any]:
        """``GET /schema``: the policies' observations and action spaces, the LLM section (public)."""
        return self._call("GET", "/schema")

    def status(self) -> dict[str, Any]:
        """``GET /``: per policy the resolved action space and input width (public)."""
        return self._call("GET", "/")

    # --- policies --------------------------------------------------------------------------

    def predict(self, policy: str, default_policy: str | None, observation: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", policy_path(policy, default_policy, "predict"), observation)

    def distribution(self, policy: str, default_policy: str | None, observation: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", policy_path(policy, default_policy, "distribution"), observation)

    def training_status(self, policy: str) -> dict[str, Any]:
        return self._call("GET", f"/policies/{policy}/train/status")

    # --- LLM -------------------------------------------------------------------------------

    def llm_status(self, route_prefix: str = "llm") -> dict[str, Any]:
        return self._call("GET", f"/{route_prefix}/")

    def chat(self, messages: list[dict[str, str]], n: int, temperature: float, max_tokens: int,
             seed: int | None = None) -> dict[str, Any]:
        """OpenAI's chat completions with per-token logprobs (each token decoded to text)."""
        body = {"messages": messages, "n": n, "temperature": temperature, "max_tokens": max_tokens,
                "logprobs": True, "seed": seed}
        return self._call("POST", "/v1/chat/completions", body)

    def grpo_runs(self, route_prefix: str = "llm") -> list[dict[str, Any]]:
        return self._call("GET", f"/{route_prefix}/grpo/runs")["runs"]

    def grpo_status(self, run_id: str, route_prefix: str = "llm") -> dict[str, Any]:
        return self._call("GET", f"/{route_prefix}/grpo/runs/{run_id}")
