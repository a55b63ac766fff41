"""Batch stage: decoded messages into write batches, and acks back in order.

A batch is cut when it reaches ``batch_size`` lines, when the in-flight window
is full (nothing more arrives until acks go out), or when its oldest message
has waited ``flush_interval``, whichever comes first, and once more at shutdown.

Batches may be written concurrently, but their messages are acknowledged
strictly in the order they were received: batch N+1's acks wait for batch N.
Out-of-order acks are silently ignored by Mosquitto and, once 16-bit message
ids wrap, can free the wrong message (ingest-facts, traps 2 and 3).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Entry:
    """One received MQTT message awaiting its ack."""

    mid: int
    qos: int
    generation: int


@dataclass(slots=True)
class Batch:
    """Lines to write together and the messages they came from."""

    seq: int
    lines: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    samples: int = 0
    first_at: float = 0.0
    newest_sample_ms: int = 0


class Batcher:
    """Accumulates messages; hands full or old batches to the write queue."""

    def __init__(self, batch_size: int, flush_interval_s: float) -> None:
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue: asyncio.Queue[Batch] = asyncio.Queue()
        self._seq = 0
        self._current = Batch(seq=0)
        self._wake = asyncio.Event()

    @property
    def current_lines(self) -> int:
        """Lines in the batch being filled."""
        return len(self._current.lines)

    def add(self, entry: Entry, lines: list[str], samples: int, newest_ms: int = 0) -> None:
        """Append one message's lines; cut the batch if it is full."""
        batch = self._current
        if not batch.entries:
            batch.first_at = time.monotonic()
            self._wake.set()
        batch.lines.extend(lines)
        batch.entries.append(entry)
        batch.samples += samples
        batch.newest_sample_ms = max(batch.newest_sample_ms, newest_ms)
        if len(batch.lines) >= self.batch_size:
            self.cut()

    def cut(self) -> None:
        """Send the current batch to the writers, if it holds anything."""
        if not self._current.entries:
            return
        self.queue.put_nowait(self._current)
        self._seq += 1
        self._current = Batch(seq=self._seq)

    async def run_timer(self) -> None:
        """Cut the current batch once its oldest message has waited long enough."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._current.entries:
                age = time.monotonic() - self._current.first_at
                if age >= self.flush_interval_s:
                    self.cut()
                    break
                await asyncio.sleep(self.flush_interval_s - age)


class OrderedAcker:
    """Releases acks batch by batch in sequence order, whatever order writes finish in."""

    def __init__(self, ack: Callable[[list[Entry]], None]) -> None:
        self._ack = ack
        self._next = 0
        self._done: dict[int, list[Entry]] = {}

    def complete(self, batch: Batch) -> None:
        """Mark ``batch`` written; ack it and every written batch after it that is now due."""
        self._done[batch.seq] = batch.entries
        while self._next in self._done:
            self._ack(self._done.pop(self._next))
            self._next += 1

    @property
    def waiting(self) -> int:
        """Written batches held back behind an unfinished earlier one."""
        return len(self._done)
