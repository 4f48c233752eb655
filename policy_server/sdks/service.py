"""``ClientSDKs``: generates the SDKs of one OpenAPI document once, caches them on disk, bundles them.

The cache folder is ``<cache_root>/<key>/<language>/``, the key a hash of the OpenAPI document,
the generators' versions and their options: a new schema, server version or generator gives a
new folder, the same ones reuse it (across restarts and processes). A language appears there only
once complete (written to a temporary folder, then renamed); failed and missing languages are not
cached, so a later run tries them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from policy_server.errors import ClientGenerationFailed, ClientsNotReady
from policy_server.files import atomic_write_text, replacing_dir
from policy_server.sdks import bundle
from policy_server.sdks.generators import OPTIONS, Toolchain, tool_versions
from policy_server.sdks.java import (
    JAVA_PATCHES,
    drop_java_time,
    java_document,
    use_http_1_1,
    uses_time_formats,
)
from policy_server.sdks.languages import LANGUAGES, Language
from policy_server.sdks.progress import LanguageState, Progress, RunStatus

log = logging.getLogger(__name__)
OnLanguage = Callable[[Language, LanguageState], None]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/policy-server/clients`` (``~/.cache/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "policy-server" / "clients"


def cache_key(document: dict[str, Any], versions: dict[str, str]) -> str:
    """sha256 of the OpenAPI document, the generators' versions, options and our Java patches
    (first 24 hex digits)."""
    text = json.dumps([document, versions, OPTIONS, JAVA_PATCHES], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ClientSDKs:
    """The SDKs of ``languages`` for one OpenAPI document; ``java`` is the Java command (or path)."""

    def __init__(
        self,
        cache_root: Path | None = None,
        java: str = "java",
        timeout_s: float = 300.0,
        languages: Sequence[Language] = LANGUAGES,
    ) -> None:
        self.cache_root = cache_root or default_cache_dir()
        self.toolchain = Toolchain(java, timeout_s)
        self.versions = tool_versions()
        self.languages = list(languages)
        self.folder: Path | None = None
        self._progress = Progress(languages={lang: "pending" for lang in self.languages})
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._keep_java_time = False

    def progress(self) -> Progress:
        """A snapshot of the generation's progress."""
        with self._lock:
            p = self._progress
            return replace(p, languages=dict(p.languages), notes=dict(p.notes))

    def start(self, document: dict[str, Any]) -> None:
        """Start generating in a background thread, unless started before (cheap to call again).

        When every language is cached already, the SDKs are ready on return.
        """
        with self._lock:
            if self._progress.status != "pending":
                return
            self._progress.status = "running"
        if self._guarded(self._prepare, document) and self._pending():
            self._thread = threading.Thread(
                target=self._guarded, args=(self._run,), name="client-sdks", daemon=True
            )
            self._thread.start()
        elif self.progress().status == "running":
            self._finish("ready")

    def wait(self, timeout_s: float | None = None) -> Progress:
        """Block until the generation has ended (or ``timeout_s`` passed); its progress."""
        self._finished.wait(timeout_s)
        return self.progress()

    def generate(self, document: dict[str, Any], on_language: OnLanguage | None = None) -> Progress:
        """Generate every language not yet cached, here and now; ``on_language`` hears each one end."""
        with self._lock:
            self._progress.status = "running"
        if self._guarded(self._prepare, document):
            self._guarded(self._run, on_language)
        return self.progress()

    def bundle(self, languages: Sequence[Language] | None = None) -> bytes:
        """The zip of the generated SDKs (one folder per language), README.md and openapi.json.

        Raises ClientsNotReady while generating, ClientGenerationFailed when the run broke.
        """
        chosen = self._ready_languages(languages)
        assert self.folder is not None
        return bundle.write_zip(self.folder, chosen, self._texts(chosen))

    def export(self, out: Path, languages: Sequence[Language] | None = None) -> Path:
        """The same content as ``bundle``, written to the folder ``out``."""
        chosen = self._ready_languages(languages)
        assert self.folder is not None
        bundle.write_folder(self.folder, chosen, self._texts(chosen), out)
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop a running generation (its generator is killed); a later ``start`` begins anew,
        reusing the languages already cached."""
        self.toolchain.close()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            self._thread = None
            self._progress = Progress(languages={lang: "pending" for lang in self.languages})
            self._finished.clear()
        self.toolchain.reopen()

    def _ready_languages(self, languages: Sequence[Language] | None) -> list[Language]:
        progress = self.progress()
        if progress.status == "failed":
            raise ClientGenerationFailed(f"client SDK generation failed: {progress.error}")
        if progress.status != "ready":
            raise ClientsNotReady(
                f"the client SDKs are being generated ({progress.summary()}); retry in a few seconds"
            )
        return [lang for lang in self.languages if languages is None or lang in languages]

    def _texts(self, languages: list[Language]) -> dict[str, str]:
        progress = self.progress()
        assert self.folder is not None
        texts = {
            "README.md": bundle.readme(progress, languages, self.versions),
            "openapi.json": (self.folder / "openapi.json").read_text(),
        }
        missing = bundle.missing_text(progress, languages)
        return texts | ({"MISSING.md": missing} if missing else {})

    def _prepare(self, document: dict[str, Any]) -> None:
        """Write the documents the generators read into the cache folder; cached languages are done."""
        folder = self.cache_root / cache_key(document, self.versions)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "openapi.json", json.dumps(document, indent=2))
        atomic_write_text(folder / "openapi-java.json", json.dumps(java_document(document), indent=2))
        self._keep_java_time = uses_time_formats(document)
        with self._lock:
            self.folder = folder
            for lang in self.languages:
                if (folder / lang).is_dir():
                    self._progress.languages[lang] = "done"

    def _run(self, on_language: OnLanguage | None = None) -> None:
        for lang in self.languages:
            state = self._language(lang)
            if on_language is not None:
                on_language(lang, state)
        self._finish("ready")

    def _guarded(self, step: Callable[..., None], *args: Any) -> bool:
        """Run one step; when it raises, the whole run has failed: record why (False)."""
        try:
            step(*args)
        except Exception as exc:  # the run itself broke (disk full, cache not writable): say so
            log.exception("client SDK generation failed")
            self._finish("failed", f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _pending(self) -> list[Language]:
        return [lang for lang, state in self.progress().languages.items() if state != "done"]

    def _language(self, lang: Language) -> LanguageState:
        """Generate one language unless cached; its final state (a failure is noted, not raised)."""
        if self.progress().languages[lang] == "done":
            return "done"
        reason = self.toolchain.missing(lang)
        if reason is not None:
            return self._set_language(lang, "missing", reason)
        self._set_language(lang, "running")
        try:
            self._run_generator(lang)
        except ClientGenerationFailed as exc:
            log.warning("the %s SDK failed: %s", lang, exc.message)
            return self._set_language(lang, "failed", exc.message)
        return self._set_language(lang, "done")

    def _run_generator(self, lang: Language) -> None:
        assert self.folder is not None
        document = self.folder / ("openapi-java.json" if lang == "java" else "openapi.json")
        # another process may generate the same language into the same folder: the last one wins
        with replacing_dir(self.folder / lang) as build:
            scratch = build / "sdk"  # the generators make their output folder themselves
            self.toolchain.run(self.toolchain.command(lang, document, scratch))
            shutil.rmtree(scratch / ".ruff_cache", ignore_errors=True)  # openapi-python-client's formatter
            if lang == "java":
                use_http_1_1(scratch)
                if not self._keep_java_time:
                    drop_java_time(scratch)
            for child in scratch.iterdir():
                child.rename(build / child.name)
            scratch.rmdir()

    def _set_language(self, lang: Language, state: LanguageState, note: str | None = None) -> LanguageState:
        with self._lock:
            self._progress.languages[lang] = state
            if note is not None:
                self._progress.notes[lang] = note
        return state

    def _finish(self, status: RunStatus, error: str | None = None) -> None:
        with self._lock:
            self._progress.status = status
            self._progress.error = error
        self._finished.set()
