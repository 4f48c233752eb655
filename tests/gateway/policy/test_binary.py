"""Binary request bodies (``.npy``, safetensors): the checks as pure functions, then the routes in-process."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium.spaces as gs
import numpy as np
import pytest
import safetensors.numpy
import torch
import yaml
from conftest import API_KEY, LPOC_OBS, cart_fragment, multi_policy_schema, training_schema
from fastapi.testclient import TestClient

from policy_server.errors import InvalidRequest
from policy_server.export import CNNPolicy, MLPPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.gateway.policy.binary import (
    NPY,
    SAFETENSORS,
    check_tensor,
    flatten_batch,
    model_input,
    read_npy,
    read_safetensors,
)
from policy_server.gateway.training.binary import experience
from policy_server.gateway.training.experience import ExperienceRequest, to_batch
from policy_server.policies.served import resolve_policy
from policy_server.schema.config import parse_schema
from policy_server.settings import Settings

ROUTES = ["/predict", "/predict_deterministic", "/distribution"]
LPOC_ROW = np.array([float(v) for v in LPOC_OBS.values()], dtype=np.float32)


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def st(**tensors: np.ndarray) -> bytes:
    return safetensors.numpy.save(tensors)


def refused(call: Any, field: str, words: str) -> str:
    """``call()`` raises InvalidRequest naming ``field``, its message containing ``words``."""
    with pytest.raises(InvalidRequest) as caught:
        call()
    error = caught.value.fields[0]
    assert error.field == field and words in error.message, error
    return error.message


# --- reading bodies -------------------------------------------------------------------------------


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    np.arange(6, dtype=">f8"),
    np.array([True, False]),
    np.zeros((2, 0), dtype=np.uint8),
])
def test_read_npy_gives_back_what_numpy_saved(array: np.ndarray) -> None:
    read = read_npy(npy(array))
    assert read.dtype == array.dtype and read.shape == array.shape and (read == array).all()


def test_read_npy_refuses_what_is_no_plain_numeric_array() -> None:
    refused(lambda: read_npy(b"{\"obs\": [1, 2]}"), "body", "not a .npy array")
    refused(lambda: read_npy(npy(np.zeros(4, np.float32))[:-1]), "body", "truncated or padded")
    refused(lambda: read_npy(npy(np.zeros(4, np.float32)) + b"\0"), "body", "truncated or padded")
    refused(lambda: read_npy(npy(np.array(["a", "b"]))), "body", "not a number type")
    refused(lambda: read_npy(npy(np.zeros(2, np.complex64))), "body", "not a number type")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    refused(lambda: read_npy(pickled.getvalue()), "body", "not a number type")
    # a header that declares 8 TB is refused from its length, before anything is allocated
    huge = npy(np.zeros(1, np.float64)).replace(b"(1,)", b"(1099511627776,)")
    refused(lambda: read_npy(huge), "body", "truncated or padded")


def test_read_safetensors_returns_tensors_and_metadata_and_refuses_a_broken_file() -> None:
    body = safetensors.numpy.save({"obs": np.ones((2, 3), np.float32)}, metadata={"client_id": "c1"})
    tensors, metadata = read_safetensors(body)
    assert (tensors["obs"] == 1).all() and metadata == {"client_id": "c1"}
    refused(lambda: read_safetensors(body[:-4]), "body", "not a safetensors file")
    refused(lambda: read_safetensors(b"\x01"), "body", "not a safetensors file")


# --- checking tensors -----------------------------------------------------------------------------

IMAGE_BOX = gs.Box(0, 255, (84, 84, 4), np.uint8)
HALF_BOX = gs.Box(-1.0, 1.0, (3,), np.float32)


def test_a_box_takes_its_dtype_and_safe_casts_only() -> None:
    image = np.full((2, 84, 84, 4), 7, np.uint8)
    assert check_tensor(image, IMAGE_BOX, "body", 2).dtype == np.uint8
    as_float = check_tensor(np.array([0, 1, -1], np.int8), HALF_BOX, "body", None)
    assert as_float.dtype == np.float32 and as_float.tolist() == [0, 1, -1]
    assert check_tensor(np.array([0.5, 0, 0], np.float16), HALF_BOX, "body", None).dtype == np.float32
    refused(lambda: check_tensor(np.zeros(3), HALF_BOX, "body.obs", None), "body.obs", "float64 does not cast")
    refused(lambda: check_tensor(np.zeros(3, np.int32), HALF_BOX, "body", None), "body", "int32 does not cast")
    refused(lambda: check_tensor(image.astype(np.int64), IMAGE_BOX, "body", 2), "body", "send uint8")


def test_a_box_refuses_a_wrong_shape_a_value_not_finite_or_out_of_bounds() -> None:
    refused(lambda: check_tensor(np.zeros((1, 3), np.float32), HALF_BOX, "body", None), "body", "shape [1, 3], expected [3]")
    refused(lambda: check_tensor(np.zeros((2, 4), np.float32), HALF_BOX, "body", 2), "body", "expected [2, 3]")
    refused(lambda: check_tensor(np.array([0, np.inf, 0], np.float32), HALF_BOX, "body", None), "body",
            "value inf at [1] is not finite")
    refused(lambda: check_tensor(np.array([[0, 0, 0], [0, 0, 1.5]], np.float32), HALF_BOX, "body", 2), "body",
            "value 1.5 at [1, 2] is outside the space's [-1.0, 1.0]")
    narrow = gs.Box(10, 20, (2,), np.uint8)
    refused(lambda: check_tensor(np.array([10, 21], np.uint8), narrow, "body", None), "body", "value 21 at [1]")


def test_integer_spaces_take_any_integer_dtype_and_check_the_range() -> None:
    discrete = gs.Discrete(3, start=1)
    assert check_tensor(np.array([1, 3], np.uint8), discrete, "b", 2).tolist() == [1, 3]
    refused(lambda: check_tensor(np.array([0, 3]), discrete, "b", 2), "b", "value 0 at [0] is outside the space's [1, 3]")
    refused(lambda: check_tensor(np.array([1.0, 2.0]), discrete, "b", 2), "b", "takes bool or integers")
    refused(lambda: check_tensor(np.array([1], np.uint64), discrete, "b", 1), "b", "int64 at most")
    assert check_tensor(np.array([True, False]), gs.MultiBinary(2), "b", None).tolist() == [1, 0]
    refused(lambda: check_tensor(np.array([0, 2]), gs.MultiBinary(2), "b", None), "b", "value 2 at [1]")
    refused(lambda: check_tensor(np.array([2, 2]), gs.MultiDiscrete([3, 2]), "b", None), "b", "value 2 at [1]")


DICT_SPACE = gs.Dict({
    "speed": gs.Box(-1, 1, (1,), np.float32),
    "gear": gs.Discrete(5, start=-1),
    "buttons": gs.MultiBinary([2, 2]),
    "cmds": gs.MultiDiscrete([3, 2], start=[1, 0]),
    "pos": gs.Tuple([gs.Box(0, 10, (2,), np.int16), gs.Discrete(2)]),
})


def test_a_dict_observation_flattens_as_gymnasium_flattens_it() -> None:
    DICT_SPACE.seed(0)
    rows = [DICT_SPACE.sample() for _ in range(5)]
    tensors = {
        "obs.speed": np.stack([r["speed"] for r in rows]), "obs.gear": np.array([r["gear"] for r in rows]),
        "obs.buttons": np.stack([r["buttons"] for r in rows]), "obs.cmds": np.stack([r["cmds"] for r in rows]),
        "obs.pos.0": np.stack([r["pos"][0] for r in rows]), "obs.pos.1": np.array([r["pos"][1] for r in rows]),
    }
    got = model_input(tensors, DICT_SPACE, "body", True, 8)
    naive = np.stack([gs.flatten(DICT_SPACE, r) for r in rows]).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (5, gs.flatdim(DICT_SPACE)) and (got == naive).all()
    one = model_input({k: v[0] for k, v in tensors.items()}, DICT_SPACE, "body", False, 8)
    assert (one == naive[:1]).all()
    assert (flatten_batch(gs.Discrete(3), np.array([2, 0])) == [[0, 0, 1], [1, 0, 0]]).all()


def test_model_input_names_a_missing_tensor_and_a_bad_batch() -> None:
    refused(lambda: model_input({"obs.speed": np.zeros((1, 1), np.float32)}, DICT_SPACE, "body", True, 8),
            "body.obs.buttons", "missing")
    refused(lambda: model_input({"obs": np.zeros((9, 3), np.float32)}, HALF_BOX, "body", True, 8), "body.obs",
            "B from 1 to 8")
    refused(lambda: model_input({"obs": np.zeros((0, 3), np.float32)}, HALF_BOX, "body", True, 8), "body.obs",
            "B from 1 to 8")
    tensors = {"obs.0": np.zeros((2, 3), np.float32), "obs.1": np.zeros((3, 3), np.float32)}
    refused(lambda: model_input(tensors, gs.Tuple([HALF_BOX, HALF_BOX]), "body", True, 8), "body.obs.1",
            "expected [2, 3]")


# --- the routes -----------------------------------------------------------------------------------


def app_client(schema: dict[str, Any], tmp: Path, **settings: Any) -> TestClient:
    path = tmp / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    base = {"schema_path": path, "backend": "local", "gateway_metrics_port": 0, "seed": 0}
    return TestClient(build_app(Settings(**base | settings)), headers={"access-token": API_KEY})


@pytest.fixture(scope="module")
def client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    schema = multi_policy_schema(model_dir)
    with app_client(schema, tmp_path_factory.mktemp("binary"), max_body_bytes=4096) as c:
        yield c


def post(client: TestClient, path: str, body: bytes, media: str) -> Any:
    return client.post(path, content=body, headers={"content-type": media})


def deterministic(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without the sampled action's draw (``/predict`` samples)."""
    return {k: v for k, v in answer.items() if k not in ("action", "actions", "action_name", "log_prob", "probability")}


