"""A garment or gateway sending hostile payloads (issue 10, findings 5 and 8): real Mosquitto and InfluxDB.

- Timestamps outside the protocol's window on status (and every other timestamped message) and integers InfluxDB
  cannot store are counted dead letters with their reason: no new shard (``SHOW SHARDS`` unchanged), no failing
  write (the write error counter does not move), and the ingester keeps up.
- JSON nested deeper than the parser allows is an ordinary rejection (``too_deep``) under the topic's device,
  with no traceback.
- A retained status delivered to a new ingester session is not news: it is not stored in ``status`` at the time it
  happened to be received (which made a silent garment look alive), but in ``status_retained``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from compression.influxql import query, rows
from compression.localservers import InfluxDB, Mosquitto
from ingest.app import Ingester
from ingest.settings import parse_mqtt_url
from simulators.publisher import LoadSpec, Outgoing, Publisher, generate
from tests.integration.conftest import Names, eventually, running, settings_for, wait_for_count

pytestmark = pytest.mark.integration

INT64_MAX = 2**63 - 1
DAY_MS = 86_400_000


def fresh_names(tag: str) -> Names:
    token = uuid.uuid4().hex[:8]
    return Names(f"t_{tag}_{token}", f"{tag}-{token}/garments/v1", f"ingest.{tag}-{token}", f"{tag}{token[:4]}")


def now_ms() -> int:
    return int(time.time() * 1000)


def shards(db: InfluxDB, database: str) -> int:
    """Shards InfluxDB holds for ``database`` (each one a time range that received a point)."""
    count = 0
    for series in query(db.url, database, "SHOW SHARDS"):
        if series.get("name") == database:
            count += len(series["values"])
    return count


def publish(mq: Mosquitto, names: Names, messages: list[Outgoing]) -> None:
    with Publisher(mq.url, f"pub-{names.client_id}-{uuid.uuid4().hex[:4]}") as pub:
        pub.publish_all(messages)


def telemetry(device: str, t: int, seq: int = 1) -> bytes:
    return (b'{"v":1,"device_id":"%s","kind":"sock","seq":%d,"samples":[{"t":%d,"worn":true,'
            b'"pressure_mmhg":{"ankle":24.5}}]}' % (device.encode(), seq, t))  # fmt: skip


def test_out_of_window_times_and_int64_overflow_are_dead_letters(mosquitto: Mosquitto, influx: InfluxDB) -> None:
    names = fresh_names("window")
    root, device = names.topic_root, f"{names.prefix}-hostile"
    now = now_ms()
    year_2200 = 7_258_118_400_000
    # (channel, payload, reason it must be rejected with)
    hostile: list[tuple[str, bytes, str]] = [
        ("status", b'{"v":1,"state":"online","t":0}', "timestamp_too_old"),  # 1970
        ("status", b'{"v":1,"state":"online","t":86400000}', "timestamp_too_old"),
        ("status", b'{"v":1,"state":"online","t":%d}' % year_2200, "timestamp_in_future"),
        ("status", b'{"v":1,"state":"online","t":%d}' % (year_2200 + 400 * DAY_MS), "timestamp_in_future"),
        ("status", b'{"v":1,"state":"online","t":%d}' % (10**20), "timestamp_in_future"),  # past int64 ns
        ("status", b'{"v":1,"state":"online","t":%d}' % (now - 40 * DAY_MS), "timestamp_too_old"),
        ("status", b'{"v":1,"state":"online","battery_pct":%d}' % (2**64), "invalid_battery_pct"),
        ("event", b'{"v":1,"device_id":"%s","t":%d,"type":"donned"}' % (device.encode(), year_2200),
         "timestamp_in_future"),
        ("event", b'{"v":1,"device_id":"%s","t":0,"type":"donned"}' % device.encode(), "timestamp_too_old"),
        ("telemetry", telemetry(device, now, seq=INT64_MAX + 1), "invalid_seq"),
        ("telemetry", telemetry(device, now, seq=10**30), "invalid_seq"),
    ]  # fmt: skip
    good = LoadSpec(devices=2, messages=3, samples=5, prefix=f"{names.prefix}-ok", topic_root=root)

    async def scenario() -> tuple[Ingester, int, int]:
        async with running(settings_for(mosquitto, influx, names)) as ingester:
            # A valid point now creates the current shard; then the hostile messages, then valid ones again.
            first = [Outgoing(f"{root}/{device}/telemetry", telemetry(device, now, seq=INT64_MAX), 1)]
            await asyncio.to_thread(publish, mosquitto, names, first)
            assert await wait_for_count(influx, names.database, "SELECT count(worn) FROM sample", 1) == 1
            before = shards(influx, names.database)
            messages = [Outgoing(f"{root}/{device}/{channel}", payload, 0) for channel, payload, _ in hostile]
            await asyncio.to_thread(publish, mosquitto, names, messages + list(generate(good)))
            await wait_for_count(influx, names.database, "SELECT count(raw_bytes) FROM rejected", len(hostile), 30)
            alive = f"SELECT count(worn) FROM sample WHERE device =~ /^{good.prefix}/"
            assert await wait_for_count(influx, names.database, alive, good.total_samples) == good.total_samples
            value = ingester.metrics.value
            total = 1 + len(messages) + good.devices * good.messages
            assert await eventually(lambda: value("compression_ingest_messages_acked_total") == total), (
                "the ingester keeps up: every message handled and acknowledged"
            )
            return ingester, before, shards(influx, names.database)

    ingester, before, after = asyncio.run(scenario())
    value = ingester.metrics.value
    assert after == before, f"hostile timestamps made {after - before} new shard(s)"
    errors = {k: value("compression_ingest_write_errors_total", kind=k) for k in ("client", "server", "connection")}
    assert errors == {"client": 0.0, "server": 0.0, "connection": 0.0}, f"failing writes: {errors}"
    assert value("compression_ingest_rejected_total", reason="influx_rejected") == 0
    dead = rows(influx.url, names.database, "SELECT * FROM rejected")
    got = sorted((str(d["channel"]), str(d["reason"])) for d in dead)
    assert got == sorted((channel, reason) for channel, _, reason in hostile), got
    assert all(d["device"] == device for d in dead)
    for reason in {r for _, _, r in hostile}:
        expected = sum(1 for _, _, r in hostile if r == reason)
        assert value("compression_ingest_rejected_total", reason=reason) == expected, reason
    stored = rows(influx.url, names.database, f"SELECT * FROM status, event WHERE device = '{device}'")
    assert stored == [], "nothing of the hostile status or events was stored as data"


def test_deeply_nested_json_is_an_ordinary_rejection(mosquitto: Mosquitto, influx: InfluxDB,
                                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    names = fresh_names("deep")
    root, device = names.topic_root, f"{names.prefix}-deep"
    deep = b"[" * 20_000 + b"]" * 20_000  # 40 KB, within the 64 KiB limit
    inside_sample = (b'{"v":1,"device_id":"%s","kind":"sock","seq":1,"samples":[{"t":%d,"worn":true,'
                     b'"pressure_mmhg":{},"x":%s}]}' % (device.encode(), now_ms(), deep))  # fmt: skip
    messages = [  # a bare array is judged by its type before its depth: invalid_structure, the others too_deep
        Outgoing(f"{root}/{device}/telemetry", deep, 0),
        Outgoing(f"{root}/{device}/telemetry", b'{"v":1,"x":' + deep + b"}", 0),
        Outgoing(f"{root}/{device}/telemetry", inside_sample, 0),
        Outgoing(f"{root}/{device}/event", b'{"v":1,"x":' + deep + b"}", 0),
        Outgoing(f"{root}/{device}/status", b'{"v":1,"state":"online","x":' + deep + b"}", 0),
    ]
    good = LoadSpec(devices=1, messages=2, samples=3, prefix=f"{names.prefix}-ok", topic_root=root)

    async def scenario() -> Ingester:
        async with running(settings_for(mosquitto, influx, names)) as ingester:
            await asyncio.to_thread(publish, mosquitto, names, messages + list(generate(good)))
            await wait_for_count(influx, names.database, "SELECT count(raw_bytes) FROM rejected", len(messages), 30)
            alive = f"SELECT count(worn) FROM sample WHERE device =~ /^{good.prefix}/"
            assert await wait_for_count(influx, names.database, alive, good.total_samples) == good.total_samples
            return ingester

    ingester = asyncio.run(scenario())
    dead = rows(influx.url, names.database, "SELECT * FROM rejected")
    assert sorted((str(d["device"]), str(d["channel"]), str(d["reason"])) for d in dead) == sorted(
        (device, m.topic.rsplit("/", 1)[1], "invalid_structure" if m.payload is deep else "too_deep") for m in messages
    )
    assert ingester.metrics.value("compression_ingest_rejected_total", reason="too_deep") == len(messages) - 1
    assert ingester.metrics.value("compression_ingest_rejected_total", reason="internal_error") == 0
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]


def publish_retained(mq: Mosquitto, topic: str, payload: bytes) -> None:
    endpoint = parse_mqtt_url(mq.url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"garment-{uuid.uuid4().hex[:8]}")
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_stale_retained_status_does_not_look_fresh(mosquitto: Mosquitto, influx: InfluxDB, protocol: str) -> None:
    names = fresh_names("retained")
    root = names.topic_root
    silent, stamped = f"{names.prefix}-silent", f"{names.prefix}-stamped"
    stamped_at = now_ms() - 3 * DAY_MS
    # A garment announced itself online (no t, as many do) and then went silent; another stamped its status.
    publish_retained(mosquitto, f"{root}/{silent}/status", b'{"v":1,"state":"online","battery_pct":80}')
    publish_retained(mosquitto, f"{root}/{stamped}/status", b'{"v":1,"state":"online","t":%d}' % stamped_at)
    time.sleep(1.0)  # the retained messages are old news by the time any ingester session starts

    async def session(client_id: str) -> None:
        async with running(settings_for(mosquitto, influx, names, mqtt_client_id=client_id,
                                        mqtt_protocol=protocol)) as ingester:  # fmt: skip
            assert await eventually(lambda: ingester.metrics.value("compression_ingest_messages_acked_total") >= 2)

    started = now_ms()
    for n in range(2):  # two new sessions (a new deployment, an expired session): two retained deliveries each
        asyncio.run(session(f"{names.client_id}-{n}"))
    since = f"time >= {started - 500}ms"
    fresh = rows(influx.url, names.database, f"SELECT last(state) AS state FROM status WHERE {since} GROUP BY device")
    assert fresh == [], f"a retained status was stored as if the garment had just spoken: {fresh}"
    (kept,) = rows(influx.url, names.database, f"SELECT * FROM status WHERE device = '{stamped}'")
    assert kept["time"] == stamped_at, "a retained status with its own t is stored at that t"
    marked = rows(influx.url, names.database, "SELECT * FROM status_retained")
    assert {str(m["device"]) for m in marked} == {silent}, "the untimed retained status is kept, marked, apart"
    assert all(m["state"] == "online" and m["battery_pct"] == 80 for m in marked)
