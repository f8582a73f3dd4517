"""The bridge's moving parts for one process: the gRPC channel, the upstream streams
and the stream hub, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import grpc

from bridge.catchup import CatchUp, Outcome
from bridge.config import BridgeConfig
from bridge.credential_watch import CredentialWatch
from bridge.errors import ServerUnavailable, calling_server
from bridge.fanout import CLOSE_TOO_SLOW, Frame, Subscriber
from bridge.hub import SnapshotTooOld, StreamHub
from bridge.limits import ConnectionLimit
from bridge.mapping import dumps
from bridge.request_id import HEADER, REQUEST_ID
from bridge.tls import upstream_channel
from bridge.upstream import Upstream
from collab_grpc.v1 import collaboration_pb2 as pb
from collab_grpc.v1 import collaboration_pb2_grpc as pb_grpc

__all__ = ["BridgeRuntime", "Credential", "credential_metadata"]

log = logging.getLogger("bridge.runtime")

SNAPSHOT_ATTEMPTS = 3
# Seconds a client refused a turn to resume is told to wait before it retries.
RESUME_RETRY_AFTER = 1

# (header name, value) as the caller sent it: ("authorization", "Bearer x") or ("x-api-key", "x").
Credential = tuple[str, str] | None


def credential_metadata(credential: Credential) -> tuple[tuple[str, str], ...]:
    """Build the metadata of an RPC made for a caller: its credential, and the id of the
    request being served, so that the server's log lines about the call carry it."""
    metadata = (credential,) if credential else ()
    request_id = REQUEST_ID.get()
    return (*metadata, (HEADER, request_id)) if request_id else metadata


