"""Structured logging: one JSON object per line on stderr (or plain text for humans).

Fields passed with ``extra=`` become keys of the object. Every line logged while an RPC
is handled carries that call's ``request_id`` (the caller's ``x-request-id`` metadata,
else one made for it), so the bridge's log lines and the server's join up.

A log line is one line whatever a client sends: JSON escapes control characters, and
the text format (SafeTextFormatter) escapes them in the message (a ``%0a`` in a path, a
line break in a JWT header a client made up) and indents every line of a traceback, so
nothing a client sends can start a line that reads as a record of its own.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "REQUEST_ID",
    "RequestIdFilter",
    "SafeTextFormatter",
    "configure_logging",
    "escape_controls",
    "request_id_from_metadata",
]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(_escaped, text)


class SafeTextFormatter(logging.Formatter):
    """The text format, one record per line: control characters in the line are
    escaped; a traceback or stack keeps its lines, each indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


# The request id of the RPC being handled (set by the observing interceptor; each call
# runs in a task of its own, so it never leaks into another call).
REQUEST_ID: ContextVar[str | None] = ContextVar("collab_request_id", default=None)

# What the server accepts as a caller's request id: 1 to 128 visible ASCII characters.
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")


def request_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The caller's ``x-request-id`` if it is acceptable, else a new one (128 random
    bits in hex, a uuid4's size; os.urandom directly, a fifth of uuid4's cost per call)."""
    for key, value in metadata:
        if key == "x-request-id" and isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
            return value
    return os.urandom(16).hex()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record logged while a call is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(SafeTextFormatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
