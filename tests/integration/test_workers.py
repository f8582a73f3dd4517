"""`collab-bridge --workers N` from the outside: N processes on one port (SO_REUSEPORT),
each following the server on its own. Clients of every worker get every event in order;
a client resumes on whichever worker it lands; a worker killed with -9 costs its clients
a reconnect, and the supervisor starts another."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import Browser, assert_gap_free, follow_to_the_end, until_connected
from tests.support.processes import BridgeProcess
from tests.support.rpc import WRITE_KEY, Client, head_seq
from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.integration

WORKERS = 2
WORKER_LINE = re.compile(r"collab-bridge: worker (\d+) pid (\d+)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A backlog large enough that the bursts below never cut a loaded test machine's clients off.
    env = {"COLLAB_BRIDGE_WORKERS": str(WORKERS), "COLLAB_CLIENT_BACKLOG": "10000"}
    with running_stack(tmp_path_factory.mktemp("workers"), bridge_env=env) as running:
        yield running


def worker_pids(bridge: BridgeProcess) -> dict[int, int]:
    """Worker number -> pid, as the supervisor last announced them."""
    pids: dict[int, int] = {}
    for line in bridge.banner:
        if match := WORKER_LINE.search(line):
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def serving_pid(browser: Browser, bridge_port: int, pids: dict[int, int]) -> int | None:
    """The worker holding the server side of the browser's connection (from /proc)."""
    ws = browser._ws
    if ws is None:
        return None
    client_port = ws.local_address[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == bridge_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids.values():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
        except (FileNotFoundError, ProcessLookupError):
            continue
    return None


async def burst(target: str, count: int, writers: int = 4) -> int:
    """``count`` activities recorded by ``writers`` agents at once; the newest seq after."""
    client = Client.connect(target)
    try:

        async def write(agent: int) -> None:
            for _ in range(count // writers):
                await client.record(f"agent_{agent}")

        await asyncio.gather(*(write(agent) for agent in range(writers)))
        return await head_seq(client)
    finally:
        await client.close()


async def caught_up(browsers: list[Browser], seq: int, within: float = 60.0) -> None:
    """Until every browser has every event up to ``seq``."""
    async with asyncio.timeout(within):
        while not all(browser.last_seq >= seq for browser in browsers):  # noqa: ASYNC110 - Browser has no event
            await asyncio.sleep(0.05)


async def spread_browsers(
    stack: Stack, name: str, pids: dict[int, int], at_least: int = 8
) -> tuple[list[Browser], list[asyncio.Task[None]]]:
    """Browsers following the bridge, at least one on every worker (the kernel picks), and
    the tasks they follow it in."""
    browsers: list[Browser] = []
    tasks: list[asyncio.Task[None]] = []
    for n in range(64):
        browser = Browser([stack.bridge.ws], f"{name}_{n}")
        browsers.append(browser)
        tasks.append(asyncio.create_task(browser.follow(within=120)))
        await until_connected([browser])
        served = {serving_pid(b, stack.bridge.port, pids) for b in browsers}
        if len(browsers) >= at_least and set(pids.values()) <= served:
            break
    assert set(pids.values()) <= {serving_pid(b, stack.bridge.port, pids) for b in browsers}
    return browsers, tasks


async def test_every_client_of_every_worker_gets_every_event_in_order(stack: Stack) -> None:
    pids = worker_pids(stack.bridge)
    assert len(pids) == WORKERS
    browsers, tasks = await spread_browsers(stack, "order", pids)
    last = await burst(stack.server.target, 400)
    await follow_to_the_end(browsers, tasks, last)
    assert_gap_free(browsers, last)


async def test_a_client_resumes_on_whichever_worker_it_lands(stack: Stack) -> None:
    pids = worker_pids(stack.bridge)
    browsers, tasks = await spread_browsers(stack, "resume", pids, at_least=4)
    resumed_on: set[int | None] = set()
    for _ in range(30):
        settled = await burst(stack.server.target, 40)
        await caught_up(browsers, settled)  # every worker has it: any may resume from it
        for browser in browsers:
            await browser.drop()
        more = await burst(stack.server.target, 40)  # while they reconnect
        await until_connected(browsers)
        resumed_on |= {serving_pid(b, stack.bridge.port, pids) for b in browsers}
        await caught_up(browsers, more)
        if set(pids.values()) <= resumed_on:
            break
    assert set(pids.values()) <= resumed_on
    last = await burst(stack.server.target, 20)
    await follow_to_the_end(browsers, tasks, last)
    assert_gap_free(browsers, last)
    assert all(browser.resumes >= 1 for browser in browsers)


async def test_a_worker_killed_with_9_costs_its_clients_a_reconnect_and_is_restarted(stack: Stack) -> None:
    pids = worker_pids(stack.bridge)
    browsers, tasks = await spread_browsers(stack, "kill", pids)
    victim = pids[0]
    on_victim = [b for b in browsers if serving_pid(b, stack.bridge.port, pids) == victim]
    others = [b for b in browsers if b not in on_victim]
    assert on_victim and others
    settled = await burst(stack.server.target, 100)
    await caught_up(browsers, settled)

    os.kill(victim, signal.SIGKILL)
    last = await burst(stack.server.target, 200)  # while its clients reconnect
    await caught_up(browsers, last)
    assert all(b.closes for b in on_victim)  # they lost their connection...
    assert all(b.resumes >= 1 for b in on_victim)  # ...and resumed where they were
    assert not any(b.closes for b in others)  # the other worker's clients noticed nothing

    # The supervisor started another worker 0, which serves clients in turn.
    assert stack.bridge.output is not None
    line = stack.bridge.output.wait_for("collab-bridge: worker 0 pid", timeout=30)
    replacement = int(line.rsplit(" ", 1)[1])
    assert replacement != victim
    pids = worker_pids(stack.bridge)
    assert pids[0] == replacement
    newcomers, more_tasks = await spread_browsers(stack, "after", pids, at_least=1)
    last = await burst(stack.server.target, 100)
    everyone = browsers + newcomers
    await follow_to_the_end(everyone, tasks + more_tasks, last)
    assert_gap_free(everyone, last)


def test_workers_do_not_outlive_a_supervisor_killed_with_9(stack: Stack, tmp_path: Path) -> None:
    env = {"COLLAB_BRIDGE_WORKERS": str(WORKERS), "COLLAB_UPSTREAM_TOKEN": WRITE_KEY}
    with BridgeProcess(stack.server.target, data_dir=tmp_path, env=env) as bridge:
        pids = worker_pids(bridge)
        assert len(pids) == WORKERS
        assert bridge.process is not None
        os.kill(bridge.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids.values()):
            assert time.monotonic() < deadline, f"workers {pids} outlived their supervisor"
            time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
