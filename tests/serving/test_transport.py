"""The direct gateway → replica data path: a real TCP server on loopback, no Ray."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from policy_server.policies.torch_policy import PolicyOutput
from policy_server.serving.transport import (
    MAGIC,
    RemoteModelError,
    TransportClient,
    TransportError,
    TransportServer,
    encode_request,
)

TOKEN = "ab" * 32


def forward(obs: np.ndarray) -> PolicyOutput:
    """Echo-like model: head 0 = obs * 2, head 1 = row sums; raises on a 999."""
    if (obs == 999).any():
        raise RuntimeError("boom: 999 is out of range")
    return PolicyOutput([obs * 2, obs.sum(axis=1, keepdims=True)], version=7)


@pytest.fixture()
def server() -> Iterator[TransportServer]:
    srv = TransportServer(forward, TOKEN, "127.0.0.1")
    yield srv
    srv.close()


def test_batches_round_trip_exactly(server: TransportServer) -> None:
    async def run() -> list[PolicyOutput]:
        client = await TransportClient.connect(*server.address, TOKEN)
        try:
            return [await client.forward(np.arange(r * 3, dtype=np.float32).reshape(r, 3) / 7) for r in (1, 5, 300)]
        finally:
            client.close()

    for out, rows in zip(asyncio.run(run()), (1, 5, 300)):
        obs = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) / 7
        assert out.version == 7
        np.testing.assert_array_equal(out.heads[0], obs * 2)
        np.testing.assert_array_equal(out.heads[1], obs.sum(axis=1, keepdims=True))


def test_a_model_error_comes_back_and_the_connection_stays_usable(server: TransportServer) -> None:
    async def run() -> PolicyOutput:
        client = await TransportClient.connect(*server.address, TOKEN)
        with pytest.raises(RemoteModelError, match="boom"):
            await client.forward(np.full((2, 2), 999, dtype=np.float32))
        out = await client.forward(np.ones((1, 2), dtype=np.float32))
        client.close()
        return out

    assert asyncio.run(run()).heads[0].tolist() == [[2.0, 2.0]]


def test_a_wrong_token_gets_no_answer(server: TransportServer) -> None:
    async def run() -> None:
        client = await TransportClient.connect(*server.address, "cd" * 32)
        try:
            await client.forward(np.ones((1, 2), dtype=np.float32))
        finally:
            client.close()

    with pytest.raises(TransportError):
        asyncio.run(run())


def test_an_oversized_frame_is_refused_before_allocation(server: TransportServer) -> None:
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(MAGIC + bytes.fromhex(TOKEN) + struct.pack("<BBII", 0, 2, 1 << 20, 1 << 20))
        reply = sock.recv(1024)
    assert reply[:1] == b"\x01" and b"over the limit" in reply


def test_many_connections_at_once(server: TransportServer) -> None:
    async def one(i: int) -> float:
        client = await TransportClient.connect(*server.address, TOKEN)
        try:
            out = await client.forward(np.full((4, 3), i, dtype=np.float32))
        finally:
            client.close()
        return float(out.heads[1][0, 0])

    async def run() -> list[float]:
        return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(run()) == [3.0 * i for i in range(16)]


def test_request_encoding_is_little_endian_in_the_arrays_dtype() -> None:
    frame = encode_request(np.array([[1.5, -2.0]], dtype=np.float32))
    assert frame == struct.pack("<BBII", 0, 2, 1, 2) + np.array([1.5, -2.0], dtype="<f4").tobytes()
    image = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert encode_request(image) == struct.pack("<BBIII", 3, 3, 2, 3, 4) + image.tobytes()


def test_arrays_of_any_shape_and_dtype_reach_the_model_as_sent() -> None:
    seen: list[np.ndarray] = []

    def record(obs: np.ndarray) -> PolicyOutput:
        seen.append(obs)
        return PolicyOutput([obs.reshape(len(obs), -1).astype(np.float32)], version=1)

    srv = TransportServer(record, TOKEN, "127.0.0.1")
    arrays = [np.arange(2 * 84 * 84 * 4).reshape(2, 84, 84, 4).astype(np.uint8),
              np.array([[0.1, -0.5]], dtype=np.float64), np.array([[[-3], [7]]], dtype=np.int64)]

    async def run() -> list[PolicyOutput]:
        client = await TransportClient.connect(*srv.address, TOKEN)
        try:
            return [await client.forward(a) for a in arrays]
        finally:
            client.close()

    try:
        outs = asyncio.run(run())
    finally:
        srv.close()
    for sent, got, out in zip(arrays, seen, outs):
        assert got.dtype == sent.dtype and got.shape == sent.shape and np.array_equal(got, sent)
        assert out.heads[0].shape == (len(sent), sent[0].size)


def test_a_peer_that_never_says_hello_is_dropped() -> None:
    srv = TransportServer(forward, TOKEN, "127.0.0.1", hello_timeout_s=0.3)
    try:
        with socket.create_connection(srv.address, timeout=5) as sock:
            assert sock.recv(16) == b""  # closed by the replica after 0.3 s of silence, not 5 s
    finally:
        srv.close()


def test_a_frame_that_stalls_half_way_is_dropped_but_an_idle_link_is_kept() -> None:
    srv = TransportServer(forward, TOKEN, "127.0.0.1", frame_timeout_s=0.3)
    try:
        async def idle_then_ask() -> PolicyOutput:
            client = await TransportClient.connect(*srv.address, TOKEN)
            await asyncio.sleep(0.6)  # idle between requests: longer than the frame timeout
            try:
                return await client.forward(np.ones((1, 2), dtype=np.float32))
            finally:
                client.close()

        assert asyncio.run(idle_then_ask()).heads[0].tolist() == [[2.0, 2.0]]
        with socket.create_connection(srv.address, timeout=5) as sock:
            sock.sendall(MAGIC + bytes.fromhex(TOKEN) + struct.pack("<BBII", 0, 2, 1, 2))  # no data follows
            assert sock.recv(16) == b""
    finally:
        srv.close()


def test_connections_over_the_cap_are_closed_at_once() -> None:
    srv = TransportServer(forward, TOKEN, "127.0.0.1", max_connections=2)
    try:
        async def run() -> tuple[list[float], bool]:
            clients = [await TransportClient.connect(*srv.address, TOKEN) for _ in range(3)]
            answers = []
            refused = False
            for client in clients:
                try:
                    answers.append(float((await client.forward(np.ones((1, 1), dtype=np.float32))).heads[0][0, 0]))
                except TransportError:
                    refused = True
            for client in clients:
                client.close()
            return answers, refused

        answers, refused = asyncio.run(run())
        assert answers == [2.0, 2.0] and refused
    finally:
        srv.close()


def test_closing_the_server_ends_the_open_links(server: TransportServer) -> None:
    async def run() -> None:
        client = await TransportClient.connect(*server.address, TOKEN)
        await client.forward(np.ones((1, 1), dtype=np.float32))
        server.close()
        try:
            await client.forward(np.ones((1, 1), dtype=np.float32))
        finally:
            client.close()

    with pytest.raises(TransportError):
        asyncio.run(run())
