"""The device client's store-and-forward queue: bounded, oldest first, deleted only on PUBACK.

Two implementations with one API:

- :class:`SqliteOutbox`: on disk (SQLite in WAL mode). A message is committed
  before ``put`` returns, so it survives a crash or a restart of the client
  process; what was not acknowledged is sent again by the next process.
- :class:`MemoryOutbox`: in memory, for the simulators' high-rate load mode,
  where durability across a process restart is not wanted.

Entries carry a strictly increasing id. The sender reads with
:meth:`Outbox.peek` (ids above the last one it handed to the broker, oldest
first) and deletes an entry with :meth:`Outbox.ack` once the broker acknowledged
it, so an entry leaves the queue only when it is safe at the broker.

Overflow policy (the bound is ``max_messages``): a ``put`` into a full queue
first evicts the oldest *telemetry* entry (counted in ``dropped_overflow`` and
logged as a warning): a gap in old readings is the least harmful loss, and the
sensor loop must never block. Events and status are never evicted: if the
queue is full of nothing but events and status, a new telemetry message is
itself dropped (counted), and a new event or status raises :class:`OutboxFullError`
so that the caller knows; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from devices.files import private_sqlite_file
from devices.protocol import Channel

log = logging.getLogger(__name__)

Durability = Literal["full", "normal"]
DEFAULT_MAX_MESSAGES: Final = 100_000


class OutboxError(RuntimeError):
    """The queue cannot store or read a message (disk full, corrupt file, closed)."""


class OutboxFullError(OutboxError):
    """The queue is full of events and status (never evicted): the message was not stored."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One queued message: what the broker gets, plus the id that orders and acknowledges it."""

    id: int
    topic: str
    payload: bytes
    channel: Channel
    retain: bool


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a ``put`` did: the new entry's id (``None`` if the new message was dropped) and evictions."""

    id: int | None
    evicted: int


