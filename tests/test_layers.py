"""The package's layers point one way, read from the source with ``ast`` (nothing is imported).

- ``schema/`` is at the bottom: it and everything it imports reach only ``policy_server.errors``,
  ``policy_server.fields`` and ``schema/`` itself, never llm/, training/, policies/, serving/, gateway/.
- The domain (policies, training, llm, schema) never reaches fastapi or starlette: HTTP stays in
  the gateway.
- The Python client (``client/``) never reaches Ray: it runs where the environments run.
- No module is over 500 lines.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "policy_server"
MAX_LINES = 500
SCHEMA_MAY_IMPORT = ("policy_server.schema", "policy_server.errors", "policy_server.fields")
DOMAIN = ("policies", "training", "llm", "schema", "experience_log")
HTTP = ("fastapi", "starlette")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def imports(module: str) -> frozenset[str]:
    """Every module ``module`` imports, at the top or inside a function (absolute names)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return frozenset(found)


def reachable(module: str) -> set[str]:
    """``module`` and every policy_server module it imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in imports(current) if m in MODULES)
    return seen


def in_package(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def test_the_import_reader_sees_imports_of_every_kind() -> None:
    assert "policy_server.schema.llm" in imports("policy_server.schema.config")  # from x import y
    assert "policy_server.schema.config" in imports("policy_server.schema")  # a package's __init__
    assert "policy_server.training.guard" in reachable("policy_server.policies.torch_policy")
    assert "fastapi" in imports("policy_server.gateway.app")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if in_package(m, ("policy_server.schema",))))
def test_schema_imports_nothing_above_it(module: str) -> None:
    above = sorted(m for m in reachable(module) if not in_package(m, SCHEMA_MAY_IMPORT))
    assert above == [], f"{module} reaches {above}; schema types must not depend on the layers above"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if in_package(m, tuple(f"policy_server.{d}" for d in DOMAIN)))
)
def test_the_domain_never_imports_http(module: str) -> None:
    http = sorted(
        f"{m} imports {name}" for m in reachable(module) for name in imports(m) if in_package(name, HTTP)
    )
    assert http == [], f"{module} reaches the HTTP layer: {http}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if in_package(m, ("policy_server.client",))))
def test_the_client_never_imports_ray(module: str) -> None:
    ray = sorted(f"{m} imports {name}" for m in reachable(module) for name in imports(m) if in_package(name, ("ray",)))
    assert ray == [], f"{module} reaches Ray: {ray}"


def test_no_module_is_over_500_lines() -> None:
    lengths = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES.values()
    }
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert long == {}, f"split these modules (over {MAX_LINES} lines): {long}"


@pytest.mark.parametrize("package", DOMAIN)
def test_the_domain_never_names_http_body_fields(package: str) -> None:
    """Domain errors name fields from their own input (``checkpoint``, ``dataset.3.GAE``); the
    gateway says where in the request they are (``gateway.errors.in_body``)."""
    named = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if '"body.' in line or "'body." in line or 'f"body' in line
    ]
    assert named == []
