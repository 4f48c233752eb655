"""Command line of policy-server (Google fire). `python generate.py --help` lists the commands.

    python generate.py copy_server_files examples/lpoc
    python generate.py check schema.yaml
    python generate.py export models/policy.pt --obs_dim 4 --nvec 2 --state_dict w.pt --schema schema.yaml
    python generate.py serve --port 8000
    python generate.py clients --out clients --languages python,java
"""

from __future__ import annotations

import fire

from policy_server import cli


def serve(host: str = "127.0.0.1", port: int = 8000, schema: str | None = None) -> None:
    """Serve a schema (default: ./schema.yaml) with uvicorn, like `uvicorn app:app`."""
    import os

    import uvicorn

    if schema:
        os.environ["SCHEMA_PATH"] = schema
    uvicorn.run("app:app", host=host, port=port)


if __name__ == "__main__":
    fire.Fire(
        {
            "copy_server_files": cli.copy_server_files,
            "check": cli.check,
            "export": cli.export,
            "clients": cli.clients,
            "serve": serve,
        }
    )
