"""The HTTP API in-process (TestClient), with the policies run in the gateway (no Ray)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    API_KEY,
    BAD_POLICY_INPUTS,
    BIG_INT,
    BOX_OBS,
    LPOC_OBS,
    ODD_OBS,
    ONEHOT_OBS,
    TUPLE_OBS,
    free_port,
    inputs_schema,
    multi_policy_schema,
)
from fastapi.testclient import TestClient

from policy_server.fields import FLOAT32_LIMIT
from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
JSON = {"content-type": "application/json"}
LPOC_NAMES = ["up", "right", "down", "left"]


def make_client(schema: Path, **settings: Any) -> TestClient:
    base = {"schema_path": schema, "backend": "local", "gateway_metrics_port": 0, "seed": 0}
    return TestClient(build_app(Settings(**(base | settings))))


@pytest.fixture(scope="module")
def schema_path(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("schema") / "schema.yaml"
    path.write_text(yaml.safe_dump(multi_policy_schema(model_dir), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def client(schema_path: Path) -> Iterator[TestClient]:
    with make_client(schema_path, max_batch_observations=8, max_body_bytes=20_000) as c:
        yield c


def module_output(model_dir: Path, name: str, obs: list[list[float]]) -> list[np.ndarray]:
    module = TorchPolicy.from_file(model_dir / name).module
    out = module(torch.tensor(obs, dtype=torch.float32))
    heads = out if isinstance(out, (tuple, list)) else (out,)
    return [h.detach().numpy().astype(np.float64) for h in heads]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def lpoc_vector(obs: dict[str, Any]) -> list[float]:
    return [float(v) for v in obs.values()]


# --- discrete ------------------------------------------------------------------------------


def test_predict_answers_a_named_action_with_its_probability(client: TestClient) -> None:
    r = client.post("/predict", json=LPOC_OBS, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["action"] in range(4)
    assert body["action_name"] == LPOC_NAMES[body["action"]]
    assert body["probability"] == pytest.approx(math.exp(body["log_prob"]))
    assert body["model_version"] == 0


def test_distribution_is_the_exact_softmax_of_the_logits(client: TestClient, model_dir: Path) -> None:
    r = client.post("/distribution", json=LPOC_OBS, headers=AUTH)
    assert r.status_code == 200, r.text
    probs = r.json()["probabilities"]
    assert list(probs) == LPOC_NAMES
    expected = softmax(module_output(model_dir, "lpoc.pt", [lpoc_vector(LPOC_OBS)])[0][0])
    assert [probs[n] for n in LPOC_NAMES] == pytest.approx(expected, abs=1e-6)


def test_deterministic_is_the_argmax_of_the_distribution(client: TestClient) -> None:
    probs = client.post("/distribution", json=LPOC_OBS, headers=AUTH).json()["probabilities"]
    r = client.post("/predict_deterministic", json=LPOC_OBS, headers=AUTH).json()
    assert r["action_name"] == max(probs, key=probs.get)
    assert r["probability"] == pytest.approx(max(probs.values()))


def test_sampled_actions_follow_the_distribution(client: TestClient) -> None:
    probs = client.post("/distribution", json=LPOC_OBS, headers=AUTH).json()["probabilities"]
    n = 2000
    body = {"observations": [LPOC_OBS] * 8}
    counts = dict.fromkeys(LPOC_NAMES, 0)
    for _ in range(n // 8):
        for item in client.post("/predict/batch", json=body, headers=AUTH).json()["results"]:
            counts[item["action_name"]] += 1
    for name in LPOC_NAMES:
        assert counts[name] / n == pytest.approx(probs[name], abs=0.04)


def test_batch_forms_answer_every_observation_in_order(client: TestClient) -> None:
    other = LPOC_OBS | {"coordinates_0": 7, "is_up_free": False}
    body = {"observations": [LPOC_OBS, other, LPOC_OBS]}
    det = client.post("/predict_deterministic/batch", json=body, headers=AUTH).json()
    singles = [client.post("/predict_deterministic", json=o, headers=AUTH).json() for o in body["observations"]]
    assert [d["action"] for d in det["results"]] == [s["action"] for s in singles]
    dist = client.post("/distribution/batch", json=body, headers=AUTH).json()
    single = client.post("/distribution", json=other, headers=AUTH).json()
    assert dist["results"][1]["probabilities"] == pytest.approx(single["probabilities"])
    assert len(client.post("/predict/batch", json=body, headers=AUTH).json()["results"]) == 3


def test_predict_raw_checks_the_width(client: TestClient) -> None:
    ok = client.post("/predict_raw", json={"obs": lpoc_vector(LPOC_OBS)}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["action"] in range(4)
    bad = client.post("/predict_raw", json={"obs": [0.0] * 10}, headers=AUTH)
    assert bad.status_code == 422
    assert "11" in bad.json()["error"]["message"] and "10" in bad.json()["error"]["message"]
    batch = client.post("/predict_raw/batch", json={"obs": [lpoc_vector(LPOC_OBS)] * 5}, headers=AUTH)
    assert batch.status_code == 200 and len(batch.json()["results"]) == 5
    ragged = client.post("/predict_raw/batch", json={"obs": [[0.0] * 11, [0.0] * 12]}, headers=AUTH)
    assert ragged.status_code == 422
    assert ragged.json()["error"]["fields"][0]["field"] == "body.obs.1"


# --- tuple and box ---------------------------------------------------------------------------


def test_tuple_policy_answers_one_index_per_component(client: TestClient, model_dir: Path) -> None:
    base = "/policies/tuple"
    r = client.post(f"{base}/predict", json=TUPLE_OBS, headers=AUTH).json()
    assert len(r["action"]) == 2 and r["action"][0] in range(3) and r["action"][1] in range(2)
    dist = client.post(f"{base}/distribution", json=TUPLE_OBS, headers=AUTH).json()["components"]
    heads = module_output(model_dir, "tuple.pt2", [[0.5, 0.1, -0.2, 0.3]])
    for component, logits in zip(dist, heads):
        assert list(component.values()) == pytest.approx(softmax(logits[0]), abs=1e-6)
    joint = dist[0][str(r["action"][0])] * dist[1][str(r["action"][1])]
    assert r["probability"] == pytest.approx(joint, rel=1e-5)
    det = client.post(f"{base}/predict_deterministic", json=TUPLE_OBS, headers=AUTH).json()
    assert det["action"] == [int(np.argmax(h[0])) for h in heads]


def test_box_policy_answers_a_clipped_gaussian_action(client: TestClient, model_dir: Path) -> None:
    base = "/policies/box"
    mean, log_std = module_output(model_dir, "box.pt2", [[0.1, -0.3, 0.0]])
    dist = client.post(f"{base}/distribution", json=BOX_OBS, headers=AUTH).json()
    assert dist["mean"] == pytest.approx(mean[0], abs=1e-6)
    assert dist["std"] == pytest.approx(np.exp(log_std[0]), abs=1e-6)
    det = client.post(f"{base}/predict_deterministic", json=BOX_OBS, headers=AUTH).json()
    assert det["action"] == pytest.approx(np.clip(mean[0], -0.5, 0.5), abs=1e-6)
    assert "probability" not in det  # a density has no probability
    for _ in range(20):
        action = client.post(f"{base}/predict", json=BOX_OBS, headers=AUTH).json()["action"]
        assert all(-0.5 <= a <= 0.5 for a in action)


def test_default_policy_keeps_the_plain_paths(client: TestClient) -> None:
    plain = client.post("/distribution", json=LPOC_OBS, headers=AUTH).json()
    prefixed = client.post("/policies/lpoc/distribution", json=LPOC_OBS, headers=AUTH).json()
    assert plain == prefixed
    # the plain paths take the default policy's observations only
    assert client.post("/predict", json=BOX_OBS, headers=AUTH).status_code == 422


# --- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["header", "query", "cookie"])
def test_api_key_is_accepted_as_header_query_or_cookie(schema_path: Path, how: str) -> None:
    with make_client(schema_path) as c:
        kwargs: dict[str, Any] = {
            "header": {"headers": AUTH},
            "query": {"params": AUTH},
            "cookie": {},
        }[how]
        if how == "cookie":
            c.cookies.set("access-token", API_KEY)
        assert c.post("/predict", json=LPOC_OBS, **kwargs).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"access-token": ""}])
def test_a_missing_key_is_401_with_a_challenge_in_the_envelope(client: TestClient, headers: dict[str, str]) -> None:
    """RFC 9110 §11.6.1: a 401 says how to authenticate (the 403 it was before did not)."""
    r = client.post("/predict", json=LPOC_OBS, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == 'APIKey realm="policy-server", header="access-token"'


def test_a_wrong_key_is_403_in_the_envelope(client: TestClient) -> None:
    r = client.post("/predict", json=LPOC_OBS, headers={"access-token": "wrong"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden" and "www-authenticate" not in r.headers
    assert API_KEY not in r.text


def test_docs_health_status_and_schema_stay_public_and_never_show_the_key(client: TestClient) -> None:
    for path in ["/docs", "/redoc", "/openapi.json", "/health/live", "/health/ready", "/", "/schema"]:
        r = client.get(path)
        assert r.status_code == 200, path
        assert API_KEY not in r.text, path


def test_environment_overrides_the_schema_key(schema_path: Path) -> None:
    with make_client(schema_path, api_key="from-env") as c:
        assert c.post("/predict", json=LPOC_OBS, headers=AUTH).status_code == 403
        assert c.post("/predict", json=LPOC_OBS, headers={"access-token": "from-env"}).status_code == 200


def test_url_path_serves_everything_under_the_prefix(model_dir: Path, write_schema: Any) -> None:
    path = write_schema(multi_policy_schema(model_dir, url_path="/api/v1/"))
    with make_client(path) as c:
        assert c.post("/api/v1/predict", json=LPOC_OBS, headers=AUTH).status_code == 200
        assert c.post("/api/v1/policies/box/predict", json=BOX_OBS, headers=AUTH).status_code == 200
        assert c.get("/api/v1/docs").status_code == 200
        assert "/api/v1/predict" in c.get("/api/v1/openapi.json").json()["paths"]
        # a reverse proxy that strips the prefix (Pathmind's ingress) reaches the same routes
        assert c.post("/predict", json=LPOC_OBS, headers=AUTH).status_code == 200


# --- bad input ---------------------------------------------------------------------------------

BAD_BODIES = {
    "wrong type": (LPOC_OBS | {"coordinates_0": "east"}, "body.coordinates_0"),
    "fraction for int": (LPOC_OBS | {"id": 1.5}, "body.id"),
    "missing field": ({k: v for k, v in LPOC_OBS.items() if k != "is_up_free"}, "body.is_up_free"),
    "unknown field": (LPOC_OBS | {"altitude": 3}, "body.altitude"),
    "not an object": ([1, 2, 3], "body"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_invalid_observations_are_422_naming_the_field(client: TestClient, case: str) -> None:
    body, field = BAD_BODIES[case]
    r = client.post("/predict", json=body, headers=AUTH)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert field in [f["field"] for f in error["fields"]]


@pytest.mark.parametrize("raw", [b'{"speed": NaN, "sensors": [0, 0, 0]}', b'{"speed": 0, "sensors": [0, Infinity, 0]}'])
def test_non_finite_numbers_are_refused(client: TestClient, raw: bytes) -> None:
    r = client.post("/policies/tuple/predict", content=raw, headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 422
    assert "finite" in r.json()["error"]["message"]


def test_wrong_list_length_is_refused(client: TestClient) -> None:
    r = client.post("/policies/tuple/predict", json=TUPLE_OBS | {"sensors": [0.0, 1.0]}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["error"]["fields"][0]["field"] == "body.sensors"


@pytest.mark.parametrize("raw", [b"", b"{not json", b'{"id": 1,}'])
def test_empty_or_malformed_json_is_422(client: TestClient, raw: bytes) -> None:
    r = client.post("/predict", content=raw, headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request"


def test_batches_over_the_limit_or_empty_are_refused(client: TestClient) -> None:
    too_many = client.post("/predict/batch", json={"observations": [LPOC_OBS] * 9}, headers=AUTH)
    assert too_many.status_code == 422 and "8" in too_many.json()["error"]["message"]
    empty = client.post("/predict/batch", json={"observations": []}, headers=AUTH)
    assert empty.status_code == 422
    bad_item = client.post("/predict/batch", json={"observations": [LPOC_OBS, {"id": 1}]}, headers=AUTH)
    assert any(f["field"].startswith("body.observations.1") for f in bad_item.json()["error"]["fields"])


def test_oversized_bodies_are_413_declared_or_streamed(client: TestClient) -> None:
    big = b'{"obs": [' + b"0.0," * 10_000 + b"0.0]}"
    r = client.post("/predict_raw", content=big, headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        yield big[:15_000]
        yield big[15_000:]

    r = client.post("/predict_raw", content=chunks(), headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_a_model_that_raises_answers_500_and_the_server_keeps_serving(client: TestClient) -> None:
    r = client.post("/policies/faulty/predict", json={"a": 5000.0, "b": 0.0}, headers=AUTH)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "model_error"
    assert "boom" in r.json()["error"]["message"]
    assert client.post("/policies/faulty/predict", json={"a": 1.0, "b": 0.0}, headers=AUTH).status_code == 200


def test_unknown_routes_and_methods_answer_the_envelope(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/predict", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "method,path,allow",
    [
        ("GET", "/predict", "POST"),
        ("TRACE", "/", "GET"),
        ("OPTIONS", "/policies/box/weights", "GET"),
        ("DELETE", "/predict/", "POST"),  # Pathmind's spelling, normalised before routing
        ("PUT", "/policies/box/train/status", "GET, POST"),  # one route answers both
    ],
)
def test_a_405_says_which_methods_the_path_answers(client: TestClient, method: str, path: str, allow: str) -> None:
    """RFC 9110: a 405 carries `Allow`."""
    r = client.request(method, path, headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == allow and r.json()["error"]["status"] == 405


# --- issue 11: numbers at float32 precision, integers within ±2**24, JSON types strictly ---------


@pytest.mark.parametrize("case", list(BAD_POLICY_INPUTS))
def test_numbers_the_model_cannot_hold_and_wrong_json_types_are_422_naming_the_field(
    client: TestClient, case: str
) -> None:
    path, body, field = BAD_POLICY_INPUTS[case]
    r = client.post(path, content=body, headers=AUTH | JSON)
    assert r.status_code == 422, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert field in [f["field"] for f in error["fields"]], error["fields"]
    assert client.post("/predict", json=LPOC_OBS, headers=AUTH).status_code == 200


def test_the_refusals_say_what_range_and_why(client: TestClient) -> None:
    big = client.post("/predict", content=BAD_POLICY_INPUTS["10**400 int"][1], headers=AUTH | JSON).json()["error"]
    assert "[-16777216, 16777216]" in big["message"] and "float32" in big["message"]
    assert "401 digits" in big["message"] and len(big["message"]) < 400  # not the 401 digits themselves
    over = client.post("/policies/box/predict", json=BOX_OBS | {"x": 1e39}, headers=AUTH).json()["error"]
    assert "overflows float32" in over["message"]


@pytest.mark.parametrize(
    "path,body",
    [
        ("/policies/box/predict", BOX_OBS | {"x": 3.4028235e38, "y": -3.4028235e38}),
        ("/policies/tuple/predict", TUPLE_OBS | {"sensors": [1e-45, 3.4e38, -1e38]}),
        ("/predict", LPOC_OBS | {"id": 2**24, "coordinates_0": -(2**24)}),
        ("/predict_raw", {"obs": [3.4028235e38] + [0] * 10}),
        ("/predict_raw/batch", {"obs": [[2**24] * 11, [-3.4028235e38] * 11]}),
    ],
)
def test_the_largest_values_float32_holds_are_accepted(client: TestClient, path: str, body: dict[str, Any]) -> None:
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b'{"obs": [1' + b"0" * 5000 + b"]}", "5001 digits"),  # past Python's 4300-digit limit
        (b"\xff", "not UTF-8 (byte 0xff at position 0)"),
        (b'{"obs": "\xe9t\xe9"}', "not UTF-8"),  # Latin-1, not UTF-8
        (b"[" * 5000, "nested too deeply"),  # past Python's recursion limit
    ],
    ids=["5001-digit int", "0xff", "latin-1", "deep nesting"],
)
def test_a_body_json_cannot_read_is_422_naming_the_body(client: TestClient, raw: bytes, reason: str) -> None:
    for path in ("/predict_raw", "/predict", "/predict/batch", "/collect_experience"):
        r = client.post(path, content=raw, headers=AUTH | JSON)
        assert r.status_code == 422, r.text[:300]
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and len(error["fields"]) == 1, error
        assert error["fields"][0]["field"] == "body" and error["fields"][0]["message"].startswith("malformed JSON")
        assert reason in error["message"] and "set_int_max_str_digits" not in error["message"]


@pytest.mark.parametrize(
    "path,body",
    [
        ("/predict", LPOC_OBS | {"id": 303.0, "coordinates_0": -7.0}),
        ("/predict/batch", {"observations": [LPOC_OBS | {"coordinates_1": 1e3}]}),
    ],
)
def test_an_integer_written_as_a_whole_float_is_an_integer(client: TestClient, path: str, body: dict[str, Any]) -> None:
    """JSON has one number type; JSON Schema's `integer` (what the document says) takes 303.0."""
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code == 200, r.text[:300]
    half = client.post("/predict", json=LPOC_OBS | {"id": 303.5}, headers=AUTH).json()["error"]
    assert [f["field"] for f in half["fields"]] == ["body.id"]


