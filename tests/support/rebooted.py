"""`python -m tests.support.rebooted <collab-server arguments>`: collab-server as it starts
after its machine crashed and came back: the boot id the SQLite store reads differs from
the one its file was opened under. (A test cannot reboot the machine; the server's own
code is untouched, as with tests/support/tight_store.py.)"""

from __future__ import annotations

from collab_grpc.server import main
from collab_grpc.store import sqlite

__all__ = ["BOOT_AFTER_THE_CRASH", "run"]

BOOT_AFTER_THE_CRASH = "00000000-0000-4000-8000-000000000001"


def run() -> None:
    sqlite.boot_id = lambda: BOOT_AFTER_THE_CRASH  # the store reads it through its module
    main()


if __name__ == "__main__":
    run()
