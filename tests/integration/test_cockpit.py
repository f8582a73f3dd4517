"""The dashboard (the cockpit) in a real headless Chromium against real collab-server and
collab-bridge processes: back-fill then live, the timeline, the trace tree and the session
view of a council, search in the URL, deep links and the back button, a bridge restart.
Without /usr/bin/chromium these tests skip, unless COLLAB_REQUIRE_BROWSER=1."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Route

from bench.frames import Team
from tests.support.browser import require_chromium
from tests.support.rpc import WRITE_KEY, Client
from tests.support.stack import API, AUTH, Stack, running_stack

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[2] / "bridge" / "static"
FRONTEND = Path(__file__).resolve().parents[2] / "bridge" / "frontend"
NO_SEARCH = (
    "the history query route (GET /api/v1/collaboration/activities) is not in this hub yet: "
    "it answered 404, or redirected to the one-activity route /activities/"
)


def test_the_vendored_libraries_are_the_locked_versions_with_their_licences() -> None:
    lock = json.loads((FRONTEND / "package-lock.json").read_text())
    wanted = json.loads((FRONTEND / "package.json").read_text())["dependencies"]
    manifest = json.loads((STATIC / "vendor" / "manifest.json").read_text())
    assert set(manifest) == set(wanted), "every dependency vendored, nothing else"
    for name, entry in manifest.items():
        locked = lock["packages"][f"node_modules/{name}"]
        assert entry["version"] == locked["version"] == wanted[name], name
        assert entry["license"] == locked["license"], name
        shipped = (STATIC / "vendor" / entry["file"]).read_text()
        assert f'"{locked["version"]}"' in shipped, f"{entry['file']} is not {name} {locked['version']}"
        assert (STATIC / "vendor" / name / "LICENSE").stat().st_size > 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_chromium()
    with running_stack(tmp_path_factory.mktemp("cockpit")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """conftest's ``http``, in the session's event loop: this module's tests run in it (they take ``browser``)."""
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as client:
        yield client


@pytest.fixture
def team(http: httpx.AsyncClient) -> Team:
    return Team(http)


async def open_page(browser: Browser, stack: Stack, query: str = "", *, wait_live: bool = True) -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    setattr(page, "errors", errors)  # noqa: B010 - read back by no_errors()
    await page.goto(f"{stack.bridge.http}/?token={WRITE_KEY}{query}")
    if wait_live:
        await page.wait_for_selector('#state[data-state="live"]', timeout=10000)
    return page


def no_errors(page: Page) -> None:
    errors: list[str] = getattr(page, "errors")  # noqa: B009
    assert not errors, errors


async def feed_ids(page: Page) -> list[str]:
    ids: list[str] = await page.eval_on_selector_all("#feed li", "items => items.map(i => i.dataset.activity)")
    return ids


async def search_route(http: httpx.AsyncClient) -> bool:
    """Whether the hub has the history query: a hub without it answers 404, or redirects
    /activities to the one-activity route /activities/."""
    response = await http.get(f"{API}/activities", params={"limit": 1}, follow_redirects=False)
    return response.status_code == 200