@pytest.fixture(scope="module")
def linear_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A policy whose logits are x + y (both heads): 3e38 + 3e38 overflows float32 to inf."""
    import yaml

    from policy_server.export import MLPPolicy, export_module

    root = tmp_path_factory.mktemp("linear")
    module = MLPPolicy(2, [], nvec=[2])
    with torch.no_grad():
        module.heads[0].weight.fill_(1.0)
        module.heads[0].bias.zero_()
    export_module(module, 2, root / "linear.pt2")
    observations = {"x": {"type": "float"}, "y": {"type": "float"}}
    doc = {"parameters": {"api_key": API_KEY, "model": "linear.pt2"}, "observations": observations}
    (root / "schema.yaml").write_text(yaml.safe_dump(doc))
    with make_client(root / "schema.yaml") as c:
        yield c


@pytest.mark.parametrize(
    "path,body,fields",
    [
        ("/predict", {"x": 3e38, "y": 3e38}, ["body"]),
        ("/distribution", {"x": -3e38, "y": -3e38}, ["body"]),
        ("/predict_raw", {"obs": [3e38, 3e38]}, ["body.obs"]),
        ("/predict_raw/batch", {"obs": [[3e38, 3e38], [1.0, 2.0], [-3e38, -1e38]]}, ["body.obs.0", "body.obs.2"]),
        ("/predict_deterministic/batch", {"observations": [{"x": 1.0, "y": 1.0}, {"x": 3e38, "y": 1e38}]},
         ["body.observations.1"]),
        ("/distribution/batch", {"observations": [{"x": 3e38, "y": 3e38}]}, ["body.observations.0"]),
        ("/collect_experience", {"observation": {"x": 3e38, "y": 3e38}}, ["body.observation"]),
    ],
)
def test_values_that_overflow_the_model_are_422_naming_the_observation(
    linear_client: TestClient, path: str, body: dict[str, Any], fields: list[str]
) -> None:
    """Valid float32 values can overflow the model's float32 layers (inf or NaN outputs): a bound
    of the weights, answered 422 `model_overflow` naming each such observation, never a 500."""
    r = linear_client.post(path, json=body, headers=AUTH)
    assert r.status_code == 422, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "model_overflow" and [f["field"] for f in error["fields"]] == fields
    assert "overflow the model's float32 layers" in error["message"]
    assert linear_client.post("/predict", json={"x": 3e38, "y": -3e38}, headers=AUTH).status_code == 200


# --- Pathmind's one-hot lists, any-text names, action masks --------------------------------------


@pytest.fixture(scope="module")
def inputs_client(inputs_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    import yaml

    folder = tmp_path_factory.mktemp("inputs")
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(inputs_schema(inputs_models, folder / "ckpt"), sort_keys=False, allow_unicode=True))
    with make_client(path) as c:
        yield c


def test_pathmind_one_hot_lists_of_open_length_are_served(inputs_client: TestClient) -> None:
    assert inputs_client.get("/").json()["policies"]["onehot"]["obs_dim"] == 60
    r = inputs_client.post("/policies/onehot/predict", json=ONEHOT_OBS, headers=AUTH)
    assert r.status_code == 200, r.text
    assert len(r.json()["action"]) == 2
    # any split works as long as the lists add up to the model's 60 inputs
    other = ONEHOT_OBS | {"table_1_node": [0, 0, 0, 1], "table_2_node": [1, 0, 0, 0, 0, 0]}
    assert inputs_client.post("/policies/onehot/predict_deterministic", json=other, headers=AUTH).status_code == 200
    flat = [v for values in ONEHOT_OBS.values() for v in values]
    by_name = inputs_client.post("/policies/onehot/distribution", json=ONEHOT_OBS, headers=AUTH).json()
    raw = inputs_client.post("/policies/onehot/predict_raw/batch", json={"obs": [flat]}, headers=AUTH)
    assert raw.status_code == 200
    assert by_name["components"] == inputs_client.post(
        "/policies/onehot/distribution/batch", json={"observations": [ONEHOT_OBS]}, headers=AUTH
    ).json()["results"][0]["components"]


def test_one_hot_lists_that_do_not_add_up_are_422_naming_them_and_both_numbers(inputs_client: TestClient) -> None:
    short = ONEHOT_OBS | {"table_3_target_node": [0, 1]}
    r = inputs_client.post("/policies/onehot/predict", json=short, headers=AUTH)
    assert r.status_code == 422
    [field] = r.json()["error"]["fields"]
    assert field["field"] == "body"
    assert "table_1_node (5)" in field["message"] and "table_3_target_node (2)" in field["message"]
    assert "hold 57 values; the model needs 60" in field["message"]
    batch = inputs_client.post("/policies/onehot/predict/batch", json={"observations": [ONEHOT_OBS, short, ONEHOT_OBS]},
                               headers=AUTH)
    assert batch.status_code == 422
    assert [f["field"] for f in batch.json()["error"]["fields"]] == ["body.observations.1"]
    too_long = ONEHOT_OBS | {"table_1_node": [0] * 61}
    r = inputs_client.post("/policies/onehot/predict", json=too_long, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "body.table_1_node"


def test_any_text_is_an_observation_name_and_an_action_mask_is_fed_as_zeros_and_ones(inputs_client: TestClient) -> None:
    r = inputs_client.post("/policies/odd/distribution", json=ODD_OBS, headers=AUTH)
    assert r.status_code == 200, r.text
    flat = [0.5, 2, 1, -1.5, 7, 1, 0.0, 1, 0, 1, 1]
    raw = inputs_client.post("/policies/odd/distribution/batch", json={"observations": [ODD_OBS]}, headers=AUTH).json()
    assert raw["results"][0]["probabilities"] == r.json()["probabilities"]
    from policy_server.policies.torch_policy import TorchPolicy

    served = inputs_client.app.state.services["odd"]  # type: ignore[attr-defined]
    logits = TorchPolicy.from_file(served.policy.spec.model).forward(np.array([flat], dtype=np.float32)).heads[0][0]
    assert list(r.json()["probabilities"].values()) == pytest.approx(softmax(logits.astype(np.float64)), abs=1e-6)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"pos.x": 1e39}, "body.pos.x"),
        ({"schema": "2"}, "body.schema"),
        ({"a b": 1}, "body.a b"),
        ({"1": BIG_INT}, "body.1"),
        ({"actionMask": [True, "yes", False, True]}, "body.actionMask.1"),
        ({"actionMask": [1, 0, 1, 1]}, "body.actionMask.0"),
        ({"actionMask": [True, False]}, "body.actionMask"),
        ({"pos": {"x": 0.5}}, "body.pos"),
    ],
)
def test_bad_values_of_odd_names_are_422_naming_them(inputs_client: TestClient, change: dict[str, Any], field: str) -> None:
    r = inputs_client.post("/policies/odd/predict", json=ODD_OBS | change, headers=AUTH)
    assert r.status_code == 422
    assert field in [f["field"] for f in r.json()["error"]["fields"]]


def request_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The request body's schema of ``POST path`` in an OpenAPI document."""
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]  # type: ignore[no-any-return]


