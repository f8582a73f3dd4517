"""The dashboard's frame time in a real headless Chromium, fed by real processes.

`python -m bench.frames` starts a collab-server and a collab-bridge on loopback, opens the
dashboard (Playwright, /usr/bin/chromium), records activities through the bridge's REST
API at a paced rate over N agents (each activity recorded, then completed: two events),
and measures, in the page, the interval between animation frames (requestAnimationFrame)
and the time the dashboard spends drawing each frame. Figures per configuration: the
p50/p95/max frame interval, the p95 drawing time, long tasks (> 50 ms) and the event rate
actually reached.

`python -m bench.frames --screenshots docs/img` instead runs a simulated team (12 agents
in 4 departments, councils with decisions and votes, parent/child activities, memory
writes, OpenTelemetry-style metadata) and writes a screenshot of each view.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Browser, Page, async_playwright

from collab_grpc.v1 import collaboration_pb2 as pb
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.rpc import WRITE_KEY, Client
from tests.support.stack import API, AUTH, Stack, running_stack

__all__ = ["FrameResult", "Team", "main", "measure"]

DEPARTMENTS = ["engineering", "research", "operations", "design"]
SHORT = {"engineering": "eng", "research": "research", "operations": "ops", "design": "design"}
MODELS = ["gpt-4o", "claude-sonnet-4", "llama-3.1-70b"]
TOOLS = ["web_search", "read_file", "run_tests", "sql_query", "summarise"]
TOPICS = [
    "cache eviction policy",
    "Q3 launch date",
    "retry budget",
    "API versioning",
    "incident 4411 follow-up",
    "hiring plan",
    "vector index choice",
    "pricing page copy",
]


class Team:
    """Agents doing realistic work through the bridge's REST API (what a user's agents send)."""

    def __init__(self, http: httpx.AsyncClient, agents: int = 12, departments: int = 4, pace: float = 0.0) -> None:
        self.http = http
        self.pace = pace  # seconds between the steps of a council or a task: work that takes time
        self.members = self.roster(agents, departments)
        self.department = dict(self.members)
        self.random = random.Random(7)

    @staticmethod
    def roster(agents: int, departments: int) -> list[tuple[str, str]]:
        """(agent_id, department) of ``agents`` agents spread over ``departments``."""
        names = DEPARTMENTS[:departments] + [f"dept_{n}" for n in range(len(DEPARTMENTS), departments)]
        return [
            (
                f"{SHORT.get(names[n % departments], names[n % departments])}_{n // departments + 1}",
                names[n % departments],
            )
            for n in range(agents)
        ]

    async def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(f"{API}/{route}", json=body)
        response.raise_for_status()
        reply: dict[str, Any] = response.json()
        return reply

    async def record(self, agent: str, activity_type: str, **fields: Any) -> str:
        body = {
            "agent_id": agent,
            "activity_type": activity_type,
            "department": self.department.get(agent, ""),
            **fields,
        }
        return str((await self._post("record-activity", body))["activity_id"])

    async def memory(self, agent: str, operation: str, item_id: str) -> None:
        await self._post("record-memory-update", {"operation": operation, "item_id": item_id, "agent_id": agent})

    async def complete(self, activity_id: str, success: bool = True, failure_reason: str | None = None) -> None:
        body: dict[str, Any] = {"activity_id": activity_id, "success": success}
        if failure_reason:
            body["failure_reason"] = failure_reason
        await self._post("complete-activity", body)

    def llm_metadata(self, agent: str) -> dict[str, Any]:
        return {
            "gen_ai.request.model": self.random.choice(MODELS),
            "gen_ai.tool.name": self.random.choice(TOOLS),
            "gen_ai.usage.input_tokens": self.random.randint(200, 4000),
            "gen_ai.usage.output_tokens": self.random.randint(50, 900),
            "otel.duration_ms": self.random.randint(80, 4000),
            "task": f"{self.random.choice(['draft', 'review', 'check', 'fix'])} {self.random.choice(TOPICS)}",
        }

    async def council(self, participants: list[str], topic: str, *, end: bool = True, fail_one: bool = False) -> str:
        """A council: a session, the chair's debate with its members' work as children, a
        decision with votes and rationale, memory written; ended unless ``end`` is false."""
        chair = participants[0]
        session = await self._post(
            "start-collaboration",
            {"participants": participants, "session_type": "council", "metadata": {"topic": topic}},
        )
        session_id = str(session["session_id"])
        debate = await self.record(
            chair,
            "council_debate",
            session_id=session_id,
            related_agents=participants[1:],
            metadata={"topic": topic, "round": 1},
        )
        children = []
        for member in participants[1:]:
            child = await self.record(
                member,
                "memory_read",
                session_id=session_id,
                parent_activity_id=debate,
                metadata={"item_id": f"notes/{topic.split()[0]}", **self.llm_metadata(member)},
            )
            message = await self.record(
                member,
                "message_sent",
                session_id=session_id,
                parent_activity_id=debate,
                related_agents=[chair],
                metadata={"message": f"my view on {topic}", "recipient": chair},
            )
            children += [child, message]
            await asyncio.sleep(self.pace)
        synthesis = await self.record(
            chair,
            "council_synthesis",
            session_id=session_id,
            parent_activity_id=debate,
            metadata={"topic": topic, **self.llm_metadata(chair)},
        )
        for n, child in enumerate(children):
            await asyncio.sleep(self.pace / 2)
            failed = fail_one and n == 1
            await self.complete(
                child, success=not failed, failure_reason="tool timed out after 30 s" if failed else None
            )
        await self.complete(synthesis)
        votes = {member: "yes" for member in participants}
        votes[participants[-1]] = self.random.choice(["no", "abstain", "yes"])
        in_favour = sum(vote == "yes" for vote in votes.values())
        await self._post(
            "record-decision",
            {
                "session_id": session_id,
                "agent_id": chair,
                "decision": f"adopt the plan for {topic}",
                "rationale": f"{in_favour} of {len(votes)} in favour; the cheapest option that meets the SLO",
                "votes": votes,
            },
        )
        await self._post(
            "record-memory-update",
            {
                "operation": "write",
                "item_id": f"decisions/{topic.replace(' ', '_')}",
                "agent_id": chair,
                "metadata": {"session": session_id},
            },
        )
        if end:
            await self.complete(debate)
            await self._post("end-collaboration", {"session_id": session_id})
        return session_id

    async def simulate(self, councils: int = 4) -> list[str]:
        """Standalone work by every agent, a few councils (one left open), memory writes,
        and some activities left open (one for every third agent)."""
        for n, (agent, _) in enumerate(self.members):
            task = await self.record(agent, "task_assigned", metadata=self.llm_metadata(agent))
            await self.complete(
                task, success=n % 7 != 3, failure_reason="rate limited by the model provider" if n % 7 == 3 else None
            )
            await self.memory(agent, "write", f"scratch/{agent}")
        sessions = []
        for n in range(councils):
            people = [self.members[(n * 3 + k) % len(self.members)][0] for k in range(4)]
            sessions.append(await self.council(people, TOPICS[n % len(TOPICS)], end=n < councils - 1, fail_one=n == 0))
        for agent, _ in self.members[::3]:
            await self.record(agent, "task_assigned", metadata=self.llm_metadata(agent))
        return sessions


@dataclass
class FrameResult:
    agents: int
    target_rate: float
    reached_rate: float
    seconds: float
    frames: int
    frame_p50_ms: float
    frame_p95_ms: float
    frame_max_ms: float
    draw_p95_ms: float
    long_tasks: int


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def open_dashboard(browser: Browser, stack: Stack, query: str = "", width: int = 1400, height: int = 900) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": height})
    await page.goto(f"{stack.bridge.http}/?token={WRITE_KEY}{query}")
    await page.wait_for_selector('#state[data-state="live"]', timeout=10000)
    return page


async def _paced_load(target: str, agents: int, rate: float, seconds: float) -> int:
    """``rate`` events a second (half recordings, half completions) for ``seconds``, over
    gRPC straight to the server (the REST route's client cannot pace 500 a second on the
    machine that also runs the browser); the number sent."""
    names = [name for name, _ in Team.roster(agents, 4)]
    department = dict(Team.roster(agents, 4))
    client = Client.connect(target)
    sent = 0
    open_ids: list[str] = []
    in_flight: set[asyncio.Task[Any]] = set()
    start = time.monotonic()

    async def one(n: int) -> None:
        nonlocal sent
        if n % 2 and open_ids:
            done = pb.CompleteActivityRequest(activity_id=open_ids.pop(0), success=n % 19 != 1)
            await client.stub.CompleteActivity(done, metadata=client.metadata)
        else:
            agent = names[(n // 2) % len(names)]
            request = pb.RecordActivityRequest(
                agent_id=agent, activity_type=pb.ACTIVITY_TYPE_TASK_ASSIGNED, department=department[agent]
            )
            request.metadata.update({"task": f"step {n}", "gen_ai.request.model": MODELS[n % len(MODELS)]})
            open_ids.append((await client.stub.RecordActivity(request, metadata=client.metadata)).activity_id)
        sent += 1

    try:
        n = 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            while n < due and len(in_flight) < 64:
                task = asyncio.create_task(one(n))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                n += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*in_flight, return_exceptions=True)
    finally:
        await client.close()
    return sent


async def measure(browser: Browser, stack: Stack, agents: int, rate: float, seconds: float, view: str) -> FrameResult:
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=30) as http:
        team = Team(http, agents=agents, departments=4)
        # Every agent known (one finished activity each) before the page opens.
        for first in range(0, agents, 50):
            batch = team.members[first : first + 50]
            await asyncio.gather(*(team.record(name, "agent_started") for name, _ in batch))
        page = await open_dashboard(browser, stack, f"&view={view}")
        await page.evaluate(
            """() => { window.frameGaps = []; window.longTasks = 0; let last = performance.now();
                const tick = (now) => { window.frameGaps.push(now - last); last = now; requestAnimationFrame(tick); };
                requestAnimationFrame(tick);
                new PerformanceObserver((list) => { window.longTasks += list.getEntries().length; })
                  .observe({ type: "longtask", buffered: false });
                window.collabDashboard.drawTimes.length = 0; }"""
        )
        started = time.monotonic()
        sent = await _paced_load(stack.server.target, agents, rate, seconds)
        took = time.monotonic() - started
        gaps: list[float] = await page.evaluate("window.frameGaps.slice(1)")
        draws: list[float] = await page.evaluate("window.collabDashboard.drawTimes.slice()")
        long_tasks: int = await page.evaluate("window.longTasks")
        await page.close()
    return FrameResult(
        agents,
        rate,
        round(sent / took, 1),
        round(took, 1),
        len(gaps),
        round(_percentile(gaps, 0.5), 2),
        round(_percentile(gaps, 0.95), 2),
        round(max(gaps, default=0.0), 1),
        round(_percentile(draws, 0.95), 2),
        long_tasks,
    )


async def screenshots(browser: Browser, stack: Stack, out: Path) -> list[Path]:
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    async with httpx.AsyncClient(base_url=stack.bridge.http, headers=AUTH, timeout=30) as http:
        team = Team(http, pace=0.5)
        sessions = await team.simulate()
        page = await open_dashboard(browser, stack)
        await page.wait_for_function("document.querySelectorAll('#decisions li').length >= 3", timeout=10000)
        # Live work after the page opened, so the timeline has growing bars too.
        for agent, _ in team.members[1::4]:
            await team.record(agent, "council_debate", metadata={"topic": "on-call rota"})
        await asyncio.sleep(1.5)
        written = []

        async def shot(name: str, query: str, ready: str) -> None:
            await page.evaluate(f"window.collabDashboard.navigate({query})")
            await page.wait_for_function(ready, timeout=10000)
            await asyncio.sleep(1.2)
            path = out / f"{name}.png"
            await page.screenshot(path=str(path))
            written.append(path)

        await shot("overview", "{view: 'overview', agent: null, session: null, activity: null}", "true")
        await shot("timeline", "{view: 'timeline'}", "window.collabDashboard.timeline.bars().length > 10")
        await shot("graph", "{view: 'graph'}", "window.collabDashboard.graph !== null")
        council = json.dumps(sessions[0])
        await shot(
            "session",
            f"{{view: 'overview', session: {council}}}",
            "document.querySelectorAll('#timeline li').length > 5",
        )
        debate = await page.evaluate(
            "(session) => [...window.collabDashboard.model.activities.values()]"
            ".find(a => a.session_id === session && a.activity_type === 'council_debate').activity_id",
            sessions[0],
        )
        await shot(
            "trace",
            f"{{view: 'timeline', session: null, activity: {json.dumps(debate)}}}",
            "document.querySelectorAll('#tree .row').length > 5",
        )
        await shot(
            "search",
            "{view: 'search', activity: null, status: ['failed']}, {search: true}",
            "!document.querySelector('#search-status').textContent.includes('searching')",
        )
    return written


def _table(results: Iterable[FrameResult]) -> str:
    lines = [
        "| agents | events/s asked | reached | frames | frame p50 ms | frame p95 ms | frame max ms | draw p95 ms "
        "| long tasks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.agents} | {r.target_rate:g} | {r.reached_rate:g} | {r.frames} | {r.frame_p50_ms} | "
            f"{r.frame_p95_ms} | {r.frame_max_ms} | {r.draw_p95_ms} | {r.long_tasks} |"
        )
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp)) as stack:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                if args.screenshots:
                    for path in await screenshots(browser, stack, Path(args.screenshots)):
                        print(f"wrote {path}")
                    return
                results = []
                for agents, rate in args.config:
                    for view in args.views:
                        result = await measure(browser, stack, agents, rate, args.seconds, view)
                        print(f"{view}: {json.dumps(asdict(result))}", flush=True)
                        results.append((view, result))
                for view in args.views:
                    print(f"\nview={view}\n{_table(r for v, r in results if v == view)}")
            finally:
                await browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=lambda s: tuple(float(x) for x in s.split("x")),
        action="append",
        help="AGENTSxRATE, e.g. 48x50 (repeatable; default 48x50 and 1000x500)",
    )
    parser.add_argument(
        "--views", nargs="+", default=["overview", "timeline"], choices=["overview", "timeline", "graph"]
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--screenshots", metavar="DIR", help="write a screenshot of each view into DIR instead")
    args = parser.parse_args(argv)
    args.config = [(int(a), r) for a, r in (args.config or [(48, 50), (1000, 500)])]
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
