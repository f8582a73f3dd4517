"""The read/write split comes from the contract, deny by default: an RPC the proto marks
`idempotency_level = NO_SIDE_EFFECTS` needs read access; every other method (one added
later and left unmarked, another service's) needs write access. Health checking and
reflection stay open. Enumerated from the descriptor, so a new RPC is covered as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # the asyncio servicer, as the server uses

from collab_grpc.auth import Authenticator
from collab_grpc.interceptors import CallInterceptor
from collab_grpc.servicer import READ_METHODS, SERVICE, WRITE_METHODS, read_methods
from tests.support.processes import ServerProcess
from tests.support.rpc import EOF, READ_KEY, WRITE_KEY, bearer

NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
REFUSALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def is_marked_read(method: MethodDescriptor) -> bool:
    return method.GetOptions().idempotency_level == NO_SIDE_EFFECTS


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# -- the contract -------------------------------------------------------------------------------


def synthetic_service() -> Any:
    """A service with a marked read, an unmarked method and one marked IDEMPOTENT (a
    retry-safe write is still a write)."""
    file = descriptor_pb2.FileDescriptorProto(name="split_test.proto", package="split.v1", syntax="proto3")
    file.message_type.add(name="Empty")
    service = file.service.add(name="Probe")
    for name, level in (
        ("Read", NO_SIDE_EFFECTS),
        ("Unmarked", None),
        ("Idempotent", descriptor_pb2.MethodOptions.IDEMPOTENT),
    ):
        method = service.method.add(name=name, input_type=".split.v1.Empty", output_type=".split.v1.Empty")
        if level is not None:
            method.options.idempotency_level = level
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool.FindServiceByName("split.v1.Probe")


def test_only_methods_marked_no_side_effects_are_reads() -> None:
    assert read_methods(synthetic_service()) == {"/split.v1.Probe/Read"}


def test_the_servers_split_is_the_contracts() -> None:
    marked = {path_of(method) for method in SERVICE.methods if is_marked_read(method)}
    assert marked == READ_METHODS
    assert {method.name for method in SERVICE.methods if not is_marked_read(method)} == WRITE_METHODS
    # What the contract says today (a new RPC needs no entry here: it is checked below).
    assert {"SubscribeEvents", "GetAgentStatus", "CheckCredential"} <= {p.rsplit("/", 1)[1] for p in READ_METHODS}
    assert {"RecordActivity", "BulkRecordActivities", "EndCollaboration"} <= WRITE_METHODS


# -- the interceptor, for methods the contract does not list --------------------------------------


def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


class _AnyMethod(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic only in the stubs
    """Serves any method path as a bytes echo: stands in for an RPC nobody classified."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return grpc.unary_unary_rpc_method_handler(_echo)


@pytest_asyncio.fixture
async def echo_target() -> AsyncIterator[str]:
    authenticator = Authenticator(api_keys=[WRITE_KEY], read_keys=[READ_KEY])
    server = grpc.aio.server(interceptors=[CallInterceptor(authenticator)])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_generic_rpc_handlers([_AnyMethod()])  # after Health: its paths stay Health's
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def echo_code(target: str, path: str, token: str | None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            await call(b"", metadata=bearer(token) if token else (), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "path", ["/collab.v1.CollaborationService/NobodyClassifiedThis", "/other.v1.Elsewhere/Anything"]
)
async def test_an_unclassified_method_needs_write_access(echo_target: str, path: str) -> None:
    assert await echo_code(echo_target, path, READ_KEY) == grpc.StatusCode.PERMISSION_DENIED
    assert await echo_code(echo_target, path, None) == grpc.StatusCode.UNAUTHENTICATED
    assert await echo_code(echo_target, path, WRITE_KEY) == grpc.StatusCode.OK


async def test_health_stays_open(echo_target: str) -> None:
    async with grpc.aio.insecure_channel(echo_target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- from the outside: every RPC of the service, with a read key ----------------------------------


# An empty SubscribeEvents sends nothing until an event comes (a read key cannot record
# one): asked for its snapshot, its first message comes at once, and an accepted stream
# is seen as OK rather than as a deadline passed.
FIRST_MESSAGE_AT_ONCE = {"SubscribeEvents": {"include_snapshot": True}}


async def call_empty(channel: grpc.aio.Channel, method: MethodDescriptor, token: str) -> grpc.StatusCode:
    """Call ``method`` with an empty request (auth is decided before the request is
    read); the status it ends with (a server stream: OK once a message arrives)."""
    request = message_factory.GetMessageClass(method.input_type)(**FIRST_MESSAGE_AT_ONCE.get(method.name, {}))
    reply = message_factory.GetMessageClass(method.output_type)
    options: dict[str, Any] = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": reply.FromString,
    }
    metadata = bearer(token)
    try:
        if method.client_streaming and method.server_streaming:
            both = channel.stream_stream(path_of(method), **options)(iter([request]), metadata=metadata, timeout=10)
            await both.read()
            both.cancel()
        elif method.client_streaming:
            await channel.stream_unary(path_of(method), **options)(iter([request]), metadata=metadata, timeout=10)
        elif method.server_streaming:
            stream = channel.unary_stream(path_of(method), **options)(request, metadata=metadata, timeout=10)
            first = await stream.read()
            stream.cancel()
            assert first is not EOF
        else:
            await channel.unary_unary(path_of(method), **options)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_read_key_is_refused_every_write_and_accepted_every_read(server_process: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server_process.target) as channel:
        codes = await asyncio.gather(*(call_empty(channel, method, READ_KEY) for method in SERVICE.methods))
    for method, code in zip(SERVICE.methods, codes, strict=True):
        if is_marked_read(method):
            # Accepted: whatever the empty request then earns (INVALID_ARGUMENT, NOT_FOUND) is no refusal.
            assert code not in REFUSALS | {grpc.StatusCode.DEADLINE_EXCEEDED}, method.name
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, method.name
