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


def test_uvicorn_app_without_uvicorns_own_certificate_is_refused_not_served_as_plain_http(
    certificate: tuple[Path, Path],
) -> None:
    from policy_server.settings import tls_not_served

    cert, key = certificate
    settings = load_settings(ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_keyfile_password="key-password")
    reason = tls_not_served(settings, ["uvicorn", "app:app", "--port", "8443"], {})
    assert reason is not None and "generate.py serve" in reason and "--ssl-certfile" in reason
    assert tls_not_served(settings, ["uvicorn", "app:app", f"--ssl-certfile={cert}"], {}) is None
    assert tls_not_served(settings, ["uvicorn", "app:app", "--ssl-certfile", str(cert)], {}) is None
    assert tls_not_served(settings, ["uvicorn", "app:app"], {"UVICORN_SSL_CERTFILE": str(cert)}) is None
    assert tls_not_served(load_settings(), ["uvicorn", "app:app"], {}) is None  # no TLS asked: nothing to refuse


def test_uvicorn_app_refuses_tls_settings_it_cannot_serve_in_one_line(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    cert, key = certificate
    env = os.environ | {"POLICY_SERVER_SSL_CERTFILE": str(cert), "POLICY_SERVER_SSL_KEYFILE": str(key),
                        "POLICY_SERVER_SSL_KEYFILE_PASSWORD": "key-password", "POLICY_SERVER_BACKEND": "local"}
    done = subprocess.run([sys.executable, "-m", "uvicorn", "app:app", "--port", "0"], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "policy-server: POLICY_SERVER_SSL_CERTFILE is set but uvicorn was given no certificate" in done.stderr
    assert "key-password" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_a_misspelled_variable_is_named_in_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from policy_server.settings import unknown_variables

    environ = {"POLICY_SERVER_API_KEYSFILE": "keys.yaml", "POLICY_SERVER_API_KEYS_FILE": "keys.yaml",
               "POLICY_SERVER_URL": "http://x", "PATH": "/bin"}
    assert unknown_variables(environ) == ["POLICY_SERVER_API_KEYSFILE"]  # the demo page's URL is ours too
    monkeypatch.setenv("POLICY_SERVER_DIRECT_TIMEOUTS", "5")
    with caplog.at_level("WARNING", logger="policy_server.settings"):
        load_settings()
    assert "POLICY_SERVER_DIRECT_TIMEOUTS is not a policy-server setting and is ignored" in caplog.text
