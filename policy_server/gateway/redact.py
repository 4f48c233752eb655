"""No log line holds an api key: a logging filter that masks credentials in every record.

The api key may come as the ``access-token`` query parameter (Pathmind's documented way), and
uvicorn's access log writes the whole request target: ``"POST /predict?access-token=... HTTP/1.1"
200``. ``RedactSecrets`` masks, in a record's message and in each of its string arguments:

- the value of every query or cookie pair whose name decodes (``%xx``, ``+``) to ``access-token``
  or ``access_token``: ``?access-token=***``;
- ``access-token: ...`` / ``'access-token': '...'`` as a header or a dict prints it;
- ``Bearer ...`` / ``Basic ...`` credentials of an ``Authorization`` header.

The arguments stay a tuple of the same length, so uvicorn's ``AccessFormatter`` (which unpacks
them) keeps working. ``install_log_redaction`` puts the filter on the ``uvicorn.access`` logger,
where it survives uvicorn re-applying its log config (``logging.config.dictConfig`` replaces a
logger's handlers but keeps its filters), and on the handlers present, which also see the records
other loggers propagate to them.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

MASK = "***"
KEY_NAMES = frozenset({"access-token", "access_token"})

# name=value pairs of a query string or a Cookie header: after ?, &, ;, or whitespace
# (the value runs to the next separator, quotes included: a key is never cut short)
_PAIR = re.compile(r"(?:(?<=[?&;\s])|^)([^=&;#\s\"'?]+)=([^&;#\s]*)")
# 'access-token': 'value', access-token: value (a header or a mapping printed)
_HEADER = re.compile(r"(?i)(access[-_]token[\"']?\s*:\s*[\"']?)([^\s\"',;}&]+)")
_AUTHORIZATION = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """``text`` with every api key in it replaced by ``***`` (see the module docstring)."""
    if "=" in text:
        text = _PAIR.sub(_mask_pair, text)
    if ":" in text:
        text = _HEADER.sub(lambda m: m.group(1) + MASK, text)
    return _AUTHORIZATION.sub(lambda m: m.group(1) + m.group(2) + MASK, text)


def _mask_pair(match: re.Match[str]) -> str:
    name = match.group(1)
    return f"{name}={MASK}" if unquote_plus(name).strip().lower() in KEY_NAMES else match.group(0)


class RedactSecrets(logging.Filter):
    """Masks api keys in a record's message and string arguments; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn", "policy_server", "")


def install_log_redaction() -> None:
    """Put one ``RedactSecrets`` on the loggers that may see a request target and on their
    handlers; idempotent, so the app calls it when it is built and again when it starts (after
    uvicorn configured logging in that worker process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactSecrets) for f in target.filters):
                target.addFilter(RedactSecrets())
