"""Server settings, read once from the environment (and ``.env``) and validated."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of one gateway process. Environment variables use the ``POLICY_SERVER_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="POLICY_SERVER_", env_file=".env", extra="ignore")

    schema_path: Path = Field(
        Path("schema.yaml"),
        validation_alias=AliasChoices("SCHEMA_PATH", "POLICY_SERVER_SCHEMA_PATH", "schema_path"),
        description="The schema.yaml to serve; model paths in it are relative to its folder.",
    )
    api_key: SecretStr | None = Field(
        None, description="Overrides `parameters.api_key` of the schema when set."
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

    @field_validator("api_key", "ray_address", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value