def test_openapi_declares_the_width_of_every_raw_vector(client: TestClient, inputs_client: TestClient) -> None:
    for c, widths in ((client, {"": 11, "/policies/tuple": 4, "/policies/box": 3}), (inputs_client, {"/policies/onehot": 60})):
        spec = c.get("/openapi.json").json()
        schemas = spec["components"]["schemas"]
        for prefix, width in widths.items():
            obs = request_schema(spec, f"{prefix}/predict_raw")["properties"]["obs"]
            assert obs["minItems"] == obs["maxItems"] == width, prefix
            rows = request_schema(spec, f"{prefix}/predict_raw/batch")["properties"]["obs"]
            assert rows["items"]["minItems"] == rows["items"]["maxItems"] == width, prefix
            assert obs["items"]["exclusiveMaximum"] == rows["items"]["items"]["exclusiveMaximum"] == FLOAT32_LIMIT
    assert schemas["OnehotObservation"]["properties"]["table_1_node"]["maxItems"] == 60
    assert "60 values" in schemas["OnehotObservation"]["properties"]["table_1_node"]["description"]
    odd = schemas["OddObservation"]
    # a discrete policy's requests may carry a top-level action mask, optional
    assert list(odd["properties"]) == [*ODD_OBS, "action_mask"] and odd["required"] == list(ODD_OBS)
    assert odd["properties"]["actionMask"]["items"] == {"type": "boolean"}
    assert odd["properties"]["actionMask"]["minItems"] == odd["properties"]["actionMask"]["maxItems"] == 4
    assert odd["properties"]["schema"]["maximum"] == 2**24


