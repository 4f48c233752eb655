"""`uvicorn app:app` serves the schema.yaml next to this file (or the one SCHEMA_PATH names)."""

import sys

from policy_server.errors import SchemaError, SettingsError
from policy_server.gateway.app import build_app

try:
    app = build_app()
except (SchemaError, SettingsError) as exc:  # the user's to fix: the reason, not a traceback (exit status 1)
    sys.exit(f"policy-server: {exc.message}")
