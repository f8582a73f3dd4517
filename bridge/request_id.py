"""Request ids: one per HTTP request or WebSocket connection.

Taken from the caller's ``X-Request-ID`` header when it is 1 to 128 visible ASCII
characters, else made (uuid4, hex). It is on every log line the request causes here,
returned in the response's ``X-Request-ID`` header (HTTP), and sent to the server as
``x-request-id`` metadata on the RPCs made for the request, where the server's log
lines carry it too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar

__all__ = ["HEADER", "MAX_LENGTH", "REQUEST_ID", "request_id_filter", "request_id_from_headers"]

HEADER = "x-request-id"
MAX_LENGTH = 128

# The request (or connection) being served; set by the app's outermost middleware.
REQUEST_ID: ContextVar[str | None] = ContextVar("bridge_request_id", default=None)

_HEADER_BYTES = HEADER.encode()


def _acceptable(text: str) -> bool:
    # Visible ASCII only: it goes into a gRPC metadata value and a response header
    # unchanged, and into log lines where a control character could forge a line.
    return 0 < len(text) <= MAX_LENGTH and all("!" <= char <= "~" for char in text)


def request_id_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The caller's ``X-Request-ID`` (ASGI headers: lower-cased names) if acceptable, else a new one."""
    for name, value in headers:
        if name == _HEADER_BYTES:
            text = value.decode("latin-1")
            return text if _acceptable(text) else uuid.uuid4().hex
    return uuid.uuid4().hex


def request_id_filter() -> Callable[[logging.LogRecord], bool]:
    """A logging filter (logging.config's factory) putting ``request_id`` on each record
    logged while a request is served."""

    def add_request_id(record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        return True

    return add_request_id
