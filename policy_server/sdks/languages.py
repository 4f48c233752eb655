"""The languages client SDKs are generated for, and the ``languages`` filter that picks some."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, cast, get_args

from policy_server.errors import FieldError, InvalidRequest

Language = Literal["python", "java", "scala", "r", "typescript", "go"]
LANGUAGES: tuple[Language, ...] = get_args(Language)


def _any_case(name: str) -> str:
    return "".join(f"[{c}{c.upper()}]" for c in name)


_NAME = "(" + "|".join(_any_case(name) for name in LANGUAGES) + ")"
LANGUAGES_PATTERN = rf"^\s*{_NAME}\s*(,\s*{_NAME}\s*)*$"
"""What ``parse_languages`` takes as a string: names in any case, comma-separated (no flags, so
that every JSON Schema validator reads it)."""


def parse_languages(value: str | Iterable[str] | None, field: str = "query.languages") -> list[Language]:
    """``"python,go"`` (or a list of names) → the languages in canonical order; None → all of them.

    Raises InvalidRequest (422) naming the unknown languages and the known ones.
    """
    if value is None:
        return list(LANGUAGES)
    names = value.split(",") if isinstance(value, str) else list(value)
    wanted = {str(name).strip().lower() for name in names}
    unknown = sorted(wanted - set(LANGUAGES))  # "" too: "python,,go" has an empty name
    if unknown:
        what = f"unknown language(s) {', '.join(map(repr, unknown))}" if wanted - {""} else "no language given"
        message = f"{what}; choose from {', '.join(LANGUAGES)} (comma-separated)"
        raise InvalidRequest(message, [FieldError(field, message)])
    return [cast(Language, name) for name in LANGUAGES if name in wanted]
