"""The embedded default store: one SQLite file (WAL) in the data directory.

Every event is written, with the rows it changes (activities, sessions, decisions,
agents) and the idempotency answers of the same writes, in one transaction. A single
writer thread commits whatever accumulated while the previous commit ran (group
commit), so many concurrent writes share one fsync. On start the state, the tail of the
log, the epoch and the seq are read back, so the history continues where it stopped.

A commit's events are published to subscribers once COMMIT has handed its pages to the
operating system (the WAL, written with synchronous=NORMAL), and its writes are answered
once the WAL is fsynced (synchronous=full, the default): the fsync's tail is kept off the
fan-out, and an acknowledged write survives kill -9 and power loss. What a subscriber
saw is in the file after kill -9 (the OS keeps what was written); only a crash of the
machine, or a failed fsync, can take back an event published before its fsync, so a
start after one (another boot id, while the file was not closed cleanly) begins a new
epoch: every subscriber is told to start over. Checkpoints run in a thread of their own,
and retention in small transactions between commits, so neither holds up a commit long.

If a commit fails (disk full, I/O error) the writes in it are refused with UNAVAILABLE
and the in-memory state is reloaded from the file, which holds exactly what was
acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter  # its own name: tests stand in for the `time` module
from typing import Any

from collab_grpc import metrics
from collab_grpc.files import create_private_file, make_private_dir
from collab_grpc.history import ActivityQuery, Found
from collab_grpc.model import (
    Activity,
    ActivityCompletion,
    ActivityLink,
    ActivityStatus,
    AgentRetirement,
    Decision,
    Event,
    EventKind,
    MemoryUpdate,
    Session,
)
from collab_grpc.state import CollaborationState, new_epoch
from collab_grpc.store.base import (
    SingleProcessStore,
    StoreError,
    StoreUnavailable,
    Waiters,
    check_read_count,
    release_waiters,
)
from collab_grpc.store.codec import decode_activity, decode_payload, decode_session, encode, encode_rows

__all__ = ["Retention", "SQLiteStore", "boot_id"]

log = logging.getLogger("collab_grpc.store.sqlite")

APPLICATION_ID = 0x636F6C62  # "colb": this file is a collab store
SCHEMA_VERSION = 4
FILE_NAME = "collab.db"
WAL_SUFFIX = "-wal"
# meta 'running': the boot id of the process using the file ('' once closed cleanly), or
# SYNC_FAILED after an fsync failed; a boot id that cannot be read is UNKNOWN_BOOT.
SYNC_FAILED = "sync-failed"
UNKNOWN_BOOT = "unknown"
# The WAL is checkpointed by a thread of its own this often (seconds), when commits came
# since; SQLite's own checkpoint, inside a COMMIT, would put its fsyncs on the fan-out.
CHECKPOINT_EVERY = 0.5
# After a checkpoint reset the WAL, SQLite truncates the file back to this many bytes.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (seq INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE activities (
    activity_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL,
    completed_at REAL, body TEXT NOT NULL
);
CREATE INDEX activities_by_seq ON activities (seq);
CREATE INDEX activities_open ON activities (status) WHERE status = 'active';
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, ended_at REAL,
    activity_count INTEGER NOT NULL, decision_count INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE INDEX sessions_ended ON sessions (ended_at);
CREATE TABLE decisions (
    decision_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE INDEX decisions_by_session ON decisions (session_id, seq);
CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY, department TEXT NOT NULL, last_activity_id TEXT, seen_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX agents_seen ON agents (seen_at);
CREATE TABLE idempotency (
    method TEXT NOT NULL, key TEXT NOT NULL, fingerprint BLOB NOT NULL, answer BLOB NOT NULL,
    stored_at REAL NOT NULL, PRIMARY KEY (method, key)
);
"""

# What the writer thread writes from a commit's events, given as JSON arrays (see
# _Chunk): each event's row, then the rows of new activities, then the completed and linked ones.
# (json_each reads an array in order. Ids, kinds and statuses are printable text, so
# json_extract, which ends a string at \u0000, reads them whole.)
_FROM_CHUNK = "FROM json_each(?)"
# Events per JSON array: at most 64 KB of metadata an event (twice for a completion),
# so an array stays far below SQLite's and Python's 1 GB and 2 GB limits on one value.
ROWS_PER_STATEMENT = 1_000


def _field(index: int) -> str:
    return f"json_extract(value, '$[{index}]')"


_INSERT_EVENTS = (
    f"INSERT INTO events (seq, time, kind, payload) SELECT {_field(0)}, {_field(1)}, {_field(2)}, {_field(3)} "
    f"{_FROM_CHUNK}"
)
_INSERT_ACTIVITIES = (
    "INSERT INTO activities (activity_id, seq, status, body, agent_id, session_id, parent_activity_id, recorded_at) "
    f"SELECT {_field(4)}, {_field(0)}, {_field(5)}, {_field(3)}, json_extract(value, '$[3].agent_id'), "
    "json_extract(value, '$[3].session_id'), json_extract(value, '$[3].parent_activity_id'), "
    f"json_extract(value, '$[3].timestamp') {_FROM_CHUNK} WHERE {_field(2)} = '{EventKind.ACTIVITY_RECORDED.value}'"
)
_COMPLETE_ACTIVITIES = (
    "UPDATE activities SET status = done.status, completed_at = done.completed_at, body = done.body FROM "
    f"(SELECT {_field(4)} AS activity_id, {_field(5)} AS status, {_field(6)} AS completed_at, {_field(7)} AS body "
    f"{_FROM_CHUNK} WHERE {_field(2)} = '{EventKind.ACTIVITY_COMPLETED.value}') AS done "
    "WHERE activities.activity_id = done.activity_id"
)
# A link sets the parent alone (its column and the body's field), not the whole body: a
# completion of the same activity in the same chunk, before or after it, keeps its state.
_LINK_ACTIVITIES = (
    "UPDATE activities SET parent_activity_id = link.parent, body = json_set(body, '$.parent_activity_id', "
    f"link.parent) FROM (SELECT {_field(4)} AS activity_id, {_field(5)} AS parent {_FROM_CHUNK} "
    f"WHERE {_field(2)} = '{EventKind.ACTIVITY_LINKED.value}') AS link WHERE activities.activity_id = link.activity_id"
)
# (agent_id, when): an agent's row made or marked seen; its department and last activity kept.
_AGENT_SEEN = (
    "INSERT INTO agents (agent_id, department, seen_at) VALUES (?, '', ?) "
    "ON CONFLICT (agent_id) DO UPDATE SET seen_at = max(seen_at, excluded.seen_at)"
)
# Schema version 1 -> 2: agents got `seen_at` (when each was last seen), so a start reads
# only the live agents. A version 1 agent is taken as seen when its last activity was
# recorded or completed (0 when that is no longer kept).
_MIGRATE_TO_2 = """
ALTER TABLE agents ADD COLUMN seen_at REAL NOT NULL DEFAULT 0;
UPDATE agents SET seen_at = coalesce((SELECT coalesce(completed_at, json_extract(body, '$.timestamp'))
    FROM activities WHERE activities.activity_id = agents.last_activity_id), 0);
CREATE INDEX agents_seen ON agents (seen_at);
"""


