"""Request ids: answered in ``X-Request-ID`` (the client's own when valid), and seen by the
services through ``request_ids.current`` with the episode id (a bare Starlette app, in-process)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from policy_server.gateway.request_ids import RequestIds, asker, current


async def who(request: Request) -> JSONResponse:
    a = asker(client_id="c")
    return JSONResponse({"request_id": a.request_id, "endpoint": a.endpoint, "episode_id": a.episode_id,
                         "client_id": a.client_id})


def client() -> TestClient:
    app = Starlette(routes=[Route("/predict/batch", who, methods=["POST"])])
    app.add_middleware(RequestIds)
    return TestClient(app)


def test_every_answer_names_its_request_and_the_service_sees_it() -> None:
    with client() as c:
        answers = [c.post("/predict/batch") for _ in range(2)]
    ids = [a.headers["x-request-id"] for a in answers]
    assert ids[0] != ids[1] and all(len(i) == 32 for i in ids)
    assert answers[0].json() == {"request_id": ids[0], "endpoint": "/predict/batch", "episode_id": None, "client_id": "c"}


def test_a_clients_own_ids_are_kept_when_valid_and_replaced_when_not() -> None:
    with client() as c:
        mine = c.post("/predict/batch", headers={"X-Request-ID": "step-41.a:b", "X-Episode-ID": "ep_7"})
        bad = c.post("/predict/batch", headers={"X-Request-ID": "a/b", "X-Episode-ID": "x" * 129})
    assert mine.headers["x-request-id"] == "step-41.a:b" and mine.json()["episode_id"] == "ep_7"
    assert bad.headers["x-request-id"] != "a/b" and bad.json()["episode_id"] is None  # `/` would break a ref


def test_outside_a_request_there_is_a_fresh_id() -> None:
    assert current().request_id != current().request_id and current().path == ""
