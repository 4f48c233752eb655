"""Property-based fuzzing (schemathesis) of every operation of the OpenAPI document, against a live
server of each example.

A real uvicorn serves each schema (local backend: no Ray), and schemathesis sends what its OpenAPI
document allows, and what it forbids (negative cases), to every operation, with the api key. Every
answer must hold to the contract:

- no 5xx, except a 503 that the operation documents (`GET /clients` answers 503
  `clients_not_ready` while the SDKs are generated);
- every error is the JSON envelope `{"error": {"code", "message", "status", "fields"}}`, and a 422
  names the field;
- its status code, content type, headers and body are the documented ones; a method the path
  does not answer gets 405 with `Allow` naming those it does (RFC 9110);
- our own request models are strict: what the document forbids gets a 4xx (the OpenAI-compatible
  routes keep OpenAI's leniency);
- on the routes that schema.yaml fixes completely (the observation routes), what the document
  allows is accepted: the document states every constraint, widths included. Their binary bodies
  (`.npy`, safetensors) are sent as the bytes schemathesis draws: each must be the 422 envelope,
  never a 5xx (a JSON Schema cannot state a tensor's header, dtype or shape).

The bundled example (top-level `schema.yaml`) runs with the most examples; the other examples, and
one schema with every router (two policies, one of them trainable, an LLM policy with GRPO, a value
model), run with fewer, so that the file takes a few minutes on two cores. Hypothesis stops an
operation at its first failure; to list every failure of a server at once, run schemathesis's CLI
against it, e.g. `st run http://127.0.0.1:8000/openapi.json -H 'access-token: <key>' --checks all`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from conftest import running_server, training_schema
from hypothesis import HealthCheck, settings
from schemathesis import BaseSchema, Case, CheckContext, Response
from schemathesis.checks import CheckFunction

from policy_server.gateway.app import build_app
from policy_server.gateway.policy.binary import BINARY_TYPES
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FUZZ_KEY = "fuzz-key-0123"
# Both ways the server takes a key: the `access-token` header (our routes) and a bearer token
# (the OpenAI-compatible routes). Schemathesis's own guesses at the key (query, cookie) stay in
# the requests: the server lets a request through when any key it carries matches.
AUTH = {"access-token": FUZZ_KEY, "Authorization": f"Bearer {FUZZ_KEY}"}
ENVELOPE_KEYS = {"code", "message", "status", "fields"}
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
OPENAI_ROUTES = re.compile(r"(^|/)v1/")
SCHEMA_FIXED_ROUTES = re.compile(r"/(predict|predict_raw|predict_deterministic|distribution)(/batch)?$")
# the binary bodies (`format: binary`) travel as the bytes drawn for them, as octet-stream's do
schemathesis.serializer.alias(list(BINARY_TYPES), "application/octet-stream")
# The LLM policies' generation limits while fuzzed. The contract (and so what schemathesis draws)
# follows the limits, so every bound is still probed. But schemathesis sends ~600 completions to the
# OpenAI routes, a random-weight tiny model seldom ends a sample early, and a token takes ~0.1 s on
# CI's 2 cores: at the llm example's 256 new tokens and 16 samples that case took 80 s.
FUZZ_LIMITS = {"max_new_tokens": 2, "max_num_samples": 4}
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def server_errors_are_documented_503s(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """No 5xx but a 503 that the operation documents (500 is documented everywhere, as the
    envelope a broken model answers with, and is never fine)."""
    status = response.status_code
    if status < 500:
        return None
    documented = case.operation.definition.raw.get("responses", {})
    assert status == 503 and "503" in documented, (
        f"{case.operation.label} answered {status}: {response.text[:500]}"
    )
    return None


def errors_are_the_envelope(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx is `{"error": {"code", "message", "status", "fields"}}` with the HTTP
    status in it; a 422 names at least one field."""
    status = response.status_code
    if status < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(
            f"{case.operation.label} answered {status} without JSON: {response.text[:300]!r}"
        ) from None
    error = body.get("error") if isinstance(body, dict) else None
    if "/v1/" in case.operation.path:  # OpenAI's routes answer in OpenAI's error shape (README)
        assert isinstance(error, dict) and set(error) == OPENAI_ERROR_KEYS and set(body) == {"error"}, (
            f"{case.operation.label} answered {status} outside OpenAI's error shape: {response.text[:300]}"
        )
        assert isinstance(error["message"], str) and isinstance(error["type"], str), error
        return None
    assert isinstance(error, dict) and set(error) == ENVELOPE_KEYS and set(body) == {"error"}, (
        f"{case.operation.label} answered {status} outside the envelope: {response.text[:300]}"
    )
    assert error["status"] == status, (
        f"{case.operation.label}: envelope status {error['status']} != HTTP {status}"
    )
    assert isinstance(error["code"], str) and isinstance(error["message"], str), error
    assert all(isinstance(f, dict) and set(f) == {"field", "message"} for f in error["fields"]), error
    assert status != 422 or error["fields"], (
        f"{case.operation.label}: a 422 that names no field: {response.text[:300]}"
    )
    return None


