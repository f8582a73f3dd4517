"""The event loop the server runs on, and every benchmark process with it: uvloop where
it is installed, as uvicorn's ``loop="auto"`` gives the bridge. grpc.aio works on any
asyncio loop, and uvloop's costs less CPU per call."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(main)
    return uvloop.run(main)
