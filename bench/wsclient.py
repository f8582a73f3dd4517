"""A minimal asyncio WebSocket client for load: cheap enough not to be the bottleneck.

It speaks just what the benchmarks need: the opening handshake, unmasked text frames
from the server, masked text frames to it, pings answered, close. It is an
``asyncio.Protocol`` that parses frames straight out of each read, with no coroutine
or future per message: thousands of these share a load process, and a client costing
more per message than the server being measured would measure the client instead.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from typing import cast

__all__ = ["WebSocketClient"]

TextHandler = Callable[[bytes], None]


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame (clients must mask, RFC 6455 5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    key = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
    return header + mask + masked


class WebSocketClient(asyncio.Protocol):
    """One connection. Text messages that arrive before :meth:`run` is called are kept
    and handed over when it is."""

    def __init__(self, handshake_done: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self._handshake_done = handshake_done
        self._closed: asyncio.Future[None] = handshake_done.get_loop().create_future()
        self._buffer = b""
        self._upgraded = False
        self._on_text: TextHandler | None = None
        self._early: list[bytes] = []

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> WebSocketClient:
        loop = asyncio.get_running_loop()
        handshake_done: asyncio.Future[None] = loop.create_future()
        _, client = await loop.create_connection(lambda: cls(handshake_done), host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        assert client.transport is not None
        client.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        try:
            await handshake_done
        except BaseException:
            client.abort()
            raise
        return client

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._handshake_done.done():
            self._handshake_done.set_exception(ConnectionError("connection closed during the handshake"))
        if not self._closed.done():
            self._closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            response, buffer = buffer[: end + 4], buffer[end + 4 :]
            if not response.startswith(b"HTTP/1.1 101"):
                self._handshake_done.set_exception(ConnectionError(f"handshake refused: {response.splitlines()[0]!r}"))
                self.abort()
                return
            self._upgraded = True
            self._handshake_done.set_result(None)
        self._buffer = self._frames(buffer)

    def _frames(self, buffer: bytes) -> bytes:
        """Handle every whole frame in ``buffer``; what is left of it."""
        view, start, size = memoryview(buffer), 0, len(buffer)
        while size - start >= 2:
            first, length = buffer[start], buffer[start + 1] & 0x7F
            header = 2
            if length == 126:
                if size - start < 4:
                    break
                (length,) = struct.unpack_from("!H", buffer, start + 2)
                header = 4
            elif length == 127:
                if size - start < 10:
                    break
                (length,) = struct.unpack_from("!Q", buffer, start + 2)
                header = 10
            end = start + header + length
            if end > size:
                break
            payload = bytes(view[start + header : end])
            start = end
            opcode = first & 0x0F
            if opcode == 0x1:
                self._text(payload)
            elif opcode == 0x9:
                self._write(_masked_frame(0xA, payload))
            elif opcode == 0x8:
                self.close()
                return b""
        return buffer[start:] if start else buffer

    def _text(self, payload: bytes) -> None:
        if self._on_text is None:
            self._early.append(payload)
        else:
            self._on_text(payload)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- what the benchmarks call ---------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._write(_masked_frame(0x1, text.encode()))

    async def run(self, on_text: TextHandler) -> None:
        """Call ``on_text`` with each text message's payload until the connection closes."""
        self._on_text = on_text
        early, self._early = self._early, []
        for payload in early:
            on_text(payload)
        await asyncio.shield(self._closed)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection without a close handshake (a reset)."""
        if self.transport is not None:
            self.transport.abort()