# Schema version 2 -> 3: the history search (query_activities). An activity's agent,
# session, parent and time get columns of their own, written when it is recorded and never
# changed after, so their indexes cost a completion nothing (an index on the JSON body
# would be rewritten by every completion, which rewrites the body). Each index orders by
# (recorded_at, activity_id), the search's order and cursor, after the filter it serves;
# department, type and metadata are read from the rows the indexes give. A new file is
# made at version 2 and taken through this step in the same transaction.
SEARCH_INDEXES = (
    "activities_by_time",
    "activities_by_agent",
    "activities_by_session",
    "activities_by_parent",
    "activities_failed",
)
_MIGRATE_TO_3 = """
ALTER TABLE activities ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
ALTER TABLE activities ADD COLUMN session_id TEXT NOT NULL DEFAULT '';
ALTER TABLE activities ADD COLUMN parent_activity_id TEXT NOT NULL DEFAULT '';
ALTER TABLE activities ADD COLUMN recorded_at REAL NOT NULL DEFAULT 0;
UPDATE activities SET agent_id = json_extract(body, '$.agent_id'), session_id = json_extract(body, '$.session_id'),
    parent_activity_id = json_extract(body, '$.parent_activity_id'), recorded_at = json_extract(body, '$.timestamp');
CREATE INDEX activities_by_time ON activities (recorded_at, activity_id);
CREATE INDEX activities_by_agent ON activities (agent_id, recorded_at, activity_id);
CREATE INDEX activities_by_session ON activities (session_id, recorded_at, activity_id) WHERE session_id != '';
CREATE INDEX activities_by_parent ON activities (parent_activity_id, recorded_at, activity_id)
    WHERE parent_activity_id != '';
CREATE INDEX activities_failed ON activities (recorded_at, activity_id) WHERE status = 'failed';
"""
# Schema version 3 -> 4: idempotency answers go by age (retention deletes the oldest a chunk
# at a time, which needs them in that order).
_MIGRATE_TO_4 = "CREATE INDEX idempotency_by_age ON idempotency (stored_at);"
_HISTORY_TIME = "recorded_at"
# A metadata match: a top-level key whose scalar value is the text given (a string), the
# number given, or true/false/null (history.MetadataMatch says the same in Python).
_METADATA_MATCH = (
    "EXISTS (SELECT 1 FROM json_each(body, '$.metadata') AS entry WHERE entry.key = ? AND ("
    "(entry.type = 'text' AND entry.atom = ?) OR (entry.type IN ('integer', 'real') AND entry.atom = ?) "
    "OR (entry.type IN ('true', 'false', 'null') AND entry.type = ?)))"
)
# Rows a search looks at per call, at most, when it filters on what no index holds
# (department, type, metadata): a page may come back short, with a cursor to go on.
HISTORY_SCAN_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class HistorySQL:
    """The statements answering a query: ``select`` its rows; with filters no index
    serves, it reads a window of at most the scan budget of rows the indexes give, and
    ``window_end`` finds the last row of a full window (where the next page continues)."""

    select: str
    parameters: list[Any]
    window_end: str | None = None
    window_parameters: list[Any] = dataclasses.field(default_factory=list)


def history_sql(query: ActivityQuery, count: int, scan_rows: int = HISTORY_SCAN_ROWS) -> HistorySQL:
    """The statements answering ``query`` (its first ``count`` rows)."""
    # What the indexes serve (the window), then what is read from each row of it.
    indexed: list[str] = []
    indexed_parameters: list[Any] = []
    residual: list[str] = []
    residual_parameters: list[Any] = []

    def any_of(conditions: list[str], parameters: list[Any], expression: str, values: Sequence[str]) -> None:
        if values:
            conditions.append(f"{expression} IN ({', '.join('?' * len(values))})")
            parameters.extend(values)

    any_of(indexed, indexed_parameters, "agent_id", query.agent_ids)
    any_of(indexed, indexed_parameters, "session_id", query.session_ids)
    any_of(indexed, indexed_parameters, "parent_activity_id", query.parent_activity_ids)
    if query.session_ids:  # what lets the planner use the partial index
        indexed.append("session_id != ''")
    if query.parent_activity_ids:
        indexed.append("parent_activity_id != ''")
    if query.statuses:
        # Checked enum values, written in the statement (one as `=`) so that a query of
        # the failed ones can use their partial index.
        if len(query.statuses) == 1:
            indexed.append(f"status = '{query.statuses[0].value}'")
        else:
            indexed.append(f"status IN ({', '.join(repr(s.value) for s in query.statuses)})")
    if query.since is not None:
        indexed.append(f"{_HISTORY_TIME} >= ?")
        indexed_parameters.append(query.since)
    if query.until is not None:
        indexed.append(f"{_HISTORY_TIME} < ?")
        indexed_parameters.append(query.until)
    if query.after is not None:
        indexed.append(f"({_HISTORY_TIME}, activity_id) {'<' if query.newest_first else '>'} (?, ?)")
        indexed_parameters.extend(query.after)
    any_of(residual, residual_parameters, "json_extract(body, '$.department')", query.departments)
    any_of(
        residual, residual_parameters, "json_extract(body, '$.activity_type')", [t.value for t in query.activity_types]
    )
    for match in query.metadata:
        residual.append(_METADATA_MATCH)
        literal = match.value if match.value in ("true", "false", "null") else ""
        residual_parameters.extend((match.key, match.value, match.number, literal))
    direction = "DESC" if query.newest_first else "ASC"
    order = f"ORDER BY {_HISTORY_TIME} {direction}, activity_id {direction}"
    where = f"WHERE {' AND '.join(indexed)} " if indexed else ""
    if not residual:
        return HistorySQL(f"SELECT body FROM activities {where}{order} LIMIT ?", [*indexed_parameters, count])
    window = f"SELECT body, activity_id, recorded_at FROM activities {where}{order} LIMIT ?"
    return HistorySQL(
        f"SELECT body FROM ({window}) WHERE {' AND '.join(residual)} {order} LIMIT ?",
        [*indexed_parameters, scan_rows, *residual_parameters, count],
        f"SELECT {_HISTORY_TIME}, activity_id FROM activities {where}{order} LIMIT 1 OFFSET ?",
        [*indexed_parameters, scan_rows - 1],
    )


