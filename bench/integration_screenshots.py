"""Screenshots of the dashboard showing each agent framework's agents, for docs/INTEGRATIONS.md.

`python -m bench.integration_screenshots --out docs/img` starts a real collab-server
(memory store) and collab-bridge per framework, runs a small multi-agent run through that
framework's real integration on a scripted or test model (no network, no API key), holds
the run open at a step that waits on an event, and meanwhile photographs the dashboard
(Playwright, /usr/bin/chromium, 1400x900): the Overview, then the Timeline with the run's
root activity open in the side panel. Then the run is let finish.

- OpenAI Agents SDK (`CollabTracingProcessor`): workflow "customer-support", a "triage"
  agent that looks the customer up, then hands off to "billing", whose invoice look-up
  is held.
- LangGraph (`CollabCallbackHandler`): graph "report-writer", a "planner" node whose model
  asks for a tool, the tool node running it, then a "writer" node whose model call is held.
- Pydantic AI (`CollabSpanProcessor`): a "researcher" agent (TestModel) delegating to an
  "analyst" agent through a tool; the analyst's figures look-up is held.
- Plain OpenTelemetry (the SDK's standard OTLP/HTTP exporter to the bridge's /v1/traces,
  no collab code): workflow "newsletter" with "scout" and "editor" agents; spans show
  when they end, so this run is photographed finished.

CrewAI is not in the dev environment (`make test-crewai` has its own venv): no screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, async_playwright

from bench.frames import open_dashboard
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.rpc import WRITE_KEY
from tests.support.stack import Stack, running_stack

__all__ = ["FRAMEWORKS", "main"]

HOLD = 60.0  # the longest a held step waits for the screenshots
THINK = 0.8  # seconds a scripted model call takes
TOOL = 0.5  # seconds a tool call that is not held takes


@dataclass
class Run:
    """A framework's run, started on a thread: ``ready`` once its held step is running;
    ``release`` lets it finish; ``finish`` waits for it and flushes the integration."""

    root_agent: str  # the agent whose agent_started activity is the root of the run
    ready: threading.Event
    release: threading.Event
    finish: Callable[[], None]


class _Worker:
    """The framework's run on a thread of its own; ``join`` raises what the run raised."""

    def __init__(self, target: Callable[[], object]) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.target()
        except BaseException as error:
            self.error = error

    def join(self) -> None:
        self.thread.join(HOLD)
        if self.thread.is_alive():
            raise RuntimeError("the run did not finish")
        if self.error is not None:
            raise RuntimeError("the run failed") from self.error


# -- OpenAI Agents SDK --------------------------------------------------------------------


