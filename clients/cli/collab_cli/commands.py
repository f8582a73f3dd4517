"""The user commands of `collab` (status, tail, history, record, complete), over the Python SDK."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from google.protobuf.timestamp_pb2 import Timestamp

from collab import ACTIVITY_TYPES, EVENT_KINDS, Client
from collab_grpc.names import ACTIVITY_STATUS_NAMES, ACTIVITY_TYPE_NAMES, MEMORY_OPERATION_NAMES
from collab_grpc.v1 import collaboration_pb2 as pb

__all__ = ["add_commands", "complete", "history", "record", "status", "tail"]

_COLOURS = {
    "activity_recorded": "\033[36m",  # cyan
    "activity_completed": "\033[32m",  # green
    "memory_updated": "\033[35m",  # magenta
    "collaboration_started": "\033[33m",  # yellow
    "collaboration_ended": "\033[33m",
    "decision_recorded": "\033[34m",  # blue
}
_FAILED = "\033[31m"
_RESET = "\033[0m"


def _client(args: argparse.Namespace) -> Client:
    try:
        return Client(args.target, args.token, timeout=args.timeout, tls_ca=args.tls_ca)
    except ValueError as error:  # a TLS CA file that cannot be used: a bad argument
        print(f"collab: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _name(names: Mapping[int, str], number: int) -> str:
    """The guide's name of an enum value; the number itself for one newer than this CLI."""
    return names.get(number, str(number))