class BridgeRuntime:
    """Made before the event loop runs; ``start`` (from the app's lifespan, inside the
    loop) opens the channel, since a grpc.aio channel belongs to the loop it is made in."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.hub = StreamHub(
            config.event_buffer,
            config.event_buffer_bytes,
            coalesce_delay=config.fanout_coalesce_delay,
            batch_size=config.fanout_batch,
        )
        # Resumes that read the server's log (older than the buffer) at once; each is
        # streamed, holding one message and the client's bounded backlog at a time.
        self._resume_slots = asyncio.Semaphore(config.max_concurrent_resumes)
        self.resumes_refused = 0
        # Clients resuming from a position the server has reached but this bridge's
        # upstream has not yet (they come from another bridge): they wait for it.
        self.catch_up = CatchUp(config.max_resume_waiters)
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
        """Open the channel to the server and start following its streams and rechecking credentials."""
        self._channel = upstream_channel(self.config.grpc_target, self.config.grpc_tls_ca)
        self._stub = pb_grpc.CollaborationServiceStub(self._channel)
        self._upstream = Upstream(
            self._channel,
            self.config.resolve_upstream_token(),
            on_snapshot=self._on_snapshot,
            on_event=self._on_event,
            on_status=self.hub.on_status,
        )
        self._upstream.start()
        self.credentials.start()

    def _on_snapshot(self, snapshot: pb.Snapshot, reset: bool) -> None:
        self.hub.on_snapshot(snapshot, reset)
        self._synced.set()
        self.catch_up.on_snapshot()

    def _on_event(self, event: pb.Event) -> None:
        self.hub.on_event(event)
        self.catch_up.on_event(event.seq)

    async def _wait_synced(self) -> None:
        """Wait (at most the RPC timeout) for the upstream's first snapshot. A client that
        connects to a bridge that has just started, as every client of a restarted bridge
        does, would otherwise be told its epoch is unknown and lose its place."""
        try:
            await asyncio.wait_for(self._synced.wait(), self.config.rpc_timeout)
        except TimeoutError:
            raise ServerUnavailable("the bridge is not following the server yet; retry") from None

    async def stop(self) -> None:
        """Stop the credential rechecks and the upstream streams, then close the channel."""
        await self.credentials.stop()
        await self.upstream.stop()
        await self.channel.close(None)

    async def check_credential(self, credential: Credential) -> float | None:
        """Ask the server when ``credential`` expires (epoch seconds; None: not by itself).

        Raises grpc.aio.AioRpcError (UNAUTHENTICATED...) when the server does not accept
        it, ServerUnavailable when the server cannot be asked."""
        try:
            with calling_server():
                reply = await self.stub.CheckCredential(
                    pb.CheckCredentialRequest(),
                    metadata=credential_metadata(credential),
                    timeout=self.config.rpc_timeout,
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
        """Read the state now with the caller's own credential, which the server checks.

        Raises grpc.aio.AioRpcError when the server refuses the credential,
        ServerUnavailable when it cannot be reached or sends no snapshot."""
        call = self.stub.SubscribeEvents(
            pb.SubscribeEventsRequest(include_snapshot=True, kinds=[pb.EVENT_KIND_COLLABORATION_ENDED]),
            metadata=credential_metadata(credential),
            timeout=self.config.rpc_timeout,
        )
        try:
            with calling_server():
                first = await call.read()
        finally:
            call.cancel()
        if not isinstance(first, pb.SubscribeEventsResponse) or not first.HasField("snapshot"):
            raise ServerUnavailable("no snapshot from the server")
        return first.snapshot

    @asynccontextmanager
    async def _resume_slot(self) -> AsyncIterator[None]:
        """Take a turn to stream a resume from the server, waiting at most ``rpc_timeout``
        before refusing with ServerUnavailable (the client retries)."""
        try:
            await asyncio.wait_for(self._resume_slots.acquire(), self.config.rpc_timeout)
        except TimeoutError:
            self.resumes_refused += 1
            limit = self.config.max_concurrent_resumes
            log.info("resume refused: %d resumes from the server's log already under way", limit)
            raise ServerUnavailable(
                f"too many clients resuming from the server's log at once (the most is {limit}: "
                "COLLAB_MAX_CONCURRENT_RESUMES); retry with the same since/epoch",
                str(RESUME_RETRY_AFTER),
            ) from None
        try:
            yield
        finally:
            self._resume_slots.release()

    async def resume_from_server(
        self,
        subscriber: Subscriber,
        credential: Credential,
        established: Mapping[str, object],
        epoch: str,
        since: int,
    ) -> bool:
        """Resume a client whose position is older than the buffer from the server's log;
        False (nothing sent) when the server cannot replay it either (another epoch, no
        longer retained).

        Read with the caller's credential: ``connection_established`` (recovered), then
        each missed event streamed to the client as it arrives (waiting for a client that
        is behind), up to where the buffer takes over; then live events. Raises
        ServerUnavailable when the replay breaks off (the client resumes again from what
        it received)."""
        hub = self.hub
        async with self._resume_slot():
            call = self.stub.SubscribeEvents(
                pb.SubscribeEventsRequest(since_seq=since, epoch=epoch),
                metadata=credential_metadata(credential),
                timeout=self.config.rpc_timeout,
            )
            try:
                first = await call.read()
                if not isinstance(first, pb.SubscribeEventsResponse) or not first.resume.recovered:
                    return False
                opening = {**established, "epoch": epoch, "seq": since, "recovered": True}
                subscriber.epoch = epoch
                subscriber.min_seq = subscriber.last_seq = subscriber.written_seq = since
                subscriber.send_frame(Frame(dumps(opening), "connection_established"))
                reached = since
                # Until the buffer (which moves on meanwhile) holds what follows.
                while reached + 1 < hub.first_buffered_seq and not subscriber.closed:
                    message = await call.read()
                    if not isinstance(message, pb.SubscribeEventsResponse):
                        raise ServerUnavailable("the server ended the replay early; resume again")
                    reached = message.event.seq
                    frame = hub.frame(message.event)
                    if frame is not None:
                        subscriber.deliver(frame)
                    if subscriber.behind:
                        await self._wait_drained(subscriber)
            except grpc.aio.AioRpcError as failure:
                if failure.code() == grpc.StatusCode.UNAVAILABLE:
                    raise ServerUnavailable.from_rpc(failure) from None
                failed = f"the replay of missed events failed: {failure.details()}; resume again"
                raise ServerUnavailable(failed) from None
            finally:
                call.cancel()
        if subscriber.closed:
            return True  # too slow, or gone: it resumes again from what it received
        if hub.epoch != epoch:  # the server restarted meanwhile
            raise ServerUnavailable("the server's history restarted during the resume; resume again")
        hub.continue_after(subscriber, reached)
        return True

    async def _wait_drained(self, subscriber: Subscriber) -> None:
        """Let a client that is behind take what waits before it is sent more; one that
        takes nothing for ``rpc_timeout`` is closed as too slow."""
        try:
            await asyncio.wait_for(subscriber.drained(), self.config.rpc_timeout)
        except TimeoutError:
            subscriber.too_slow = True
            subscriber.disconnect(
                CLOSE_TOO_SLOW,
                f"too slow: took nothing for {self.config.rpc_timeout:g} s; reconnect with since="
                f"{subscriber.written_seq}",
            )

    async def _wait_for_upstream(self, snapshot: pb.Snapshot, epoch: str, since: int) -> None:
        """Let a client resuming from ``(epoch, since)`` wait, at most ``resume_wait``
        seconds, for this bridge's upstream to get there: the server has (``snapshot``,
        just read from it, says so) but this bridge, a few events or one restart behind
        the bridge the client comes from, has not yet. Past the wait the client is given
        a fresh state; with ``max_resume_waiters`` waiting already it is refused
        (UNAVAILABLE: WebSocket 1013 / HTTP 503 with Retry-After) to retry as it is."""
        if snapshot.epoch != epoch or snapshot.seq < since:
            return  # a position the server is not at either: nothing will come to wait for
        hub, catch_up = self.hub, self.catch_up
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.resume_wait
        waited = False
        while hub.epoch != epoch or hub.last_seq < since:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if not catch_up.has_room():
                catch_up.outcomes[Outcome.REFUSED] += 1
                limit = self.config.max_resume_waiters
                raise ServerUnavailable(
                    f"the bridge is behind the server and {limit} clients already wait for it to catch up "
                    "(COLLAB_MAX_RESUME_WAITERS); retry with the same since/epoch",
                    str(RESUME_RETRY_AFTER),
                )
            waited = True
            # In another epoch than the client's, the upstream's next snapshot brings it.
            if not await catch_up.wait(since if hub.epoch == epoch else None, remaining):
                break
        if not waited:
            return
        if hub.epoch == epoch and hub.last_seq >= since:
            catch_up.outcomes[Outcome.CAUGHT_UP] += 1
        else:
            catch_up.outcomes[Outcome.EXPIRED] += 1
            log.warning(
                "a resuming client is ahead of this bridge's upstream after %g s; it gets a fresh state",
                self.config.resume_wait,
                extra={"epoch": epoch, "since": since, "upstream_epoch": hub.epoch, "upstream_seq": hub.last_seq},
            )

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
        # Set here, before anything is written to it, for the WebSocket and SSE alike.
        subscriber.max_backlog_bytes = self.config.client_backlog_bytes
        if not self._synced.is_set():
            await self._wait_synced()
        if since is not None:
            await self._wait_for_upstream(snapshot, epoch, since)
        if since is not None and epoch == self.hub.epoch and since + 1 < self.hub.first_buffered_seq:
            # Older than this bridge's buffer (it restarted, say): the server may still have them.
            resumed = await self.resume_from_server(subscriber, credential, established, epoch, since)
            if resumed:
                return
        for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
            try:
                opening = {**established, "epoch": snapshot.epoch, "seq": snapshot.seq}
                # The last attempt accepts another epoch: the bridge may be the one behind
                # (the server just restarted); its upstream then resets the client.
                self.hub.open(subscriber, snapshot, opening, since, epoch, strict=attempt < SNAPSHOT_ATTEMPTS)
                return
            except SnapshotTooOld:
                await asyncio.sleep(0.05 * attempt)
                snapshot = await self.fetch_snapshot(credential)
        raise ServerUnavailable("events arrive faster than a consistent snapshot can be taken; retry")
