"""The HTTP gateway: FastAPI app, routes generated from the schema, auth, errors, metrics."""

from policy_server.gateway.app import build_app

__all__ = ["build_app"]
