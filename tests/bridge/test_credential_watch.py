"""CredentialWatch (bridge/credential_watch.py) on its own: one CheckCredential per distinct
credential (at connect and per recheck round), never more than ``concurrency`` at once,
connections ended at expiry and on revocation, kept when the server cannot be asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest

from bridge.credential_watch import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, TOKEN_EXPIRED, CredentialWatch
from bridge.errors import ServerUnavailable


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


class FakeServer:
    """Answers CheckCredential from a table; counts calls and the most in flight at once."""

    def __init__(self) -> None:
        self.answers: dict[str, float | grpc.StatusCode | None] = {}
        self.calls: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.release.set()

    async def check(self, credential: str) -> float | None:
        self.calls.append(credential)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # in flight for a moment, as an RPC is
            await self.release.wait()
        finally:
            self.in_flight -= 1
        answer = self.answers.get(credential, grpc.StatusCode.UNAUTHENTICATED)
        if answer == grpc.StatusCode.UNAVAILABLE:  # as BridgeRuntime.check_credential raises it
            raise ServerUnavailable("down")
        if isinstance(answer, grpc.StatusCode):
            raise rpc_error(answer, "invalid credential")
        return answer


class Ends:
    """The end callbacks of connections, and how each was ended."""

    def __init__(self) -> None:
        self.ended: dict[str, tuple[int, str]] = {}
        self.changed = asyncio.Event()

    def of(self, name: str) -> Callable[[int, str], None]:
        def end(code: int, reason: str) -> None:
            self.ended[name] = (code, reason)
            self.changed.set()

        return end

    async def until(self, count: int) -> None:
        """Until ``count`` connections have been ended (the test's timeout bounds it)."""
        while len(self.ended) < count:
            self.changed.clear()
            await self.changed.wait()


def watch_of(server: FakeServer, concurrency: int = 2) -> CredentialWatch:
    return CredentialWatch(server.check, recheck_interval=3600.0, concurrency=concurrency)


async def test_connections_of_one_credential_share_one_check() -> None:
    server = FakeServer()
    server.answers["key-a"] = None
    server.release.clear()
    watch, ends = watch_of(server), Ends()
    entering = [asyncio.create_task(watch.enter("key-a", "key-a", ends.of(f"c{n}"))) for n in range(50)]
    await asyncio.sleep(0)
    server.release.set()
    watched = await asyncio.gather(*entering)
    assert server.calls == ["key-a"]
    assert len(watch) == 1
    await watch.enter("key-a", "key-a", ends.of("late"))
    assert server.calls == ["key-a"]  # known already: no new call
    for one in watched:
        one.release()
    assert len(watch) == 1  # "late" still holds it


async def test_a_refused_credential_is_refused_at_enter() -> None:
    watch = watch_of(FakeServer())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch.enter("nope", "nope", Ends().of("c"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(watch) == 0


async def test_connections_end_at_expiry() -> None:
    server = FakeServer()
    server.answers["jwt"] = time.time() + 0.2
    server.answers["key"] = None
    watch, ends = watch_of(server), Ends()
    await watch.enter("jwt", "jwt", ends.of("a"))
    await watch.enter("jwt", "jwt", ends.of("b"))
    await watch.enter("key", "key", ends.of("c"))
    await ends.until(2)
    assert ends.ended == {"a": (CLOSE_UNAUTHORIZED, TOKEN_EXPIRED), "b": (CLOSE_UNAUTHORIZED, TOKEN_EXPIRED)}
    assert len(watch) == 1 and watch.expired == 2
    await watch.stop()


async def test_a_recheck_asks_once_per_credential_within_the_concurrency() -> None:
    server = FakeServer()
    for n in range(10):
        server.answers[f"key-{n}"] = None
    watch, ends = watch_of(server, concurrency=3), Ends()
    for n in range(10):
        for m in range(3):
            await watch.enter(f"key-{n}", f"key-{n}", ends.of(f"{n}-{m}"))
    server.calls.clear()
    server.most_in_flight = 0
    server.answers["key-4"] = grpc.StatusCode.UNAUTHENTICATED  # removed from the configuration
    server.answers["key-5"] = grpc.StatusCode.PERMISSION_DENIED
    server.answers["key-6"] = grpc.StatusCode.UNAVAILABLE  # the server could not be asked
    await watch.recheck()
    assert sorted(server.calls) == sorted(f"key-{n}" for n in range(10))
    assert server.most_in_flight == 3
    assert ends.ended == {
        **{f"4-{m}": (CLOSE_UNAUTHORIZED, "invalid credential") for m in range(3)},
        **{f"5-{m}": (CLOSE_FORBIDDEN, "invalid credential") for m in range(3)},
    }
    assert len(watch) == 8 and watch.revoked == 6


async def test_the_recheck_loop_runs_every_interval() -> None:
    server = FakeServer()
    server.answers["key"] = None
    watch, ends = CredentialWatch(server.check, recheck_interval=0.05, concurrency=1), Ends()
    await watch.enter("key", "key", ends.of("c"))
    watch.start()
    server.answers["key"] = grpc.StatusCode.UNAUTHENTICATED
    await ends.until(1)
    await watch.stop()
    assert ends.ended == {"c": (CLOSE_UNAUTHORIZED, "invalid credential")}
