"""The README that comes with the SDKs, and the zip (or folder) they are handed out in."""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

from policy_server import __version__
from policy_server.sdks.java import JAVA_CLASSPATH_JARS
from policy_server.sdks.languages import Language
from policy_server.sdks.progress import Progress

ZIP_NAME = "policy-server-clients.zip"
USAGE: dict[Language, str] = {
    "python": "openapi-python-client; `pip install ./python`, then `AuthenticatedClient(base_url=URL, "
    'token=KEY, prefix="", auth_header_name="access-token")` and the functions under '
    "`policy_server_client.api` (`api.<tag>.predict.sync(client=..., body=...)`; one module per operation, named after its method and path).",
    "java": "openapi-generator `java`, library `native` (java.net.http + Jackson 2); build with the "
    f"pom.xml, or compile `src/main/java` against {', '.join(JAVA_CLASSPATH_JARS)}. Set the key with "
    '`apiClient.setRequestInterceptor(b -> b.header("access-token", KEY))`.',
    "scala": "openapi-generator `scala-sttp` (sttp client); build with sbt.",
    "r": "openapi-generator `r`; `R CMD INSTALL r`.",
    "typescript": "openapi-generator `typescript-fetch` (the Fetch API); `npm install && npm run build`.",
    "go": "openapi-generator `go`, package `policyserver`; `go build ./...`.",
}
_ZERO_TIME = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same SDKs give the same zip


def readme(progress: Progress, languages: Sequence[Language], versions: dict[str, str]) -> str:
    """README.md: what was generated, with how to use it, and what is missing or failed and why."""
    tools = ", ".join(f"{name} {version}" for name, version in versions.items())
    lines = [
        "# policy-server client SDKs",
        "",
        f"Generated from the OpenAPI document of this server (policy-server {__version__}; {tools}).",
        "Every call needs the api key in the `access-token` header (or query parameter, or cookie).",
        "",
    ]
    done = [lang for lang in languages if progress.languages.get(lang) == "done"]
    if done:
        lines += ["## Generated", ""] + [f"- `{lang}/`: {USAGE[lang]}" for lang in done] + [""]
    lines += _problems(progress, languages)
    return "\n".join(lines).rstrip() + "\n"


def missing_text(progress: Progress, languages: Sequence[Language]) -> str | None:
    """MISSING.md: the missing and failed languages and why, or None when nothing is."""
    problems = _problems(progress, languages)
    return "\n".join(["# Missing client SDKs", "", *problems]).rstrip() + "\n" if problems else None


def _problems(progress: Progress, languages: Sequence[Language]) -> list[str]:
    lines: list[str] = []
    for state, langs, note in progress.problems(languages):
        lines += [
            f"## {state.capitalize()}: {', '.join(langs)}",
            "",
            note if state == "missing" else _fenced(note),
            "",
        ]
    return lines


def _fenced(text: str) -> str:
    return f"```text\n{text}\n```"


def write_zip(root: Path, languages: Sequence[Language], texts: dict[str, str]) -> bytes:
    """A zip of ``root/<language>/`` for every given language that exists, plus the ``texts``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in texts.items():
            archive.writestr(zipfile.ZipInfo(name, _ZERO_TIME), text)
        for lang in languages:
            for path in sorted((root / lang).rglob("*")) if (root / lang).is_dir() else []:
                if path.is_file():
                    info = zipfile.ZipInfo(str(path.relative_to(root)), _ZERO_TIME)
                    info.external_attr = (path.stat().st_mode & 0o777) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def write_folder(root: Path, languages: Sequence[Language], texts: dict[str, str], out: Path) -> None:
    """The same content as ``write_zip``, as a folder (each language's folder replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    for lang in languages:
        if (root / lang).is_dir():
            shutil.rmtree(out / lang, ignore_errors=True)
            shutil.copytree(root / lang, out / lang)
    for name, text in texts.items():
        (out / name).write_text(text)
    if "MISSING.md" not in texts:
        (out / "MISSING.md").unlink(missing_ok=True)
