"""The error hierarchy: every 422 names its fields, and errors cross Ray whole."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import policy_server
from policy_server import errors
from policy_server.errors import FieldError, InvalidRequest, ModelOverflow, PolicyServerError, QueueFull

PACKAGE = Path(policy_server.__file__).parent
INVALID = {name for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, InvalidRequest)}


def test_an_invalid_request_names_at_least_one_field() -> None:
    with pytest.raises(TypeError, match="names at least one field"):
        InvalidRequest("body.x: bad", [])
    exc = InvalidRequest.at("body.stream", "streaming is not supported")
    assert exc.message == "body.stream: streaming is not supported"
    assert exc.fields == [FieldError("body.stream", "streaming is not supported")]


def _calls_without_fields(path: Path) -> list[str]:
    """``InvalidRequest(message)`` calls (or a subclass's) in ``path`` that pass no fields."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in INVALID):
            continue
        if len(node.args) < 2 and not any(k.arg == "fields" for k in node.keywords):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_every_invalid_request_raised_in_the_package_passes_its_fields() -> None:
    """Like httpx's test that every lower-layer error is mapped: a 422 that names no field cannot
    be written (the constructor refuses it at run time; this finds it before)."""
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 50 and INVALID == {"InvalidRequest", "ModelOverflow"}
    assert [site for path in sources for site in _calls_without_fields(path)] == []


@pytest.mark.parametrize(
    "exc",
    [
        InvalidRequest.at("body.messages.0", "an empty conversation"),
        ModelOverflow("body.obs: overflows", [FieldError("body.obs", "overflows")]),
        errors.NotFound("no checkpoint 'x'"),
        QueueFull("too many prompts queued", retry_after_s=7),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_cross_ray_whole(exc: PolicyServerError) -> None:
    """Ray pickles an actor's error; the default pickling calls ``cls(*args)``, which an
    InvalidRequest refuses (no fields) and QueueFull misreads."""
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert vars(back) == vars(exc)
