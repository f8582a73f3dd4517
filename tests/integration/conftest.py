"""Fixtures every integration module shares. Each module defines its own ``stack``
(a server and a bridge started the way that module needs them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.support.stack import AUTH, Stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes ``browser`` runs in the session's event loop, the one the run's
    Chromium was launched in: Playwright's objects belong to the loop they were made in.
    (Its module's async fixtures say ``loop_scope="session"`` for the same reason.)"""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.asyncio(loop_scope="session"), append=False)


@pytest_asyncio.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """REST on the module's bridge, with the write key."""
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as client:
        yield client


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, launched once for the run's browser tests: Playwright's
    driver and a browser started for each test took longer than many of the tests. Tests
    take it through ``browser``, which closes what each opened."""
    require_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="session")
async def browser(chromium: Browser) -> AsyncIterator[Browser]:
    """The run's Chromium for one test. Each page the test opens with ``new_page()`` has a
    browser context of its own, as fresh as a new browser's (no cookies, storage or cache
    of another page); every context is closed after the test, so none of its pages stays
    connected to a stack or runs on into the next test."""
    if not chromium.is_connected():
        pytest.fail("the run's Chromium is gone (it crashed or was killed in an earlier browser test)")
    yield chromium
    for context in chromium.contexts:
        await context.close()
