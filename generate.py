"""Command line of policy-server (Google fire). `python generate.py --help` lists the commands.

    python generate.py copy_server_files examples/lpoc
    python generate.py check schema.yaml
    python generate.py schema --env CartPole-v1 --out schema.yaml --model models/policy.pt2
    python generate.py export models/policy.pt --obs_dim 4 --nvec 2 --state_dict w.pt --schema schema.yaml
    python generate.py import models/ppo_cartpole.zip --out schema.yaml
    python generate.py import models/policy.onnx --schema schema.yaml
    python generate.py serve --port 8000
    python generate.py export_minari logs/decisions served/cartpole-v0
    python generate.py clients --out clients --languages python,java
"""

from __future__ import annotations

import sys

import fire

from policy_server import cli
from policy_server.errors import PolicyServerError


def serve(host: str = "127.0.0.1", port: int = 8000, schema: str | None = None) -> None:
    """Serve a schema (default: ./schema.yaml) with uvicorn, like `uvicorn app:app`; over HTTPS when
    POLICY_SERVER_SSL_CERTFILE (and POLICY_SERVER_SSL_KEYFILE, ...) are set, checked first."""
    import os

    import uvicorn

    from policy_server.settings import load_settings

    if schema:
        os.environ["SCHEMA_PATH"] = schema
    tls = load_settings().uvicorn_ssl()
    if tls:  # app.py refuses TLS settings that uvicorn was not given: these are
        os.environ["UVICORN_SSL_CERTFILE"] = tls["ssl_certfile"]
    uvicorn.run("app:app", host=host, port=port, **tls)


def main() -> None:
    """Run one command; a refusal (a bad schema, an unservable folder) prints its reason, not a
    traceback, and exits with status 1."""
    commands = {
        "copy_server_files": cli.copy_server_files,
        "check": cli.check,
        "schema": cli.schema,
        "export": cli.export,
        "import": cli.import_model,
        "clients": cli.clients,
        "export_minari": cli.export_minari,
        "serve": serve,
    }
    try:
        fire.Fire(commands)
    except PolicyServerError as exc:
        sys.exit(f"policy-server: {exc.message}")


if __name__ == "__main__":
    main()