def openai_agents(stack: Stack) -> Run:
    from agents import (
        Agent,
        Handoff,
        Model,
        ModelResponse,
        RunConfig,
        Runner,
        Usage,
        function_tool,
        generation_span,
        set_trace_processors,
    )
    from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

    from collab.integrations.openai_agents import CollabTracingProcessor

    class ScriptedModel(Model):
        """Answers each call with its next reply: a tool call (name, JSON arguments) or text."""

        def __init__(self, name: str, replies: list[tuple[str, str] | str]) -> None:
            self.name = name
            self.replies = list(replies)

        async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
            with generation_span(model=self.name, usage={"input_tokens": 412, "output_tokens": 38}):
                await asyncio.sleep(THINK)
                reply = self.replies.pop(0)
            if isinstance(reply, tuple):
                name, arguments = reply
                item: Any = ResponseFunctionToolCall(
                    type="function_call", id=f"fc_{name}", call_id=f"call_{name}", name=name, arguments=arguments
                )
            else:
                content: list[Any] = [ResponseOutputText(type="output_text", text=reply, annotations=[])]
                item = ResponseOutputMessage(
                    id="msg_1", type="message", role="assistant", status="completed", content=content
                )
            usage = Usage(requests=1, input_tokens=412, output_tokens=38)
            return ModelResponse(output=[item], usage=usage, response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            raise NotImplementedError("run without streaming")

    ready, release = threading.Event(), threading.Event()

    @function_tool
    def lookup_customer(email: str) -> str:
        """Find a customer by e-mail."""
        time.sleep(TOOL)
        return f"{email}: customer C-1042, plan Pro"

    @function_tool
    def lookup_invoice(invoice: str) -> str:
        """Look an invoice up in the billing system."""
        ready.set()
        release.wait(HOLD)
        return f"{invoice}: paid on 2 December"

    billing = Agent(
        name="billing",
        instructions="Answer billing questions.",
        tools=[lookup_invoice],
        model=ScriptedModel("gpt-4o", [("lookup_invoice", '{"invoice": "INV-7731"}'), "INV-7731 is paid."]),
    )
    triage = Agent(
        name="triage",
        instructions="Find the customer, then route the question.",
        tools=[lookup_customer],
        handoffs=[billing],
        model=ScriptedModel(
            "gpt-4o-mini",
            [("lookup_customer", '{"email": "ana@example.com"}'), (Handoff.default_tool_name(billing), "{}")],
        ),
    )
    processor = CollabTracingProcessor()
    set_trace_processors([processor])  # collab only: no export to OpenAI from here
    config = RunConfig(workflow_name="customer-support", group_id="ticket-5521")
    worker = _Worker(lambda: Runner.run_sync(triage, "Has my invoice INV-7731 been paid?", run_config=config))

    def finish() -> None:
        worker.join()
        set_trace_processors([])
        processor.shutdown()

    return Run("customer-support", ready, release, finish)


# -- LangGraph -----------------------------------------------------------------------------


def langgraph(stack: Stack) -> Run:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    from collab.integrations.langchain import CollabCallbackHandler

    ready, release = threading.Event(), threading.Event()

    class PacedModel(GenericFakeChatModel):
        """A fake chat model that takes a model's time to answer; ``held``: until the screenshots."""

        held: bool = False
        model_name: str = "gpt-4o-mini"  # what the handler reports (LangChain's ls_model_name)

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(THINK)
            if self.held:
                ready.set()
                release.wait(HOLD)
            return super()._generate(*args, **kwargs)

    @tool
    def search_docs(query: str) -> str:
        """Search the product documentation."""
        time.sleep(TOOL)
        return f"3 pages about {query}"

    planner_model = PacedModel(
        messages=iter(
            [
                AIMessage(
                    content="",
                    tool_calls=[{"name": "search_docs", "args": {"query": "SSO setup"}, "id": "call-sso"}],
                ),
                AIMessage(content="Outline: 1. enable SSO 2. map groups 3. test a login."),
            ]
        )
    )
    writer_model = PacedModel(
        messages=iter([AIMessage(content="To set up SSO, ...")]), model_name="claude-sonnet-4", held=True
    )

    def planner(state: MessagesState) -> dict[str, Any]:
        return {"messages": [planner_model.invoke(state["messages"])]}

    def writer(state: MessagesState) -> dict[str, Any]:
        return {"messages": [writer_model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("planner", planner)
    graph.add_node("tools", ToolNode([search_docs]))
    graph.add_node("writer", writer)
    graph.add_edge(START, "planner")
    graph.add_conditional_edges("planner", tools_condition, {"tools": "tools", END: "writer"})
    graph.add_edge("tools", "planner")
    graph.add_edge("writer", END)
    compiled = graph.compile(name="report-writer")
    handler = CollabCallbackHandler()
    config: Any = {"callbacks": [handler], "configurable": {"thread_id": "doc-request-88"}}
    inputs: Any = {"messages": [HumanMessage(content="Write a how-to for setting up SSO.")]}
    worker = _Worker(lambda: compiled.invoke(inputs, config=config))

    def finish() -> None:
        worker.join()
        handler.shutdown()

    return Run("report-writer", ready, release, finish)


# -- Pydantic AI ---------------------------------------------------------------------------


def pydantic_ai(stack: Stack) -> Run:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from pydantic_ai import Agent
    from pydantic_ai.capabilities import Instrumentation
    from pydantic_ai.models.instrumented import InstrumentationSettings
    from pydantic_ai.models.test import TestModel

    from collab.integrations.otel import CollabSpanProcessor

    class PacedModel(TestModel):
        """Pydantic AI's TestModel, taking a model's time to answer."""

        async def request(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(THINK)
            return await super().request(*args, **kwargs)

    ready, release = threading.Event(), threading.Event()
    provider = TracerProvider(resource=Resource.create({"service.name": "pydantic-ai-demo"}))
    provider.add_span_processor(CollabSpanProcessor())
    instrumented = [Instrumentation(settings=InstrumentationSettings(tracer_provider=provider))]
    analyst = Agent(PacedModel(call_tools=["fetch_figures"]), name="analyst", capabilities=instrumented)
    researcher = Agent(PacedModel(call_tools=["ask_analyst"]), name="researcher", capabilities=instrumented)

    @analyst.tool_plain
    def fetch_figures(metric: str) -> str:
        """Fetch a metric's figures for the last quarter."""
        ready.set()
        release.wait(HOLD)
        return f"{metric}: +12% quarter on quarter"

    @researcher.tool_plain
    async def ask_analyst(question: str) -> str:
        """Ask the analyst agent a question about the figures."""
        answer = await analyst.run(question)
        return str(answer.output)

    worker = _Worker(lambda: researcher.run_sync("How did sign-ups grow last quarter?"))

    def finish() -> None:
        worker.join()
        provider.shutdown()  # flushes and stops the processor

    return Run("researcher", ready, release, finish)


# -- plain OpenTelemetry (OTLP exporter) ---------------------------------------------------


def opentelemetry(stack: Stack) -> Run:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = OTLPSpanExporter(
        endpoint=f"{stack.bridge.http}/v1/traces", headers={"authorization": f"Bearer {WRITE_KEY}"}
    )
    provider = TracerProvider(resource=Resource.create({"service.name": "newsletter-service"}))
    # One batch for the whole run, sent at the flush: a parent reaches the hub with its children.
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    tracer = provider.get_tracer("newsletter")

    def span(name: str, operation: str, **attributes: Any) -> Any:
        return tracer.start_as_current_span(
            f"{operation} {name}", attributes={"gen_ai.operation.name": operation, **attributes}
        )

    with span(
        "newsletter", "invoke_workflow", **{"gen_ai.agent.name": "newsletter", "gen_ai.conversation.id": "issue-49"}
    ):
        with span("scout", "invoke_agent", **{"gen_ai.agent.name": "scout"}):
            with span("web_search", "execute_tool", **{"gen_ai.tool.name": "web_search"}):
                time.sleep(TOOL)
            with span(
                "claude-sonnet-4",
                "chat",
                **{
                    "gen_ai.request.model": "claude-sonnet-4",
                    "gen_ai.usage.input_tokens": 1830,
                    "gen_ai.usage.output_tokens": 240,
                },
            ):
                time.sleep(THINK)
            with span(
                "editor",
                "handoff",
                **{"gen_ai.handoff.from_agent": "scout", "gen_ai.handoff.to_agent": "editor"},
            ):
                time.sleep(0.05)
        with span("editor", "invoke_agent", **{"gen_ai.agent.name": "editor"}):
            with span("claude-sonnet-4", "chat", **{"gen_ai.request.model": "claude-sonnet-4"}):
                time.sleep(THINK)
            with span("draft_store", "update_memory", **{"gen_ai.memory.id": "drafts/issue-49"}):
                time.sleep(0.1)
    # Sent before the dashboard opens: the page back-fills it. (Sent while it is open, the
    # feed's live rows of spans the hub took in one millisecond read "(done · )", no duration.)
    provider.force_flush(10_000)
    ready, release = threading.Event(), threading.Event()
    ready.set()
    return Run("newsletter", ready, release, provider.shutdown)  # photographed finished


FRAMEWORKS: dict[str, Callable[[Stack], Run]] = {
    "openai-agents": openai_agents,
    "langgraph": langgraph,
    "pydantic-ai": pydantic_ai,
    "opentelemetry": opentelemetry,
}


@contextmanager
def _hub_environment(stack: Stack) -> Iterator[None]:
    """COLLAB_GRPC_TARGET and COLLAB_TOKEN, as docs/INTEGRATIONS.md has the integrations read them."""
    saved = {name: os.environ.get(name) for name in ("COLLAB_GRPC_TARGET", "COLLAB_TOKEN", "OPENAI_API_KEY")}
    os.environ.update(COLLAB_GRPC_TARGET=stack.server.target, COLLAB_TOKEN=WRITE_KEY)
    os.environ.pop("OPENAI_API_KEY", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


ROOT = """(agent) => [...window.collabDashboard.model.activities.values()]
    .find(a => a.agent_id === agent && a.activity_type === 'agent_started')?.activity_id ?? null"""


# The timeline zoomed (as its Zoom buttons do) to the run: a few seconds, not the 30 s it opens on.
ZOOM_TO_RUN = """() => { const d = window.collabDashboard;
    const first = Math.min(...[...d.model.activities.values()].map(a => a.timestamp));
    d.timeline.span = Math.max(5, (Date.now() / 1000 - first) * 1.15 + 0.5); d.model.touch("timeline"); }"""


async def photograph(browser: Browser, stack: Stack, framework: str, out: Path) -> list[Path]:
    with _hub_environment(stack):
        run = FRAMEWORKS[framework](stack)
        try:
            if not await asyncio.to_thread(run.ready.wait, HOLD):
                raise RuntimeError(f"{framework}: the run never reached its held step")
            page = await open_dashboard(browser, stack)
            handle = await page.wait_for_function(ROOT, arg=run.root_agent, timeout=15000)
            root = await handle.json_value()
            await asyncio.sleep(1.5)  # the live spans of the held step, and the cards settled
            written = [out / f"integration-{framework}-overview.png", out / f"integration-{framework}.png"]
            await page.screenshot(path=str(written[0]))
            await page.evaluate(f"window.collabDashboard.navigate({{view: 'timeline', activity: {json.dumps(root)}}})")
            await page.wait_for_function("document.querySelectorAll('#tree .row').length > 1", timeout=15000)
            await asyncio.sleep(1.5)
            await page.evaluate(ZOOM_TO_RUN)
            await asyncio.sleep(0.3)  # a frame drawn at that zoom
            await page.screenshot(path=str(written[1]))
            await page.close()
        finally:
            run.release.set()
            await asyncio.to_thread(run.finish)
    return written


async def _run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for framework in args.frameworks:
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    running_stack(Path(tmp), server_env={"COLLAB_STORE": "memory"}) as stack,
                ):
                    for path in await photograph(browser, stack, framework, out):
                        print(f"wrote {path}", flush=True)
        finally:
            await browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img", help="the directory the PNGs go to (default docs/img)")
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS))
    args = parser.parse_args(argv)
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
