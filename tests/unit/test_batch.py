"""Batching (size, timer, window) and acks strictly in the order received."""

from __future__ import annotations

import asyncio

from ingest.batch import Batch, Batcher, Entry, OrderedAcker


def entry(mid: int, generation: int = 1) -> Entry:
    return Entry(mid=mid, qos=1, generation=generation)


async def test_cut_on_size() -> None:
    batcher = Batcher(batch_size=5, flush_interval_s=60)
    for mid in range(1, 4):
        batcher.add(entry(mid), ["a", "b"], samples=2)
    assert batcher.queue.qsize() == 1  # 6 lines >= 5
    batch = batcher.queue.get_nowait()
    assert [e.mid for e in batch.entries] == [1, 2, 3] and batch.samples == 6 and len(batch.lines) == 6
    assert batcher.current_lines == 0


async def test_cut_on_timer() -> None:
    batcher = Batcher(batch_size=1000, flush_interval_s=0.05)
    timer = asyncio.create_task(batcher.run_timer())
    batcher.add(entry(1), ["a"], samples=1)
    assert batcher.queue.empty()
    batch = await asyncio.wait_for(batcher.queue.get(), timeout=2)
    assert [e.mid for e in batch.entries] == [1]
    batcher.add(entry(2), ["b"], samples=1)  # the timer re-arms for the next batch
    assert [e.mid for e in (await asyncio.wait_for(batcher.queue.get(), timeout=2)).entries] == [2]
    timer.cancel()


async def test_cut_without_entries_sends_nothing() -> None:
    batcher = Batcher(batch_size=10, flush_interval_s=1)
    batcher.cut()
    assert batcher.queue.empty()


def test_acks_go_out_in_batch_order_whatever_order_writes_finish() -> None:
    acked: list[int] = []
    acker = OrderedAcker(lambda entries: acked.extend(e.mid for e in entries))
    batches = [Batch(seq=i, entries=[entry(10 * i + 1), entry(10 * i + 2)]) for i in range(4)]
    acker.complete(batches[2])
    acker.complete(batches[1])
    assert acked == [] and acker.waiting == 2
    acker.complete(batches[0])
    assert acked == [1, 2, 11, 12, 21, 22] and acker.waiting == 0
    acker.complete(batches[3])
    assert acked[-2:] == [31, 32]