@pytest.mark.parametrize("route", ROUTES)
def test_npy_and_safetensors_answer_as_json_does(client: TestClient, route: str) -> None:
    expected = client.post(route, json=LPOC_OBS).json()
    batch_expected = client.post(f"{route}/batch", json={"observations": [LPOC_OBS, LPOC_OBS]}).json()
    keep = deterministic if route == "/predict" else (lambda a: a)
    for media, one, two in ((NPY, npy(LPOC_ROW), npy(np.stack([LPOC_ROW] * 2))),
                            (SAFETENSORS, st(obs=LPOC_ROW), st(obs=np.stack([LPOC_ROW] * 2)))):
        answer = post(client, route, one, media)
        assert answer.status_code == 200 and keep(answer.json()) == keep(expected), answer.text
        batch = post(client, f"{route}/batch", two, media).json()
        assert [keep(r) for r in batch["results"]] == [keep(r) for r in batch_expected["results"]]
        assert {**batch, "results": None} == {**batch_expected, "results": None}


def test_a_sampled_binary_answer_is_a_valid_action(client: TestClient) -> None:
    answer = post(client, "/predict", npy(LPOC_ROW.astype(np.uint8)), NPY).json()  # uint8 → float32 is safe
    probabilities = client.post("/distribution", json=LPOC_OBS).json()["probabilities"]
    assert answer["probability"] == pytest.approx(probabilities[answer["action_name"]])