async def test_it_opens_back_filled_then_stays_live_with_no_gap_and_no_duplicate(
    browser: Browser, stack: Stack, team: Team
) -> None:
    before = [await team.record(f"fill_{n % 4}", "task_assigned", metadata={"task": f"before {n}"}) for n in range(40)]
    for activity_id in before[::2]:
        await team.complete(activity_id)
    for n in range(6):
        await team.memory(f"fill_{n % 4}", "write", f"notes/before_{n}")
    page = await open_page(browser, stack, wait_live=False)
    # Recorded while the page opens, its back-fill in flight: each must show once.
    during = [await team.record(f"fill_{n % 4}", "task_assigned", metadata={"task": f"during {n}"}) for n in range(20)]
    await team.complete(during[0])
    for n in range(3):
        await team.memory("fill_1", "read", f"notes/during_{n}")
    await page.wait_for_selector('#state[data-state="live"]', timeout=10000)
    after = [await team.record("fill_0", "memory_write", metadata={"item_id": f"after {n}"}) for n in range(5)]
    await team.memory("fill_2", "delete", "notes/after_0")
    wanted = before + during + after
    await page.wait_for_function(
        'ids => ids.every(id => document.querySelector(`#feed [data-activity="${id}"]`))', arg=wanted, timeout=10000
    )
    # Memory updates from before the page opened, during its back-fill and after: each once, newest first.
    items = [f"notes/before_{n}" for n in range(6)] + [f"notes/during_{n}" for n in range(3)] + ["notes/after_0"]
    await page.wait_for_function(
        "items => items.every(i => [...document.querySelectorAll('#memory li')]"
        ".some(li => li.textContent.includes(i)))",
        arg=items,
        timeout=10000,
    )
    memory: list[str] = await page.eval_on_selector_all("#memory li", "items => items.map(i => i.textContent)")
    shown_items = [next(i for i in items if i in text) for text in memory if any(i in text for i in items)]
    assert shown_items == list(reversed(items)), shown_items
    assert "fill_2 delete notes/after_0" in memory[0], memory[0]
    shown = await feed_ids(page)
    for activity_id in wanted:
        assert shown.count(activity_id) == 1, activity_id
    statuses: dict[str, str] = await page.evaluate(
        "ids => Object.fromEntries(ids.map(id => [id, window.collabDashboard.model.activities.get(id).status]))", wanted
    )
    assert [statuses[a] for a in before[::2] + during[:1]] == ["completed"] * 21
    assert {statuses[a] for a in before[1::2] + during[1:] + after} == {"active"}
    # The agent cards say what each does, in words, never an activity id.
    card = await page.text_content('#agents [data-agent="fill_0"]')
    assert card is not None and "Writing memory for" in card and "act_" not in card, card
    no_errors(page)


async def test_timeline_bars_grow_while_open_and_stop_when_completed(
    browser: Browser, stack: Stack, team: Team
) -> None:
    page = await open_page(browser, stack, "&view=timeline")
    await page.wait_for_function("document.querySelector('#backfill-note').textContent.includes('then live')")
    activity_id = await team.record("lane_agent", "council_debate", metadata={"topic": "lanes"})
    bar = "id => window.collabDashboard.timeline.bars().find(b => b.activity_id === id)"
    await page.wait_for_function(f"id => ({bar})(id)", arg=activity_id, timeout=5000)
    first: dict[str, Any] = await page.evaluate(bar, activity_id)
    assert first["status"] == "active"
    await page.wait_for_function(f"id => ({bar})(id).width > {first['width'] + 3}", arg=activity_id, timeout=10000)
    await team.complete(activity_id, success=False, failure_reason="the model refused")
    await page.wait_for_function(f"id => ({bar})(id).status === 'failed'", arg=activity_id, timeout=5000)
    done: dict[str, Any] = await page.evaluate(bar, activity_id)
    await page.wait_for_function(f"id => ({bar})(id).x < {done['x'] - 3}", arg=activity_id, timeout=10000)
    moved: dict[str, Any] = await page.evaluate(bar, activity_id)
    assert abs(moved["width"] - done["width"]) < 0.5, "a completed bar keeps its length as the view follows live"
    await page.click("#zoom-in")
    await page.wait_for_function(f"id => ({bar})(id).width > {moved['width'] * 1.9}", arg=activity_id, timeout=5000)
    # A click on the bar opens its details. Following live, the bar moves left as the
    # clock runs, and may have moved past where it was read by the time the click lands
    # (seen on a loaded machine): a drag on the canvas first, as a user pans to look at
    # something, stops the following, and the bar stays where it is read. The drag is to
    # the left, to later times: the bar, just completed, is near the live right edge, and
    # a drag to the right could push its middle past the canvas, where a click misses it.
    lanes = await page.query_selector("#lanes canvas")
    assert lanes is not None
    canvas = await lanes.bounding_box()
    assert canvas is not None
    grab_x, grab_y = canvas["x"] + canvas["width"] / 2, canvas["y"] + moved["y"] + 3
    await page.mouse.move(grab_x, grab_y)
    await page.mouse.down()
    await page.mouse.move(grab_x - 20, grab_y, steps=4)
    await page.mouse.up()
    await page.wait_for_function("!window.collabDashboard.timeline.follow")
    # Two frames: the one the drag asked for has drawn the bars where they now stay.
    await page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    moved = await page.evaluate(bar, activity_id)
    await lanes.click(position={"x": moved["x"] + moved["width"] / 2, "y": moved["y"] + 3})
    await page.wait_for_function(
        "document.querySelector('#activity-title').textContent === 'Council debate by lane_agent'"
    )
    facts = await page.text_content("#activity-facts")
    assert facts is not None and "failed: the model refused" in facts
    no_errors(page)