def status(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as hub:
        summary = hub.agent_status()
    if args.json:
        from google.protobuf.json_format import MessageToDict

        json.dump(MessageToDict(summary, preserving_proto_field_name=True), out, indent=2)
        out.write("\n")
        return 0
    rows = [("AGENT", "DEPARTMENT", "STATUS", "CURRENT ACTIVITY", "LAST ACTIVITY", "COLLABS")]
    for agent in summary.agents:
        rows.append(
            (
                agent.agent_id,
                agent.department or "-",
                "active" if agent.status == pb.AGENT_STATE_ACTIVE else "idle",
                agent.current_activity_id or "-",
                agent.last_activity_id or "-",
                str(agent.collaboration_count),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
    out.write(
        f"{summary.total_agents} agents: {summary.active_agents} active, {summary.idle_agents} idle; "
        f"{summary.active_activities} open activities, {summary.active_collaborations} active collaborations\n"
    )
    return 0


def describe(event: pb.Event) -> tuple[str, str, str]:
    """(kind, agent, what happened) for one event line."""
    kind = event.WhichOneof("payload") or ""
    if kind == "activity_recorded":
        a = event.activity_recorded
        where = f" in {a.session_id}" if a.session_id else ""
        return kind, a.agent_id, f"{_name(ACTIVITY_TYPE_NAMES, a.activity_type)} {a.activity_id}{where}"
    if kind == "activity_completed":
        done = event.activity_completed
        outcome = "completed" if done.success else f"FAILED ({done.activity.failure_reason or 'no reason'})"
        return kind, done.activity.agent_id, f"{done.activity.activity_id} {outcome}"
    if kind == "memory_updated":
        m = event.memory_updated
        return kind, m.agent_id, f"{_name(MEMORY_OPERATION_NAMES, m.operation)} {m.item_id}"
    if kind in ("collaboration_started", "collaboration_ended"):
        s = getattr(event, kind)
        return kind, ",".join(s.participants), f"{s.session_id} ({s.session_type})"
    if kind == "agent_retired":
        r = event.agent_retired
        return kind, r.agent_id, f"left the live status (idle; last activity {r.last_activity_id or 'none'})"
    if kind == "activity_linked":
        link = event.activity_linked
        return kind, link.activity.agent_id, f"{link.activity_id} now under {link.parent_activity_id}"
    d = event.decision_recorded
    return kind, d.agent_id, f"{d.session_id}: {d.decision}"


def _department(event: pb.Event) -> str | None:
    kind = event.WhichOneof("payload")
    if kind == "activity_recorded":
        return event.activity_recorded.department
    if kind == "activity_completed":
        return event.activity_completed.activity.department
    if kind == "activity_linked":
        return event.activity_linked.activity.department
    return None


def tail(args: argparse.Namespace, out: TextIO) -> int:
    colour = not args.no_color and out.isatty()
    shown = 0
    with _client(args) as hub:
        for event in hub.events(
            types=args.type, agent_ids=args.agent, activity_types=args.activity_type, since=args.since
        ):
            if args.department and _department(event) not in set(args.department):
                continue
            kind, agent, what = describe(event)
            when = datetime.fromtimestamp(event.time.seconds + event.time.nanos / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
            line = f"{event.seq:>6} {when} {kind:<22} {agent:<16} {what}"
            if colour:
                shade = _FAILED if "FAILED" in what else _COLOURS.get(kind, "")
                line = f"{shade}{line}{_RESET}"
            out.write(line + "\n")
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return 0
    return 0


# `collab history`: how many activities it shows at most (--limit), and the statuses.
MAX_HISTORY_ROWS = 100_000
STATUSES = ("active", "completed", "failed")
_AGO = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds from epoch seconds, an ISO 8601 time (naive: UTC) or a span ago
    (``90s``, ``15m``, ``2h``, ``7d``); ValueError saying what is accepted."""
    try:
        return float(text)
    except ValueError:
        pass
    if len(text) > 1 and text[-1] in _AGO and text[:-1].isdigit():
        return (now if now is not None else datetime.now(UTC).timestamp()) - int(text[:-1]) * _AGO[text[-1]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not epoch seconds, an ISO 8601 time or a span ago like 15m, 2h, 7d") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _seconds(stamp: Timestamp) -> float:
    return float(stamp.seconds + stamp.nanos / 1e9)


def _duration(activity: pb.Activity, now: float) -> str:
    end = _seconds(activity.completed_at) if activity.HasField("completed_at") else now
    seconds = max(0.0, end - _seconds(activity.timestamp))
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def history(args: argparse.Namespace, out: TextIO) -> int:
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as error:
        print(f"collab history: --since/--until: {error}", file=sys.stderr)
        return 2
    metadata: dict[str, str] = {}
    for pair in args.meta or []:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            print(f"collab history: --meta must be key=value, got {pair!r}", file=sys.stderr)
            return 2
        metadata[key] = value
    if not 1 <= args.limit <= MAX_HISTORY_ROWS:
        print(f"collab history: --limit must be between 1 and {MAX_HISTORY_ROWS}", file=sys.stderr)
        return 2
    now = datetime.now(UTC).timestamp()
    rows = [("TIME (UTC)", "AGENT", "DEPARTMENT", "TYPE", "STATUS", "TOOK", "ACTIVITY", "SESSION")]
    with _client(args) as hub:
        found = hub.query_activities(
            agent_ids=args.agent or (),
            departments=args.department or (),
            activity_types=args.activity_type or (),
            statuses=args.status or (),
            session_ids=args.session or (),
            parent_activity_ids=args.parent or (),
            since=since,
            until=until,
            metadata=metadata,
            order=args.order,
            page_size=min(args.limit, 500),
        )
        for shown, activity in enumerate(found, 1):
            if args.json:
                from google.protobuf.json_format import MessageToDict

                out.write(json.dumps(MessageToDict(activity, preserving_proto_field_name=True)) + "\n")
            else:
                status = _name(ACTIVITY_STATUS_NAMES, activity.status)
                if activity.failure_reason:
                    status = f"{status} ({activity.failure_reason})"
                rows.append(
                    (
                        datetime.fromtimestamp(_seconds(activity.timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S"),
                        activity.agent_id,
                        activity.department or "-",
                        _name(ACTIVITY_TYPE_NAMES, activity.activity_type),
                        status,
                        _duration(activity, now),
                        activity.activity_id,
                        activity.session_id or "-",
                    )
                )
            if shown >= args.limit:
                break
    if not args.json:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
        out.write(f"{len(rows) - 1} activities\n")
    return 0


def _metadata_option(text: str | None) -> dict[str, Any]:
    """``--metadata``: a JSON object, or exit with what is wrong."""
    try:
        metadata = json.loads(text) if text else {}
    except ValueError as error:
        raise SystemExit(f"collab: --metadata is not valid JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise SystemExit("collab: --metadata must be a JSON object")
    return metadata


def record(args: argparse.Namespace, out: TextIO) -> int:
    metadata = _metadata_option(args.metadata)
    with _client(args) as hub:
        activity_id = hub.record_activity(
            args.agent_id,
            args.activity_type,
            department=args.department,
            metadata=metadata,
            related_agents=_split(args.related),
            session_id=args.session,
            parent_activity_id=args.parent,
        )
    out.write(activity_id + "\n")
    return 0


def complete(args: argparse.Namespace, out: TextIO) -> int:
    metadata = _metadata_option(args.metadata)
    with _client(args) as hub:
        activity = hub.complete_activity(
            args.activity_id, success=not args.failed, failure_reason=args.reason or "", metadata=metadata
        )
    out.write(f"{activity.activity_id} {_name(ACTIVITY_STATUS_NAMES, activity.status)}\n")
    return 0


def _split(value: str | None) -> Iterable[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def hub_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--target", help="collab-server address [COLLAB_GRPC_TARGET, default 127.0.0.1:50051]")
        parser.add_argument("--token", help="credential [COLLAB_TOKEN, else the key in COLLAB_DATA_DIR]")
        parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
        parser.add_argument("--tls-ca", help="PEM CA file: connect with TLS trusting it [COLLAB_GRPC_TLS_CA]")

    show = commands.add_parser("status", help="the agent table")
    hub_options(show)
    show.add_argument("--json", action="store_true", help="the raw status as JSON")
    show.set_defaults(run=status)

    follow = commands.add_parser("tail", help="the live event stream, coloured, with filters")
    hub_options(follow)
    follow.add_argument("--type", action="append", choices=sorted(EVENT_KINDS), help="event kind (repeatable)")
    follow.add_argument("--agent", action="append", help="agent id (repeatable)")
    follow.add_argument("--department", action="append", help="department of activity events (repeatable)")
    follow.add_argument(
        "--activity-type", action="append", choices=sorted(ACTIVITY_TYPES), help="activity type (repeatable)"
    )
    follow.add_argument("--since", type=int, help="start after this seq (default: now)")
    follow.add_argument("--count", type=int, help="stop after this many events")
    follow.add_argument("--no-color", action="store_true", help="no colours even on a terminal")
    follow.set_defaults(run=tail)

    search = commands.add_parser(
        "history",
        help="search the history the hub retains (a table, or JSON lines with --json)",
        description="Every filter may repeat (any of its values); different filters combine with AND.",
    )
    hub_options(search)
    search.add_argument("--agent", action="append", help="agent id (repeatable)")
    search.add_argument("--department", action="append", help="department (repeatable)")
    search.add_argument(
        "--activity-type", action="append", choices=sorted(ACTIVITY_TYPES), help="activity type (repeatable)"
    )
    search.add_argument("--status", action="append", choices=STATUSES, help="activity status (repeatable)")
    search.add_argument("--session", action="append", help="session id (repeatable)")
    search.add_argument("--parent", action="append", help="parent activity id: its children (repeatable)")
    search.add_argument("--since", help="recorded at or after: epoch seconds, ISO 8601 (UTC if naive) or 15m/2h/7d ago")
    search.add_argument("--until", help="recorded before: as --since")
    search.add_argument("--meta", action="append", help="key=value: a top-level metadata value (repeatable)")
    search.add_argument("--order", choices=("desc", "asc"), default="desc", help="newest (default) or oldest first")
    search.add_argument(
        "--limit", type=int, default=50, help=f"show at most this many (default 50, at most {MAX_HISTORY_ROWS})"
    )
    search.add_argument("--json", action="store_true", help="one JSON object per activity and line")
    search.set_defaults(run=history)

    new = commands.add_parser("record", help="record an activity; prints its id")
    hub_options(new)
    new.add_argument("agent_id")
    new.add_argument("activity_type", choices=sorted(ACTIVITY_TYPES))
    new.add_argument("--department", default="")
    new.add_argument("--metadata", help="a JSON object")
    new.add_argument("--related", help="comma-separated related agent ids")
    new.add_argument("--session", help="the collaboration session it belongs to")
    new.add_argument("--parent", help="the activity it is a step of")
    new.set_defaults(run=record)

    finish = commands.add_parser("complete", help="complete an activity")
    hub_options(finish)
    finish.add_argument("activity_id")
    finish.add_argument("--failed", action="store_true", help="it failed")
    finish.add_argument("--reason", help="why it failed")
    finish.add_argument("--metadata", help="a JSON object merged into the activity's metadata (token usage...)")
    finish.set_defaults(run=complete)


def run(args: argparse.Namespace) -> int:
    from collab import CollabError

    try:
        code: int = args.run(args, sys.stdout)
        return code
    except CollabError as error:
        print(f"collab: {error.code.lower().replace('_', ' ')}: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
