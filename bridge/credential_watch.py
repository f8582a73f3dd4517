"""How long each open WebSocket and SSE connection's credential stays good.

The server decides what a credential grants (auth lives there); the bridge asks it with
CheckCredential, once per distinct credential, and then:
- ends every connection of a credential that expires (a JWT's ``exp``) at that moment,
  with one timer per credential;
- asks again every ``recheck_interval`` seconds for each distinct credential its
  connections hold (one RPC per credential per round, at most ``concurrency`` at a time)
  and ends every connection of one the server no longer accepts (a key removed from its
  configuration, the server restarted with another).

A connection is ended with close 4401 (4403 when the credential may no longer read) and
an `error` message before it, as a refusal at connect is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from bridge.errors import ServerUnavailable

__all__ = ["CLOSE_FORBIDDEN", "CLOSE_UNAUTHORIZED", "TOKEN_EXPIRED", "CredentialWatch", "Watched"]

log = logging.getLogger("bridge.credentials")

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
TOKEN_EXPIRED = "token has expired"

# Ends a connection: (close code, reason).
End = Callable[[int, str], None]
# Asks the server about a credential (as the connection sent it): its expiry (epoch
# seconds) or None; raises grpc.aio.AioRpcError when the server refuses it, ServerUnavailable
# when it cannot be asked.
Check = Callable[[Any], Awaitable[float | None]]

# Server answers that mean the credential is no good any more; anything else (the server
# unreachable, a timeout) says nothing about it, and its connections stay.
_REFUSED = {grpc.StatusCode.UNAUTHENTICATED: CLOSE_UNAUTHORIZED, grpc.StatusCode.PERMISSION_DENIED: CLOSE_FORBIDDEN}


@dataclass(eq=False)
class _Entry:
    """One distinct credential: as first sent, when it expires and how to end each of its connections."""

    credential: Any
    expires_at: float | None
    ends: set[End] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class Watched:
    """One connection's place under its credential; ``release`` when it ends."""

    watch: CredentialWatch
    key: str
    end: End
    expires_at: float | None

    def release(self) -> None:
        self.watch.leave(self)


class CredentialWatch:
    """``check(credential)`` asks the server about a credential; connections are grouped
    by ``key``, the token however it was sent (bridge/limits.py token_key)."""

    def __init__(self, check: Check, *, recheck_interval: float, concurrency: int) -> None:
        self._check = check
        self.recheck_interval = recheck_interval
        self.concurrency = concurrency
        self._entries: dict[str, _Entry] = {}
        # One CheckCredential in flight per credential, shared by the connections that
        # open meanwhile (a page opened by many browsers at once asks once).
        self._checking: dict[str, asyncio.Future[float | None]] = {}
        self._task: asyncio.Task[None] | None = None
        # Tallies for the log and tests: connections ended for an expired or refused credential.
        self.expired = 0
        self.revoked = 0

    def __len__(self) -> int:
        """Distinct credentials held by open connections."""
        return len(self._entries)

    # -- connections ------------------------------------------------------------------

    async def enter(self, key: str, credential: Any, end: End) -> Watched:
        """Watch a connection opening with ``credential`` (its token: ``key``):
        ``end(code, reason)`` is called when it expires or the server stops accepting it.
        Raises grpc.aio.AioRpcError when the server refuses it now, ServerUnavailable when
        it cannot be asked."""
        entry = self._entries.get(key)
        expires_at = entry.expires_at if entry is not None else await self._ask(key, credential)
        entry = self._entries.get(key)  # another connection may have made it meanwhile
        if entry is None:
            entry = self._entries[key] = _Entry(credential, expires_at)
            self._schedule(key, entry)
        entry.ends.add(end)
        return Watched(self, key, end, entry.expires_at)

    def leave(self, watched: Watched) -> None:
        entry = self._entries.get(watched.key)
        if entry is None:
            return
        entry.ends.discard(watched.end)
        if not entry.ends:
            self._drop(watched.key)

    async def _ask(self, key: str, credential: Any) -> float | None:
        """The server's answer for ``credential``; one call whoever else is waiting for it."""
        pending = self._checking.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._check(credential))
            self._checking[key] = pending
            pending.add_done_callback(lambda done: self._asked(key, done))
        # Shielded: one waiter giving up (its client left) does not cancel the others' answer.
        return await asyncio.shield(pending)

    def _asked(self, key: str, done: asyncio.Future[float | None]) -> None:
        if self._checking.get(key) is done:
            del self._checking[key]
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have gone

    # -- expiry -----------------------------------------------------------------------

    def _schedule(self, key: str, entry: _Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if entry.expires_at is not None:
            delay = max(0.0, entry.expires_at - time.time())  # exp is wall-clock time
            entry.timer = asyncio.get_running_loop().call_later(delay, self._expire, key, entry)

    def _expire(self, key: str, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            self.expired += len(entry.ends)
            log.info("credential expired; ending its connections", extra={"connections": len(entry.ends)})
            self._end_all(key, CLOSE_UNAUTHORIZED, TOKEN_EXPIRED)

    def _end_all(self, key: str, code: int, reason: str) -> None:
        entry = self._drop(key)
        if entry is not None:
            for end in tuple(entry.ends):
                end(code, reason)

    def _drop(self, key: str) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.timer is not None:
            entry.timer.cancel()
        return entry

    # -- rechecks ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._recheck_forever(), name="credential-recheck")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_interval)
            try:
                await self.recheck()
            except Exception:  # a bug must not end the rechecks for good
                log.exception("credential recheck failed")

    async def recheck(self) -> None:
        """Ask the server again about every distinct credential held now, ``concurrency``
        at a time; end the connections of each one it refuses."""
        keys = iter(list(self._entries))

        async def worker() -> None:
            for key in keys:  # the workers share one iterator: each key is asked once
                await self._recheck_one(key)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(self._entries)))))

    async def _recheck_one(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return  # its connections have all gone meanwhile
        try:
            expires_at = await self._check(entry.credential)
        except ServerUnavailable:
            log.debug("credential recheck inconclusive: the server is unavailable")
            return
        except grpc.aio.AioRpcError as failure:
            code = _REFUSED.get(failure.code())
            if code is None:
                log.debug("credential recheck inconclusive: %s", failure.code().name)
                return
            reason = failure.details() or failure.code().name
            if self._entries.get(key) is entry:
                self.revoked += len(entry.ends)
                log.info(
                    "credential no longer accepted; ending its connections",
                    extra={"connections": len(entry.ends), "reason": reason},
                )
                self._end_all(key, code, reason)
            return
        if self._entries.get(key) is entry and expires_at != entry.expires_at:
            entry.expires_at = expires_at
            self._schedule(key, entry)