async def test_what_a_completion_adds_shows_in_the_details_and_the_feed(
    browser: Browser, stack: Stack, team: Team, http: httpx.AsyncClient
) -> None:
    page = await open_page(browser, stack)
    activity_id = await team.record("token_agent", "message_sent", metadata={"gen_ai.request.model": "m-1"})
    held = "id => window.collabDashboard.model.activities.get(id)"
    await page.wait_for_function(f"id => ({held})(id)", arg=activity_id, timeout=5000)
    await page.evaluate("id => window.collabDashboard.navigate({ activity: id })", activity_id)
    usage = {"gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 34, "gen_ai.response.model": "m-1-x"}
    done = await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "metadata": usage})
    assert done.status_code == 200, done.text
    await page.wait_for_function(f"id => ({held})(id).status === 'completed'", arg=activity_id, timeout=5000)
    activity: dict[str, Any] = await page.evaluate(held, activity_id)
    assert activity["metadata"] == {"gen_ai.request.model": "m-1", **usage}
    await page.wait_for_function("document.querySelector('#metadata').textContent.includes('m-1-x')", timeout=5000)
    table = await page.text_content("#metadata")
    assert table is not None and "gen_ai.usage.input_tokens" in table and "1200" in table
    await page.wait_for_function("document.querySelector('#feed').textContent.includes('1,234 tokens')", timeout=5000)
    no_errors(page)


async def test_a_completion_before_its_back_fill_keeps_what_it_added(
    browser: Browser, stack: Stack, team: Team, http: httpx.AsyncClient
) -> None:
    """The completion comes live while the back-fill that brings its activity is in
    flight, and that back-fill read the activity still open (without the keys the
    completion added): once it arrives, the activity shows completed with its usage.

    The race is replayed in the page's model in one step (the page forgets the activity,
    takes the completion, then the back-fill's copy): done live, the agent's card would
    look the activity up on its own in between, and the completion would find it held."""
    page = await open_page(browser, stack)
    activity_id = await team.record("early_token_agent", "message_sent", metadata={"gen_ai.request.model": "m-1"})
    held = "id => window.collabDashboard.model.activities.get(id)"
    await page.wait_for_function(f"id => ({held})(id)", arg=activity_id, timeout=5000)
    read_open = (await http.get(f"{API}/activities/{activity_id}")).json()["activity"]  # as the back-fill read it
    usage = {"gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 34, "gen_ai.response.model": "m-1-x"}
    done = await http.post(f"{API}/complete-activity", json={"activity_id": activity_id, "metadata": usage})
    assert done.status_code == 200, done.text
    # The live message, as the page took it: completed, with what it added.
    await page.wait_for_function(
        f"id => ({held})(id)?.metadata['gen_ai.response.model'] === 'm-1-x'", arg=activity_id, timeout=5000
    )
    replayed: dict[str, Any] = await page.evaluate(
        """([id, open, added]) => {
          const model = window.collabDashboard.model;
          const live = model.activities.get(id);
          model.activities.delete(id);
          model.byTime = model.byTime.filter((a) => a !== live);
          const lane = model.lanes.get(live.agent_id);
          lane.splice(lane.indexOf(live), 1);
          model.complete(id, live.status, live.completed_at, undefined, added);
          const early = model.earlyCompletions.has(id);
          const entry = model.putActivity(open);
          return { early, kept: model.earlyCompletions.has(id), status: entry.status, metadata: entry.metadata };
        }""",
        [activity_id, read_open, usage],
    )
    assert replayed["early"] and not replayed["kept"]  # kept for the back-fill, then applied
    assert replayed["status"] == "completed"
    assert replayed["metadata"] == {"gen_ai.request.model": "m-1", **usage}
    await page.evaluate("id => window.collabDashboard.navigate({ activity: id })", activity_id)
    await page.wait_for_function("document.querySelector('#metadata').textContent.includes('m-1-x')", timeout=5000)
    no_errors(page)


def otlp_agent_span(agent: str, start: float, end: float) -> dict[str, Any]:
    """An OTLP/JSON export of one finished agent run, as an exporter sends it after the end."""
    attributes = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent}
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "name": f"invoke_agent {agent}",
        "startTimeUnixNano": str(int(start * 1e9)),
        "endTimeUnixNano": str(int(end * 1e9)),
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()],
    }
    return {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [span]}]}]}


