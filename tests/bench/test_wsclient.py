"""The benchmarks' load client against a real `websockets` server: every frame size,
frames split across reads and packed into one, messages before `run()`, pings, masking."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from bench.wsclient import WebSocketClient

# The sizes around each length encoding (7-bit, 16-bit, 64-bit).
SIZES = [0, 1, 125, 126, 127, 65_535, 65_536, 200_000]


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, list[str]]]:
    received: list[str] = []

    async def handler(connection: ServerConnection) -> None:
        for size in SIZES:
            await connection.send("x" * size)
        pong = await connection.ping(b"are you there")
        await asyncio.wait_for(pong, 5)  # else the handler fails and nothing is echoed
        async for message in connection:
            assert isinstance(message, str)
            received.append(message)
            await connection.send(f"echo:{message}")

    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as running:
        yield running, received


def _port(server: Server) -> int:
    port: int = next(iter(server.sockets)).getsockname()[1]
    return port


async def test_every_frame_size_arrives_whole_and_in_order(server: tuple[Server, list[str]]) -> None:
    running, received = server
    client = await WebSocketClient.connect("127.0.0.1", _port(running), "/")
    await asyncio.sleep(0.2)  # the server's messages (likely) arrive before run(): they are kept
    got: list[bytes] = []
    done = asyncio.Event()

    def on_text(payload: bytes) -> None:
        got.append(payload)
        if payload.startswith(b"echo:"):
            done.set()

    reading = asyncio.create_task(client.run(on_text))
    client.send_text("hello, é" * 40)  # masked, 16-bit length
    await asyncio.wait_for(done.wait(), 10)
    assert [len(payload) for payload in got[: len(SIZES)]] == SIZES
    assert all(set(payload) <= {ord("x")} for payload in got[: len(SIZES)])
    assert received == ["hello, é" * 40]
    assert got[-1] == ("echo:" + "hello, é" * 40).encode()
    client.close()
    await asyncio.wait_for(reading, 10)


async def test_frames_split_across_reads_and_packed_into_one() -> None:
    """What the parser gets is whatever TCP delivers: a frame in pieces, or many at once."""
    frames = b"".join(bytes([0x81, len(text)]) + text for text in (b"one", b"two", b"three"))
    big = b"y" * 300
    frames += bytes([0x81, 126]) + len(big).to_bytes(2, "big") + big
    loop = asyncio.get_running_loop()
    client = WebSocketClient(loop.create_future())
    # The 101 response and a first frame in one read, before run(): the frame is kept.
    client.data_received(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + bytes([0x81, 5]) + b"early")
    got: list[bytes] = []
    reading = asyncio.create_task(client.run(got.append))
    await asyncio.sleep(0)
    assert got == [b"early"]
    got.clear()
    for start in range(0, len(frames), 3):  # three bytes a read
        client.data_received(frames[start : start + 3])
    client.data_received(frames)  # and all of them in one
    assert got == [b"one", b"two", b"three", big] * 2
    client.connection_lost(None)
    await asyncio.wait_for(reading, 1)


async def test_a_refused_handshake_raises() -> None:
    def refuse(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(403, "no\n")

    async with serve(lambda connection: asyncio.sleep(0), "127.0.0.1", 0, process_request=refuse) as refusing:
        with pytest.raises(ConnectionError, match="403"):
            await WebSocketClient.connect("127.0.0.1", _port(refusing), "/")
