"""The server's files are its own: the data directory 0700 when the server makes it,
every file it creates in it 0600 (they hold every activity, idempotency answer and the
generated key; other users of the machine have no business reading them)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "create_private_file", "make_private_dir", "warn_if_shared"]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

log = logging.getLogger("collab_grpc.files")


def make_private_dir(path: Path) -> None:
    """``path`` and its missing parents, the last one 0700; a directory that already
    exists is left as it is (it may be shared on purpose)."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def create_private_file(path: Path, what: str) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (then warn if it is not
    private). SQLite gives its -wal, -shm and -journal files the mode of the database
    file, so they follow."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        warn_if_shared(path, what)
        return
    os.close(fd)


def warn_if_shared(path: Path, what: str, logger: logging.Logger = log) -> None:
    """Say so when other users may access ``path``, ``what`` it is (someone else made or
    loosened it: their file is left as it is)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            f"other users can access {what} %s (mode %04o); run: chmod 600 %s",
            path,
            mode,
            path,
            extra={"path": str(path), "mode": f"{mode:04o}"},
        )