@dataclass(frozen=True, slots=True)
class Retention:
    """What the file keeps beyond the live state: the newest ``count`` events and
    completed activities, none older than ``seconds``; ended sessions likewise by age.
    Open activities and active sessions are always kept. Retention deletes ``chunk``
    rows per table and transaction, one round after another while there is more to
    delete (a commit waits for one round at most), else every ``every`` seconds, and at
    once when the file is past ``max_bytes`` of pages in use (0: no budget); while it
    cannot bring the file under that, new records are refused (completions and ends
    still pass: they are what lets retention free room)."""

    count: int = 100_000
    seconds: float = 7 * 24 * 3600.0
    max_bytes: int = 4 * 1024 * 1024 * 1024
    every: float = 10.0  # how often pruning looks, in seconds, while nothing is left to delete
    chunk: int = 500  # rows per table and pruning transaction, so a commit never waits long


IdempotencyRow = tuple[str, str, bytes, bytes, float]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Events of a commit for the writer thread: one JSON array with a row per event,
    ``[seq, time, kind, payload]``, where a new activity adds ``activity_id, status``,
    a completion ``activity_id, status, completed_at, activity`` and a link
    ``activity_id, parent_activity_id``. Payloads are JSON objects in it: SQLite keeps
    their text as written, and each is encoded only once."""

    document: str
    recorded: int
    completed: int
    linked: int = 0

    @classmethod
    def of(cls, rows: list[tuple[Any, ...]]) -> _Chunk:
        kinds = [row[2] for row in rows]
        return cls(
            encode_rows(rows),
            kinds.count(EventKind.ACTIVITY_RECORDED),
            kinds.count(EventKind.ACTIVITY_COMPLETED),
            kinds.count(EventKind.ACTIVITY_LINKED),
        )


# While commits keep coming, retention looks again this soon (seconds) rather than after
# Retention.every: rows past the limits go within about this long of being written.
PRUNE_FOLLOW_UP = 1.0

# Group commit while writes keep coming (seconds): a commit is held open for more writes
# at most COMMIT_DELAY after the previous one began, and only while they keep arriving
# (no gap of COMMIT_QUIET); MAX_BATCH events close it early.
COMMIT_DELAY = 0.010
COMMIT_QUIET = 0.004
MAX_BATCH = 1_000


class SQLiteStore(SingleProcessStore):
    def __init__(
        self,
        data_dir: Path,
        *,
        synchronous: str = "full",
        retention: Retention | None = None,
        commit_delay: float = COMMIT_DELAY,
        commit_quiet: float = COMMIT_QUIET,
        history_scan_rows: int = HISTORY_SCAN_ROWS,
    ) -> None:
        self.path = data_dir / FILE_NAME
        self.history_scan_rows = history_scan_rows
        self.commit_delay = commit_delay
        self.commit_quiet = commit_quiet
        self._last_commit = 0.0
        # Writes were staged while the last commit ran: the server is busy, and the next
        # commit waits for more (see _gather).
        self._busy = False
        self.commits = 0
        self._failure_marks: list[int] = []
        # Set when a failed commit could not be followed by a reload, or once closed: every
        # write refused.
        self._broken: str | None = None
        self.synchronous = synchronous
        self.retention = retention or Retention()
        self.failure: str | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collab-sqlite")
        self._connection: sqlite3.Connection | None = None
        self._state: CollaborationState | None = None
        self._events: list[Event] = []
        self._answers: list[IdempotencyRow] = []
        self._durable_seq = 0
        self._waiters: Waiters = []
        self._wakeup: asyncio.Event | None = None
        # Set while nothing is staged and no commit runs: what close() waits for.
        self._idle: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []  # retention and checkpoints
        # Held while the writer connection is in use (a commit, from its first statement on
        # the loop to its fsync; a retention round): they must not interleave.
        self._writer_lock = asyncio.Lock()
        self._prune_now: asyncio.Event | None = None  # the file is past its byte budget
        # Commits since the last checkpoint (read by the checkpoint loop).
        self._commits_since_checkpoint = 0
        # The WAL is checkpointed through a connection and thread of its own, beside commits.
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collab-sqlite-ckpt")
        # Set once an fsync failed: what was committed since may not be on the disk.
        self._sync_failure: str | None = None
        # The oldest seq the events table holds in this epoch (None: none), as of the last
        # pruning round; a resume from before the events in memory reads from there.
        self._oldest_stored_seq: int | None = None
        self._epoch_start = 0  # the last seq before this epoch's first event
        self._agent_idle_ttl = 0.0  # the state's, once attached (read by the writer thread)
        self._idempotency_ttl = 24 * 3600.0  # likewise
        # The history search reads through a connection of its own in a thread of its own,
        # so it neither waits for a commit nor holds one up (WAL: readers see the last commit).
        self._reader: sqlite3.Connection | None = None
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collab-sqlite-read")
        # Bytes of the file's pages in use (free pages left by retention excluded), as
        # of the last commit: read by the loop, written by the writer thread.
        self.used_bytes = 0

    @property
    def description(self) -> str:
        return f"sqlite ({self.path})"

    @property
    def failure_marks(self) -> Sequence[int]:
        return self._failure_marks

    # -- opening --------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Open the file, or make a new one; refuse anything that is not a collab store."""
        make_private_dir(self.path.parent)
        create_private_file(self.path, "the database file")  # before SQLite makes it with the process's umask
        fresh = self.path.stat().st_size == 0
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            _check_sqlite(connection)
            application_id = connection.execute("PRAGMA application_id").fetchone()[0]
            tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if application_id != APPLICATION_ID and (tables or not fresh):
                raise StoreError(f"{self.path} is not a collab store (it holds other data); refusing to touch it")
            if application_id == APPLICATION_ID:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version == 1:
                    connection.executescript(f"BEGIN; {_MIGRATE_TO_2} PRAGMA user_version = 2; COMMIT;")
                    log.info("store upgraded to schema version 2", extra={"path": str(self.path)})
                    version = 2
                if version == 2:
                    connection.executescript(f"BEGIN; {_MIGRATE_TO_3} PRAGMA user_version = 3; COMMIT;")
                    log.info("store upgraded to schema version 3 (history search)", extra={"path": str(self.path)})
                    version = 3
                if version == 3:
                    connection.executescript(f"BEGIN; {_MIGRATE_TO_4} PRAGMA user_version = 4; COMMIT;")
                    log.info("store upgraded to schema version 4 (retention by age)", extra={"path": str(self.path)})
                    version = 4
                if version != SCHEMA_VERSION:
                    raise StoreError(f"{self.path} has schema version {version}; this server reads {SCHEMA_VERSION}")
                check = connection.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StoreError(f"{self.path} is corrupted ({check}); restore it from a backup")
            connection.execute("PRAGMA journal_mode = WAL")
            # A COMMIT only writes the WAL; with synchronous full the store fsyncs it itself
            # (_sync), after publishing, and checkpoints from its own thread.
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            if application_id != APPLICATION_ID:
                self._initialise(connection)
        except sqlite3.DatabaseError as error:
            connection.close()
            raise StoreError(f"{self.path} cannot be read as a collab store: {error}") from None
        except StoreError:
            connection.close()
            raise
        return connection

    @staticmethod
    def _initialise(connection: sqlite3.Connection) -> None:
        """Schema, epoch and the file's identity in one transaction: a crash leaves
        either an empty file or a complete store."""
        connection.executescript(
            f"BEGIN; {SCHEMA} {_MIGRATE_TO_3} {_MIGRATE_TO_4} "
            f"INSERT INTO meta (key, value) VALUES ('epoch', '{new_epoch()}'), ('last_seq', '0');"
            f" PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )

    async def attach(self, state: CollaborationState) -> None:
        """Store's interface: ``open``, run inside the event loop (a start-up read)."""
        self.open(state)

    def open(self, state: CollaborationState) -> None:
        """Open the file and continue its history in ``state``; then follow ``state``."""
        self._connection = self._open()
        self._begin_run(self._connection)
        self._open_reader()
        self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._state = state
        self._agent_idle_ttl = state.settings.agent_idle_ttl
        self._idempotency_ttl = state.idempotency.ttl
        self._load(state)
        state.log.sink = self._stage_event
        state.idempotency.sink = self._stage_answer
        self.used_bytes = _used_bytes(self._connection)
        state.storage_refusal = self._storage_refusal

    def _begin_run(self, connection: sqlite3.Connection) -> None:
        """Mark the file as in use by this process (its boot id), first starting a new
        epoch if the last process may have published events the file lacks: it did not
        close cleanly and either an fsync failed or the machine restarted since (a crash
        of the machine loses what was committed but not fsynced; kill -9 loses nothing
        the OS was given). The new epoch tells every subscriber to start over."""
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        running = meta.get("running", "")
        boot = boot_id() or UNKNOWN_BOOT
        lossy = running == SYNC_FAILED or (running != "" and (running != boot or boot == UNKNOWN_BOOT))
        connection.execute("BEGIN IMMEDIATE")
        try:
            if lossy:
                connection.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (new_epoch(),))
                connection.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch_start', ?)", (meta["last_seq"],)
                )
                log.warning(
                    "the store was not closed cleanly and may lack events it published (%s); starting a new epoch",
                    "an fsync failed" if running == SYNC_FAILED else "the machine restarted since",
                    extra={"path": str(self.path), "seq": int(meta["last_seq"])},
                )
            connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('running', ?)", (boot,))
            connection.execute("COMMIT")
        except BaseException:
            self._rollback(connection)
            raise
        self._sync()
        _sync_directory(self.path.parent)  # the WAL file's own entry, made by the first commit

    def _sync(self) -> None:
        """fsync what the connection committed to the WAL (synchronous full); a no-op
        with synchronous normal, where only checkpoints sync."""
        if self.synchronous.lower() != "full":
            return
        descriptor = os.open(self.path.with_name(FILE_NAME + WAL_SUFFIX), os.O_RDONLY)
        try:
            _fdatasync(descriptor)
        finally:
            os.close(descriptor)

    def _storage_refusal(self) -> str | None:
        """Why a new record cannot be stored now (the file is over its budget), or None."""
        budget = self.retention.max_bytes
        if not budget or self.used_bytes <= budget:
            return None
        return (
            f"the database uses {self.used_bytes} bytes, over its budget of {budget} bytes "
            "(--max-db-bytes / COLLAB_MAX_DB_BYTES), and retention cannot free enough: lower "
            "--retain-count or --retain-seconds, complete open activities and end sessions (kept until then), "
            "or raise the budget"
        )

    def _stage_event(self, event: Event) -> None:
        self._events.append(event)
        self._stage()

    def _stage_answer(self, method: str, key: str, fingerprint: bytes, answer: bytes, stored_at: float) -> None:
        self._answers.append((method, key, fingerprint, answer, stored_at))
        self._stage()

    def _stage(self) -> None:
        # The first write staged since the commit loop took the last ones wakes it; the
        # rest of a batch finds it woken already.
        if self._staged_count() == 1 and self._wakeup is not None and self._idle is not None:
            self._idle.clear()
            self._wakeup.set()

    def _load(self, state: CollaborationState) -> None:
        connection = self._connection
        assert connection is not None
        settings = state.settings
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        last_seq = int(meta["last_seq"])
        activities = [
            decode_activity(_json(body))
            for (body,) in connection.execute(
                "SELECT body FROM activities WHERE status = 'active' OR seq >= "
                "(SELECT coalesce(min(seq), 0) FROM (SELECT seq FROM activities ORDER BY seq DESC LIMIT ?)) "
                "ORDER BY seq",
                (settings.history_limit,),
            )
        ]
        sessions = [
            _session(body, ended_at, activity_count, decision_count)
            for body, ended_at, activity_count, decision_count in connection.execute(
                "SELECT body, ended_at, activity_count, decision_count FROM sessions WHERE ended_at IS NULL "
                "UNION ALL SELECT * FROM (SELECT body, ended_at, activity_count, decision_count FROM sessions "
                "WHERE ended_at IS NOT NULL ORDER BY ended_at DESC LIMIT ?)",
                (settings.ended_sessions_limit,),
            )
        ]
        sessions.sort(key=lambda s: (s.ended_at is not None, s.ended_at or 0.0))
        kept = {s.session_id for s in sessions}
        decisions = [
            Decision(**_json(body))
            for session_id, body in connection.execute("SELECT session_id, body FROM decisions ORDER BY seq")
            if session_id in kept
        ]
        events = [
            Event(seq, meta["epoch"], at, EventKind(kind), decode_payload(EventKind(kind), payload))
            for seq, at, kind, payload in reversed(
                connection.execute(
                    "SELECT seq, time, kind, payload FROM events ORDER BY seq DESC LIMIT ?",
                    (settings.event_log_retain,),
                ).fetchall()
            )
        ]
        # The live agents only (not every id ever seen): seen within the idle TTL, or
        # with an open activity, in an active session or in the roster.
        needed = {activity.agent_id for activity in activities if activity.status is ActivityStatus.ACTIVE}
        needed.update(member for s in sessions if s.ended_at is None for member in s.participants)
        needed.update(state.roster_ids)
        agents = connection.execute(
            "SELECT agent_id, department, last_activity_id, seen_at FROM agents WHERE seen_at >= ? UNION "
            "SELECT agent_id, department, last_activity_id, seen_at FROM agents "
            "WHERE agent_id IN (SELECT value FROM json_each(?))",
            (state.clock() - settings.agent_idle_ttl, json.dumps(sorted(needed))),
        ).fetchall()
        state.restore(
            epoch=meta["epoch"],
            last_seq=last_seq,
            agents=agents,
            activities=activities,
            sessions=sessions,
            decisions=decisions,
            events=events,
        )
        now = state.clock()
        state.idempotency.clear()
        # The newest the cache holds, fed oldest first (it evicts the first fed).
        for row in reversed(
            connection.execute(
                "SELECT method, key, fingerprint, answer, stored_at FROM idempotency WHERE stored_at > ? "
                "ORDER BY stored_at DESC LIMIT ?",
                (now - state.idempotency.ttl, state.idempotency.capacity),
            ).fetchall()
        ):
            state.idempotency.remember(*row)
        self._durable_seq = last_seq
        self._epoch_start = int(meta.get("epoch_start", "0"))
        self._oldest_stored_seq = self._oldest_seq(connection)
        log.info(
            "store opened",
            extra={
                "path": str(self.path),
                "epoch": meta["epoch"],
                "seq": last_seq,
                "activities": len(activities),
                "agents": len(agents),
            },
        )

    # -- history search -------------------------------------------------------------

    def _open_reader(self) -> None:
        """The search's read-only connection."""
        reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        reader.execute("PRAGMA query_only = ON")
        self._reader = reader

    async def query_activities(self, query: ActivityQuery, count: int) -> Found:
        """Every activity the file retains (Retention: open ones, and the newest completed
        ones up to its count and age), as of the last commit; with filters no index
        serves, looking at ``history_scan_rows`` rows at most."""
        if self._reader is None:
            return Found([])
        sql = history_sql(query, count, self.history_scan_rows)
        reader = self._reader

        def read() -> Found:
            reader.execute("BEGIN")  # both statements read the same commit
            try:
                rows = reader.execute(sql.select, sql.parameters).fetchall()
                scanned_to = None
                if sql.window_end is not None and len(rows) < count:
                    end = reader.execute(sql.window_end, sql.window_parameters).fetchone()
                    scanned_to = (float(end[0]), str(end[1])) if end is not None else None
            finally:
                reader.execute("COMMIT")
            return Found([decode_activity(_json(body)) for (body,) in rows], scanned_to)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._read_executor, read)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the store could not be read ({error}); try again") from None

    async def read_activities(self, ids: Sequence[str]) -> list[Activity]:
        """The activities among ``ids`` the file retains, as of the last commit (Store),
        through the search's connection and thread."""
        check_read_count(ids)
        if self._reader is None or not ids:
            return []
        reader, wanted = self._reader, list(dict.fromkeys(ids))
        sql = f"SELECT body FROM activities WHERE activity_id IN ({', '.join('?' * len(wanted))})"

        def read() -> list[Activity]:
            return [decode_activity(_json(body)) for (body,) in reader.execute(sql, wanted).fetchall()]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._read_executor, read)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the store could not be read ({error}); try again") from None

    # -- resumes from the file -----------------------------------------------------------

    def archived_from(self, epoch: str) -> int | None:
        """The oldest seq of ``epoch`` the file holds (EventArchive), as of the last
        retention round: a resume from before the events in memory reads from here."""
        if self._state is None or epoch != self._state.epoch:
            return None
        return self._oldest_stored_seq

    async def read_events(self, after_seq: int, through_seq: int, count: int) -> list[Event]:
        """At most ``count`` events after ``after_seq`` through ``through_seq``, oldest
        first, as of the last commit (EventArchive); through the search's connection and
        thread, so a resume neither waits for a commit nor holds one up."""
        if self._reader is None or self._state is None:
            return []
        reader, epoch = self._reader, self._state.epoch

        def read() -> list[Event]:
            rows = reader.execute(
                "SELECT seq, time, kind, payload FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (after_seq, through_seq, count),
            ).fetchall()
            return [
                Event(seq, epoch, at, EventKind(kind), decode_payload(EventKind(kind), payload))
                for seq, at, kind, payload in rows
            ]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._read_executor, read)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the store could not be read ({error}); try again") from None

    # -- writing --------------------------------------------------------------------

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._prune_now = asyncio.Event()
        if self._staged_count():  # writes staged before the loop ran
            self._wakeup.set()
        else:
            self._idle.set()
        self._committer = asyncio.create_task(self._commit_loop())
        self._background = [
            asyncio.create_task(self._retention_loop()),
            asyncio.create_task(self._checkpoint_loop()),
        ]

    async def durable(self, seq: int) -> None:
        """Return once everything up to ``seq`` is committed, published and (synchronous
        full) fsynced."""
        if seq <= self._durable_seq:
            return
        if self._broken is not None:
            raise StoreUnavailable(self._broken)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, waiter))
        await waiter

    async def _commit_loop(self) -> None:
        assert self._wakeup is not None and self._state is not None
        loop = asyncio.get_running_loop()
        assert self._idle is not None
        while True:
            await self._wakeup.wait()
            await self._gather()
            self._last_commit = perf_counter()
            self._wakeup.clear()
            events, answers = self._events, self._answers
            self._events, self._answers = [], []
            async with self._writer_lock:
                await self._commit_batch(loop, events, answers)
            if self._broken is not None:
                self._events, self._answers = [], []
                self._release(lambda seq: True, StoreUnavailable(self._broken))
            self._busy = bool(self._events or self._answers)
            if self._busy:
                self._wakeup.set()
            else:
                self._idle.set()

    async def _commit_batch(
        self, loop: asyncio.AbstractEventLoop, events: list[Event], answers: list[IdempotencyRow]
    ) -> None:
        """Write, commit, publish and fsync one batch; answer its writers."""
        if not (events or answers):
            return
        # As the writes waiting on it see it: the hand-over to the writer thread too.
        started = perf_counter()
        try:
            chunks = self._write_rows(events, answers)
            await loop.run_in_executor(self._executor, self._commit, chunks, self._announcer(loop, events))
        except _SyncFailed as error:
            # Committed and published, but not known to be on the disk.
            metrics.commit_failed("sqlite")
            await self._sync_failed(error)
        except Exception as error:
            metrics.commit_failed("sqlite")
            try:
                self._failed(error)
            except Exception as reload_error:
                # The reload failed too (the file cannot be read now), so the state
                # in memory can no longer be trusted: refuse this write and every
                # later one until the server is restarted, instead of leaving them
                # waiting or deciding them on that state.
                log.exception("reloading the state after a failed commit failed")
                self._broken = (
                    f"the store failed ({error}) and could not be read back ({reload_error}); "
                    "nothing more is recorded until the server is restarted"
                )
        else:
            self.commits += 1
            self._commits_since_checkpoint += 1
            self.failure = None
            if events:
                self._durable_seq = events[-1].seq
                # Published already (see _announcer); this catches up if that failed.
                self._publish(self._durable_seq)
                if self._oldest_stored_seq is None:
                    self._oldest_stored_seq = events[0].seq
            try:
                metrics.committed("sqlite", perf_counter() - started, len(events))
            except Exception:
                # Committed is committed: the writers get their answers, and this
                # loop must live on, or every later write would wait forever.
                log.exception("after commit through seq %d", self._durable_seq)
            self._release(lambda seq: seq <= self._durable_seq, None)
            budget = self.retention.max_bytes
            if 0 < budget < self.used_bytes and self._prune_now is not None:
                self._prune_now.set()

    def _announcer(self, loop: asyncio.AbstractEventLoop, events: list[Event]) -> Callable[[], None]:
        """What the writer thread calls once COMMIT returned: the events are published on
        the loop then, while the thread goes on to the fsync (their writers are answered
        after it). The callback runs before the commit's own completion reaches the loop."""
        if not events:
            return _nothing
        seq = events[-1].seq

        def committed() -> None:
            loop.call_soon_threadsafe(self._publish, seq)

        return committed

    def _publish(self, seq: int) -> None:
        """Publish every event up to ``seq`` (committed): subscribers get them now."""
        assert self._state is not None
        try:
            self._state.log.publish_through(seq)
        except Exception:
            log.exception("publishing events through seq %d", seq)

    async def _sync_failed(self, error: _SyncFailed) -> None:
        """An fsync failed: what was committed since the last one may not be on the disk,
        and the OS may not say so again (a later fsync can succeed without it). The writes
        waiting are refused, every later one too until a restart, and the file is marked
        so that the next start begins a new epoch (subscribers may have seen events the
        disk lost)."""
        self._sync_failure = str(error.__cause__ or error)
        self._broken = (
            f"the store could not make writes durable (fsync failed: {self._sync_failure}); "
            "nothing more is recorded until the server is restarted"
        )
        self.failure = self._broken
        log.error("fsync failed; refusing every write until a restart", extra={"error": self._sync_failure})
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._mark_running, SYNC_FAILED)
        except Exception:
            log.exception("marking the store after a failed fsync")

    def _mark_running(self, value: str) -> None:
        """Set meta 'running' (writer thread): '' once closed cleanly, SYNC_FAILED."""
        connection = self._connection
        assert connection is not None
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute("UPDATE meta SET value = ? WHERE key = 'running'", (value,))
            connection.execute("COMMIT")
        except BaseException:
            self._rollback(connection)
            raise
        if value != SYNC_FAILED:
            self._sync()

    async def _gather(self) -> None:
        """Group commit: what a commit costs (the fsync, and SQLite writing each page the
        transaction touched to the WAL) is much the same for one write as for a hundred,
        so under load the store waits for more writes before it commits; that, not the
        rows, is what its throughput depends on (docs/BENCHMARKS.md). A write after a
        quiet spell commits at once: only when writes were staged while the last commit
        ran does the next one wait, while more keep arriving (none for ``commit_quiet``:
        commit), until ``commit_delay`` after the last commit began or MAX_BATCH events."""
        if not self._busy or self.commit_delay <= 0:
            return
        deadline = self._last_commit + self.commit_delay
        staged = self._staged_count()
        while len(self._events) < MAX_BATCH and (left := deadline - perf_counter()) > 0:
            await asyncio.sleep(min(self.commit_quiet, left))
            if self._staged_count() == staged:
                return
            staged = self._staged_count()

    def _staged_count(self) -> int:
        return len(self._events) + len(self._answers)

    def _release(self, ready: Callable[[int], bool], error: BaseException | None) -> None:
        self._waiters = release_waiters(self._waiters, ready, error)

    def _failed(self, error: Exception) -> None:
        """Refuse the writes of a failed commit, and every write decided after them, and
        reload what the file holds (exactly what was acknowledged).

        The reload runs here, on the event loop, so that no write can be decided on the
        state being replaced; it is rare and reads one file."""
        assert self._state is not None
        self.failure = f"the store could not write ({error}); the write was not recorded"
        log.error("commit failed; reloading the state from %s", self.path, extra={"error": str(error)})
        refused_through = self._state.log.last_seq
        self._failure_marks.append(self._durable_seq)
        if self._connection is not None:
            self._rollback(self._connection)
        self._events, self._answers = [], []
        self._state.log.close_all("the store failed; resubscribe with since_seq set to the last seq received")
        self._load(self._state)
        self._release(lambda seq: seq <= refused_through, StoreUnavailable(self.failure))

    def _write_rows(self, events: list[Event], answers: list[IdempotencyRow]) -> list[_Chunk]:
        """Begin the transaction and write, on the event loop, every table's rows but
        the events' and the activities'; those (one or two per event) are left to the
        writer thread, as the chunks returned.

        Without the COMMIT this touches only SQLite's page cache, so it is quick; but the
        rows of every event, written one statement each, cost the loop about as much as
        deciding the events. In the writer thread they go in as three statements reading
        a JSON array (per ROWS_PER_STATEMENT events): each statement hands the GIL back to
        that thread once, where ``executemany`` would once a row."""
        connection = self._connection
        assert connection is not None
        connection.execute("BEGIN IMMEDIATE")
        try:
            rows: list[tuple[Any, ...]] = []
            # The other tables' rows in the events' order; a run of new activities (most
            # of what is written) shares one statement per table.
            run: list[Activity] = []
            for event in events:
                payload = event.payload
                if isinstance(payload, Activity):
                    rows.append((event.seq, event.time, event.kind, payload, payload.activity_id, payload.status))
                    run.append(payload)
                    continue
                self._activity_run(connection, run)
                run = []
                if isinstance(payload, ActivityCompletion):
                    done = payload.activity
                    row = (event.seq, event.time, event.kind, payload)
                    rows.append((*row, done.activity_id, done.status, done.completed_at, done))
                    connection.execute(_AGENT_SEEN, (done.agent_id, event.time))
                elif isinstance(payload, ActivityLink):
                    link = payload
                    rows.append((event.seq, event.time, event.kind, link, link.activity_id, link.parent_activity_id))
                else:
                    rows.append((event.seq, event.time, event.kind, payload))
                    self._apply(connection, event)
            self._activity_run(connection, run)
            connection.executemany(
                "INSERT OR REPLACE INTO idempotency (method, key, fingerprint, answer, stored_at) "
                "VALUES (?, ?, ?, ?, ?)",
                answers,
            )
            if events:
                connection.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(events[-1].seq),))
            return [
                _Chunk.of(rows[start : start + ROWS_PER_STATEMENT]) for start in range(0, len(rows), ROWS_PER_STATEMENT)
            ]
        except BaseException:
            self._rollback(connection)
            raise

    def _commit(self, chunks: list[_Chunk], committed: Callable[[], None]) -> None:
        """The chunks' rows, COMMIT, ``committed()`` (which publishes the events), then the
        fsync: in the writer thread, so the loop keeps deciding the next batch meanwhile.
        Chunk by chunk, new activities before completions and links: either may be of an
        activity recorded in the same chunk. A failed fsync raises _SyncFailed."""
        connection = self._connection
        assert connection is not None
        try:
            for chunk in chunks:
                connection.execute(_INSERT_EVENTS, (chunk.document,))
                if chunk.recorded:
                    connection.execute(_INSERT_ACTIVITIES, (chunk.document,))
                if chunk.completed:
                    connection.execute(_COMPLETE_ACTIVITIES, (chunk.document,))
                if chunk.linked:
                    connection.execute(_LINK_ACTIVITIES, (chunk.document,))
            connection.execute("COMMIT")
        except BaseException:
            self._rollback(connection)
            raise
        committed()
        try:
            self._sync()
        except OSError as error:
            raise _SyncFailed(str(error)) from error
        with contextlib.suppress(sqlite3.Error):  # committed is committed; the next one measures
            self.used_bytes = _used_bytes(connection)

    @staticmethod
    def _rollback(connection: sqlite3.Connection) -> None:
        # SQLite may already have rolled back (for instance on SQLITE_FULL); a second
        # ROLLBACK would raise and hide the error that matters.
        if connection.in_transaction:
            connection.execute("ROLLBACK")

    @staticmethod
    def _activity_run(connection: sqlite3.Connection, run: list[Activity]) -> None:
        """A run of new activities: their agents' last activity and department, their
        sessions' counts (the activities' own rows go in from the writer thread)."""
        if not run:
            return
        # One row per agent, as the run's rows one after another would leave it: its last
        # activity, its last department given (a run has many activities per agent).
        agents: dict[str, tuple[str, str, str, float]] = {}
        sessions: dict[str, int] = {}
        for activity in run:
            known = agents.get(activity.agent_id)
            department = activity.department or (known[1] if known else "")
            agents[activity.agent_id] = (activity.agent_id, department, activity.activity_id, activity.timestamp)
            if activity.session_id:
                sessions[activity.session_id] = sessions.get(activity.session_id, 0) + 1
        connection.executemany(
            "INSERT INTO agents (agent_id, department, last_activity_id, seen_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (agent_id) DO UPDATE SET last_activity_id = excluded.last_activity_id, "
            "department = CASE WHEN excluded.department = '' THEN department ELSE excluded.department END, "
            "seen_at = max(seen_at, excluded.seen_at)",
            agents.values(),
        )
        connection.executemany(
            "UPDATE sessions SET activity_count = activity_count + ? WHERE session_id = ?",
            [(count, session_id) for session_id, count in sessions.items()],
        )

    @staticmethod
    def _apply(connection: sqlite3.Connection, event: Event) -> None:
        """The rows of a session, decision, memory or retirement event. (A session's or
        decision's row keeps its JSON too; a memory event's row needs none, so it is not
        encoded.) A retired agent's row goes: the agents table holds the live ones."""
        payload = event.payload
        if isinstance(payload, Session):
            connection.execute(
                "INSERT INTO sessions (session_id, seq, ended_at, activity_count, decision_count, body) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET ended_at = excluded.ended_at, "
                "activity_count = excluded.activity_count, decision_count = excluded.decision_count",
                (
                    payload.session_id,
                    event.seq,
                    payload.ended_at,
                    payload.activity_count,
                    payload.decision_count,
                    encode(payload),
                ),
            )
            connection.executemany(_AGENT_SEEN, [(member, event.time) for member in payload.participants])
        elif isinstance(payload, Decision):
            connection.execute(
                "INSERT INTO decisions (decision_id, session_id, seq, body) VALUES (?, ?, ?, ?)",
                (payload.decision_id, payload.session_id, event.seq, encode(payload)),
            )
            connection.execute(
                "UPDATE sessions SET decision_count = decision_count + 1 WHERE session_id = ?",
                (payload.session_id,),
            )
            connection.execute(_AGENT_SEEN, (payload.agent_id, event.time))
        elif isinstance(payload, MemoryUpdate):
            connection.execute(_AGENT_SEEN, (payload.agent_id, event.time))
        elif isinstance(payload, AgentRetirement):
            connection.execute("DELETE FROM agents WHERE agent_id = ?", (payload.agent_id,))

    async def _retention_loop(self) -> None:
        """Retention rounds in the writer thread, between commits: one after another
        while a round finds more to delete (so it keeps up with any write rate the store
        takes, a commit waiting for one round at most), PRUNE_FOLLOW_UP later while
        commits came since the last round (rows past the limits go within about that long
        of being written), else every ``every`` seconds (so it also runs while no one
        writes), or at once when the file is past its budget."""
        assert self._prune_now is not None
        loop = asyncio.get_running_loop()
        while True:
            self._prune_now.clear()
            commits = self.commits
            more: bool | None = None
            async with self._writer_lock:
                pruning = loop.run_in_executor(self._executor, self._prune_round)
                try:
                    more = await asyncio.shield(pruning)
                except asyncio.CancelledError:
                    # Stopped (close): the round in the thread ends before the lock is let go.
                    await asyncio.wait({pruning})
                    raise
                except Exception:
                    log.exception("retention round failed; retrying later")
            if more:
                await asyncio.sleep(0)  # commits queued meanwhile go first (the executor is FIFO)
                continue
            pause = self.retention.every
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._prune_now.wait(), min(pause, PRUNE_FOLLOW_UP))
            if self.commits == commits and not self._prune_now.is_set():  # idle: look again less often
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._prune_now.wait(), max(0.0, pause - PRUNE_FOLLOW_UP))

    def _prune_round(self) -> bool | None:
        """One retention round (writer thread): True if it left more to delete, False
        if it deleted some, None if nothing (or it failed)."""
        connection = self._connection
        assert connection is not None
        more = self._prune(connection)
        self._oldest_stored_seq = self._oldest_seq(connection)
        self.used_bytes = _used_bytes(connection)
        return more

    def _oldest_seq(self, connection: sqlite3.Connection) -> int | None:
        """The oldest seq of this epoch the events table holds (None: none)."""
        (oldest,) = connection.execute("SELECT min(seq) FROM events WHERE seq > ?", (self._epoch_start,)).fetchone()
        return int(oldest) if oldest is not None else None

    def _prune(self, connection: sqlite3.Connection) -> bool | None:
        """Enforce retention, ``chunk`` rows per table and transaction: True if a table
        had more to delete than one chunk, False if rows were deleted, None if none were
        (or deleting failed)."""
        retention = self.retention
        oldest = time.time() - retention.seconds
        statements = [
            (
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <= "
                "(SELECT coalesce(max(seq), 0) FROM events) - ? OR time < ? ORDER BY seq LIMIT ?)",
                (retention.count, oldest, retention.chunk),
            ),
            (
                "DELETE FROM activities WHERE activity_id IN (SELECT activity_id FROM activities "
                "WHERE status != 'active' ORDER BY seq DESC LIMIT ? OFFSET ?)",
                (retention.chunk, retention.count),
            ),
            (
                "DELETE FROM activities WHERE activity_id IN (SELECT activity_id FROM activities "
                "WHERE status != 'active' AND completed_at < ? ORDER BY seq LIMIT ?)",
                (oldest, retention.chunk),
            ),
            (
                "DELETE FROM decisions WHERE session_id IN (SELECT session_id FROM sessions "
                "WHERE ended_at < ? ORDER BY ended_at LIMIT ?)",
                (oldest, retention.chunk),
            ),
            (
                "DELETE FROM sessions WHERE session_id IN (SELECT session_id FROM sessions "
                "WHERE ended_at < ? ORDER BY ended_at LIMIT ?)",
                (oldest, retention.chunk),
            ),
            (
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency WHERE stored_at < ? "
                "ORDER BY stored_at LIMIT ?)",
                (time.time() - self._idempotency_ttl, retention.chunk),
            ),
            # Agents that went idle while the server was down were never retired (a start
            # reads only live ones): their rows go once past the retention and the idle TTL.
            (
                "DELETE FROM agents WHERE agent_id IN (SELECT agent_id FROM agents WHERE seen_at < ? "
                "AND agent_id NOT IN (SELECT json_extract(body, '$.agent_id') FROM activities "
                "WHERE status = 'active') AND agent_id NOT IN (SELECT member.value FROM sessions, "
                "json_each(sessions.body, '$.participants') AS member WHERE sessions.ended_at IS NULL) "
                "ORDER BY seen_at LIMIT ?)",
                (min(oldest, time.time() - self._agent_idle_ttl), retention.chunk),
            ),
        ]
        more = False
        deleted_any = False
        try:
            for statement, parameters in statements:
                connection.execute("BEGIN IMMEDIATE")
                deleted = connection.execute(statement, parameters).rowcount
                connection.execute("COMMIT")  # not fsynced: a delete a crash takes back is done again
                more = more or deleted >= retention.chunk
                deleted_any = deleted_any or deleted > 0
        except sqlite3.Error as error:
            # Deleting needs space too (in the WAL), so on a full disk pruning fails; it
            # is retried at the next round. (No commit's writes depend on it.)
            self._rollback(connection)
            log.warning("pruning failed; retrying later", extra={"error": str(error)})
            return None
        return True if more else (False if deleted_any else None)

    async def _checkpoint_loop(self) -> None:
        """Checkpoint the WAL (PASSIVE: beside commits, never blocking one) when commits
        came since the last time; SQLite's own would run inside a COMMIT."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            if not self._commits_since_checkpoint:
                continue
            self._commits_since_checkpoint = 0
            try:
                await loop.run_in_executor(self._checkpoint_executor, self._checkpoint)
            except sqlite3.Error as error:  # a full disk, say: the next round tries again
                log.warning("checkpoint failed; retrying later", extra={"error": str(error)})

    def _checkpoint(self) -> None:
        checkpointer = self._checkpointer
        assert checkpointer is not None
        checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def close(self) -> None:
        """Commit what is staged (and any commit running), stop the writer, mark the file
        closed cleanly, close it."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        if self._committer is not None and self._idle is not None:
            # Idle when this resumes, not only when the event was set: a write staged in
            # between is committed first.
            while not self._committer.done() and not self._idle.is_set():
                await self._idle.wait()
            self._committer.cancel()
            # A write after this is refused, not left waiting for a commit that never comes.
            self._broken = self._broken or "the store is closed (the server is shutting down)"
            self._release(lambda seq: True, StoreUnavailable(self._broken))
        loop = asyncio.get_running_loop()
        if self._checkpointer is not None:
            checkpointer, self._checkpointer = self._checkpointer, None
            await loop.run_in_executor(self._checkpoint_executor, checkpointer.close)
        self._checkpoint_executor.shutdown(wait=True)
        if self._connection is not None:
            if self._sync_failure is None and self._state is not None:
                try:  # everything acknowledged is fsynced: a next start needs no new epoch
                    await loop.run_in_executor(self._executor, self._mark_running, "")
                except (sqlite3.Error, OSError) as error:
                    log.warning("could not mark the store closed cleanly", extra={"error": str(error)})
            await loop.run_in_executor(self._executor, self._connection.close)
        self._executor.shutdown(wait=True)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await asyncio.get_running_loop().run_in_executor(self._read_executor, reader.close)
        self._read_executor.shutdown(wait=True)


