"""Bad input never crashes the ingester; each rejection is stored with its reason; good samples are kept."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from compression.influxql import rows
from compression.localservers import InfluxDB, Mosquitto
from simulators.publisher import LoadSpec, Outgoing, Publisher, generate
from tests.integration.conftest import Names, eventually, running, settings_for, wait_for_count
from tests.strategies import Case, collect_corpus

pytestmark = pytest.mark.integration

CORPUS_SIZE = 300


def fresh_names() -> Names:
    token = uuid.uuid4().hex[:8]
    return Names(f"t_bad_{token}", f"bad-{token}/garments/v1", f"ingest.bad-{token}", f"bad{token[:4]}")


def to_outgoing(case: Case, root: str) -> Outgoing:
    return Outgoing(f"{root}/{case.topic_device}/telemetry", case.payload, case.valid_samples)


async def ingest_corpus(mq: Mosquitto, db: InfluxDB, names: Names, cases: list[Case]) -> dict[str, float]:
    good = LoadSpec(devices=1, messages=2, samples=3, prefix=f"{names.prefix}-ok", topic_root=names.topic_root)
    messages = [to_outgoing(c, names.topic_root) for c in cases] + list(generate(good))
    expected_dead = sum(1 if c.whole_reason else len(c.sample_reasons) for c in cases)
    async with running(settings_for(mq, db, names)) as ingester:

        def publish() -> None:
            with Publisher(mq.url, f"pub-{names.client_id}") as pub:
                pub.publish_all(messages)

        await asyncio.to_thread(publish)
        await wait_for_count(db, names.database, "SELECT count(raw_bytes) FROM rejected", expected_dead)
        # The good messages after the corpus prove the ingester is still alive and reading.
        alive = f"SELECT count(ankle_mmhg) FROM sample WHERE device =~ /^{good.prefix}/"
        await wait_for_count(db, names.database, alive, good.total_samples)
        value = ingester.metrics.value
        assert await eventually(lambda: value("compression_ingest_messages_acked_total") == len(messages)), (
            "every message, bad or good, is acknowledged once handled"
        )
        return {
            reason: ingester.metrics.value("compression_ingest_rejected_total", reason=reason)
            for reason in {c.whole_reason for c in cases} | {r for c in cases for r in c.sample_reasons.values()}
            if reason
        }


def test_malformed_corpus_is_rejected_with_reasons(mosquitto: Mosquitto, influx: InfluxDB) -> None:
    names = fresh_names()
    cases = collect_corpus(names.prefix, CORPUS_SIZE)
    assert len({c.whole_reason for c in cases}) >= 8, "the corpus covers many kinds of bad input"
    counted = asyncio.run(ingest_corpus(mosquitto, influx, names, cases))

    dead = rows(influx.url, names.database, "SELECT * FROM rejected")
    per_device = rows(influx.url, names.database, "SELECT count(worn) AS n FROM sample GROUP BY device")
    stored: Counter[str] = Counter({str(r["device"]): int(r["n"]) for r in per_device})
    by_device: dict[str, list[dict[str, object]]] = {}
    for letter in dead:
        by_device.setdefault(str(letter["device"]), []).append(letter)

    expected_reasons: Counter[str] = Counter()
    for case in cases:
        if case.bad_topic:
            expected_reasons[case.whole_reason or ""] += 1
            continue
        letters = by_device.get(case.topic_device, [])
        if case.whole_reason:
            assert [x["reason"] for x in letters] == [case.whole_reason], case
            assert letters[0]["raw_bytes"] == len(case.payload)
            assert stored[case.topic_device] == 0
            expected_reasons[case.whole_reason] += 1
        else:
            got = sorted((int(x["sample_index"]), x["reason"]) for x in letters)  # type: ignore[call-overload]
            assert got == sorted(case.sample_reasons.items()), case
            assert stored[case.topic_device] == case.valid_samples, "valid samples of a partly bad message are kept"
            expected_reasons.update(case.sample_reasons.values())
    invalid_topic = [x for x in dead if x["device"] == "_invalid"]
    assert len(invalid_topic) == sum(1 for c in cases if c.bad_topic)
    assert all(x["reason"] == "invalid_device_id" for x in invalid_topic)
    assert {k: v for k, v in counted.items() if v} == dict(expected_reasons), "rejections are counted by reason"
