"""Server settings, read once from the environment (and ``.env``) and validated."""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from policy_server.errors import SettingsError

log = logging.getLogger(__name__)
OTHER_VARIABLES = {"POLICY_SERVER_URL"}
"""Ours but not the server's: the demo page's (frontend.py)."""
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class Settings(BaseSettings):
    """Settings of one gateway process. Environment variables use the ``POLICY_SERVER_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="POLICY_SERVER_", env_file=".env", extra="ignore")

    schema_path: Path = Field(
        Path("schema.yaml"),
        validation_alias=AliasChoices("SCHEMA_PATH", "POLICY_SERVER_SCHEMA_PATH", "schema_path"),
        description="The schema.yaml to serve; model paths in it are relative to its folder.",
    )
    api_key: SecretStr | None = Field(
        None, description="Overrides the schema's server-wide keys (`parameters.api_key`, `api_keys`) when set."
    )
    api_keys_file: Path | None = Field(
        None, description="A YAML or JSON file of api keys (`server`, `policies.<name>`, `llm` lists), "
        "re-read when it changes: keys rotate without a restart."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="Origins (`https://app.example.com`, or `*`) whose browser pages may call the API "
        "(CORS); a JSON list or a comma-separated list. Empty: no CORS headers."
    )
    ssl_certfile: Path | None = Field(
        None, description="TLS certificate (PEM; may hold the key too) that `generate.py serve` serves HTTPS with."
    )
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM) of `ssl_certfile`.")
    ssl_keyfile_password: SecretStr | None = Field(None, description="Password of an encrypted `ssl_keyfile`.")
    ssl_ca_certs: Path | None = Field(None, description="CA certificates (PEM) that client certificates are checked against.")
    ssl_cert_reqs: Literal["none", "optional", "required"] = Field(
        "none", description="Whether clients must present a certificate signed by `ssl_ca_certs` (mutual TLS)."
    )
    backend: Literal["serve", "local"] = Field(
        "serve",
        description="`serve` runs every policy on a Ray Serve deployment; `local` runs them in the "
        "gateway process (development and tests without Ray).",
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("RAY_ADDRESS", "POLICY_SERVER_RAY_ADDRESS", "ray_address"),
        description="Join this Ray cluster instead of starting Ray in the process.",
    )
    direct_transport: bool = Field(
        True,
        description="Send batches straight to the replicas over TCP (binary, token-checked), with "
        "the Serve handle as fallback; false: every batch goes through the Serve handle.",
    )
    direct_timeout_s: float = Field(
        30.0, gt=0, description="Most seconds a replica may take to answer a batch on the direct path "
        "before the request gets a 504 (the link is then closed: the answer may still come)."
    )
    ray_metrics_port: int = Field(8080, description="Port of Ray's (and Serve's) metrics export.")
    gateway_metrics_port: int = Field(
        8081, description="Port of the gateway's own Prometheus metrics; 0 turns them off."
    )
    serve_app_prefix: str = Field(
        "policy-server", description="Serve application names are `<prefix>-<policy>`."
    )
    gateway_lease_s: float = Field(
        30.0, gt=0, description="On a Ray cluster shared by several gateways: how long a gateway's "
        "hold on the shared Serve apps and trainers lasts unrenewed (renewed every third of it); a "
        "gateway killed without shutting down stops keeping them after this."
    )
    start_timeout_s: float = Field(
        900.0, gt=0, description="Most seconds one Serve app may take to start (a large model's load "
        "included) before start-up fails, naming what Serve said about it."
    )
    wait_for_resources: bool = Field(
        False,
        description="When the cluster lacks the CPUs or GPUs that a replica or trainer asks for: false "
        "fails start-up, naming each, what it asks and what is free (at once when the schema's total "
        "does not fit, else once one stays unplaced `placement_grace_s`); true keeps waiting (an "
        "autoscaling cluster adds nodes), saying so every 30 s, up to `start_timeout_s`.",
    )
    placement_grace_s: float = Field(
        20.0, gt=0, description="Seconds a replica or trainer may wait for a node before start-up "
        "names it unplaceable."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Larger bodies get a 413.")
    max_batch_observations: int = Field(
        4096, gt=0, description="Most observations accepted in one batch request."
    )
    seed: int | None = Field(None, description="Seed of the action sampler (reproducible runs).")
    clients_enabled: bool = Field(
        True, description="Serve `GET /clients`: client SDKs generated from this server's OpenAPI document."
    )
    clients_prebuild: bool = Field(
        False,
        description="Start generating the client SDKs at start-up (once the backends are up); false: on "
        "the first `GET /clients`, which answers 503 with Retry-After until they are ready.",
    )
    clients_cache_dir: Path | None = Field(
        None, description="Where generated SDKs are cached; default `~/.cache/policy-server/clients`."
    )
    clients_java: str = Field(
        "java", description="The Java that runs openapi-generator (Java, Scala, R, TypeScript and Go SDKs)."
    )
    clients_timeout_s: float = Field(300.0, gt=0, description="Most seconds one language's generator runs.")

    @field_validator("api_key", "ray_address", "api_keys_file", "ssl_certfile", "ssl_keyfile",
                     "ssl_keyfile_password", "ssl_ca_certs", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [o.strip() for o in text.split(",") if o.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                                  or parts.path or parts.query or parts.fragment):
                raise ValueError(f"{origin!r} is not an origin: give scheme://host[:port] with no path or "
                                 "trailing slash (browsers send `https://app.example.com`), or `*`")
        return origins

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        """The TLS files exist, are readable and fit together (key, its password, certificate, CA)."""
        if self.ssl_certfile is None:
            given = [name for name in ("ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs")
                     if getattr(self, name) is not None] + (["ssl_cert_reqs"] if self.ssl_cert_reqs != "none" else [])
            if given:
                raise ValueError(f"POLICY_SERVER_{given[0].upper()} is set without POLICY_SERVER_SSL_CERTFILE")
            return self
        if self.ssl_cert_reqs != "none" and self.ssl_ca_certs is None:
            raise ValueError("POLICY_SERVER_SSL_CERT_REQS needs POLICY_SERVER_SSL_CA_CERTS to check client certificates")
        for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
            _readable_file(getattr(self, name), f"POLICY_SERVER_{name.upper()}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # without a password, an encrypted key fails here instead of OpenSSL asking on the terminal
        password = self.ssl_keyfile_password.get_secret_value() if self.ssl_keyfile_password else (lambda: b"")
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
        except ssl.SSLError:
            raise ValueError(f"POLICY_SERVER_SSL_CERTFILE {self.ssl_certfile} and its key cannot be loaded: not PEM, a key "
                             "that does not match the certificate, or a missing or wrong key password") from None
        if self.ssl_ca_certs is not None:
            try:
                context.load_verify_locations(self.ssl_ca_certs)
            except ssl.SSLError:
                raise ValueError(f"POLICY_SERVER_SSL_CA_CERTS {self.ssl_ca_certs}: no PEM certificates") from None
        return self

    def uvicorn_ssl(self) -> dict[str, Any]:
        """uvicorn's TLS arguments (``uvicorn.run(..., **settings.uvicorn_ssl())``); empty without a certificate."""
        if self.ssl_certfile is None:
            return {}
        return {
            "ssl_certfile": str(self.ssl_certfile),
            "ssl_keyfile": str(self.ssl_keyfile) if self.ssl_keyfile else None,
            "ssl_keyfile_password": self.ssl_keyfile_password.get_secret_value() if self.ssl_keyfile_password else None,
            "ssl_ca_certs": str(self.ssl_ca_certs) if self.ssl_ca_certs else None,
            "ssl_cert_reqs": CERT_REQS[self.ssl_cert_reqs],
        }


