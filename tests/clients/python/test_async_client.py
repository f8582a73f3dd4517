"""AsyncClient against a real grpc.aio server in the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from collab import AsyncClient, Conflict, NotFound, ResumeFailed
from collab_grpc.server import RunningServer
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.conftest import HubFactory
from tests.support.rpc import WRITE_KEY


async def connect(make_hub: HubFactory, **overrides: Any) -> tuple[RunningServer, AsyncClient]:
    running, _ = await make_hub(**overrides)
    return running, AsyncClient(f"127.0.0.1:{running.port}", WRITE_KEY, timeout=5)


async def test_every_method(make_hub: HubFactory) -> None:
    _, hub = await connect(make_hub)
    async with hub:
        activity_id = await hub.record_activity("agent_1", "memory_write", department="eng", metadata={"k": 1})
        assert (await hub.get_activity(activity_id)).status == pb.ACTIVITY_STATUS_ACTIVE
        session_id = await hub.start_collaboration(["agent_1", "agent_2"], session_type="council")
        assert [s.session_id for s in await hub.active_collaborations()] == [session_id]
        decision_id = await hub.record_decision(session_id, "agent_1", "ship", votes={"agent_2": "yes"})
        assert decision_id.startswith("dec_")
        update = await hub.record_memory_update("read", "item_1", "agent_2")
        assert update.operation == pb.MEMORY_OPERATION_READ
        done = await hub.complete_activity(activity_id, success=False, failure_reason="tool error")
        assert done.status == pb.ACTIVITY_STATUS_FAILED
        assert (await hub.get_collaboration(session_id)).decisions[0].decision_id == decision_id
        ended = await hub.end_collaboration(session_id)
        assert ended.HasField("ended_at")
        assert [s.session_id for s in await hub.ended_collaborations()] == [session_id]
        assert [u.update.item_id for u in await hub.memory_updates(limit=5)] == ["item_1"]
        assert [a.activity_id for a in await hub.activity_feed(agent_id="agent_1")] == [activity_id]
        status = await hub.agent_status()
        assert {a.agent_id for a in status.agents} == {"agent_1", "agent_2"}
        with pytest.raises(NotFound):
            await hub.complete_activity("act_missing")
        with pytest.raises(Conflict):
            await hub.end_collaboration(session_id)


async def test_activity_context_manager_completes_or_fails(make_hub: HubFactory) -> None:
    _, hub = await connect(make_hub)
    async with hub:
        async with hub.activity("agent_1", "council_debate", metadata={"topic": "x"}) as act:
            assert (await hub.get_activity(act.activity_id)).status == pb.ACTIVITY_STATUS_ACTIVE
        assert (await hub.get_activity(act.activity_id)).status == pb.ACTIVITY_STATUS_COMPLETED
        with pytest.raises(KeyError):
            async with hub.activity("agent_1", "task_assigned") as failing:
                raise KeyError("boom")
        failed = await hub.get_activity(failing.activity_id)
        assert (failed.status, failed.failure_reason) == (pb.ACTIVITY_STATUS_FAILED, "KeyError")


async def test_events_yield_in_order_and_resume_from_a_seq(make_hub: HubFactory) -> None:
    _, hub = await connect(make_hub)
    async with hub:
        ids = [await hub.record_activity("agent_1", "message_sent") for _ in range(3)]
        seen: list[pb.Event] = []
        async for event in hub.events(since=1, types=["activity_recorded"]):
            seen.append(event)
            if len(seen) == 2:
                break
        assert [e.activity_recorded.activity_id for e in seen] == ids[1:]
        with pytest.raises(ResumeFailed, match="epoch"):
            async for _ in hub.events(since=1, epoch="another-epoch"):
                pass


async def test_events_resume_after_the_stream_breaks(make_hub: HubFactory) -> None:
    running, hub = await connect(make_hub)
    async with hub:
        received: list[int] = []

        async def follow() -> None:
            async for event in hub.events(types=["activity_recorded"]):
                received.append(event.seq)
                if len(received) == 10:
                    return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.1)
        for n in range(10):
            await hub.record_activity("agent_1", "message_sent")
            if n == 4:  # the server drops every subscription, as when one falls behind
                running.servicer.state.log.close_all("test: cut off")
        await asyncio.wait_for(follower, 10)
        assert received == list(range(1, 11))


async def test_batching_recorder_under_load(make_hub: HubFactory) -> None:
    _, hub = await connect(make_hub)
    async with hub:
        async with hub.recorder(max_batch=200, max_delay=0.05) as recorder:
            for n in range(2_000):
                await recorder.record(f"agent_{n % 20}", "message_sent", metadata={"n": n})
            await recorder.record("", "message_sent")  # refused: kept in failures, others unaffected
        assert len(recorder.recorded) == 2_000 and len(set(recorder.recorded)) == 2_000
        assert [f.code for f in recorder.failures] == ["INVALID_ARGUMENT"]
        assert (await hub.agent_status()).active_activities == 2_000


def nested(depth: int) -> dict[str, Any]:
    """Metadata ``depth`` levels deep."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"next": value}
    return value


