"""The device client's outbox: order, bound and overflow policy, persistence, ack semantics."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devices.outbox import MemoryOutbox, Outbox, OutboxFullError, SqliteOutbox
from devices.protocol import Channel

OutboxFactory = Callable[[int], Outbox]


@pytest.fixture(params=["sqlite", "memory"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutboxFactory]:
    opened: list[Outbox] = []

    def factory(max_messages: int) -> Outbox:
        box: Outbox
        if request.param == "sqlite":
            box = SqliteOutbox(tmp_path / f"outbox-{len(opened)}.db", max_messages, durability="normal")
        else:
            box = MemoryOutbox(max_messages)
        opened.append(box)
        return box

    yield factory
    for box in opened:
        box.close()


def put(box: Outbox, n: int, channel: Channel = "telemetry") -> list[int]:
    ids = []
    for i in range(n):
        result = box.put(f"garments/v1/sock-0001/{channel}", f"{channel}-{i}".encode(), channel, channel == "status")
        assert result.id is not None
        ids.append(result.id)
    return ids


def payloads(box: Outbox) -> list[bytes]:
    return [e.payload for e in box.peek(0, 1_000_000)]


def test_oldest_first_and_peek_after(make: OutboxFactory) -> None:
    box = make(100)
    ids = put(box, 10)
    assert ids == sorted(ids) and len(set(ids)) == 10
    assert payloads(box) == [f"telemetry-{i}".encode() for i in range(10)]
    assert [e.id for e in box.peek(ids[3], 4)] == ids[4:8]
    assert box.peek(ids[-1], 10) == []
    assert box.depth() == 10


def test_entry_keeps_topic_channel_and_retain(make: OutboxFactory) -> None:
    box = make(10)
    box.put("garments/v1/sock-0001/status", b'{"v":1,"state":"online"}', "status", retain=True)
    (entry,) = box.peek(0, 10)
    assert (entry.topic, entry.payload, entry.channel, entry.retain) == (
        "garments/v1/sock-0001/status", b'{"v":1,"state":"online"}', "status", True,
    )  # fmt: skip


def test_ack_deletes_only_the_acked_message(make: OutboxFactory) -> None:
    box = make(100)
    ids = put(box, 5)
    assert box.ack(ids[2]) is True
    assert box.ack(ids[2]) is False, "a second ack of the same message deletes nothing"
    assert [e.id for e in box.peek(0, 10)] == [ids[0], ids[1], ids[3], ids[4]]
    assert box.ack_many([ids[0], ids[4], 999_999]) == 2
    assert [e.id for e in box.peek(0, 10)] == [ids[1], ids[3]]
    assert box.depth() == 2


def test_ids_never_reused_after_the_queue_empties(make: OutboxFactory) -> None:
    box = make(10)
    first = put(box, 3)
    assert box.ack_many(first) == 3
    # The sender remembers the last id it handed over; a reused id would be skipped.
    assert put(box, 1)[0] > first[-1]


def test_full_queue_evicts_the_oldest_telemetry_and_counts_it(
    make: OutboxFactory, caplog: pytest.LogCaptureFixture
) -> None:
    box = make(5)
    event_id = put(box, 1, "event")[0]
    telemetry = put(box, 4)
    with caplog.at_level(logging.WARNING, logger="devices.outbox"):
        result = box.put("garments/v1/sock-0001/telemetry", b"new", "telemetry")
    assert result.evicted == 1 and result.id is not None
    assert box.depth() == 5
    remaining = [e.id for e in box.peek(0, 10)]
    assert remaining == [event_id, *telemetry[1:], result.id], "the event stays, the oldest telemetry goes"
    assert "outbox full" in caplog.text


def test_full_queue_keeps_events_and_status(make: OutboxFactory) -> None:
    box = make(3)
    put(box, 2, "event")
    put(box, 1, "status")
    # New telemetry: nothing older to evict, so the new message itself is dropped (counted).
    dropped = box.put("garments/v1/sock-0001/telemetry", b"t", "telemetry")
    assert dropped.id is None and dropped.evicted == 1
    # A new event or status: refused loudly, never dropped silently.
    with pytest.raises(OutboxFullError):
        box.put("garments/v1/sock-0001/event", b"e", "event")
    with pytest.raises(OutboxFullError):
        box.put("garments/v1/sock-0001/status", b"s", "status", retain=True)
    assert payloads(box) == [b"event-0", b"event-1", b"status-0"]


def test_event_into_a_full_queue_evicts_telemetry(make: OutboxFactory) -> None:
    box = make(2)
    put(box, 2)
    result = box.put("garments/v1/sock-0001/event", b"e", "event")
    assert result.id is not None and result.evicted == 1
    assert payloads(box) == [b"telemetry-1", b"e"]


def test_sqlite_outbox_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = SqliteOutbox(path, 100)
    ids = put(box, 6)
    box.ack(ids[0])
    box.close()

    again = SqliteOutbox(path, 100)
    try:
        assert again.depth() == 5
        assert [e.id for e in again.peek(0, 10)] == ids[1:]
        assert payloads(again) == [f"telemetry-{i}".encode() for i in range(1, 6)]
        assert put(again, 1)[0] > ids[-1], "ids keep increasing across a reopen"
        assert again.peek(0, 10)[0].id == ids[1], "oldest first across a reopen"
    finally:
        again.close()


def test_sqlite_outbox_uses_wal(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "outbox.db", 10)
    box.close()
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_bound_applies_to_what_was_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = SqliteOutbox(path, 10)
    put(box, 10)
    box.close()
    smaller = SqliteOutbox(path, 10)
    try:
        assert smaller.put("garments/v1/sock-0001/telemetry", b"x", "telemetry").evicted == 1
        assert smaller.depth() == 10
    finally:
        smaller.close()


def test_concurrent_put_and_ack(make: OutboxFactory) -> None:
    box = make(100_000)
    done = threading.Event()
    acked: list[int] = []

    def sender() -> None:
        last = 0
        while not done.is_set() or box.depth():
            batch = box.peek(last, 50)
            if batch:
                last = batch[-1].id
                acked.extend(e.id for e in batch)
                box.ack_many([e.id for e in batch])

    thread = threading.Thread(target=sender)
    thread.start()
    ids = put(box, 2000)
    done.set()
    thread.join(30)
    assert acked == ids, "every message sent once, in order"
    assert box.depth() == 0


def test_bound_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MemoryOutbox(0)
    with pytest.raises(ValueError):
        SqliteOutbox(tmp_path / "x.db", 0)