BAD_BODIES = {
    "not npy": ("/predict", b"\x93NUMPY garbage", NPY, "body", "not a .npy array"),
    "truncated npy": ("/predict", npy(LPOC_ROW)[:-3], NPY, "body", "truncated"),
    "float64": ("/predict", npy(LPOC_ROW.astype(np.float64)), NPY, "body", "float64 does not cast"),
    "wrong width": ("/predict", npy(LPOC_ROW[:5]), NPY, "body", "expected [11]"),
    "a batch to the single route": ("/predict", npy(np.stack([LPOC_ROW] * 2)), NPY, "body", "expected [11]"),
    "one row to a batch route": ("/predict/batch", npy(LPOC_ROW), NPY, "body", "a batch is shape (B, 11)"),
    "nan": ("/distribution", npy(np.where(np.arange(11) == 4, np.nan, LPOC_ROW).astype(np.float32)), NPY, "body",
            "value nan at [4] is not finite"),
    "inf in a batch row": ("/predict/batch", st(obs=np.stack([LPOC_ROW, LPOC_ROW * np.inf])), SAFETENSORS, "body.obs",
                           "value inf at [1, 0]"),
    "truncated safetensors": ("/predict", st(obs=LPOC_ROW)[:-1], SAFETENSORS, "body", "not a safetensors file"),
    "no obs tensor": ("/predict", st(x=LPOC_ROW), SAFETENSORS, "body.x", "unknown; expected obs"),
    "missing obs": ("/predict_deterministic", st(), SAFETENSORS, "body.obs", "missing"),
    "strings": ("/predict", npy(np.array(["a"] * 11)), NPY, "body", "not a number type"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_every_bad_binary_body_is_the_422_envelope_naming_the_tensor(client: TestClient, case: str) -> None:
    route, body, media, field, words = BAD_BODIES[case]
    answer = post(client, route, body, media)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["fields"][0]["field"] == field, error
    assert words in error["fields"][0]["message"], error


def test_a_binary_body_over_the_limit_is_413_and_the_key_is_still_checked(client: TestClient) -> None:
    too_big = post(client, "/predict/batch", npy(np.zeros((200, 11), np.float32)), NPY)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    keyless = client.post("/predict", content=npy(LPOC_ROW), headers={"content-type": NPY, "access-token": "no"})
    assert keyless.status_code == 403
    box = post(client, "/policies/box/predict_deterministic", st(obs=np.array([0.1, -0.3, 0.0], np.float32)), SAFETENSORS)
    assert box.json()["action"] == client.post("/policies/box/predict_deterministic",
                                               json={"x": 0.1, "y": -0.3, "flag": False}).json()["action"]


def test_the_openapi_document_lists_the_three_bodies(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for route in [*ROUTES, "/predict_raw", *(f"{r}/batch" for r in [*ROUTES, "/predict_raw"])]:
        content = paths[route]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", NPY, SAFETENSORS}, route
    assert "[B (1 to 4096), 11]" in paths["/predict/batch"]["post"]["requestBody"]["content"][NPY]["schema"]["description"]


FRAME_SPACE = {"type": "box", "shape": [84, 84, 4], "dtype": "uint8", "low": 0, "high": 255}
ROBOT_SPACE = {"type": "dict", "spaces": {"pos": {"type": "box", "shape": [2], "low": -1, "high": 1},
                                          "gear": {"type": "discrete", "n": 3}}}


@pytest.fixture(scope="module")
def spaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An Atari-sized image policy (uint8 84×84×4 frames, a CNN) and a Dict policy with a discrete
    action (masks sent as `action_mask`), and the same with a Dict entry `legal` as its mask."""
    tmp = tmp_path_factory.mktemp("binary-spaces")
    torch.manual_seed(0)
    export_module(CNNPolicy((84, 84, 4), 4, channels=4, hidden=16), (84, 84, 4), tmp / "cnn", dtype=torch.uint8)
    export_module(MLPPolicy(3 + 2, [8], nvec=[3]), 5, tmp / "robot")
    schema = {"parameters": {"api_key": API_KEY, "default_policy": "atari"}, "policies": {
        "atari": {"model": str(tmp / "cnn.pt2"), "observation_space": FRAME_SPACE},
        "robot": {"model": str(tmp / "robot.pt2"), "observation_space": ROBOT_SPACE},
        "masked": {"model": str(tmp / "robot.pt2"), "action_space": {"type": "discrete", "mask": "legal"},
                   "observation_space": {"type": "dict", "spaces": ROBOT_SPACE["spaces"] | {
                       "legal": {"type": "multi_binary", "n": 3}}}},
    }}
    with app_client(schema, tmp, max_body_bytes=8 * 2**20) as c:
        yield c


def test_a_real_size_image_batch_of_64_answers_as_json_does(spaces: TestClient) -> None:
    """64 uint8 frames of 84×84×4: 7 MB as JSON, 1.8 MB as .npy or safetensors."""
    frames = np.random.default_rng(0).integers(0, 256, (64, 84, 84, 4), dtype=np.uint8)
    expected = spaces.post("/distribution/batch", json={"obs": frames.tolist()})
    assert expected.status_code == 200, expected.text
    for body, media in ((npy(frames), NPY), (st(obs=frames), SAFETENSORS)):
        answer = post(spaces, "/distribution/batch", body, media)
        assert answer.status_code == 200 and answer.json() == expected.json(), answer.text
    one = post(spaces, "/predict_deterministic", npy(frames[3]), NPY).json()
    assert one["action"] == spaces.post("/predict_deterministic", json={"obs": frames[3].tolist()}).json()["action"]
    refused_frame = post(spaces, "/predict", npy(frames[0].astype(np.float32)), NPY)  # float32 → uint8 would round
    assert refused_frame.status_code == 422 and "send uint8" in refused_frame.json()["error"]["message"]


def test_a_dict_observation_travels_as_tensors_with_its_mask(spaces: TestClient) -> None:
    robot = "/policies/robot"
    obs = {"pos": [0.5, -0.5], "gear": 2}
    tensors = {"obs.pos": np.array([0.5, -0.5], np.float32), "obs.gear": np.array(2)}
    expected = spaces.post(f"{robot}/distribution", json={"obs": obs}).json()
    assert post(spaces, f"{robot}/distribution", st(**tensors), SAFETENSORS).json() == expected
    masked = spaces.post(f"{robot}/distribution", json={"obs": obs, "action_mask": [False, True, True]}).json()
    assert masked["probabilities"]["0"] == 0
    mask = np.array([0, 1, 1], np.uint8)
    assert post(spaces, f"{robot}/distribution", st(**tensors, action_mask=mask), SAFETENSORS).json() == masked
    batch = {k: np.stack([v, v]) for k, v in tensors.items()} | {"action_mask": np.stack([mask, mask])}
    assert post(spaces, f"{robot}/distribution/batch", st(**batch), SAFETENSORS).json()["results"] == [
        {"probabilities": masked["probabilities"]}] * 2
    for body, media, field, words in (
        (npy(tensors["obs.pos"]), NPY, "body", "application/safetensors"),
        (st(**{k: v for k, v in tensors.items() if k != "obs.gear"}), SAFETENSORS, "body.obs.gear", "missing"),
        (st(**tensors | {"obs.gear": np.array(3)}), SAFETENSORS, "body.obs.gear", "outside the space's [0, 2]"),
        (st(**tensors, action_mask=np.array([0, 2, 1])), SAFETENSORS, "body.action_mask", "value 2 at [1]"),
        (st(**tensors, action_mask=np.ones(4, bool)), SAFETENSORS, "body.action_mask", "expected [3]"),
        (st(**tensors, extra=np.ones(1)), SAFETENSORS, "body.extra", "unknown"),
    ):
        answer = post(spaces, f"{robot}/predict", body, media)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]["fields"][0]
        assert error["field"] == field and words in error["message"], error


def test_a_dict_mask_entry_travels_as_its_tensor_and_is_required(spaces: TestClient) -> None:
    obs = {"pos": [0.5, -0.5], "gear": 2, "legal": [True, False, True]}
    tensors = {"obs.pos": np.array([0.5, -0.5], np.float32), "obs.gear": np.array(2), "obs.legal": np.array([1, 0, 1])}
    expected = spaces.post("/policies/masked/distribution", json={"obs": obs}).json()
    assert expected["probabilities"]["1"] == 0
    assert post(spaces, "/policies/masked/distribution", st(**tensors), SAFETENSORS).json() == expected
    missing = post(spaces, "/policies/masked/predict", st(**{k: v for k, v in tensors.items() if k != "obs.legal"}),
                   SAFETENSORS)
    assert missing.status_code == 422 and missing.json()["error"]["fields"][0]["field"] == "body.obs.legal"


# --- experience -----------------------------------------------------------------------------------


def steps_tensors(fragment: dict[str, Any]) -> dict[str, np.ndarray]:
    obs = np.array(fragment["observations"], np.float32)
    t = len(fragment["actions"])
    return {"obs": obs[:-1], "next_obs": obs[1:], "actions": np.array(fragment["actions"]),
            "rewards": np.array(fragment["rewards"], np.float32), "log_probs": np.array(fragment["log_probs"], np.float32),
            "terminated": np.arange(t) == t - 1}


@pytest.fixture(scope="module")
def trainer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("binary-train")
    with app_client(training_schema(model_dir, tmp / "ckpt", ppo={"rollout_samples": 1024}), tmp) as c:
        yield c


def test_safetensors_experience_is_the_json_fragment_it_mirrors(trainer: TestClient, model_dir: Path) -> None:
    fragment = cart_fragment(steps=8)
    body = safetensors.numpy.save(steps_tensors(fragment), metadata={"client_id": "c1", "model_version": "0"})
    answer = post(trainer, "/train/experience", body, SAFETENSORS)
    assert answer.status_code == 200 and answer.json()["accepted"] == 8, answer.text
    spec = parse_schema(training_schema(model_dir, model_dir / "unused"), model_dir).policies["cart"]
    policy = resolve_policy(spec)[0]
    batch, variant = experience(body, policy, 4096)
    json_batch = to_batch(ExperienceRequest.model_validate({"client_id": "c1", "fragments": [fragment]}), policy, 4096)
    for name in ("obs", "next_obs", "actions", "rewards", "terminated", "truncated", "segment_end", "log_probs",
                 "versions"):
        assert np.array_equal(getattr(batch, name), getattr(json_batch, name), equal_nan=True), name
    assert variant is None


BAD_EXPERIENCE = {
    "npy": (lambda t, m: npy(t["obs"]), NPY, "body", "application/safetensors"),
    "no client_id": (lambda t, m: safetensors.numpy.save(t, metadata={"model_version": "0"}), SAFETENSORS,
                     "body.__metadata__.client_id", "1 to 128"),
    "bad version": (lambda t, m: safetensors.numpy.save(t, metadata=m | {"model_version": "-1"}), SAFETENSORS,
                    "body.__metadata__.model_version", "in decimal"),
    "unknown metadata": (lambda t, m: safetensors.numpy.save(t, metadata=m | {"seed": "1"}), SAFETENSORS,
                         "body.__metadata__.seed", "unknown"),
    "action out of range": (lambda t, m: safetensors.numpy.save(t | {"actions": t["actions"] + 5}, metadata=m),
                            SAFETENSORS, "body.actions.0", "out of range"),
    "nan action": (lambda t, m: safetensors.numpy.save(t | {"actions": np.full(8, np.nan, np.float32)}, metadata=m),
                   SAFETENSORS, "body.actions", "not finite"),
    "nan reward": (lambda t, m: safetensors.numpy.save(t | {"rewards": t["rewards"] * np.nan}, metadata=m),
                   SAFETENSORS, "body.rewards", "not finite"),
    "short next_obs": (lambda t, m: safetensors.numpy.save(t | {"next_obs": t["next_obs"][:3]}, metadata=m),
                       SAFETENSORS, "body.next_obs", "3 rows, but obs, actions, rewards"),
    "no rewards": (lambda t, m: safetensors.numpy.save({k: v for k, v in t.items() if k != "rewards"}, metadata=m),
                   SAFETENSORS, "body.rewards", "missing"),
    "terminated as floats": (lambda t, m: safetensors.numpy.save(t | {"terminated": np.zeros(8)}, metadata=m),
                             SAFETENSORS, "body.terminated", "float64 does not cast"),
}


@pytest.mark.parametrize("case", BAD_EXPERIENCE, ids=list(BAD_EXPERIENCE))
def test_bad_binary_experience_is_a_422_naming_the_tensor(trainer: TestClient, case: str) -> None:
    make, media, field, words = BAD_EXPERIENCE[case]
    body = make(steps_tensors(cart_fragment(steps=8)), {"client_id": "c1", "model_version": "0"})
    answer = post(trainer, "/train/experience", body, media)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["fields"][0]["field"] == field and words in error["fields"][0]["message"], error


def test_a_body_of_another_content_type_is_415_naming_the_accepted_ones(client: TestClient) -> None:
    answer = post(client, "/predict", b"\x00" * 16, "application/octet-stream")
    assert answer.status_code == 415 and answer.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json, application/x-npy or application/safetensors" in answer.json()["error"]["message"]
