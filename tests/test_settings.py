"""Settings validated once: TLS files, CORS origins, and errors that name the variable, never a secret."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from support import self_signed_certificate

from policy_server.errors import SettingsError
from policy_server.settings import load_settings


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), password="key-password")


def test_tls_settings_become_uvicorns_arguments(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    settings = load_settings(ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_keyfile_password="key-password",
                             ssl_ca_certs=str(cert), ssl_cert_reqs="required")
    assert settings.uvicorn_ssl() == {"ssl_certfile": str(cert), "ssl_keyfile": str(key),
                                      "ssl_keyfile_password": "key-password", "ssl_ca_certs": str(cert),
                                      "ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert load_settings().uvicorn_ssl() == {}  # no certificate: plain HTTP


@pytest.mark.parametrize(("values", "message"), [
    ({"ssl_keyfile": "key"}, "POLICY_SERVER_SSL_KEYFILE is set without POLICY_SERVER_SSL_CERTFILE"),
    ({"ssl_certfile": "missing.pem"}, "POLICY_SERVER_SSL_CERTFILE: missing.pem does not exist"),
    ({"ssl_certfile": "cert", "ssl_keyfile": "key"}, "wrong key password"),  # no password for the encrypted key
    ({"ssl_certfile": "cert", "ssl_keyfile": "key", "ssl_keyfile_password": "nope-secret"}, "wrong key password"),
    ({"ssl_certfile": "cert", "ssl_keyfile": "key", "ssl_keyfile_password": "key-password",
      "ssl_cert_reqs": "required"}, "POLICY_SERVER_SSL_CERT_REQS needs POLICY_SERVER_SSL_CA_CERTS"),
    ({"ssl_certfile": "cert", "ssl_keyfile": "key", "ssl_keyfile_password": "key-password", "ssl_ca_certs": "key"},
     "POLICY_SERVER_SSL_CA_CERTS .* no PEM certificates"),
])
def test_wrong_tls_settings_are_refused_naming_the_variable(
    certificate: tuple[Path, Path], values: dict[str, str], message: str
) -> None:
    files = {"cert": str(certificate[0]), "key": str(certificate[1])}
    values = {name: files.get(value, value) if name != "ssl_keyfile_password" else value for name, value in values.items()}
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings(**values)
    assert "secret" not in caught.value.message


def test_a_folder_is_no_certificate(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="is not a file"):
        load_settings(ssl_certfile=str(tmp_path))


@pytest.mark.parametrize(("value", "origins"), [
    ("", []),
    ("https://app.example.com", ["https://app.example.com"]),
    ("https://a.example.com, http://localhost:3000", ["https://a.example.com", "http://localhost:3000"]),
    ('["https://a.example.com", "*"]', ["https://a.example.com", "*"]),
])
def test_cors_origins_read_as_a_comma_or_json_list(monkeypatch: pytest.MonkeyPatch, value: str, origins: list[str]) -> None:
    monkeypatch.setenv("POLICY_SERVER_CORS_ORIGINS", value)
    assert load_settings().cors_origins == origins


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "ftp://x.org", "https://x.org/path"])
def test_a_cors_origin_that_no_browser_sends_is_refused(origin: str) -> None:
    with pytest.raises(SettingsError, match="POLICY_SERVER_CORS_ORIGINS: .* is not an origin"):
        load_settings(cors_origins=[origin])
