"""A request the protobuf runtime cannot decode is refused with INVALID_ARGUMENT.

grpc.aio decodes each request before any handler runs, and a decoding failure ends the
call with UNKNOWN ("Unexpected <class 'DecodeError'>"), which says nothing to the caller.
The protobuf decoder stops at 100 levels of nested messages: every level of a metadata
Struct is about three, so metadata nested over ~33 levels (the hub's own limit is 32)
never reaches the hub's validation; a string field that is not UTF-8 fails the same way.
Here the decoding fails softly (``soft_deserializer``), and the server's interceptor
(collab_grpc/interceptors.py) ends such a call with INVALID_ARGUMENT and the decoder's
reason instead; a client-streaming method that answers each message on its own
(BulkRecordActivities) gets the Undecodable in place of the message instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from collab_grpc.validation import Limits

__all__ = ["Undecodable", "checked", "refuse", "soft_deserializer"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class Undecodable:
    """Stands in for a request that could not be decoded, so the call can be refused."""

    __slots__ = ("details",)

    def __init__(self, error: DecodeError) -> None:
        reason = str(error)
        if "MaxDepth" in reason:
            reason = f"messages nest too deeply (metadata may nest at most {Limits().max_metadata_depth} levels)"
        self.details = f"the request could not be decoded: {reason}"


def soft_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns an Undecodable instead of raising DecodeError."""
    if deserializer is None:
        return None
    decode = deserializer

    def soft(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as error:
            return Undecodable(error)

    return soft


async def refuse(request: Undecodable, context: Context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """A request stream that ends the call at the first message that could not be decoded."""
    async for request in requests:
        if isinstance(request, Undecodable):
            await refuse(request, context)
        yield request
