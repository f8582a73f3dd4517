"""A lock the suite's processes share (`make test` runs pytest-xdist workers): for the few
fixtures that change the checkout itself rather than a directory of their own, such as
`npm ci` in a client or a build's egg-info, so that two workers never do it at once."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["checkout_lock"]

CHECKOUT = Path(__file__).resolve().parents[2]
# Outside the checkout (nothing to ignore or clean up in it), one set per checkout.
LOCKS = Path(tempfile.gettempdir()) / "collab-test-locks"


@contextlib.contextmanager
def checkout_lock(name: str) -> Iterator[None]:
    """Hold the checkout's lock ``name`` (waiting for another process that holds it)."""
    LOCKS.mkdir(exist_ok=True)
    checkout = hashlib.sha256(str(CHECKOUT).encode()).hexdigest()[:12]
    with (LOCKS / f"{checkout}-{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
