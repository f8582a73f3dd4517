"""Fixtures every integration module shares. Each module defines its own ``stack``
(a server and a bridge started the way that module needs them)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio
from playwright.async_api import Browser, async_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.support.stack import AUTH, Stack


@pytest_asyncio.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """REST on the module's bridge, with the write key."""
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as client:
        yield client


@pytest_asyncio.fixture
async def browser(stack: Stack) -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, for one test against the module's stack; launch()
    gives every browser a fresh, empty profile directory of its own."""
    require_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()
