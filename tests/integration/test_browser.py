"""The dashboard and the browser client in a real headless Chromium (Debian's, driven by
Playwright). Without /usr/bin/chromium these tests skip, unless COLLAB_REQUIRE_BROWSER=1
(as in CI, whose .ci/run installs it), where they fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from tests.support.browser import require_chromium
from tests.support.rpc import WRITE_KEY, Client
from tests.support.stack import API, AUTH, Stack, running_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_chromium()
    with running_stack(tmp_path_factory.mktemp("browser")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """conftest's ``http``, in the session's event loop: this module's tests run in it (they take ``browser``)."""
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as client:
        yield client


async def dashboard(browser: Browser, stack: Stack) -> Page:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{stack.bridge.http}/?token={WRITE_KEY}")
    await page.wait_for_selector('#state[data-state="live"]', timeout=5000)
    assert not errors, errors
    return page


async def post(http: httpx.AsyncClient, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """A REST write that must succeed (a refusal fails the test with its reason, not a
    later wait for the page)."""
    response = await http.post(f"{API}/{route}", json=body)
    assert response.status_code == 200, f"{route}: {response.status_code} {response.text}"
    answer: dict[str, Any] = response.json()
    return answer


async def record(http: httpx.AsyncClient, agent_id: str, activity_type: str = "council_debate") -> str:
    activity_id: str = (await post(http, "record-activity", {"agent_id": agent_id, "activity_type": activity_type}))[
        "activity_id"
    ]
    return activity_id


async def test_the_dashboard_shows_a_recorded_activity_within_a_second(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    page = await dashboard(browser, stack)
    activity_id = await record(http, "dash_agent")
    await page.wait_for_selector(f'#feed [data-activity="{activity_id}"]', timeout=1000)
    await page.wait_for_selector('#agents [data-agent="dash_agent"][data-status="active"]', timeout=1000)


async def test_the_dashboard_shows_an_agent_turning_idle_on_completion(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    page = await dashboard(browser, stack)
    activity_id = await record(http, "idle_agent")
    await page.wait_for_selector('#agents [data-agent="idle_agent"][data-status="active"]', timeout=2000)
    await post(http, "complete-activity", {"activity_id": activity_id})
    await page.wait_for_selector('#agents [data-agent="idle_agent"][data-status="idle"]', timeout=3000)
    await page.wait_for_selector(f'#feed [data-activity="{activity_id}"][data-status="completed"]', timeout=1000)


async def test_collaborations_decisions_and_memory_updates(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    page = await dashboard(browser, stack)
    session_id = (await post(http, "start-collaboration", {"participants": ["a1", "a2"]}))["session_id"]
    await post(http, "record-decision", {"session_id": session_id, "agent_id": "a1", "decision": "ship it"})
    await post(http, "record-memory-update", {"operation": "write", "item_id": "item_9", "agent_id": "a1"})
    row = await page.wait_for_selector(f'#collaborations [data-session="{session_id}"]', timeout=2000)
    assert row is not None
    await page.wait_for_function(
        f"document.querySelector('[data-session=\"{session_id}\"]').textContent.includes('1 decisions')", timeout=2000
    )
    await page.click(f'#collaborations [data-session="{session_id}"] button')
    await page.wait_for_function("document.querySelector('#timeline').textContent.includes('ship it')", timeout=2000)
    await page.wait_for_function("document.querySelector('#memory').textContent.includes('item_9')", timeout=2000)
    await post(http, "end-collaboration", {"session_id": session_id})
    await page.wait_for_function(
        f"document.querySelector('#history').textContent.includes('{session_id}')", timeout=3000
    )


async def test_after_a_bridge_restart_it_shows_reconnecting_then_recovers_with_no_missed_event(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    page = await dashboard(browser, stack)
    await page.evaluate(
        """() => { window.states = []; window.collabDashboard.hub.addEventListener('state',
                   (e) => window.states.push(e.detail.state)); }"""
    )
    before = await record(http, "restart_agent", "task_assigned")
    await page.wait_for_selector(f'[data-activity="{before}"]', timeout=2000)
    port = stack.bridge.port
    assert await asyncio.to_thread(stack.bridge.stop) == 0
    await page.wait_for_selector('#state[data-state="reconnecting"]', timeout=5000)
    # Recorded while the bridge is down, straight to the server: the dashboard must still get it.
    server = Client.connect(stack.server.target)
    try:
        missed = await server.record("restart_agent", session_id="")
    finally:
        await server.close()
    await asyncio.to_thread(stack.bridge.start, port)
    await page.wait_for_selector('#state[data-state="resumed"]', timeout=20000)
    await page.wait_for_selector(f'#feed [data-activity="{missed}"]', timeout=3000)
    states: list[str] = await page.evaluate("window.states")
    assert "reconnecting" in states and states[-1] == "resumed", states
    after = await record(http, "restart_agent", "task_completed")
    await page.wait_for_selector(f'#feed [data-activity="{after}"]', timeout=2000)
    feed: list[str] = await page.eval_on_selector_all("#feed li", "items => items.map(i => i.dataset.activity)")
    assert feed[:3] == [after, missed, before], "in order, none missing, none repeated"


async def test_the_js_client_resends_its_subscription_and_resumes(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    page = await browser.new_page()
    await page.goto(f"{stack.bridge.http}/docs")  # any page of the bridge's origin
    await page.evaluate(
        """async (token) => {
            const { CollabClient } = await import('/client/collab.js');
            window.hub = new CollabClient({ token, clientId: 'js_test', initialBackoff: 100 });
            window.got = [];
            window.hub.addEventListener('message', (e) => window.got.push(e.detail));
            window.hub.subscribe(['memory_update']);
            window.hub.connect();
            await new Promise((ready) =>
                window.hub.addEventListener('state', (e) => e.detail.state === 'live' && ready()));
        }""",
        WRITE_KEY,
    )

    async def received(kind: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = await page.evaluate("window.got")
        return [m for m in messages if m["type"] == kind]

    await page.evaluate("window.hub.ping()")
    await page.wait_for_function("window.got.some(m => m.type === 'pong')", timeout=2000)
    await page.wait_for_function("window.got.some(m => m.type === 'subscribed')", timeout=2000)
    port = stack.bridge.port
    assert await asyncio.to_thread(stack.bridge.stop) == 0
    await http.aclose()
    await asyncio.to_thread(stack.bridge.start, port)
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as again:
        await page.wait_for_function("window.hub.state === 'resumed'", timeout=20000)
        await record(again, "js_agent", "memory_write")
        response = await again.post(
            f"{API}/record-memory-update", json={"operation": "read", "item_id": "item_js", "agent_id": "js_agent"}
        )
        assert response.status_code == 200
    await page.wait_for_function("window.got.some(m => m.type === 'memory_update')", timeout=3000)
    assert len(await received("subscribed")) == 2, "the subscription was sent again after reconnecting"
    assert await received("agent_activity") == [], "the subscription still filters after reconnecting"
