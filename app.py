"""`uvicorn app:app` serves the schema.yaml next to this file (or the one SCHEMA_PATH names)."""

import os
import sys

from policy_server.errors import SchemaError, SettingsError
from policy_server.gateway.app import build_app
from policy_server.settings import load_settings, tls_not_served

try:
    settings = load_settings()
    if reason := tls_not_served(settings, sys.argv, os.environ):
        raise SettingsError(reason)
    app = build_app(settings)
except (SchemaError, SettingsError) as exc:  # the user's to fix: the reason, not a traceback (exit status 1)
    sys.exit(f"policy-server: {exc.message}")
