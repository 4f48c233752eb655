"""A direct data path for the LLM policy's streams, from the gateway to the policy's replicas.

Through a streaming Serve handle every token of every stream is one Ray message, and its
serialisation, the generator's per-item reports and Serve's router cost the gateway and the
replica more CPU than the engine spends making the token (bench/llm.py). So each replica also
listens on a TCP port of its node, on the engine's own event loop (vLLM's: chunks go from the
engine to the socket without a thread hop), and the gateway reads streams from there; Serve stays
the control plane (placement, health, weights) and the streaming handle the fallback.

Nothing is pickled: frames are msgpack (plain data; decoding runs no code) and only the error
classes of ``policy_server.errors`` are rebuilt, by name. A connection starts with the replica's
random token (compared in constant time), sent within ``HELLO_TIMEOUT_S`` or the replica closes it
(as it closes connections over ``MAX_CONNECTIONS``); then it carries one stream at a time::

    hello     b"PSL1" | token (32 bytes)
    frame     uint32 length (little-endian) | msgpack
    request   [prompt_ids, {GenerationParams field: value}]           gateway -> replica
    chunks    [0, [[index, token_ids, log_probs, top_logprobs, finish_reason, stop_string, version], ...]]
    end       [1]
    error     [2, class name, message, [[field, message], ...], retry_after_s]

Any byte from the gateway during a stream, or the connection closing, cancels the stream (the
engine aborts its request): the gateway closes the connection when its client leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, cast

import msgpack

from policy_server import errors
from policy_server.errors import BackendUnavailable, FieldError, ModelError, PolicyServerError
from policy_server.llm.params import GenerationParams, SampleChunk, StructuredOutput
from policy_server.serving.errors import domain_error
from policy_server.serving.transport import (  # one hello, and one set of limits, for both direct paths
    HELLO_TIMEOUT_S,
    MAX_CONNECTIONS,
    TOKEN_BYTES,
    hello,
    is_hello,
)

log = logging.getLogger(__name__)

MAGIC = b"PSL1"
MAX_FRAME = 64 << 20  # a longer length prefix is a broken or hostile peer, not a request
CHUNKS, END, ERROR = 0, 1, 2
_LENGTH = struct.Struct("<I")
CONNECT_TIMEOUT_S = 5.0
RELIST_S = 1.0  # while no replica is reachable, list them again at most this often

Streams = Callable[[list[int], GenerationParams], AsyncIterator[SampleChunk]]
"""Opens one stream of an engine: ``engine.stream`` or its equivalent on the engine's loop."""


# --- pure encoding ---------------------------------------------------------------------------


def frame(message: Any) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(data)) + data


def unpack(data: bytes) -> Any:
    """One frame's message; integer map keys (top log-probs' token ids) allowed."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_request(prompt_ids: list[int], params: GenerationParams) -> bytes:
    return frame([prompt_ids, dataclasses.asdict(params)])


def decode_request(message: Any) -> tuple[list[int], GenerationParams]:
    """Raises ValueError (or TypeError) for a message that is not a request of valid parameters."""
    prompt_ids, fields = message
    if not isinstance(prompt_ids, list) or not all(type(t) is int for t in prompt_ids):
        raise TypeError("prompt_ids must be a list of token ids")
    if not isinstance(fields, dict):
        raise TypeError("the parameters must be a map")
    structured = fields.get("structured")
    if structured is not None:
        fields = {**fields, "structured": StructuredOutput(**structured)}
    return prompt_ids, GenerationParams(**fields)


def encode_chunks(chunks: list[SampleChunk]) -> bytes:
    return frame([CHUNKS, [dataclasses.astuple(c) for c in chunks]])


def decode_chunks(items: list[list[Any]]) -> list[SampleChunk]:
    return [SampleChunk(*item) for item in items]


def encode_error(exc: BaseException) -> bytes:
    """``exc`` as the server's error (``serving.errors.domain_error``: another exception is a
    ``ModelError`` naming it), in an error frame."""
    mapped = domain_error(exc, "the LLM replica")
    fields = [[f.field, f.message] for f in mapped.fields]
    return frame([ERROR, type(mapped).__name__, mapped.message, fields, mapped.retry_after_s])


def decode_error(name: str, message: str, fields: list[list[str]], retry_after_s: int | None) -> PolicyServerError:
    """The error the replica raised: its class of ``policy_server.errors`` (status and code
    included), message and fields; a name that is no such class is a ``ModelError``."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PolicyServerError)):
        return ModelError(f"the LLM replica raised {name}: {message}")
    exc = cls.__new__(cls)
    exc.args = (message,)
    exc.message, exc.fields = message, [FieldError(f, m) for f, m in fields]
    if retry_after_s != cls.retry_after_s:
        exc.retry_after_s = retry_after_s
    return exc


