"""A direct data path from the gateway to the replicas of a policy deployment.

A Serve handle call costs about 3 ms on a 2-core machine, most of it Serve's router and request
bookkeeping (bench/README.md); a forward pass of a small policy costs 0.1 ms. So each replica also
listens on a TCP port of its node, and the gateway sends batches there: Serve stays the control
plane (placement, replicas, health, weight broadcasts) and the handle stays the fallback.

The wire format is plain binary, never pickle: a replica only ever parses numbers, so a peer
that reaches the port cannot run code. A connection starts with the replica's random token
(compared in constant time); then each request is an array of any shape and of one of the
``DTYPES`` (a float32 matrix for Pathmind's observations, uint8 ``(B, 84, 84, 4)`` for images) and
each answer the model's heads and version::

    hello     b"PSv2" | token (32 bytes)
    request   uint8 dtype (index into DTYPES) | uint8 ndim | ndim × uint32 dims | data
    answer    b"\\x00" | int64 version | uint32 n_heads | n × (uint32 rows | uint32 cols | float32 data)
    failure   b"\\x01" | uint32 length | utf-8 message

All integers and data little-endian. Version 1 (``PSv1``) carried float32 matrices only.

A replica's port is a network service: a peer that does not send its hello within
``HELLO_TIMEOUT_S``, or stalls half-way through a frame for ``FRAME_TIMEOUT_S``, is dropped;
connections over ``MAX_CONNECTIONS`` are closed at once. An authenticated link may stay idle
between requests for as long as the gateway keeps it.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from policy_server.policies.torch_policy import PolicyOutput

MAGIC = b"PSv2"
TOKEN_BYTES = 32


def hello(magic: bytes, token: bytes) -> bytes:
    """The first bytes a gateway sends on a direct link: the protocol's ``magic``, then the replica's
    ``token`` (``TOKEN_BYTES`` bytes, handed out only through Serve)."""
    return magic + token


def is_hello(received: bytes, magic: bytes, token: bytes) -> bool:
    """Whether ``received`` is the hello of ``magic`` and ``token``, compared in constant time."""
    return len(received) == len(magic) + TOKEN_BYTES and hmac.compare_digest(received, hello(magic, token))
MAX_BYTES = 1 << 28  # refuse frames over 256 MB before allocating them
MAX_NDIM = 16
DTYPES = ("float32", "float64", "float16", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "bool")
"""The dtypes a request may carry, by their index on the wire."""
HELLO_TIMEOUT_S = 5.0
FRAME_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 256  # a gateway keeps a few links per replica; hundreds means a leak or a flood
_DIMS = struct.Struct("<II")
_ARRAY = struct.Struct("<BB")
_VERSION_HEADS = struct.Struct("<qI")
_LENGTH = struct.Struct("<I")


class TransportError(Exception):
    """The peer broke the protocol or went away."""


class RemoteModelError(Exception):
    """The model raised on the replica; the message says what."""


# --- pure encoding ---------------------------------------------------------------------------


def encode_request(obs: np.ndarray) -> bytes:
    """One request frame: ``obs`` ``(B, ...)`` in its own dtype (one of ``DTYPES``)."""
    code = DTYPES.index(obs.dtype.name)  # ValueError for a dtype the wire does not carry
    data = np.ascontiguousarray(obs, dtype=obs.dtype.newbyteorder("<"))
    return _ARRAY.pack(code, obs.ndim) + struct.pack(f"<{obs.ndim}I", *obs.shape) + data.tobytes()


def encode_answer(out: PolicyOutput) -> bytes:
    parts = [b"\x00", _VERSION_HEADS.pack(out.version, len(out.heads))]
    for head in out.heads:
        head = np.ascontiguousarray(head, dtype="<f4")
        parts += [_DIMS.pack(*head.shape), head.tobytes()]
    return b"".join(parts)


def encode_failure(message: str) -> bytes:
    data = message.encode()[:65536]
    return b"\x01" + _LENGTH.pack(len(data)) + data


def _matrix(rows: int, cols: int, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").reshape(rows, cols).astype(np.float32)


# --- replica side ----------------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = sock.makefile("rb")
        try:
            sock.settimeout(self.server.hello_timeout_s)
            if not is_hello(stream.read(len(MAGIC) + TOKEN_BYTES), MAGIC, self.server.token):
                return  # wrong peer: close without a word
            while self._serve_one(sock, stream):
                pass
        except TimeoutError:
            return  # a silent or stalled peer: drop it (the read buffer is unusable after a timeout)

    def _serve_one(self, sock: socket.socket, stream: BinaryIO) -> bool:
        """Answer one request; False when the link is to be closed."""
        sock.settimeout(None)  # an authenticated link may wait for its next request without end
        first = stream.read(1)
        if not first:
            return False
        sock.settimeout(self.server.frame_timeout_s)  # ... but a frame, once begun, must arrive
        header = first + stream.read(_ARRAY.size - 1)
        if len(header) < _ARRAY.size:
            return False
        code, ndim = _ARRAY.unpack(header)
        if code >= len(DTYPES) or ndim > MAX_NDIM:
            sock.sendall(encode_failure(f"unknown dtype {code} or {ndim} dimensions (protocol {MAGIC!r})"))
            return False
        dims = stream.read(4 * ndim)
        if len(dims) < 4 * ndim:
            return False
        shape = struct.unpack(f"<{ndim}I", dims)
        dtype = np.dtype(DTYPES[code]).newbyteorder("<")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size > MAX_BYTES:
            sock.sendall(encode_failure(f"batch of {'×'.join(map(str, shape))} {dtype.name} values is over the limit"))
            return False
        data = stream.read(size)
        if len(data) < size:
            return False
        try:
            obs = np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
            answer = encode_answer(self.server.forward(obs))
        except Exception as exc:  # noqa: BLE001 - the model's failure goes back to the caller, not to the log
            answer = encode_failure(f"{type(exc).__name__}: {exc}")
        sock.sendall(answer)
        return True


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's default backlog of 5 resets gateways that connect at once

    def __init__(self, host: str, token: bytes, forward: Callable[[np.ndarray], PolicyOutput],
                 max_connections: int, hello_timeout_s: float, frame_timeout_s: float) -> None:
        super().__init__((host, 0), _Handler)
        self.token, self.forward = token, forward
        self.hello_timeout_s, self.frame_timeout_s = hello_timeout_s, frame_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self.active: set[socket.socket] = set()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)  # refused: socketserver closes the connection

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.active.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.active.discard(request)
            self._slots.release()

    def drop_all(self) -> None:
        """End every open link: its gateway sees the break at once and lists the replicas again."""
        with self._lock:
            for sock in self.active:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class TransportServer:
    """Serves ``forward`` on an ephemeral port of ``host`` in daemon threads."""

    def __init__(self, forward: Callable[[np.ndarray], PolicyOutput], token: str, host: str,
                 max_connections: int = MAX_CONNECTIONS, hello_timeout_s: float = HELLO_TIMEOUT_S,
                 frame_timeout_s: float = FRAME_TIMEOUT_S) -> None:
        self._server = _Server(host, bytes.fromhex(token), forward, max_connections, hello_timeout_s, frame_timeout_s)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop listening and end the open links."""
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_all()


# --- gateway side ------------------------------------------------------------------------------


class TransportClient:
    """One asyncio connection to one replica; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int, token: str, timeout: float = 5.0) -> TransportClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(hello(MAGIC, bytes.fromhex(token)))
        return cls(reader, writer)

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        """Raises RemoteModelError when the model failed, TransportError when the link did."""
        read = self._reader.readexactly
        try:
            self._writer.write(encode_request(obs))
            await self._writer.drain()
            if await read(1) == b"\x01":
                (length,) = _LENGTH.unpack(await read(_LENGTH.size))
                raise RemoteModelError((await read(length)).decode(errors="replace"))
            version, n_heads = _VERSION_HEADS.unpack(await read(_VERSION_HEADS.size))
            heads = []
            for _ in range(n_heads):
                rows, cols = _DIMS.unpack(await read(_DIMS.size))
                heads.append(_matrix(rows, cols, await read(4 * rows * cols)))
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise TransportError(f"replica connection lost: {exc!r}") from exc
        return PolicyOutput(heads, version)

    def close(self) -> None:
        self._writer.close()