def tls_not_served(settings: Settings, argv: list[str], environ: Mapping[str, str]) -> str | None:
    """Why the running uvicorn would serve plain HTTP although ``settings`` ask for TLS, or None.

    uvicorn opens its socket before it loads the app, so ``uvicorn app:app`` cannot take TLS from
    our settings: it needs its own ``--ssl-certfile`` (or ``UVICORN_SSL_CERTFILE``, which
    ``generate.py serve`` sets when it passes the settings on). ``argv``, ``environ``: the process's.
    """
    if settings.ssl_certfile is None:
        return None
    if environ.get("UVICORN_SSL_CERTFILE") or any(a.split("=")[0] == "--ssl-certfile" for a in argv):
        return None
    return ("POLICY_SERVER_SSL_CERTFILE is set but uvicorn was given no certificate, so it would serve plain "
            "HTTP: `uvicorn app:app` opens its socket before it loads the app. Start with `python generate.py "
            "serve` (it passes the POLICY_SERVER_SSL_* settings on), or give uvicorn --ssl-certfile and "
            "--ssl-keyfile (or UVICORN_SSL_CERTFILE and UVICORN_SSL_KEYFILE)")


def _readable_file(path: Path | None, variable: str) -> None:
    if path is None:
        return
    if not path.is_file():
        raise ValueError(f"{variable}: {path} {'is not a file' if path.exists() else 'does not exist'}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{variable}: {path} is not readable by this user")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``POLICY_SERVER_*`` names in ``environ`` that are no setting (a typo is otherwise ignored)."""
    prefix = Settings.model_config.get("env_prefix", "")
    known = {f"{prefix}{name}".upper() for name in Settings.model_fields} | OTHER_VARIABLES
    return sorted(name for name in environ if name.upper().startswith(prefix) and name.upper() not in known)


def load_settings(**values: Any) -> Settings:
    """The settings from the environment (and ``.env``), ``values`` overriding them; warns of
    ``POLICY_SERVER_*`` variables that are no setting.

    Raises SettingsError naming each wrong setting and why, never a secret's value.
    """
    for name in unknown_variables(os.environ):
        log.warning("%s is not a policy-server setting and is ignored (README, Settings, lists them)", name)
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"POLICY_SERVER_{where.upper()}: {message}" if where else message)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
