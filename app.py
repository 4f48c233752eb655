"""`uvicorn app:app` serves the schema.yaml next to this file (or the one SCHEMA_PATH names)."""

from policy_server.gateway.app import build_app

app = build_app()
