"""The bridge's refusals and the HTTP answers they become.

- ``ServerUnavailable``: the collab server cannot be reached, or the bridge cannot serve
  a client from it right now; the caller retries. Raised where that is found (a call that
  failed with UNAVAILABLE, a bridge not yet following the server, a resume refused a
  turn) and answered in one place per protocol: HTTP 503 (with ``Retry-After`` when
  known) here, WebSocket close 1013 in bridge/websocket.py.
- ``HubError``: any other refusal, as its HTTP status and the error body
  ``{"detail": "<what is wrong>", "code": "<STATUS>"}``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import grpc
from starlette.responses import JSONResponse

from bridge.limits import ThrottledLog
from collab_grpc.errors import BUDGET_TRAILER

__all__ = [
    "HTTP_STATUS",
    "CompactJSONResponse",
    "HubError",
    "ServerUnavailable",
    "calling_server",
    "hub_error_response",
    "retry_after_of",
    "without_addresses",
]

log = logging.getLogger("bridge.errors")

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Why the server could not be reached names internal addresses (the server's, Redis's):
# for the operator's log, not for whoever calls. What else the server said (the disk is
# full, say) is the caller's to know.
_unreachable = ThrottledLog(log, "calls to the collab server failed with UNAVAILABLE")
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix-abstract|unix|dns|vsock):(?:\[[^\]]*\]|[^\s,;\[\]])+?(?=:?(?:\s|$|[,;]))"  # gRPC's
    r"|\[[0-9a-fA-F:.%]+\](?::\d+)?"  # [IPv6]:port
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?"  # IPv4:port
    r"|\b[\w.-]+:\d{2,5}\b"  # name:port
)


def without_addresses(text: str) -> str:
    """Replace every network address in ``text`` (IPs, host:port, gRPC's ipv4:/unix: forms) with ``[address]``."""
    return _ADDRESS.sub("[address]", text)


def retry_after_of(failure: grpc.aio.AioRpcError) -> str | None:
    """Return the ``retry-after`` trailer the server sent with ``failure``, if any."""
    # The type stubs mistype metadata entries; they are (key, value) pairs.
    for key, value in cast("Sequence[tuple[str, str]]", failure.trailing_metadata() or ()):
        if key == "retry-after":
            return str(value)
    return None


class ServerUnavailable(Exception):
    """The collab server cannot be reached or cannot serve this client now: retry (after
    ``retry_after`` seconds when given)."""

    def __init__(self, reason: str, retry_after: str | None = None) -> None:
        self.detail = f"the collab server is unavailable: {without_addresses(reason) or 'retry later'}"
        super().__init__(self.detail)
        self.retry_after = retry_after

    @classmethod
    def from_rpc(cls, failure: grpc.aio.AioRpcError) -> ServerUnavailable:
        """Describe a call that failed with UNAVAILABLE, logging its details whole (addresses included)."""
        details = failure.details() or ""
        _unreachable.record(detail=details)
        return cls(details, retry_after_of(failure))

    @classmethod
    def of(cls, failure: grpc.aio.AioRpcError | ServerUnavailable) -> ServerUnavailable:
        """Return ``failure`` if it is one, else what an UNAVAILABLE failure that did not pass
        calling_server stands for (its details may name addresses: they are removed)."""
        return failure if isinstance(failure, ServerUnavailable) else cls.from_rpc(failure)


@contextmanager
def calling_server() -> Iterator[None]:
    """Raise a call's UNAVAILABLE failure as ServerUnavailable; every other failure passes as it is."""
    try:
        yield
    except grpc.aio.AioRpcError as failure:
        if failure.code() == grpc.StatusCode.UNAVAILABLE:
            raise ServerUnavailable.from_rpc(failure) from None
        raise


class HubError(Exception):
    """A refusal, or a failed call to the server, as the HTTP answer it becomes."""

    def __init__(self, status: int, code: str, detail: str, retry_after: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after

    @classmethod
    def from_rpc(cls, failure: grpc.aio.AioRpcError | ServerUnavailable) -> HubError:
        """Map a failed call to the server to its HTTP answer (an unreachable server: 503)."""
        if isinstance(failure, ServerUnavailable) or failure.code() == grpc.StatusCode.UNAVAILABLE:
            return cls.unavailable(ServerUnavailable.of(failure))
        code = failure.code()
        status = HTTP_STATUS.get(code, 502)
        # A memory budget is full, not a rate: 507, and retrying soon does not help
        # (429 with Retry-After stays the rate limit's).
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(
            key == BUDGET_TRAILER for key, _ in cast("Sequence[tuple[str, str]]", failure.trailing_metadata() or ())
        ):
            status = 507
        return cls(status, code.name, failure.details() or code.name, retry_after_of(failure))

    @classmethod
    def unavailable(cls, error: ServerUnavailable) -> HubError:
        """Answer a ServerUnavailable over HTTP: 503, with ``Retry-After`` when it has one."""
        return cls(503, grpc.StatusCode.UNAVAILABLE.name, error.detail, error.retry_after)


class CompactJSONResponse(JSONResponse):
    """Starlette's JSONResponse (the same bytes) with its encoder built once instead of per response."""

    _encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))

    def render(self, content: Any) -> bytes:
        """Encode ``content`` as compact UTF-8 JSON."""
        return self._encoder.encode(content).encode("utf-8")


def hub_error_response(error: HubError) -> JSONResponse:
    """Answer ``error`` in the error shape, with ``Retry-After`` and ``WWW-Authenticate`` where they apply."""
    headers = {}
    if error.retry_after:
        headers["Retry-After"] = error.retry_after
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return CompactJSONResponse({"detail": error.detail, "code": error.code}, status_code=error.status, headers=headers)
