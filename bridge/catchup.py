"""Clients that resume from a position this bridge's upstream has not reached yet.

A client told to resume on another bridge (close 1012, a load balancer's choice) carries
the seq it saw on the first one; the second follows the same server but may be a few
events behind it. Such a client waits here, briefly and in bounded numbers, for the
upstream to reach its position, and is then resumed from the buffer like any other;
only one still ahead when its wait ends is given a fresh state (``reset``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from enum import Enum

__all__ = ["CatchUp", "Outcome"]


class Outcome(Enum):
    """How a wait for the upstream ended (a label of the bridge's metrics)."""

    CAUGHT_UP = "caught_up"
    EXPIRED = "expired"  # still behind after the wait: the client gets a fresh state
    REFUSED = "refused"  # too many waiting already: the client is told to retry


class CatchUp:
    """At most ``max_waiting`` waiters; each waits for the upstream's seq (``on_event``)
    to reach its own, or for the upstream to start from a snapshot (``on_snapshot``:
    a new epoch, or a jump), after which it looks again."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        # (seq awaited, arrival order, wake-up): the lowest seq first, so an event wakes
        # exactly the waiters it satisfies and costs one comparison when there are none.
        self._by_seq: list[tuple[int, int, asyncio.Future[None]]] = []
        # Waiters for an epoch the upstream does not follow yet: woken by a snapshot.
        self._for_snapshot: set[asyncio.Future[None]] = set()
        self._arrivals = itertools.count()
        self.waiting = 0
        self.outcomes = dict.fromkeys(Outcome, 0)

    def on_event(self, seq: int) -> None:
        by_seq = self._by_seq
        while by_seq and by_seq[0][0] <= seq:
            wake = heapq.heappop(by_seq)[2]
            if not wake.done():
                wake.set_result(None)

    def on_snapshot(self) -> None:
        """The upstream's epoch or position changed at once: every waiter looks again."""
        woken = [entry[2] for entry in self._by_seq] + list(self._for_snapshot)
        self._by_seq.clear()
        self._for_snapshot.clear()
        for wake in woken:
            if not wake.done():
                wake.set_result(None)

    def has_room(self) -> bool:
        return self.waiting < self.max_waiting

    async def wait(self, seq: int | None, within: float) -> bool:
        """Until the upstream reaches ``seq`` (None: until its next snapshot); False
        when ``within`` seconds pass first. The caller checks ``has_room`` before."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry: tuple[int, int, asyncio.Future[None]] | None = None
        if seq is None:
            self._for_snapshot.add(wake)
        else:
            entry = (seq, next(self._arrivals), wake)
            heapq.heappush(self._by_seq, entry)
        self.waiting += 1
        try:
            await asyncio.wait_for(wake, within)  # cancels ``wake`` when it times out
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
            if wake.cancelled():  # not woken (timed out, or the client left): taken out now
                self._for_snapshot.discard(wake)
                if entry is not None and entry in self._by_seq:
                    self._by_seq.remove(entry)
                    heapq.heapify(self._by_seq)
