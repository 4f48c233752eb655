"""Client SDKs generated from the server's own OpenAPI document (Python; Java, Scala, R,
TypeScript and Go where a Java runtime is present), cached on disk and handed out as one zip."""

from policy_server.sdks.languages import LANGUAGES, Language, parse_languages
from policy_server.sdks.progress import LanguageState, Progress, RunStatus
from policy_server.sdks.service import ClientSDKs, cache_key, default_cache_dir

__all__ = [
    "LANGUAGES",
    "ClientSDKs",
    "Language",
    "LanguageState",
    "Progress",
    "RunStatus",
    "cache_key",
    "default_cache_dir",
    "parse_languages",
]