def strict_request_models(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """What the document forbids is refused (schemathesis's negative_data_rejection): our request
    models are strict. The OpenAI-compatible routes keep OpenAI's leniency (0 for false, ...)."""
    if OPENAI_ROUTES.search(case.operation.path):
        return None
    return schemathesis.checks.negative_data_rejection(ctx, response, case)


def documented_inputs_are_accepted(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """What the document allows is accepted (schemathesis's positive_data_acceptance) on the
    observation routes, whose every constraint the schema.yaml fixes (names, types, ranges,
    widths), so the document can state them all. Elsewhere validity also depends on what no JSON
    Schema can say: a prompt's length in tokens, a fragment's `observations` being one longer
    than its `actions`. One bound here is the model's own, not the schema's: values near
    float32's limit that overflow its float32 layers (422 `model_overflow`, naming the field). One
    is the request's own: an `action_mask` must allow some action in every component, and the raw
    batch form needs one per row, which no JSON Schema of a list of booleans says (422 naming it)."""
    if not SCHEMA_FIXED_ROUTES.search(case.operation.path) or case.media_type in BINARY_TYPES:
        return None
    if response.status_code == 422 and response.json()["error"]["code"] == "model_overflow":
        return None
    if response.status_code == 422 and all("action_mask" in f["field"].split(".") for f in response.json()["error"]["fields"]):
        return None
    return schemathesis.checks.positive_data_acceptance(ctx, response, case)


CHECKS: list[CheckFunction] = [
    server_errors_are_documented_503s,
    errors_are_the_envelope,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.unsupported_method,
    schemathesis.checks.allow_header_conformance,
    strict_request_models,
    documented_inputs_are_accepted,
]


def exercise(case: Case) -> None:
    """Send one case with the key and run every check on its answer."""
    response = case.call(headers=AUTH, timeout=120)
    case.validate_response(response, checks=CHECKS)


def settings_for(schema_path: Path, tmp: Path) -> Settings:
    """A local-backend server of ``schema_path`` with the fuzz key and no metrics port.

    The SDK generator's Java is a command that does not exist, so `GET /clients` generates only
    the Python SDK (the Java-based generators would take minutes of both cores).
    """
    return Settings(
        schema_path=schema_path,
        backend="local",
        api_key=FUZZ_KEY,
        gateway_metrics_port=0,
        seed=0,
        clients_cache_dir=tmp / "clients",
        clients_java=str(tmp / "no-java"),
    )


def live_api(schema_path: Path, tmp: Path) -> Iterator[BaseSchema]:
    """A live server of ``schema_path`` and the schemathesis schema loaded from its /openapi.json."""
    with running_server(build_app(settings_for(schema_path, tmp))) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def llm_example_schema(name: str, llm_dirs: dict[str, Path], tmp: Path, engine: str | None = None) -> Path:
    """``examples/<name>/schema.yaml`` as it is, its model folders pointed at the tiny models built
    for the test session (the example's own are built by a script), written under ``tmp``; on
    ``engine`` when given."""
    doc = yaml.safe_load((EXAMPLES / name / "schema.yaml").read_text())
    policy = doc["llm"]["policy"]
    if engine:
        policy["engine"] = engine
    policy["path"] = str(llm_dirs["policy"])
    if "adapter" in policy:
        policy["adapter"] = str(llm_dirs["policy_lora"])
    if "training" in policy:
        policy["training"]["save_dir"] = str(tmp / "runs")
    if "value" in doc["llm"]:
        doc["llm"]["value"]["path"] = str(llm_dirs["value"])
    return write_fuzzed(doc, tmp)


def write_fuzzed(doc: dict[str, Any], tmp: Path) -> Path:
    """``doc`` with its LLM policy's generation limits lowered to ``FUZZ_LIMITS``, written under ``tmp``."""
    policy = doc.get("llm", {}).get("policy")
    if policy is not None:
        policy["limits"] = policy.get("limits", {}) | FUZZ_LIMITS
    path = tmp / "schema.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def every_router_schema(model_dir: Path, llm_dirs: dict[str, Path], tmp: Path) -> Path:
    """Two policies (one trainable), an LLM policy with GRPO training and a value model."""
    doc = training_schema(model_dir, tmp / "checkpoints")
    doc["llm"] = {
        "policy": {"path": str(llm_dirs["policy"]), "engine": "transformers", "training": {"save_dir": str(tmp / "runs")}},
        "value": {"path": str(llm_dirs["value"])},
    }
    return write_fuzzed(doc, tmp)


@pytest.fixture(scope="module")
def bundled_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseSchema]:
    """The top-level schema.yaml and models/, as `uvicorn app:app` serves them."""
    yield from live_api(ROOT / "schema.yaml", tmp_path_factory.mktemp("bundled"))


@pytest.fixture(params=["cartpole", "llm", "alphabetical", "every-router"])
def example_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BaseSchema]:
    """Each example of examples/ (the LLM ones over the session's tiny models), and every router.
    The contract is the gateway's, whatever the engine: one vLLM engine (the llm example's) is enough.
    examples/lpoc is the bundled example, file for file: the bundled run covers it."""
    name = request.param
    if name == "cartpole":
        path = EXAMPLES / name / "schema.yaml"
    elif name == "every-router":
        model_dir, llm_dirs = request.getfixturevalue("model_dir"), request.getfixturevalue("llm_dirs")
        path = every_router_schema(model_dir, llm_dirs, tmp_path)
    else:  # the llm example on its default engine (vLLM), the other on the transformers engine
        engine = None if name == "llm" else "transformers"
        path = llm_example_schema(name, request.getfixturevalue("llm_dirs"), tmp_path, engine)
    yield from live_api(path, tmp_path)


bundled = schemathesis.pytest.from_fixture("bundled_api")
examples = schemathesis.pytest.from_fixture("example_api")


@settings(FUZZ, max_examples=25)
@bundled.parametrize()
def test_bundled_example_answers_every_request_within_its_contract(case: Case) -> None:
    """The CI run: the example a fresh clone serves."""
    exercise(case)


@settings(FUZZ, max_examples=5)
@examples.parametrize()
def test_every_example_answers_every_request_within_its_contract(case: Case) -> None:
    exercise(case)
