"""A WebSocket client that never reads: the slow consumer the bridge must cut off."""

from __future__ import annotations

import socket
import time

from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.frames import Frame as WebSocketFrame
from websockets.uri import parse_uri

__all__ = ["StalledClient"]


class StalledClient:
    """A WebSocket client that stops reading after its handshake: a blocking socket with a
    small receive buffer (loopback autotuning would otherwise absorb tens of MB) driven
    by the `websockets` sans-I/O protocol, read only when the test decides."""

    def __init__(self, url: str, port: int) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.socket.connect(("127.0.0.1", port))
        self.protocol.send_request(self.protocol.connect())
        self.socket.sendall(b"".join(self.protocol.data_to_send()))

    def read_until_closed(self, within: float = 30.0) -> tuple[int, Close]:
        """Read everything now; the number of text frames received and the close frame."""
        deadline = time.monotonic() + within
        texts = 0
        while (remaining := deadline - time.monotonic()) > 0:
            self.socket.settimeout(remaining)
            data = self.socket.recv(1 << 20)
            assert data, f"connection ended after {texts} messages without a close frame"
            self.protocol.receive_data(data)
            for event in self.protocol.events_received():
                if isinstance(event, WebSocketFrame) and event.opcode is Opcode.CLOSE:
                    return texts, Close.parse(event.data)
                if isinstance(event, WebSocketFrame) and event.opcode is Opcode.TEXT:
                    texts += 1
        raise AssertionError(f"no close frame within {within} s ({texts} messages read)")

    def close(self) -> None:
        self.socket.close()
