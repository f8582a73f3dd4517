"""What `Client` and `AsyncClient` share through the core (collab/_core.py), checked on
each against `collab-server` as a real process: the recorders send at the same
thresholds and refuse alike when full and the hub is down, and an event stream resumes
across a server restart with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from collab import AsyncClient, Client, Unavailable
from tests.support.processes import ServerProcess
from tests.support.rpc import WRITE_KEY

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("kind", ["sync", "async"])]
ENV = {"COLLAB_API_KEYS": WRITE_KEY, "COLLAB_RATE_LIMIT": "0"}
T = TypeVar("T")


@contextlib.asynccontextmanager
async def connect(kind: str, target: str, **options: Any) -> AsyncIterator[Client | AsyncClient]:
    """A `Client` or an `AsyncClient` of ``target``, closed afterwards."""
    if kind == "sync":
        with Client(target, WRITE_KEY, **options) as hub:
            yield hub
    else:
        async with AsyncClient(target, WRITE_KEY, **options) as hub:
            yield hub


async def settle(value: Any) -> Any:
    """What a call returned: awaited if the client is the AsyncClient's."""
    return await value if inspect.isawaitable(value) else value


async def each(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    """The items of a Client's iterator or of an AsyncClient's async iterator."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def test_both_recorders_send_at_the_same_thresholds(kind: str, server_process: ServerProcess) -> None:
    async with connect(kind, server_process.target, timeout=5) as hub:
        seen: list[tuple[int, int]] = []  # (waiting, recorded) after each record and close
        # Not entered, so no ticker: only the thresholds send.
        batch_first, buffer_first = hub.recorder(max_batch=3, max_buffer=5), hub.recorder(max_batch=10, max_buffer=4)
        for recorder in (batch_first, buffer_first):
            for n in range(6):
                await settle(recorder.record(f"agent_{n}", "message_sent"))
                seen.append((recorder.pending, len(recorder.recorded)))
            await settle(recorder.close())
            seen.append((recorder.pending, len(recorder.recorded)))
            assert len(set(recorder.recorded)) == 6 and not recorder.failures
    batch_due = [(1, 0), (2, 0), (0, 3), (1, 3), (2, 3), (0, 6), (0, 6)]
    buffer_full_first = [(1, 0), (2, 0), (3, 0), (4, 0), (1, 4), (2, 4), (0, 6)]
    assert seen == batch_due + buffer_full_first


async def test_a_full_recorder_refuses_while_the_hub_is_down_and_keeps_what_it_took(kind: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env=ENV).start()
    try:
        async with connect(kind, server.target, timeout=5, retries=0) as hub:
            recorder = hub.recorder(max_batch=10, max_buffer=2, max_delay=60)
            await settle(recorder.record("agent_1", "message_sent"))
            await settle(recorder.record("agent_2", "message_sent"))
            port = server.port
            server.kill()
            with pytest.raises(Unavailable):
                await settle(recorder.record("agent_3", "message_sent"))
            assert (recorder.pending, recorder.recorded) == (2, []), "refused, not kept; the two taken still wait"
            server.start(port)
            hub.settings = dataclasses.replace(hub.settings, retries=30)  # while the channel reconnects
            await settle(recorder.close())
            assert recorder.pending == 0 and len(recorder.recorded) == 2
            feed = await settle(hub.activity_feed(limit=10))
            assert sorted(a.agent_id for a in feed) == ["agent_1", "agent_2"]
    finally:
        server.stop()


def test_events_continue_across_a_server_restart_with_no_gap(kind: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env=ENV).start()
    received: list[int] = []
    done = threading.Event()

    async def follow() -> None:
        async with connect(kind, server.target) as watcher:
            async for event in each(watcher.events(types=["activity_recorded"])):
                received.append(event.seq)
                if len(received) == 10:
                    done.set()
                    return

    follower = threading.Thread(target=asyncio.run, args=(follow(),), daemon=True)
    try:
        with Client(server.target, WRITE_KEY) as hub:
            hub.record_activity("agent_1", "message_sent")  # the follower starts after this one
            follower.start()
            while not received:
                hub.record_activity("agent_1", "message_sent")
                done.wait(0.05)
            first = received[0]
            recorded = 1 + len(received)
            port = server.port
            assert server.stop() == 0
            server.start(port)
            with Client(server.target, WRITE_KEY, retries=20) as again:
                while recorded < first + 10:
                    again.record_activity("agent_1", "message_sent")
                    recorded += 1
        assert done.wait(20), received
        assert received == list(range(first, first + 10)), "resumed after the restart: no gap, no duplicate"
    finally:
        server.stop()
