"""`python -m tests.support.tight_store <collab-server arguments>`: collab-server whose
SQLite file may hold only ``COLLAB_TEST_MAX_PAGES`` pages.

Past that, SQLite fails with SQLITE_FULL ("database or disk is full") and rolls the
transaction back itself, exactly as when the disk is full (ENOSPC). SIGUSR1 makes room
(the limit times 1,000), as an operator freeing space would. For the disk-full test on
machines where a test cannot mount a tiny tmpfs; the server's own code is untouched.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from types import FrameType
from typing import Any

from collab_grpc.server import main

__all__ = ["MAX_PAGES_VARIABLE", "ROOM_SIGNAL", "run"]

MAX_PAGES_VARIABLE = "COLLAB_TEST_MAX_PAGES"
ROOM_SIGNAL = signal.SIGUSR1


def run() -> None:
    """collab-server's main with every SQLite connection it opens held to the limit."""
    limit = int(os.environ[MAX_PAGES_VARIABLE])
    connections: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def tight_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection: sqlite3.Connection = connect(*args, **kwargs)
        connection.execute(f"PRAGMA max_page_count = {limit}")
        connections.append(connection)
        return connection

    def make_room(_signum: int, _frame: FrameType | None) -> None:
        # SQLite serialises calls on a connection: safe while the store's writer thread uses it.
        for connection in connections:
            connection.execute(f"PRAGMA max_page_count = {limit * 1000}")

    sqlite3.connect = tight_connect  # type: ignore[assignment]  # the store opens its file with sqlite3.connect
    signal.signal(ROOM_SIGNAL, make_room)
    main()


if __name__ == "__main__":
    run()
