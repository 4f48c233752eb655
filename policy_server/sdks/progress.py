"""How far SDK generation is: one state per language, and the whole run's status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from policy_server.sdks.languages import Language

LanguageState = Literal["pending", "running", "done", "failed", "missing"]
RunStatus = Literal["pending", "running", "ready", "failed"]


@dataclass
class Progress:
    """``status``: pending (not started), running, ready (every language ended) or failed (the run
    itself broke: ``error``). ``notes`` say why a language is missing or failed."""

    status: RunStatus = "pending"
    languages: dict[Language, LanguageState] = field(default_factory=dict)
    notes: dict[Language, str] = field(default_factory=dict)
    error: str | None = None

    def done(self) -> list[Language]:
        return [lang for lang, state in self.languages.items() if state == "done"]

    def summary(self) -> str:
        """``3/6 languages done: python, java, scala``."""
        done = self.done()
        return f"{len(done)}/{len(self.languages)} languages done" + (f": {', '.join(done)}" if done else "")

    def problems(self, languages: Sequence[Language] | None = None) -> list[tuple[str, list[Language], str]]:
        """(state, languages, note) for the missing and failed languages, one entry per same note."""
        grouped: dict[tuple[str, str], list[Language]] = {}
        for lang in languages if languages is not None else list(self.languages):
            state = self.languages.get(lang)
            if state in ("missing", "failed"):
                grouped.setdefault((state, self.notes.get(lang, "")), []).append(lang)
        return [(state, langs, note) for (state, note), langs in grouped.items()]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "languages": dict(self.languages),
            "notes": dict(self.notes),
            "error": self.error,
        }