async def test_an_exported_span_is_drawn_at_its_own_times(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    page = await open_page(browser, stack, "&view=timeline")
    now = (await page.evaluate("Date.now()")) / 1000
    # It ran from 20 s to 17 s ago (in the 30 s the view shows at least) and reaches the hub only now.
    response = await http.post("/v1/traces", json=otlp_agent_span("late_exporter", now - 20, now - 17))
    assert response.status_code == 200, response.text
    held = """() => [...window.collabDashboard.model.activities.values()]
        .find(a => a.agent_id === 'late_exporter' && a.status === 'completed')"""
    await page.wait_for_function(held, timeout=10000)
    activity: dict[str, Any] = await page.evaluate(held)
    assert abs(activity["timestamp"] - (now - 20)) < 0.01, "the bar starts when the span started"
    assert abs(activity["completed_at"] - (now - 17)) < 0.01, "and ends when it ended"
    assert activity["recorded_at"] > now - 5, "the hub's arrival time is kept beside them"
    bar = "id => window.collabDashboard.timeline.bars().find(b => b.activity_id === id)"
    await page.wait_for_function(f"id => ({bar})(id)", arg=activity["activity_id"], timeout=5000)
    await page.evaluate("id => window.collabDashboard.navigate({ activity: id })", activity["activity_id"])
    await page.wait_for_function("document.querySelector('#activity-facts').textContent.includes('reported')")
    facts = await page.text_content("#activity-facts")
    assert facts is not None and "3.0 s" in facts, facts
    no_errors(page)


def otlp_span(trace_id: str, span_id: str, operation: str, agent: str, parent_span_id: str = "") -> dict[str, Any]:
    """An OTLP/JSON export of one finished GenAI span (of the last few seconds)."""
    attributes = {"gen_ai.operation.name": operation, "gen_ai.agent.name": agent}
    now = time.time()
    span = {
        "traceId": trace_id,
        "spanId": span_id,
        **({"parentSpanId": parent_span_id} if parent_span_id else {}),
        "name": f"{operation} {agent}",
        "startTimeUnixNano": str(int((now - 2) * 1e9)),
        "endTimeUnixNano": str(int((now - 1) * 1e9)),
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()],
    }
    return {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [span]}]}]}


async def export_span(
    http: httpx.AsyncClient, trace_id: str, span_id: str, operation: str, agent: str, parent: str = ""
) -> str:
    """Export one span through the bridge; the id of the activity it became."""
    response = await http.post("/v1/traces", json=otlp_span(trace_id, span_id, operation, agent, parent))
    assert response.status_code == 200 and not response.json().get("partialSuccess"), response.text
    found = await http.get(f"{API}/activities", params={"agent_id": agent, "meta": f"otel.span_id={span_id}"})
    (activity,) = found.json()["activities"]
    activity_id: str = activity["activity_id"]
    return activity_id


