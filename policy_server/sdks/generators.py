"""The SDK generators, each run in a subprocess with a timeout: openapi-python-client for Python,
openapi-generator (a jar run by ``java``) for the other languages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from policy_server.errors import ClientGenerationFailed
from policy_server.sdks.java import JAVA_OPTIONS
from policy_server.sdks.languages import Language

GENERATOR_NAMES: dict[Language, str] = {
    "java": "java",
    "scala": "scala-sttp",
    "r": "r",
    "typescript": "typescript-fetch",
    "go": "go",
}
OPTIONS: dict[Language, dict[str, str]] = {
    "java": JAVA_OPTIONS,
    "scala": {"mainPackage": "policyserver.client", "hideGenerationTimestamp": "true"},
    "r": {"packageName": "policyserver", "hideGenerationTimestamp": "true"},
    "typescript": {
        "npmName": "policy-server-client",
        "supportsES6": "true",
        "hideGenerationTimestamp": "true",
    },
    "go": {"packageName": "policyserver", "hideGenerationTimestamp": "true"},
}
JAVA_HINT = "install one, e.g. `apt-get install default-jre-headless`"
_JVM_FLAGS = ["-XX:TieredStopAtLevel=1"]  # C1 only: a short-lived generator run starts ~30% faster
_ERROR_CHARS = 2000


def tool_versions() -> dict[str, str]:
    """Versions of the generator packages (part of the cache key)."""
    versions = {}
    for package in ("openapi-python-client", "openapi-generator-cli"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def generator_jar() -> Path | None:
    """openapi-generator's jar, shipped inside the ``openapi-generator-cli`` PyPI package."""
    spec = find_spec("openapi_generator_cli")
    if spec is None or spec.origin is None:
        return None
    jar = Path(spec.origin).parent / "openapi-generator.jar"
    return jar if jar.is_file() else None


@dataclass
class Toolchain:
    """Which generators this machine can run; ``java`` is a command name or path."""

    java: str = "java"
    timeout_s: float = 300.0
    java_path: str | None = field(init=False)
    jar: Path | None = field(init=False)
    _running: subprocess.Popen[str] | None = field(init=False, default=None)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.java_path = shutil.which(self.java)
        self.jar = generator_jar()

    def missing(self, language: Language) -> str | None:
        """Why ``language`` cannot be generated here (what to install), or None."""
        if language == "python":
            if find_spec("openapi_python_client") is None:
                return "the Python SDK needs openapi-python-client: `pip install openapi-python-client`"
            return None
        if self.java_path is None:
            return (
                f"Java, Scala, R, TypeScript and Go SDKs need a Java runtime ({self.java} not found "
                f"on PATH); {JAVA_HINT}"
            )
        if self.jar is None:
            return "openapi-generator's jar is missing: `pip install openapi-generator-cli`"
        return None

    def command(self, language: Language, document: Path, out: Path) -> list[str]:
        """The command line that writes ``language``'s SDK for ``document`` into ``out``."""
        if language == "python":
            tool = [sys.executable, "-m", "openapi_python_client", "generate", "--meta", "setup"]
            return [*tool, "--path", str(document), "--output-path", str(out)]
        assert self.java_path is not None and self.jar is not None
        options = dict(OPTIONS[language])
        library = options.pop("library", None)
        tool = [
            self.java_path,
            *_JVM_FLAGS,
            "-jar",
            str(self.jar),
            "generate",
            "-g",
            GENERATOR_NAMES[language],
        ]
        properties = ",".join(f"{k}={v}" for k, v in options.items())
        command = [*tool, "-i", str(document), "-o", str(out), "--additional-properties", properties]
        return command + (["--library", library] if library else [])

    def run(self, command: list[str]) -> None:
        """Run one generator; raises ClientGenerationFailed with the end of its output."""
        with self._lock:
            if self._closed:
                raise ClientGenerationFailed("generation was stopped (the server is shutting down)")
            process = self._running = subprocess.Popen(
                _niced(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        try:
            output, _ = process.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise ClientGenerationFailed(
                f"{Path(command[0]).name} ran past the {self.timeout_s:g} s timeout"
            ) from None
        finally:
            with self._lock:
                self._running = None
        if process.returncode != 0:
            raise ClientGenerationFailed(f"exit status {process.returncode}: {trim(output)}")

    def close(self) -> None:
        """Stop the generator running now and refuse new runs until ``reopen``."""
        with self._lock:
            self._closed = True
            if self._running is not None:
                self._running.kill()

    def reopen(self) -> None:
        with self._lock:
            self._closed = False


def _niced(command: list[str]) -> list[str]:
    """At a lower CPU priority where ``nice`` exists: requests being served come first."""
    nice = shutil.which("nice")
    return [nice, "-n", "10", *command] if nice else command


def trim(output: str) -> str:
    """The end of a generator's output: its last lines, at most ~2000 characters."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    text = "\n".join(lines[-20:])
    return text if len(text) <= _ERROR_CHARS else "…" + text[-_ERROR_CHARS:]
