"""A minimal asyncio WebSocket client for load: cheap enough not to be the bottleneck.

It speaks just what the benchmarks need: the opening handshake, unmasked text frames
from the server, masked text frames to it, pings answered, close."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable

__all__ = ["WebSocketClient"]


class WebSocketClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> WebSocketClient:
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = await reader.readuntil(b"\r\n\r\n")
        if not response.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {response.splitlines()[0]!r}")
        return cls(reader, writer)

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x81, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.writer.write(header + mask + masked)

    async def run(self, on_text: Callable[[bytes], None]) -> None:
        """Read until closed, calling ``on_text`` with each text message's payload."""
        read = self.reader.readexactly
        while True:
            try:
                first, second = await read(2)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await read(8))
            payload = await read(length) if length else b""
            opcode = first & 0x0F
            if opcode == 0x1:
                on_text(payload)
            elif opcode == 0x9:  # ping: answer with a masked pong
                mask = os.urandom(4)
                self.writer.write(
                    bytes([0x8A, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                )
            elif opcode == 0x8:
                return

    def close(self) -> None:
        self.writer.close()
