"""The bridge's moving parts for one process: the gRPC channel, the upstream streams
and the stream hub, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc

from bridge.config import BridgeConfig
from bridge.credential_watch import CredentialWatch
from bridge.fanout import Frame, Subscriber
from bridge.hub import SnapshotTooOld, StreamHub
from bridge.limits import ConnectionLimit
from bridge.request_id import HEADER, REQUEST_ID
from bridge.tls import upstream_channel
from bridge.upstream import Upstream
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["BridgeRuntime", "Credential", "credential_metadata"]

log = logging.getLogger("bridge.runtime")

SNAPSHOT_ATTEMPTS = 3

# (header name, value) as the caller sent it: ("authorization", "Bearer x") or ("x-api-key", "x").
Credential = tuple[str, str] | None


def credential_metadata(credential: Credential) -> tuple[tuple[str, str], ...]:
    """The metadata of an RPC made for a caller: its credential, and the id of the
    request being served, so that the server's log lines about the call carry it."""
    metadata = (credential,) if credential else ()
    request_id = REQUEST_ID.get()
    return (*metadata, (HEADER, request_id)) if request_id else metadata


class BridgeRuntime:
    """Made before the event loop runs; ``start`` (from the app's lifespan, inside the
    loop) opens the channel, since a grpc.aio channel belongs to the loop it is made in."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.hub = StreamHub(config.event_buffer)
        # One budget per token across the WebSocket and SSE endpoints.
        self.connection_limit = ConnectionLimit(config.max_connections_per_token)
        # The open connections' credentials: ended when they expire or are revoked.
        self.credentials = CredentialWatch(
            self.check_credential,
            recheck_interval=config.credential_recheck_interval,
            concurrency=config.credential_recheck_concurrency,
        )
        self._told_no_check = False
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CollaborationServiceAsyncStub | None = None
        self._upstream: Upstream | None = None
        # Set once the upstream's first snapshot is in: before that the bridge follows no
        # epoch, and a client could not be resumed.
        self._synced = asyncio.Event()

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self._channel is not None, "BridgeRuntime.start() has not run"
        return self._channel

    @property
    def stub(self) -> pb_grpc.CollaborationServiceAsyncStub:
        assert self._stub is not None, "BridgeRuntime.start() has not run"
        return self._stub

    @property
    def upstream(self) -> Upstream:
        assert self._upstream is not None, "BridgeRuntime.start() has not run"
        return self._upstream

    async def start(self) -> None:
        self._channel = upstream_channel(self.config.grpc_target, self.config.grpc_tls_ca)
        self._stub = pb_grpc.CollaborationServiceStub(self._channel)
        self._upstream = Upstream(
            self._channel,
            self.config.resolve_upstream_token(),
            on_snapshot=self._on_snapshot,
            on_event=self.hub.on_event,
            on_status=self.hub.on_status,
        )
        self._upstream.start()
        self.credentials.start()

    def _on_snapshot(self, snapshot: pb.Snapshot, reset: bool) -> None:
        self.hub.on_snapshot(snapshot, reset)
        self._synced.set()

    async def _wait_synced(self) -> None:
        """Wait (at most the RPC timeout) for the upstream's first snapshot. A client that
        connects to a bridge that has just started, as every client of a restarted bridge
        does, would otherwise be told its epoch is unknown and lose its place."""
        try:
            await asyncio.wait_for(self._synced.wait(), self.config.rpc_timeout)
        except TimeoutError:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "the bridge is not following the server yet; retry",
                None,
            ) from None

    async def stop(self) -> None:
        await self.credentials.stop()
        await self.upstream.stop()
        await self.channel.close(None)

    async def check_credential(self, credential: Credential) -> float | None:
        """When ``credential`` expires (epoch seconds; None: not by itself), as the server
        says; grpc.aio.AioRpcError (UNAUTHENTICATED...) when it is not accepted."""
        try:
            reply = await self.stub.CheckCredential(
                pb.CheckCredentialRequest(), metadata=credential_metadata(credential), timeout=self.config.rpc_timeout
            )
        except grpc.aio.AioRpcError as failure:
            if failure.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            # A server older than this bridge (a rolling upgrade): it checked the credential
            # when the connection's snapshot was fetched; its expiry cannot be known.
            if not self._told_no_check:
                self._told_no_check = True
                log.warning("the server has no CheckCredential: connections are not ended when credentials expire")
            return None
        if not reply.HasField("expires_at"):
            return None
        return float(reply.expires_at.ToNanoseconds()) / 1e9

    async def fetch_snapshot(self, credential: Credential) -> pb.Snapshot:
        """The state now, read with the caller's own credential, which the server checks."""
        call = self.stub.SubscribeEvents(
            pb.SubscribeEventsRequest(include_snapshot=True, kinds=[pb.EVENT_KIND_COLLABORATION_ENDED]),
            metadata=credential_metadata(credential),
            timeout=self.config.rpc_timeout,
        )
        try:
            first = await call.read()
        finally:
            call.cancel()
        if not isinstance(first, pb.SubscribeEventsResponse) or not first.HasField("snapshot"):
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "no snapshot from the server",
                None,
            )
        return first.snapshot

    async def fetch_missed(self, credential: Credential, epoch: str, since: int, until: int) -> list[Frame] | None:
        """The events after ``since`` up to ``until``, replayed by the server with the
        caller's credential; None when it cannot (another epoch, no longer retained)."""
        call = self.stub.SubscribeEvents(
            pb.SubscribeEventsRequest(since_seq=since, epoch=epoch),
            metadata=credential_metadata(credential),
            timeout=self.config.rpc_timeout,
        )
        frames: list[Frame] = []
        try:
            first = await call.read()
            if not isinstance(first, pb.SubscribeEventsResponse) or not first.resume.recovered:
                return None
            seq = since
            while seq < until:
                message = await call.read()
                if not isinstance(message, pb.SubscribeEventsResponse):
                    return None
                seq = message.event.seq
                frame = self.hub.frame(message.event)
                if frame is not None:
                    frames.append(frame)
        except grpc.aio.AioRpcError:
            return None
        finally:
            call.cancel()
        return frames

    async def open_client(
        self,
        subscriber: Subscriber,
        snapshot: pb.Snapshot,
        credential: Credential,
        established: Mapping[str, object],
        since: int | None,
        epoch: str,
    ) -> None:
        """Start a client from ``snapshot`` (or resume it from ``(epoch, since)``). In the
        rare case that events outran the snapshot while it was fetched, fetch another."""
        if not self._synced.is_set():
            await self._wait_synced()
        fetched = None
        if since is not None and epoch == self.hub.epoch and since + 1 < self.hub.first_buffered_seq:
            # Older than this bridge's buffer (it restarted, say): the server may still have them.
            fetched = await self.fetch_missed(credential, epoch, since, self.hub.first_buffered_seq - 1)
        for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
            try:
                opening = {**established, "epoch": snapshot.epoch, "seq": snapshot.seq}
                # The last attempt accepts another epoch: the bridge may be the one behind
                # (the server just restarted); its upstream then resets the client.
                self.hub.open(subscriber, snapshot, opening, since, epoch, fetched, strict=attempt < SNAPSHOT_ATTEMPTS)
                return
            except SnapshotTooOld:
                await asyncio.sleep(0.05 * attempt)
                snapshot = await self.fetch_snapshot(credential)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "events arrive faster than a consistent snapshot can be taken; retry",
            None,
        )
