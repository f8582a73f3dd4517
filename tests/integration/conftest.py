"""Fixtures every integration module shares. Each module defines its own ``stack``
(a server and a bridge started the way that module needs them)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio

from tests.support.stack import AUTH, Stack


@pytest_asyncio.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """REST on the module's bridge, with the write key."""
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as client:
        yield client
