"""bridge/wire.py against the real uvicorn WebSocket implementation the bridge runs on:
if an upgrade of uvicorn moved what the direct writer relies on, these fail (and the
bridge would quietly fall back to the slower ASGI path)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
import websockets
from websockets.frames import Frame as WireFrame
from websockets.frames import Opcode

from bridge.wire import direct_writer, text_frame
from tests.support.services import free_port

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def test_text_frame_is_an_unmasked_text_frame() -> None:
    for text in ("", "héllo", "x" * 200, "y" * 70_000):
        frame = text_frame(text)
        assert frame == WireFrame(Opcode.TEXT, text.encode()).serialize(mask=False)
        assert frame[0] == 0x81  # FIN, text
        assert not frame[1] & 0x80  # not masked


def test_no_direct_writer_for_a_send_that_is_not_uvicorns() -> None:
    async def send(message: dict[str, Any]) -> None:
        pass

    assert direct_writer(send) is None
    assert direct_writer(print) is None


@contextlib.asynccontextmanager
async def served(*, deflate: bool) -> AsyncIterator[tuple[int, list[bool]]]:
    """uvicorn (websockets-sansio, permessage-deflate as asked) serving an app that
    writes "direct" through a direct writer when it gets one, then "asgi" through send;
    yields the port and, per connection, whether it got a direct writer."""
    found: list[bool] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        assert scope["type"] == "websocket"
        await receive()
        await send({"type": "websocket.accept"})
        write = direct_writer(send)
        found.append(write is not None)
        if write is not None:
            assert write(text_frame("direct"))
        await send({"type": "websocket.send", "text": "asgi"})
        await receive()  # until the client goes

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws="websockets-sansio", ws_per_message_deflate=deflate, log_level="error"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, no event
                await asyncio.sleep(0.01)
        yield port, found
    finally:
        server.should_exit = True
        await task


async def test_frames_written_directly_arrive_in_order_with_asgi_ones() -> None:
    # The client offers compression (browsers do); the bridge's default declines it.
    async with (
        served(deflate=False) as (port, found),
        websockets.connect(f"ws://127.0.0.1:{port}/", compression="deflate") as client,
    ):
        assert [await client.recv(), await client.recv()] == ["direct", "asgi"]
    assert found == [True]


async def test_a_compressed_connection_gets_no_direct_writer_and_still_its_messages() -> None:
    async with (
        served(deflate=True) as (port, found),
        websockets.connect(f"ws://127.0.0.1:{port}/", compression="deflate") as client,
    ):
        assert client.protocol.extensions  # permessage-deflate was agreed
        assert await client.recv() == "asgi"
    assert found == [False]
