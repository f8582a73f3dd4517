"""Writing one encoded WebSocket frame to many connections.

A broadcast frame is the same bytes for every client: a server's frames are not masked,
and without a per-connection extension (permessage-deflate, off by default in the
bridge) nothing else differs. So the fan-out builds the frame once per event and writes
those bytes straight to each connection's transport, instead of asking the ASGI server
to frame the text again for every client (the ASGI message, the protocol's frame
building and its buffer join cost more than the write itself).

This needs the connection's transport, which ASGI does not expose: ``direct_writer``
finds it behind uvicorn's websockets-sansio ``send`` (a bound method of its protocol)
and returns None for any other server, whose clients then get the ASGI path. The direct
write is taken only while the connection is open and its transport accepts data;
otherwise the caller falls back to ``send`` (which waits while writing is paused, so
the slow-client protection sees the same blocking as before).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame as WireFrame
from websockets.frames import Opcode
from websockets.protocol import State

__all__ = ["DirectWrite", "direct_writer", "text_frame"]

# Writes an encoded frame now and says True, or says False: use the ASGI send instead.
DirectWrite = Callable[[bytes], bool]


def text_frame(text: str) -> bytes:
    """``text`` as one unmasked, uncompressed WebSocket text frame (a server's frame)."""
    return WireFrame(Opcode.TEXT, text.encode()).serialize(mask=False)


def direct_writer(send: Callable[..., Any]) -> DirectWrite | None:
    """A direct writer for the accepted connection behind ``send``, or None where frames
    must go through ``send`` (another server, or an extension such as compression)."""
    protocol = getattr(send, "__self__", None)
    if not isinstance(protocol, WebSocketsSansIOProtocol):
        return None
    connection = protocol.conn
    if connection.extensions or not protocol.handshake_complete or protocol.initial_response is not None:
        return None
    transport = protocol.transport
    writable = protocol.writable

    def write(data: bytes) -> bool:
        if (
            protocol.close_sent
            or protocol.disconnected
            or not writable.is_set()
            or connection.state is not State.OPEN
            or transport.is_closing()
        ):
            return False
        transport.write(data)
        return True

    return write