# UPDATE ... FROM (the completions of a commit) came in SQLite 3.33.
MIN_SQLITE = (3, 33, 0)
_JSON_PROBE = "SELECT json_extract('[1]', '$[0]')"


def _check_sqlite(connection: sqlite3.Connection) -> None:
    """Refuse an SQLite library this store cannot write with, saying what it needs."""
    version = sqlite3.sqlite_version
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        needed = ".".join(map(str, MIN_SQLITE))
        raise StoreError(f"the SQLite store needs SQLite {needed} or newer; this Python links SQLite {version}")
    try:
        connection.execute(_JSON_PROBE)
    except sqlite3.OperationalError:
        raise StoreError(
            f"the SQLite store needs SQLite's JSON functions; this Python's SQLite {version} lacks them"
        ) from None


class _SyncFailed(Exception):
    """The fsync after a COMMIT failed (the commit's events are published already)."""


def _nothing() -> None:
    pass


def boot_id() -> str | None:
    """This boot of the machine (Linux), or None where it cannot be read: a crash of the
    machine changes it, kill -9 of a process does not."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _fdatasync(descriptor: int) -> None:
    # fdatasync where there is one (Linux), as SQLite's own sync does; fsync elsewhere.
    sync = getattr(os, "fdatasync", os.fsync)
    sync(descriptor)


def _sync_directory(directory: Path) -> None:
    """fsync a directory, so that the files made in it survive a crash of the machine."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open a directory (Windows): nothing to do
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse to fsync a directory (EINVAL); nothing more can be done there
    finally:
        os.close(descriptor)


def _used_bytes(connection: sqlite3.Connection) -> int:
    """Bytes of the file's pages that hold data (pages freed by deletes are reused)."""
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    free = connection.execute("PRAGMA freelist_count").fetchone()[0]
    size = connection.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _json(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


def _session(body: str, ended_at: float | None, activity_count: int, decision_count: int) -> Session:
    session = decode_session(_json(body))
    session.ended_at = ended_at
    session.activity_count = activity_count
    session.decision_count = decision_count
    return session
