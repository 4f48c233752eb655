"""The client's HTTP layer: the error envelope read once, and a real server's refusals and outages
(errors raised at once, connection errors, 429 and 503 retried with backoff)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from socket import socket
from typing import Any

import httpx
import pytest
import uvicorn
from client_support import AUTH, local_app, serving_server
from conftest import API_KEY, multi_policy_schema, running_server

from policy_server.client import PolicyClient, PolicyClientError
from policy_server.client.http import ErrorEnvelope, error_envelope
from policy_server.net import bound_socket

ENVELOPE = {"error": {"code": "invalid_request", "status": 422, "message": "invalid request: body.x: bad",
                      "fields": [{"field": "body.x", "message": "bad"}]}}


# --- the error envelope -------------------------------------------------------------------------


def test_the_envelope_is_read_with_its_fields() -> None:
    envelope = error_envelope(httpx.Response(422, json=ENVELOPE))
    assert envelope == ErrorEnvelope(422, "invalid_request", "invalid request: body.x: bad",
                                     [{"field": "body.x", "message": "bad"}])
    no_fields = {"error": {"code": "not_found", "message": "no"}}
    assert error_envelope(httpx.Response(404, json=no_fields)).fields == []


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(502, text="  <html>bad gateway</html>\n"), "<html>bad gateway</html>"),
        (httpx.Response(500, json={"detail": "Internal Server Error"}), '{"detail":"Internal Server Error"}'),
        (httpx.Response(500, json={"error": "boom"}), '{"error":"boom"}'),
        (httpx.Response(500, json=["error"]), '["error"]'),
        (httpx.Response(503, json={"error": {"message": "no code"}}), '{"error":{"message":"no code"}}'),
        (httpx.Response(504), "Gateway Timeout"),
    ],
    ids=["html page", "other JSON", "error not an object", "a list", "no code", "empty body"],
)
def test_an_answer_that_is_not_the_envelope_is_an_http_error(response: httpx.Response, message: str) -> None:
    assert error_envelope(response) == ErrorEnvelope(response.status_code, "http_error", message, [])


def test_a_long_foreign_page_is_cut_to_500_characters() -> None:
    assert error_envelope(httpx.Response(502, text="x" * 2000)).message == "x" * 500


def test_the_client_error_carries_the_envelope() -> None:
    error = PolicyClientError.from_response(httpx.Response(422, json=ENVELOPE))
    assert (error.status, error.code) == (422, "invalid_request")
    assert error.fields == [{"field": "body.x", "message": "bad"}]
    assert str(error) == "422 invalid_request: invalid request: body.x: bad"


# --- a real server's refusals and outages -------------------------------------------------------


@pytest.fixture(scope="module")
def serving(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The discrete (lpoc, TorchScript), tuple and box policies; nothing trains."""
    with serving_server(model_dir, tmp_path_factory.mktemp("serving")) as url:
        yield url


def test_a_422_is_raised_at_once_with_the_servers_envelope(serving: str) -> None:
    with PolicyClient(serving, API_KEY, policy="box", inference="remote", max_retries=5) as client:
        with pytest.raises(PolicyClientError) as caught:
            client.act([0.1, 0.2])  # the policy takes 3 values
        assert caught.value.status == 422 and caught.value.code == "invalid_request"
        assert "at least 3 items" in caught.value.message and caught.value.fields
        assert client.stats.retries == 0


def test_a_wrong_key_is_a_403_without_retries(serving: str) -> None:
    with PolicyClient(serving, "wrong", policy="box", inference="remote") as client:
        with pytest.raises(PolicyClientError) as caught:
            client.act([0.1, 0.2, 0.3])
        assert caught.value.status == 403 and client.stats.retries == 0


def test_not_trainable_is_a_404(serving: str) -> None:
    with PolicyClient(serving, API_KEY, policy="box") as client:
        with pytest.raises(PolicyClientError) as caught:
            client.status()
        assert caught.value.status == 404 and caught.value.code == "not_trainable"


def url_of(sock: socket) -> str:
    host, port = sock.getsockname()
    return f"http://{host}:{port}"


@contextmanager
def server_started_later(app: Any, sock: socket, delay_s: float) -> Iterator[None]:
    """uvicorn on the bound ``sock``, started ``delay_s`` seconds from now in a thread (until then,
    connections are refused)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    def run() -> None:
        time.sleep(delay_s)
        server.run(sockets=[sock])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_retries_with_backoff_until_a_briefly_down_server_answers(model_dir: Path, tmp_path: Path) -> None:
    app = local_app(multi_policy_schema(model_dir), tmp_path)
    with bound_socket() as sock, server_started_later(app, sock, delay_s=1.0):
        client = PolicyClient(url_of(sock), API_KEY, policy="box", inference="remote",
                              max_retries=20, backoff_base_s=0.05, backoff_cap_s=0.5)
        start = time.monotonic()
        action, _, version = client.act([0.1, -0.3, 0.0])
        assert time.monotonic() - start >= 0.9 and client.stats.retries >= 3
        assert version == 0 and len(action) == 2
        client.close()


def test_a_503_while_a_policy_is_unavailable_is_retried_after_its_retry_hint(model_dir: Path, tmp_path: Path) -> None:
    app = local_app(multi_policy_schema(model_dir), tmp_path)
    with running_server(app) as url, PolicyClient(url, API_KEY, policy="box", max_retries=20,
                                                  backoff_base_s=0.05, backoff_cap_s=0.2) as client:
        service = app.state.services["box"]
        backend, service.backend = service.backend, None  # as while its deployment starts: 503
        unavailable = httpx.get(f"{url}/policies/box/version", headers=AUTH)
        assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "1"
        threading.Timer(1.5, lambda: setattr(service, "backend", backend)).start()
        start = time.monotonic()
        assert client.version() == 0
        assert client.stats.retries >= 2 and time.monotonic() - start >= 1.5  # waited as told, not 0.05 s


def test_gives_up_after_max_retries_with_a_connection_error() -> None:
    with bound_socket() as nobody_listens:  # bound, never listening: every connection is refused
        client = PolicyClient(url_of(nobody_listens), API_KEY, max_retries=2,
                              backoff_base_s=0.01, backoff_cap_s=0.02)
        with pytest.raises(PolicyClientError) as caught:
            client.version()
    assert caught.value.status is None and caught.value.code == "connection_error"
    assert client.stats.retries == 2
    client.close()
