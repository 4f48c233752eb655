"""Local TCP ports for servers this process starts (tests, benchmarks, the demo's example server)."""

from __future__ import annotations

import socket

LOCALHOST = "127.0.0.1"


def bound_socket(host: str = LOCALHOST) -> socket.socket:
    """A TCP socket bound to a free port of ``host``, not yet listening; the caller closes it.

    Race-free: hand it to the server (``uvicorn.Server.run(sockets=[sock])``), which listens on
    it, so no other process can take the port in between. Until then, connecting is refused.
    """
    sock = socket.socket()
    sock.bind((host, 0))
    return sock


def free_port(host: str = LOCALHOST) -> int:
    """A port of ``host`` that was free a moment ago (bound to port 0, then released).

    Racy: another process (a Ray worker picking ports, say) may take it between this call and
    the bind of whoever uses it. Use ``bound_socket`` where the server can take a socket; this is
    for ports handed by number to another process (uvicorn's ``--port``, Ray's metrics ports).
    """
    with bound_socket(host) as sock:
        return int(sock.getsockname()[1])
