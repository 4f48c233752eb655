"""No log line holds an api key: ``redact`` and the ``RedactSecrets`` filter on uvicorn's loggers."""

from __future__ import annotations

import io
import logging
import logging.config
from collections.abc import Iterator

import pytest
from uvicorn.config import LOGGING_CONFIG

from policy_server.gateway.redact import RedactSecrets, install_log_redaction, redact

KEY = "s3cr3t-KEY_42"


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        (f'POST /predict_raw?access-token={KEY} HTTP/1.1', "/predict_raw?access-token=***"),
        (f"/predict?x=1&access-token={KEY}&y=2", "x=1&access-token=***&y=2"),
        (f"/predict?access%2Dtoken={KEY}", "access%2Dtoken=***"),  # Starlette decodes the name
        (f"/predict?%61ccess-token={KEY}", "=***"),
        (f"/predict?access_token={KEY}#top", "access_token=***#top"),
        (f"/predict?access-token={KEY}%20more+words", "access-token=***"),
        (f"Cookie: access-token={KEY}; theme=dark", "theme=dark"),
        (f"{{'access-token': '{KEY}', 'accept': 'json'}}", "'accept': 'json'"),
        (f"access-token: {KEY}", "access-token: ***"),
        (f"Authorization: Bearer {KEY}", "Bearer ***"),
        (f"authorization: basic {KEY}==", "basic ***"),
    ],
)
def test_redact_masks_the_key_in_every_form_it_is_sent(line: str, kept: str) -> None:
    masked = redact(line)
    assert KEY not in masked and kept in masked


def test_other_query_parameters_stay_as_they_are() -> None:
    line = "GET /llm/forward/abc?wait=1&token_count=5 HTTP/1.1"
    assert redact(line) == line


@pytest.fixture()
def access_log() -> Iterator[io.StringIO]:
    """uvicorn's own logging config, re-applied after the filter was installed, to a buffer."""
    install_log_redaction()
    logging.config.dictConfig(LOGGING_CONFIG)  # what `uvicorn` does in each worker and on reload
    sink = io.StringIO()
    handler = logging.getLogger("uvicorn.access").handlers[0]
    handler.setStream(sink)  # type: ignore[attr-defined]
    yield sink
    logging.getLogger("uvicorn.access").handlers.clear()


def test_the_filter_survives_uvicorns_log_config_and_keeps_its_access_format(access_log: io.StringIO) -> None:
    logger = logging.getLogger("uvicorn.access")
    assert any(isinstance(f, RedactSecrets) for f in logger.filters)
    # the call uvicorn's protocols make for each request
    logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", f"/predict?access-token={KEY}", "1.1", 200)
    line = access_log.getvalue()
    assert KEY not in line and '"POST /predict?access-token=*** HTTP/1.1" 200' in line