async def test_a_linked_activity_moves_under_its_parent_in_the_tree(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    """A tool span exported before its agent span is a root; when the agent span comes the
    tree shown for the tool re-roots at the agent."""
    agent, trace = f"linked_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    tool = await export_span(http, trace, "00000000000000b2", "execute_tool", agent, parent="00000000000000b1")
    page = await open_page(browser, stack, f"&activity={tool}")
    await page.wait_for_function("document.querySelectorAll('#tree .row').length === 1", timeout=10000)
    parent = await export_span(http, trace, "00000000000000b1", "invoke_agent", agent)
    await page.wait_for_function("document.querySelectorAll('#tree .row').length === 2", timeout=10000)
    rows: list[dict[str, str]] = await page.eval_on_selector_all(
        "#tree .row", "rows => rows.map(r => ({id: r.dataset.activity, depth: r.dataset.depth}))"
    )
    assert rows == [{"id": parent, "depth": "0"}, {"id": tool, "depth": "1"}], rows
    assert "nothing (a root)" not in (await page.text_content("#activity-facts") or "")
    no_errors(page)


async def test_a_link_that_comes_before_the_back_fill_is_applied(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    """The page's back-fill reads the feed before the link and is answered after it (the
    link arrives live while the page does not know the activity yet): the activity is
    shown under its parent all the same, and a stale copy never takes the parent away."""
    agent, trace = f"early_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    tool = await export_span(http, trace, "00000000000000c2", "execute_tool", agent, parent="00000000000000c1")
    snapshot_taken, link_seen = asyncio.Event(), asyncio.Event()
    held: list[Any] = []

    async def hold_the_feed(route: Route) -> None:
        held.append(await route.fetch())  # the feed as it is now: the tool a root
        snapshot_taken.set()
        await link_seen.wait()
        await route.fulfill(response=held[-1])

    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.route("**/activity-feed?*", hold_the_feed)
    await page.goto(f"{stack.bridge.http}/?token={WRITE_KEY}")
    await asyncio.wait_for(snapshot_taken.wait(), 10)
    assert any(
        a["activity_id"] == tool and a["parent_activity_id"] is None for a in (await held[0].json())["activities"]
    )
    await page.evaluate(
        """() => window.collabDashboard.hub.addEventListener("activity_linked", ({ detail }) => {
             (window.linksSeen ||= []).push(detail.activity_id); })"""
    )
    parent = await export_span(http, trace, "00000000000000c1", "invoke_agent", agent)
    await page.wait_for_function("id => (window.linksSeen || []).includes(id)", arg=tool, timeout=10000)
    assert await page.evaluate("id => !window.collabDashboard.model.activities.has(id)", tool)
    link_seen.set()
    await page.wait_for_function("id => window.collabDashboard.model.activities.has(id)", arg=tool, timeout=10000)
    await page.unroute("**/activity-feed?*")
    shown = "id => window.collabDashboard.model.activities.get(id).parent_activity_id"
    assert await page.evaluate(shown, tool) == parent
    # A copy from before the link (as a later back-fill or search may bring) keeps the parent.
    stale = """id => { const model = window.collabDashboard.model;
                       model.putActivity({ ...model.activities.get(id), parent_activity_id: null }); }"""
    await page.evaluate(stale, tool)
    assert await page.evaluate(shown, tool) == parent
    await page.evaluate("id => window.collabDashboard.navigate({ activity: id })", tool)
    await page.wait_for_function("document.querySelectorAll('#tree .row').length === 2", timeout=10000)
    rows: list[str] = await page.eval_on_selector_all("#tree .row", "rows => rows.map(r => r.dataset.activity)")
    assert rows == [parent, tool], rows
    assert not errors, errors


async def test_an_agent_open_past_the_threshold_is_marked_stalled(browser: Browser, stack: Stack, team: Team) -> None:
    activity_id = await team.record("slow_agent", "council_debate", metadata={"topic": "a long one"})
    page = await open_page(browser, stack, "&stalled=5")
    card = '#agents [data-agent="slow_agent"]'
    await page.wait_for_selector(f'{card}[data-stalled="true"]', timeout=15000)
    badge = await page.text_content(f"{card} .badge")
    assert badge is not None and badge.startswith("stalled "), badge
    assert "one activity open over 5.0 s" in (await page.text_content("#stalled-note") or "")
    await team.complete(activity_id)
    await page.wait_for_selector(f'{card}[data-stalled="false"]', timeout=5000)
    no_errors(page)


async def test_a_card_off_screen_is_aged_when_it_scrolls_into_view(browser: Browser, stack: Stack, team: Team) -> None:
    # Enough working agents that the last department's cards are below the fold.
    for n in range(150):
        await team.record(f"crowd_{n:03d}", "task_assigned", department="zz_crowd", metadata={"task": f"job {n}"})
    page = await open_page(browser, stack, "&stalled=3")
    last = '#agents [data-agent="crowd_149"]'
    await page.wait_for_selector(last, state="attached", timeout=10000)
    in_view = "sel => { const r = document.querySelector(sel).getBoundingClientRect(); return r.top < innerHeight; }"
    assert not await page.evaluate(in_view, last), "the test needs this card off screen"
    # The note counts every stalled agent, off screen or not, from the model.
    await page.wait_for_function(
        "document.querySelector('#stalled-note').textContent.match(/\\((\\d+) now\\)/)?.[1] >= 150", timeout=15000
    )
    assert await page.get_attribute(last, "data-stalled") == "false", "off screen, the clock does not redraw it"
    await page.locator(last).scroll_into_view_if_needed()
    await page.wait_for_selector(f'{last}[data-stalled="true"]', timeout=5000)
    no_errors(page)


async def test_a_council_as_a_session_view_and_a_trace_tree(browser: Browser, stack: Stack, team: Team) -> None:
    people = ["chair_a", "member_b", "member_c"]
    session_id = await team.council(people, "cache eviction policy", fail_one=True)
    page = await open_page(browser, stack, f"&session={session_id}")
    await page.wait_for_function("document.querySelectorAll('#timeline li').length === 7", timeout=10000)
    title = await page.text_content("#session-title")
    assert title == "council with chair_a, member_b, member_c", title
    entries: list[dict[str, Any]] = await page.eval_on_selector_all(
        "#timeline li",
        "items => items.map(i => ({activity: i.dataset.activity, decision: i.dataset.decision, text: i.textContent}))",
    )
    times: list[float] = await page.evaluate(
        """ids => ids.map(([a, d]) => a ? window.collabDashboard.model.activities.get(a).timestamp
                                           : window.collabDashboard.model.decisions.get(d).timestamp)""",
        [[e["activity"], e["decision"]] for e in entries],
    )
    assert times == sorted(times), "in time order"
    decision = entries[-1]["text"]
    assert "chair_a decided “adopt the plan for cache eviction policy”" in decision, decision
    assert "because" in decision and "chair_a: yes" in decision and "member_b: yes" in decision, decision
    # From the session to the debate: its tree, the members' work as its children.
    await page.click("#timeline li[data-activity] button.link")
    await page.wait_for_function("document.querySelectorAll('#tree .row').length === 6", timeout=10000)
    rows: list[dict[str, str]] = await page.eval_on_selector_all(
        "#tree .row", "rows => rows.map(r => ({depth: r.dataset.depth, status: r.dataset.status, text: r.textContent}))"
    )
    assert rows[0] == {"depth": "0", "status": "completed", "text": "chair_a: Council debate"}, rows
    assert [r["depth"] for r in rows[1:]] == ["1"] * 5
    assert [r["status"] for r in rows].count("failed") == 1
    assert "cache eviction policy" in (await page.text_content("#metadata") or "")
    assert "session=" not in page.url and "activity=" in page.url
    await page.go_back()
    await page.wait_for_function("!document.querySelector('#panel-session').hidden", timeout=5000)
    assert f"session={session_id}" in page.url
    no_errors(page)


async def test_the_graph_links_who_worked_together(browser: Browser, stack: Stack, team: Team) -> None:
    await team.council(["graph_a", "graph_b", "graph_c"], "API versioning")
    page = await open_page(browser, stack, "&view=graph")
    # Drawn as the back-fill arrives (the feed, then the sessions): wait for the whole picture.
    await page.wait_for_function(
        "(e => e['graph_a\\u0000graph_b'] > 1 && e['graph_a\\u0000graph_c'] > 1 && e['graph_b\\u0000graph_c'] >= 1)"
        "(window.collabDashboard.graphEdges || {})",
        timeout=10000,
    )
    edges: dict[str, int] = await page.evaluate("window.collabDashboard.graphEdges")
    # graph_b and graph_c only share the session; graph_a names them and hears from them.
    assert edges["graph_b\u0000graph_c"] == 1 and edges["graph_a\u0000graph_c"] > 1, edges
    no_errors(page)


async def test_search_by_url_survives_a_reload(
    browser: Browser, stack: Stack, team: Team, http: httpx.AsyncClient
) -> None:
    if not await search_route(http):
        pytest.skip(NO_SEARCH)
    failed = []
    for n in range(3):
        activity_id = await team.record("searched", "council_debate", metadata={"round": n})
        await team.complete(activity_id, success=n == 1)
        if n != 1:
            failed.append(activity_id)
    noise = await team.record("searched", "memory_write")
    await team.complete(noise, success=False)
    query = "&view=search&agent_id=searched&activity_type=council_debate&status=failed"
    page = await open_page(browser, stack, query)
    rows = "Array.from(document.querySelectorAll('#search-results tbody tr')).map(r => r.dataset.activity)"
    await page.wait_for_function(f"{rows}.length === 2", timeout=10000)
    assert await page.evaluate(rows) == failed[::-1], "newest first"
    assert await page.input_value('#search-form [name="agent_id"]') == "searched"
    await page.reload()
    await page.wait_for_function(f"{rows}.length === 2", timeout=10000)
    await page.select_option('#search-form [name="order"]', "asc")
    await page.click('#search-form button[type="submit"]')
    await page.wait_for_function(f"{rows}[0] === {json.dumps(failed[0])}", timeout=10000)
    assert "order=asc" in page.url and "status=failed" in page.url
    await page.go_back()
    await page.wait_for_function(f"{rows}[0] === {json.dumps(failed[1])}", timeout=10000)
    no_errors(page)


async def test_without_the_history_route_search_says_so_and_searches_what_the_page_holds(
    browser: Browser, stack: Stack, team: Team, http: httpx.AsyncClient
) -> None:
    if await search_route(http):
        pytest.skip("this hub has the history query: the fallback is not used")
    activity_id = await team.record("fallback_agent", "council_debate")
    await team.complete(activity_id, success=False)
    page = await open_page(browser, stack, "&view=search&agent_id=fallback_agent&status=failed")
    await page.wait_for_function(
        "document.querySelector('#search-status').textContent.includes('search needs a newer hub')"
    )
    await page.wait_for_selector(f'#search-results tr[data-activity="{activity_id}"]', timeout=5000)
    assert len(await page.query_selector_all("#search-results tbody tr")) == 1
    no_errors(page)


async def test_deep_links_reload_and_the_back_button(browser: Browser, stack: Stack, team: Team) -> None:
    activity_id = await team.record("linked_agent", "task_assigned", metadata={"gen_ai.tool.name": "web_search"})
    page = await open_page(browser, stack, f"&activity={activity_id}")
    title = "document.querySelector('#activity-title').textContent"
    await page.wait_for_function(f"{title} === 'Task assigned by linked_agent'", timeout=10000)
    await page.reload()
    await page.wait_for_function(f"{title} === 'Task assigned by linked_agent'", timeout=10000)
    assert "web_search" in (await page.text_content("#metadata") or "")
    await page.click('#activity-facts button.link:text("linked_agent")')
    await page.wait_for_function("!document.querySelector('#panel-agent').hidden")
    assert "agent=linked_agent" in page.url and "activity=" not in page.url
    await page.go_back()
    await page.wait_for_function("!document.querySelector('#panel-activity').hidden")
    assert f"activity={activity_id}" in page.url
    await page.go_forward()
    await page.wait_for_function("!document.querySelector('#panel-agent').hidden")
    panel = await page.text_content("#panel-agent")
    assert panel is not None and "Task assigned" in panel and activity_id not in panel
    no_errors(page)


# Last: it restarts the module's bridge.
async def test_after_a_bridge_restart_it_resumes_with_nothing_missed_or_repeated(
    browser: Browser, stack: Stack, http: httpx.AsyncClient
) -> None:
    team = Team(http)
    page = await open_page(browser, stack, "&view=timeline")
    before = await team.record("restart_b", "task_assigned")
    await page.wait_for_function(f"window.collabDashboard.model.activities.has({json.dumps(before)})", timeout=5000)
    port = stack.bridge.port
    assert await asyncio.to_thread(stack.bridge.stop) == 0
    await page.wait_for_selector('#state[data-state="reconnecting"]', timeout=5000)
    server = Client.connect(stack.server.target)
    try:
        missed = await server.record("restart_b", session_id="")
    finally:
        await server.close()
    await asyncio.to_thread(stack.bridge.start, port)
    await page.wait_for_selector('#state[data-state="resumed"]', timeout=20000)
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=10) as again:
        await Team(again).complete(before)
    bars = "window.collabDashboard.timeline.bars()"
    await page.wait_for_function(
        f"{bars}.some(b => b.activity_id === {json.dumps(missed)}) && "
        f"{bars}.some(b => b.activity_id === {json.dumps(before)} && b.status === 'completed')",
        timeout=10000,
    )
    await page.evaluate("window.collabDashboard.navigate({view: 'overview'})")
    await page.wait_for_selector(f'#feed [data-activity="{missed}"]', timeout=5000)
    shown = await feed_ids(page)
    assert shown.count(missed) == 1 and shown.count(before) == 1
    no_errors(page)
