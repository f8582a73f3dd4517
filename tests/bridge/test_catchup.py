"""A client resuming from a seq the bridge's upstream has not reached yet (it comes from
a bridge a few events ahead) waits for it, briefly and in bounded numbers."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.catchup import CatchUp, Outcome
from bridge.config import parse_bridge_config
from bridge.errors import HubError, ServerUnavailable
from bridge.fanout import Subscriber
from collab_grpc.v1 import collaboration_pb2 as pb
from tests.bridge.test_buffer_budgets import EPOCH, OPENING, ReplayStub, Wire, big_event, runtime_with, snapshot
from tests.bridge.test_coalescing import passes_run


async def test_a_client_ahead_of_the_bridge_waits_for_it_then_resumes_with_every_event() -> None:
    runtime = runtime_with(ReplayStub([]))  # the bridge is at 30
    wire = Wire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=100)
    # The client saw 33 on another bridge; the server (its snapshot) is at 35.
    opening = asyncio.create_task(runtime.open_client(subscriber, snapshot(35), None, OPENING, 33, EPOCH))
    await asyncio.sleep(0.01)
    assert not opening.done() and runtime.catch_up.waiting == 1
    for seq in (31, 32):
        runtime._on_event(big_event(seq))
    await asyncio.sleep(0.01)
    assert not opening.done()  # 32 is not yet its seq
    runtime._on_event(big_event(33))
    await asyncio.wait_for(opening, 5)
    first = json.loads(wire.sent[0])
    assert (first["type"], first["recovered"], first["seq"]) == ("connection_established", True, 33)
    for seq in (34, 35):
        runtime._on_event(big_event(seq))
    await passes_run(runtime.hub)
    assert wire.seqs == [34, 35]  # events, not a fresh state
    assert runtime.catch_up.outcomes[Outcome.CAUGHT_UP] == 1 and runtime.catch_up.waiting == 0


async def test_a_client_still_ahead_after_the_wait_gets_a_fresh_state() -> None:
    runtime = runtime_with(ReplayStub([]), resume_wait=0.05)
    wire = Wire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=100)
    await asyncio.wait_for(runtime.open_client(subscriber, snapshot(35), None, OPENING, 33, EPOCH), 5)
    first = json.loads(wire.sent[0])
    assert first["recovered"] is False and "is ahead of the newest event 30" in first["reason"]
    assert json.loads(wire.sent[1])["type"] == "collaboration_state"
    assert runtime.catch_up.outcomes[Outcome.EXPIRED] == 1 and runtime.catch_up.waiting == 0


async def test_a_seq_the_server_has_not_issued_is_not_waited_for() -> None:
    runtime = runtime_with(ReplayStub([]))
    wire = Wire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=100)
    # Ahead of the server too (a forged or foreign seq): nothing would come; no wait.
    await asyncio.wait_for(runtime.open_client(subscriber, snapshot(35), None, OPENING, 99, EPOCH), 5)
    assert json.loads(wire.sent[0])["recovered"] is False
    assert sum(runtime.catch_up.outcomes.values()) == 0


async def test_waiters_beyond_the_limit_are_refused_as_unavailable_to_retry() -> None:
    runtime = runtime_with(ReplayStub([]), max_resume_waiters=2)
    wires = [Wire() for _ in range(3)]
    opening = [
        asyncio.create_task(
            runtime.open_client(Subscriber(w.fast, w.close, max_backlog=100), snapshot(35), None, OPENING, 32, EPOCH)
        )
        for w in wires
    ]
    done, pending = await asyncio.wait(opening, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(pending) == 2
    refused = next(iter(done)).exception()
    assert isinstance(refused, ServerUnavailable)
    assert "COLLAB_MAX_RESUME_WAITERS" in str(refused)
    assert HubError.from_rpc(refused).retry_after == "1"  # 1013 / 503 with Retry-After
    for seq in (31, 32):
        runtime._on_event(big_event(seq))
    await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert [json.loads(w.sent[0])["recovered"] for w in wires if w.sent] == [True, True]
    assert runtime.catch_up.outcomes == {Outcome.CAUGHT_UP: 2, Outcome.EXPIRED: 0, Outcome.REFUSED: 1}


async def test_a_client_in_an_epoch_the_bridge_has_not_seen_yet_waits_for_its_snapshot() -> None:
    runtime = runtime_with(ReplayStub([]))  # follows EPOCH; the server has restarted as "e2"
    wire = Wire()
    subscriber = Subscriber(wire.fast, wire.close, max_backlog=100)
    restarted = pb.Snapshot(epoch="e2", seq=4, agent_status=pb.AgentStatusSummary())
    opening = asyncio.create_task(runtime.open_client(subscriber, restarted, None, OPENING, 4, "e2"))
    await asyncio.sleep(0.01)
    assert not opening.done()
    runtime._on_snapshot(restarted, reset=True)
    await asyncio.wait_for(opening, 5)
    first = json.loads(wire.sent[0])
    assert (first["recovered"], first["seq"]) == (True, 4)


async def test_a_waiter_that_gives_up_or_leaves_is_taken_out() -> None:
    catch_up = CatchUp(max_waiting=10)
    assert await catch_up.wait(50, 0.01) is False
    leaving = asyncio.create_task(catch_up.wait(60, 5))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert catch_up.waiting == 0 and not catch_up._by_seq and not catch_up._for_snapshot
    woken = asyncio.create_task(catch_up.wait(5, 5))
    await asyncio.sleep(0)
    catch_up.on_event(4)
    await asyncio.sleep(0)
    assert not woken.done()
    catch_up.on_event(7)
    assert await woken is True


def test_the_wait_and_its_bound_are_settings() -> None:
    defaults = parse_bridge_config([], env={})
    assert (defaults.resume_wait, defaults.max_resume_waiters) == (2.0, 1000)
    config = parse_bridge_config(["--resume-wait", "0"], env={"COLLAB_MAX_RESUME_WAITERS": "5"})
    assert (config.resume_wait, config.max_resume_waiters) == (0.0, 5)
    for argv in (["--resume-wait", "-1"], ["--resume-wait", "nan"], ["--max-resume-waiters", "0"]):
        with pytest.raises(SystemExit):
            parse_bridge_config(argv, env={})
