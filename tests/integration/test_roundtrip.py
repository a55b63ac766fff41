"""Round trip: N protocol-v1 messages in, exactly N x samples points out, field by field."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from compression.influxql import rows
from compression.localservers import InfluxDB, Mosquitto
from devices.protocol import Event, Status, Telemetry, encode, topic_for
from simulators.publisher import LoadSpec, Outgoing, Publisher, generate
from tests.integration.conftest import Names, running, settings_for, wait_for_count

pytestmark = pytest.mark.integration


def publish(mq: Mosquitto, messages: list[Outgoing], client_id: str) -> None:
    with Publisher(mq.url, client_id) as pub:
        report = pub.publish_all(messages)
    assert report.acked == len(messages)


async def test_every_sample_arrives_field_by_field(mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    spec = LoadSpec(devices=7, messages=9, samples=11, prefix=names.prefix, topic_root=names.topic_root)
    messages = list(generate(spec))
    async with running(settings_for(mosquitto, influx, names)) as ingester:
        await asyncio.to_thread(publish, mosquitto, messages, f"pub-{names.client_id}")
        count = await wait_for_count(influx, names.database, "SELECT count(ankle_mmhg) FROM sample",
                                     spec.total_samples)  # fmt: skip
    assert count == spec.total_samples == 7 * 9 * 11
    assert ingester.metrics.value("compression_ingest_samples_written_total") == spec.total_samples
    assert ingester.metrics.value("compression_ingest_messages_acked_total") == len(messages)

    stored = rows(influx.url, names.database, "SELECT * FROM sample")
    by_key = {(r["device"], r["time"]): r for r in stored}
    assert len(by_key) == spec.total_samples
    for out in messages:
        message = msgspec.json.decode(out.payload, type=Telemetry)
        for index, sample in enumerate(message.samples):
            point = by_key[(message.device_id, sample.t)]
            assert point["kind"] == "sock"
            assert point["ankle_mmhg"] == sample.pressure_mmhg["ankle"]
            assert point["calf_mmhg"] == sample.pressure_mmhg["calf"]
            assert point["thigh_mmhg"] == sample.pressure_mmhg["thigh"]
            assert "foot_mmhg" not in point and "knee_mmhg" not in point  # zones not sent, not stored
            assert point["skin_temp_c"] == sample.skin_temp_c
            assert point["worn"] is True
            assert point["worn_s"] == 60.0
            assert point["seq"] == message.seq
            last = index == len(message.samples) - 1
            assert point["battery_pct"] == (message.battery_pct if last else None)


async def test_events_and_status_are_stored(mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    device = f"boot{names.prefix[4:]}-01"
    t = int(time.time() * 1000) - 60_000
    start = Event(v=1, device_id=device, t=t, type="session_start", program="recovery", target_mmhg=60,
                  planned_s=1200)  # fmt: skip
    end = Event(v=1, device_id=device, t=t + 30_000, type="session_end", duration_s=1190,
                reason="completed")  # fmt: skip
    status = Status(v=1, state="online", fw="1.4.2", battery_pct=80, rssi_dbm=-67, t=t)
    messages = [
        Outgoing(topic_for(device, "event", names.topic_root), encode(start), 0),
        Outgoing(topic_for(device, "event", names.topic_root), encode(end), 0),
        Outgoing(topic_for(device, "status", names.topic_root), encode(status), 0),
    ]
    async with running(settings_for(mosquitto, influx, names)):
        await asyncio.to_thread(publish, mosquitto, messages, f"pub-{names.client_id}")
        assert await wait_for_count(influx, names.database, "SELECT count(count) FROM event", 2) == 2
        assert await wait_for_count(influx, names.database, "SELECT count(state) FROM status", 1) == 1
    events = {r["type"]: r for r in rows(influx.url, names.database, "SELECT * FROM event")}
    assert events["session_start"]["program"] == "recovery"
    assert events["session_start"]["target_mmhg"] == 60.0
    assert events["session_start"]["planned_s"] == 1200
    assert events["session_start"]["time"] == t
    assert events["session_end"]["duration_s"] == 1190
    assert events["session_end"]["reason"] == "completed"
    (stat,) = rows(influx.url, names.database, "SELECT * FROM status")
    assert stat["device"] == device and stat["state"] == "online" and stat["online"] is True
    assert stat["fw"] == "1.4.2" and stat["battery_pct"] == 80 and stat["rssi_dbm"] == -67 and stat["time"] == t


async def test_redelivery_does_not_double_count(mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    spec = LoadSpec(devices=2, messages=3, samples=5, prefix=names.prefix, topic_root=names.topic_root)
    messages = list(generate(spec))
    async with running(settings_for(mosquitto, influx, names)):
        # The same messages twice, as a broker redelivery after a lost ack would send them.
        await asyncio.to_thread(publish, mosquitto, messages + messages, f"pub-{names.client_id}")
        await wait_for_count(influx, names.database, "SELECT count(ankle_mmhg) FROM sample", spec.total_samples)
        await asyncio.sleep(0.5)
    assert rows(influx.url, names.database, "SELECT count(ankle_mmhg) FROM sample")[0]["count"] == spec.total_samples
    wear = rows(influx.url, names.database, "SELECT sum(worn_s) FROM sample")[0]["sum"]
    assert wear == spec.total_samples * 60.0
