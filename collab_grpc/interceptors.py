"""The server's auth interceptor: every CollaborationService call needs a credential.

Health checking and reflection stay open (load balancers and grpcurl-style tools use
them before they hold a token); they reveal no state.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from collab_grpc.auth import Authenticator, token_from_headers
from collab_grpc.errors import CollabError
from collab_grpc.servicer import STATUS_FOR_ERROR, WRITE_METHODS, Context

__all__ = ["AuthInterceptor"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

log = logging.getLogger("collab_grpc.auth")

SERVICE_PREFIX = "/collab.v1.CollaborationService/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _refusal(handler: Handler, code: grpc.StatusCode, details: str) -> Handler:
    """A handler of the same shape as ``handler`` that only ends the call with ``code``."""

    async def refuse(_request: Any, context: Context) -> None:
        await context.abort(code, details)

    async def refuse_stream(_request: Any, context: Context) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator, as streams expect

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deserializer, serializer)


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES) or not self.authenticator.enabled:
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        headers = {key: value for key, value in metadata if isinstance(value, str)}
        name = method.removeprefix(SERVICE_PREFIX)
        # Anything not known to be a read needs write access: deny by default.
        write = name in WRITE_METHODS or not method.startswith(SERVICE_PREFIX)
        try:
            self.authenticator.require(token_from_headers(headers), write=write)
        except CollabError as error:
            log.warning("refused %s: %s", method, error, extra={"rpc": method, "reason": str(error)})
            return _refusal(handler, STATUS_FOR_ERROR[type(error)], str(error))
        return handler
