"""The SDK's exceptions: one per way a call can fail, each carrying the server's message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import grpc

__all__ = [
    "CollabError",
    "Conflict",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResumeFailed",
    "Unauthenticated",
    "Unavailable",
    "error_from_rpc",
]


class CollabError(Exception):
    """A call the hub refused or could not serve; ``code`` is the gRPC status name."""

    code = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CollabError):
    code = "INVALID_ARGUMENT"


class NotFound(CollabError):
    code = "NOT_FOUND"


class Conflict(CollabError):
    """The state forbids it: already completed, session ended, idempotency key reused."""

    code = "FAILED_PRECONDITION"


class RateLimited(CollabError):
    """RESOURCE_EXHAUSTED: over a rate (``retry_after``: seconds to wait), or a budget
    that is full until something is freed (``budget``: its setting's name, e.g.
    "max-db-bytes"; no retry delay then)."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float | None = None, budget: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.budget = budget


class Unauthenticated(CollabError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CollabError):
    code = "PERMISSION_DENIED"


class Unavailable(CollabError):
    """The hub cannot be reached or is shutting down; safe calls are retried first."""

    code = "UNAVAILABLE"


class ResumeFailed(CollabError):
    """An event stream could not continue where it stopped (the history restarted, or the
    missed events are no longer kept): events in between cannot be delivered."""

    code = "DATA_LOSS"


_BY_STATUS: dict[grpc.StatusCode, type[CollabError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    # A call the server cancelled: a server shutting down cancels the calls that reached
    # it but no handler yet (a local cancel raises asyncio.CancelledError, not this). Its
    # outcome is as unknown as a broken connection's, and retrying a write is as safe:
    # every write carries an idempotency key.
    grpc.StatusCode.CANCELLED: Unavailable,
}


def error_from_rpc(error: grpc.RpcError) -> CollabError:
    """The SDK exception for a failed gRPC call (sync or asyncio)."""
    call = cast(grpc.Call, error)
    code = call.code()
    message = call.details() or code.name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after, budget = None, None
        pairs = cast(Sequence[tuple[str, str]], call.trailing_metadata() or ())
        for key, value in pairs:
            if key == "retry-after":
                retry_after = float(value)
            elif key == "collab-budget":
                budget = value
        return RateLimited(message, retry_after, budget)
    kind = _BY_STATUS.get(code, CollabError)
    failure = kind(message)
    if kind is CollabError:
        failure.code = code.name
    return failure