class Outbox(Protocol):
    """The queue API shared by the on-disk and the in-memory implementation. Thread-safe."""

    max_messages: int

    def put(self, topic: str, payload: bytes, channel: Channel, retain: bool = False) -> PutResult:
        """Store a message (evicting per the overflow policy); never blocks on the network."""
        ...

    def peek(self, after_id: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with ids above ``after_id``, oldest first."""
        ...

    def ack(self, entry_id: int) -> bool:
        """Delete one entry; False if it was not there (already evicted or acked)."""
        ...

    def ack_many(self, entry_ids: list[int]) -> int:
        """Delete several entries in one transaction; return how many were there."""
        ...

    def depth(self) -> int:
        """Entries in the queue."""
        ...

    def close(self) -> None:
        """Release the queue's resources; the on-disk queue keeps its content."""
        ...


def _check_bound(max_messages: int) -> None:
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, got {max_messages}")


def _warn_dropped(topic: str, why: str) -> None:
    log.warning("outbox full (%s): dropped telemetry %s", why, topic)


class MemoryOutbox:
    """An in-memory :class:`Outbox` (lost with the process): for high-rate simulation."""

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        _check_bound(max_messages)
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_id = 1

    def put(self, topic: str, payload: bytes, channel: Channel, retain: bool = False) -> PutResult:
        """Store a message (evicting per the overflow policy); never blocks on the network."""
        with self._lock:
            evicted = 0
            if len(self._entries) >= self.max_messages:
                victim = next((e.id for e in self._entries.values() if e.channel == "telemetry"), None)
                if victim is None:
                    return _refuse(topic, channel)
                _warn_dropped(self._entries.pop(victim).topic, "evicted the oldest telemetry")
                evicted = 1
            entry_id = self._next_id
            self._next_id += 1
            self._entries[entry_id] = Entry(entry_id, topic, payload, channel, retain)
            return PutResult(entry_id, evicted)

    def peek(self, after_id: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with ids above ``after_id``, oldest first."""
        out: list[Entry] = []
        with self._lock:
            # Entries leave mostly from the front, so the scan past already-sent ids stays short
            # (at most the in-flight window).
            for entry in self._entries.values():
                if entry.id > after_id:
                    out.append(entry)
                    if len(out) >= limit:
                        break
        return out

    def ack(self, entry_id: int) -> bool:
        """Delete one entry; False if it was not there (already evicted or acked)."""
        with self._lock:
            return self._entries.pop(entry_id, None) is not None

    def ack_many(self, entry_ids: list[int]) -> int:
        """Delete several entries; return how many were there."""
        with self._lock:
            return sum(self._entries.pop(i, None) is not None for i in entry_ids)

    def depth(self) -> int:
        """Entries in the queue."""
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Nothing to release; the content is kept until the object is gone."""


def _refuse(topic: str, channel: Channel) -> PutResult:
    """Full of events and status: drop new telemetry (counted), refuse anything else loudly."""
    if channel == "telemetry":
        _warn_dropped(topic, "only events and status queued")
        return PutResult(None, 1)
    raise OutboxFullError(f"outbox full of events and status; {channel} for {topic} not stored")


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    channel TEXT NOT NULL,
    retain INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_telemetry ON outbox (id) WHERE channel = 'telemetry';
"""


class SqliteOutbox:
    """An on-disk :class:`Outbox` in one SQLite file (WAL mode), surviving process restarts.

    ``durability="full"`` syncs every commit to disk (survives power loss: a
    garment's battery running flat); ``"normal"`` survives a crash of the
    process but may lose the last commits on power loss, at much less I/O.
    """

    def __init__(
        self, path: str | Path, max_messages: int = DEFAULT_MAX_MESSAGES, durability: Durability = "full"
    ) -> None:
        _check_bound(max_messages)
        self.max_messages = max_messages
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            # One connection shared by the caller's thread and the sender thread, under our lock;
            # autocommit mode (isolation_level=None) so each statement group is an explicit transaction.
            private_sqlite_file(self.path)  # queued readings: the device's owner only
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            (self._depth,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc

    def put(self, topic: str, payload: bytes, channel: Channel, retain: bool = False) -> PutResult:
        """Store a message durably (evicting per the overflow policy) before returning."""
        with self._lock:
            try:
                return self._put(topic, payload, channel, retain)
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot store a message in {self.path}: {exc}") from exc

    def _put(self, topic: str, payload: bytes, channel: Channel, retain: bool) -> PutResult:
        evicted = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._depth >= self.max_messages:
                row = self._db.execute("SELECT id, topic FROM outbox WHERE channel = 'telemetry' ORDER BY id LIMIT 1")
                victim = row.fetchone()
                if victim is None:
                    self._db.execute("ROLLBACK")
                    return _refuse(topic, channel)
                self._db.execute("DELETE FROM outbox WHERE id = ?", (victim[0],))
                _warn_dropped(victim[1], "evicted the oldest telemetry")
                evicted = 1
            cursor = self._db.execute(
                "INSERT INTO outbox (topic, payload, channel, retain) VALUES (?, ?, ?, ?)",
                (topic, payload, channel, int(retain)),
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._depth += 1 - evicted
        return PutResult(cursor.lastrowid, evicted)

    def peek(self, after_id: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with ids above ``after_id``, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, topic, payload, channel, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read {self.path}: {exc}") from exc
        return [Entry(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def ack(self, entry_id: int) -> bool:
        """Delete one entry; False if it was not there (already evicted or acked)."""
        return self.ack_many([entry_id]) == 1

    def ack_many(self, entry_ids: list[int]) -> int:
        """Delete several entries in one transaction (one disk sync); return how many were there."""
        if not entry_ids:
            return 0
        with self._lock:
            try:
                with self._db:  # one transaction, one sync to disk
                    self._db.execute("BEGIN")
                    cursor = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in entry_ids])
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot delete from {self.path}: {exc}") from exc
            deleted = max(cursor.rowcount, 0)
            self._depth -= deleted
            return deleted

    def depth(self) -> int:
        """Entries in the queue."""
        with self._lock:
            return int(self._depth)

    def close(self) -> None:
        """Close the file; its content stays for the next process."""
        with self._lock:
            self._db.close()