# --- documentation and metrics --------------------------------------------------------------


def test_openapi_documents_the_generated_observation_models(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    obs = spec["components"]["schemas"]["LpocObservation"]
    assert list(obs["properties"]) == [*LPOC_OBS, "action_mask"] and obs["required"] == list(LPOC_OBS)
    assert obs["additionalProperties"] is False
    assert obs["properties"]["is_up_free"]["examples"] == [False]
    assert "TupleObservation" in spec["components"]["schemas"]
    sensors = spec["components"]["schemas"]["TupleObservation"]["properties"]["sensors"]
    assert sensors["minItems"] == sensors["maxItems"] == 3
    for path in ["/predict", "/predict_deterministic", "/distribution", "/predict_raw", "/predict/batch",
                 "/policies/box/distribution/batch", "/policies/tuple/predict_raw/batch"]:
        assert path in spec["paths"], path
    assert {"APIKeyHeader", "APIKeyQuery", "APIKeyCookie"} <= set(spec["components"]["securitySchemes"])


def test_status_describes_every_policy(client: TestClient) -> None:
    body = client.get("/").json()
    assert body["default_policy"] == "lpoc"
    assert body["policies"]["tuple"]["action_space"] == {"type": "tuple", "nvec": [3, 2], "names": [["0", "1", "2"], ["0", "1"]]}
    assert body["policies"]["box"]["obs_dim"] == 3


def test_gateway_metrics_count_requests_per_policy_endpoint_and_status(schema_path: Path) -> None:
    port = free_port()
    with make_client(schema_path, gateway_metrics_port=port) as c:
        c.post("/predict", json=LPOC_OBS, headers=AUTH)
        c.post("/policies/box/predict", json=BOX_OBS)  # no key: 401
        c.post("/policies/box/predict", json=BOX_OBS, headers={"access-token": "wrong"})
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'policy_server_requests_total{endpoint="/predict",policy="lpoc",status="200"} 1.0' in text
    assert 'policy_server_errors_total{endpoint="/policies/box/predict",policy="box",status="401"} 1.0' in text
    assert 'policy_server_errors_total{endpoint="/policies/box/predict",policy="box",status="403"} 1.0' in text
    assert 'policy_server_batch_rows_count{policy="lpoc"} 1.0' in text
    assert "policy_server_request_seconds_bucket" in text


def test_answers_match_their_documented_response_models(client: TestClient) -> None:
    from policy_server.gateway.policy import wire

    cases = [
        ("/predict", LPOC_OBS, wire.ActionResponse),
        ("/policies/box/predict_deterministic", BOX_OBS, wire.ActionResponse),
        ("/policies/tuple/distribution", TUPLE_OBS, wire.DistributionResponse),
        ("/policies/box/distribution", BOX_OBS, wire.DistributionResponse),
        ("/policies/tuple/predict/batch", {"observations": [TUPLE_OBS] * 2}, wire.BatchActionResponse),
        ("/distribution/batch", {"observations": [LPOC_OBS] * 2}, wire.BatchDistributionResponse),
    ]
    for path, body, model in cases:
        answer = client.post(path, json=body, headers=AUTH).json()
        assert model.model_validate(answer).model_dump(exclude_none=True) == answer, path