async def test_a_batch_with_an_activity_the_hub_cannot_decode_is_sent_again_one_a_message(
    make_hub: HubFactory,
) -> None:
    # 33 levels of metadata: the SDK can build it, the hub's protobuf decoder cannot read
    # it, so the whole message of 100 around it is answered as one failed item.
    _, hub = await connect(make_hub)
    async with hub:
        async with hub.recorder(max_batch=1_000, max_delay=10) as recorder:
            for n in range(150):
                metadata = nested(33) if n == 5 else {"n": n}
                await recorder.record(f"agent_{n % 10}", "message_sent", metadata=metadata)
        assert len(recorder.recorded) == 149 and len(set(recorder.recorded)) == 149
        (failure,) = recorder.failures
        assert failure.code == "INVALID_ARGUMENT" and "nest" in failure.message
        assert failure.request.metadata["next"]  # the activity that failed, not another
        assert (await hub.agent_status()).active_activities == 149


async def test_large_activities_are_split_over_messages_under_the_grpc_limit(make_hub: HubFactory) -> None:
    _, hub = await connect(make_hub)
    async with hub:
        async with hub.recorder(max_batch=1_000, max_delay=10) as recorder:
            for n in range(100):  # ~5 MB in all: over gRPC's 4 MiB as one message
                await recorder.record(f"agent_{n % 10}", "message_sent", metadata={"blob": "x" * 50_000})
        assert len(recorder.recorded) == 100 and not recorder.failures


class LoseFirstResponse(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """The first RecordActivity reaches the server, but its answer is lost on the way
    back (as when a connection breaks): the caller sees UNAVAILABLE."""

    def __init__(self) -> None:
        self.lost = 0

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        call = await continuation(details, request)
        if details.method.endswith(b"/RecordActivity") and not self.lost:
            await call
            self.lost += 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "lost", None
            )
        return call


async def test_a_retried_write_is_never_recorded_twice(make_hub: HubFactory) -> None:
    running, _ = await make_hub()
    lossy = LoseFirstResponse()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", interceptors=[lossy])  # type: ignore[list-item]
    async with AsyncClient(token=WRITE_KEY, channel=channel) as hub:
        activity_id = await hub.record_activity("agent_1", "memory_write")
        assert lossy.lost == 1
        feed = await hub.activity_feed(agent_id="agent_1")
        assert [a.activity_id for a in feed] == [activity_id]


async def test_the_recorder_keeps_flushing_after_a_failed_flush(make_hub: HubFactory) -> None:
    running, _ = await make_hub()
    async with AsyncClient(f"127.0.0.1:{running.port}", WRITE_KEY, timeout=2, retries=0) as hub:
        recorder = hub.recorder(max_batch=1000, max_delay=0.05)
        async with recorder:
            failing = hub._stub.BulkRecordActivities
            calls = 0

            def unavailable(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "restarting", None
                    )
                return failing(*args, **kwargs)

            hub._stub.BulkRecordActivities = unavailable  # type: ignore[assignment]
            await recorder.record("agent_1", "message_sent")
            for _ in range(100):  # the ticker fails once, then succeeds on its own
                if recorder.recorded:
                    break
                await asyncio.sleep(0.02)
            assert calls >= 2 and len(recorder.recorded) == 1


async def test_a_flush_cut_short_by_close_is_sent_again_not_lost(make_hub: HubFactory) -> None:
    running, _ = await make_hub()
    async with AsyncClient(f"127.0.0.1:{running.port}", WRITE_KEY, timeout=5) as hub:
        real = hub._stub.BulkRecordActivities
        inside = asyncio.Event()

        async def hangs_once(*args: Any, **kwargs: Any) -> Any:
            if not inside.is_set():
                inside.set()
                await asyncio.Event().wait()  # a flush that hangs until close() cancels the ticker
            return await real(*args, **kwargs)

        hub._stub.BulkRecordActivities = hangs_once  # type: ignore[assignment]
        recorder = hub.recorder(max_batch=1000, max_delay=0.01)
        async with recorder:
            for n in range(3):
                await recorder.record("agent_1", "message_sent", metadata={"n": n})
            await asyncio.wait_for(inside.wait(), 10)
        assert recorder.pending == 0 and len(recorder.recorded) == 3
        assert (await hub.agent_status()).active_activities == 3