# --- replica side ----------------------------------------------------------------------------


class _ReplicaConnection(asyncio.Protocol):
    """One gateway's connection: the hello, then one stream at a time (see the module's protocol)."""

    def __init__(self, token: bytes, streams: Streams, open_connections: set[_ReplicaConnection],
                 max_connections: int = MAX_CONNECTIONS, hello_timeout_s: float = HELLO_TIMEOUT_S) -> None:
        self._token, self._streams = token, streams
        self._open, self._max, self._hello_timeout_s = open_connections, max_connections, hello_timeout_s
        self._silent: asyncio.TimerHandle | None = None
        self._buffer = bytearray()
        self._greeted = False
        self._task: asyncio.Task[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        if len(self._open) >= self._max:  # over the cap: a leak or a flood, not a gateway
            self.transport.close()
            return
        self._open.add(self)
        _no_delay(transport)
        self._silent = asyncio.get_running_loop().call_later(self._hello_timeout_s, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self)
        if self._silent is not None:
            self._silent.cancel()
        if self._task is not None:
            self._task.cancel()  # the gateway left: the engine aborts the request
        self.resume_writing()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self._task is not None:  # the gateway cancels the stream under way
            self.transport.close()
            return
        self._buffer += data
        if not self._greeted:
            size = len(MAGIC) + TOKEN_BYTES
            if len(self._buffer) < size:
                return
            if not is_hello(bytes(self._buffer[:size]), MAGIC, self._token):
                self.transport.close()  # wrong peer: close without a word
                return
            del self._buffer[:size]
            self._greeted = True
            if self._silent is not None:
                self._silent.cancel()
        self._start_stream()

    def _start_stream(self) -> None:
        assert self.transport is not None
        if len(self._buffer) < _LENGTH.size:
            return
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > MAX_FRAME:
            self.transport.close()
            return
        if len(self._buffer) < _LENGTH.size + length:
            return
        data = bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
        del self._buffer[:_LENGTH.size + length]
        try:
            prompt_ids, params = decode_request(unpack(data))
        except (ValueError, TypeError) as exc:
            self.transport.write(encode_error(ModelError(f"the gateway sent a malformed request: {exc}")))
            self.transport.close()
            return
        self._task = asyncio.get_running_loop().create_task(self._stream(prompt_ids, params))

    async def _stream(self, prompt_ids: list[int], params: GenerationParams) -> None:
        assert self.transport is not None
        try:
            async with aclosing(self._streams(prompt_ids, params)) as chunks:
                async for chunk in chunks:
                    self.transport.write(encode_chunks([chunk]))
                    if self._writable is not None:
                        await self._writable
            answer = frame([END])
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - the engine's failure goes to the gateway, as ours
            answer = encode_error(exc)
        self._task = None
        if not self.transport.is_closing():
            self.transport.write(answer)
            if self._buffer:  # the next request arrived while this stream ended
                self._start_stream()


def _no_delay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LLMStreamServer:
    """Serves ``streams`` on an ephemeral port of ``host``, on ``loop`` (an event loop running in
    another thread, where the streams must be iterated), or on a loop thread of its own."""

    def __init__(self, streams: Streams, token: str, host: str, loop: asyncio.AbstractEventLoop | None = None,
                 max_connections: int = MAX_CONNECTIONS, hello_timeout_s: float = HELLO_TIMEOUT_S) -> None:
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="llm-transport", daemon=True)
            self._thread.start()
        self.loop = loop
        secret = bytes.fromhex(token)
        self._connections: set[_ReplicaConnection] = set()
        start = loop.create_server(
            lambda: _ReplicaConnection(secret, streams, self._connections, max_connections, hello_timeout_s),
            host, 0, backlog=1024,
        )
        self._server = asyncio.run_coroutine_threadsafe(start, loop).result(timeout=30)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop listening and close every connection (their streams are cancelled)."""
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout=30)
        if self._thread is not None:  # the loop is ours: stop it and wait for its thread
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
            self.loop.close()

    async def _close(self) -> None:
        self._server.close()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)  # the sockets close on the next turn of the loop


def engine_streams(engine: Any) -> tuple[Streams, asyncio.AbstractEventLoop | None]:
    """How the direct server opens ``engine``'s streams, and the loop they run on.

    An engine with its own ``event_loop`` (vLLM's) streams on it through ``stream_on_engine_loop``
    (``stream`` would hop to that loop and back per chunk); vLLM already merges the outputs a slow
    reader left queued. Another engine streams on the server's own loop, merged by ``coalesced``.
    """
    from policy_server.llm.chunks import coalesced

    if not hasattr(engine, "stream_on_engine_loop"):
        return (lambda prompt_ids, params: coalesced(engine.stream(prompt_ids, params))), None
    return engine.stream_on_engine_loop, engine.event_loop


# --- gateway side ------------------------------------------------------------------------------


class LinkLost(Exception):
    """The connection to the replica broke (or never opened)."""


class _GatewayConnection(asyncio.Protocol):
    """One connection to one replica; frames go to ``messages`` as they arrive (several read at
    once are handed over at once)."""

    def __init__(self, endpoint: tuple[str, int, str]) -> None:
        self.endpoint = endpoint
        self._buffer = bytearray()
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                self.close()
                return
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                return
            self.messages.put_nowait(unpack(bytes(self._buffer[_LENGTH.size:end])))
            del self._buffer[:end]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.messages.put_nowait(LinkLost(f"the replica closed the connection ({exc!r})"))

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class DirectLLMStreams:
    """The gateway's side: streams read from the replicas' direct ports, spread over them, with
    connections kept for reuse (one stream at a time on each).

    ``endpoints`` lists the replicas' (host, port, token) (``broadcast("transport_endpoint")``);
    ``fallback`` opens a stream through the Serve handle, used when no replica can be reached
    (counted in ``fallbacks``); a broken connection re-lists the endpoints.
    """

    def __init__(self, endpoints: Callable[[], Any], fallback: Streams) -> None:
        self._list, self._fallback = endpoints, fallback
        self._endpoints: list[tuple[str, int, str]] | None = None
        self._listed_at = 0.0
        self._idle: dict[tuple[str, int, str], list[_GatewayConnection]] = {}
        self._turn = itertools.count()
        self.direct = 0
        self.fallbacks = 0

    async def _refresh(self) -> None:
        self._listed_at = time.monotonic()
        try:
            self._endpoints = [tuple(e) for e in await self._list()]  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - replicas restarting: the handle serves meanwhile
            log.warning("cannot list the LLM replicas' direct endpoints (%s); streaming through Serve", exc)
            self._endpoints = []

    async def _connection(self) -> _GatewayConnection | None:
        """An idle or new connection to the next replica in turn; None when none can be reached."""
        if self._endpoints is None or (not self._endpoints and time.monotonic() - self._listed_at > RELIST_S):
            await self._refresh()
        for _ in range(len(self._endpoints or ()) + 1):  # each replica once, and once more after re-listing
            endpoints = self._endpoints or []
            if not endpoints:
                break
            endpoint = endpoints[next(self._turn) % len(endpoints)]
            idle = self._idle.setdefault(endpoint, [])
            while idle:
                conn = idle.pop()
                if not conn.lost:
                    return conn
            try:
                return await self._connect(endpoint)
            except (TimeoutError, OSError) as exc:
                log.warning("cannot reach the LLM replica at %s:%s (%s)", endpoint[0], endpoint[1], exc)
                await self._refresh()
        return None

    @staticmethod
    async def _connect(endpoint: tuple[str, int, str]) -> _GatewayConnection:
        host, port, token = endpoint
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(lambda: _GatewayConnection(endpoint), host, port), CONNECT_TIMEOUT_S)
        assert conn.transport is not None
        conn.transport.write(hello(MAGIC, bytes.fromhex(token)))
        return conn

    async def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """The replica's chunks; raises the replica's ``PolicyServerError`` as itself, and
        ``BackendUnavailable`` when the link breaks after chunks were sent. Closing this early
        closes the connection: the replica aborts the generation."""
        conn = await self._connection()
        if conn is None:
            async for chunk in self._fall_back(prompt_ids, params):
                yield chunk
            return
        assert conn.transport is not None
        conn.transport.write(encode_request(prompt_ids, params))
        self.direct += 1
        done, sent = False, False
        try:
            while not isinstance(message := await conn.messages.get(), LinkLost):
                if message[0] == CHUNKS:
                    for chunk in decode_chunks(message[1]):
                        sent = True
                        yield chunk
                    continue
                done = True
                if message[0] == ERROR:
                    raise decode_error(*message[1:])
                return
        finally:
            if done and not conn.lost:
                self._idle.setdefault(conn.endpoint, []).append(conn)
            else:  # closed early (the client left) or broken: the replica ends the stream
                conn.close()
        await self._refresh()  # the link broke: the replica restarted or went away
        if sent:
            raise BackendUnavailable("the LLM replica went away during the stream; retry")
        async for chunk in self._fall_back(prompt_ids, params):
            yield chunk

    async def _fall_back(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        self.fallbacks += 1
        async with aclosing(self._fallback(prompt_ids, params)) as chunks:
            async for chunk in chunks:
                yield chunk

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
