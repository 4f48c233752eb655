"""``python generate.py clients``: the SDKs of a schema's API written to a folder, without Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import API_KEY, multi_policy_schema

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "generate.py", "clients", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PAGER": "cat", "PATH": path, "HOME": "/nonexistent"},
    )


def test_the_command_documents_itself() -> None:
    shown = run_cli("--help", path="/usr/bin:/bin")
    assert shown.returncode == 0, shown.stderr
    assert "--languages" in shown.stdout + shown.stderr and "--out" in shown.stdout + shown.stderr


def test_without_java_it_says_so_and_still_writes_python(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(multi_policy_schema(model_dir)))
    python_only = str(Path(sys.executable).parent)  # no java there
    done = run_cli(
        "--schema",
        str(tmp_path / "schema.yaml"),
        "--out",
        str(tmp_path / "clients"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--languages",
        "python,java",
        path=python_only,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote python to" in done.stdout
    assert "java missing: Java, Scala, R, TypeScript and Go SDKs need a Java runtime" in done.stdout
    assert "client SDKs" in done.stderr and "2/2" in done.stderr  # the progress bar
    written = tmp_path / "clients"
    assert (written / "python" / "setup.py").is_file() and not (written / "java").exists()
    assert "apt-get install default-jre-headless" in (written / "MISSING.md").read_text()
    assert all(API_KEY not in p.read_text() for p in written.rglob("*.py"))
