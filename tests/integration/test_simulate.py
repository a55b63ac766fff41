"""Simulated fleets through the real broker, ingester and InfluxDB, graded by their ground truth."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
import pytest

from compression.influxql import rows
from compression.localservers import BrokerAccess, InfluxDB, Mosquitto, start_mosquitto
from devices.protocol import decode_telemetry
from simulators.run import RunOptions, run_fleet
from simulators.scenarios import Device, Fleet, Period, SimMessage, build_fleet, every_scenario
from tests.integration.conftest import Names, running, settings_for, wait_for_count

pytestmark = pytest.mark.integration


def patients(truth: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["device_id"]: p for p in truth["patients"]}


def sample_times(fleet: Fleet, device_id: str) -> list[int]:
    """Every valid sample time a device sent (bad payloads left out)."""
    (device,) = [d for d in fleet.devices if d.device_id == device_id]
    times = []
    for message in fleet.device_messages(device):
        if message.channel == "telemetry" and message.expected_reason is None:
            decoded = decode_telemetry(message.payload, device_id, message.publish_at_ms + 1)
            times += [s.t for s in decoded.message.samples]
    return times


async def test_every_scenario_14_day_backfill_lands_complete(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names
) -> None:
    fleet = every_scenario(seed=7, days=14, end=datetime.now(UTC))
    truth = fleet.ground_truth()
    expected = patients(truth)
    total = sum(p["transport"]["samples_stored"] for p in expected.values())
    options = RunOptions(mosquitto.url, connections=3, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    async with running(settings_for(mosquitto, influx, names)):
        report = await asyncio.to_thread(run_fleet, fleet, options)
        assert report.acked == report.messages and report.dropped == 0
        stored = await wait_for_count(influx, names.database, "SELECT count(worn) FROM sample", total, timeout=180)
    assert stored == total

    per_device = rows(influx.url, names.database, "SELECT count(worn) AS n FROM sample GROUP BY device")
    assert {r["device"]: r["n"] for r in per_device} == {
        d: p["transport"]["samples_stored"] for d, p in expected.items() if p["transport"]["samples_stored"]
    }

    # Wear per local day, exactly as the ground truth counts it.
    for device, patient in expected.items():
        q = (f"SELECT sum(worn_s) AS s FROM sample WHERE device = '{device}' AND time >= {truth['start_ms']}ms "
             f"AND time < {truth['end_ms']}ms GROUP BY time(1d) tz('{truth['timezone']}')")  # fmt: skip
        wear = {r["time"]: r["s"] or 0.0 for r in rows(influx.url, names.database, q)}
        for day in patient["days"]:
            if day["complete"]:
                assert wear.get(day["start_ms"], 0.0) == pytest.approx(day["wear_s"], abs=1e-6), (device, day["date"])

    # bad_firmware: every malformed payload rejected with the reason the ground truth names.
    dead = rows(influx.url, names.database, "SELECT count(raw_bytes) AS n FROM rejected GROUP BY device, reason")
    got: dict[str, Counter[str]] = {}
    for r in dead:
        got.setdefault(r["device"], Counter())[r["reason"]] = r["n"]
    want = {d: Counter(p["rejections"]) for d, p in expected.items() if p["rejections"]}
    assert got == want
    assert any(p["scenario"] == "bad_firmware" for p in expected.values() if p["rejections"])

    # offline_backfill: the late upload is stored with the original timestamps.
    (late,) = [p for p in expected.values() if p["scenario"] == "offline_backfill"]
    offline = late["transport"]["offline"]
    sent = [t for t in sample_times(fleet, late["device_id"]) if offline["from_ms"] <= t < offline["until_ms"]]
    q = (f"SELECT count(worn) AS n FROM sample WHERE device = '{late['device_id']}' "
         f"AND time >= {offline['from_ms']}ms AND time < {offline['until_ms']}ms")  # fmt: skip
    assert sent and rows(influx.url, names.database, q)[0]["n"] == len(sent)
    assert offline["late_messages"] > 0


@dataclass
class RetimedFleet:
    """A real fleet's first messages, re-timed to fall due during the test (live pacing)."""

    devices: tuple[Device, ...]
    seed: int
    period: Period
    items: list[SimMessage]

    def messages(self) -> Iterator[SimMessage]:
        return iter(self.items)


async def test_live_mode_sends_each_message_when_it_falls_due(mosquitto: Mosquitto, names: Names) -> None:
    fleet = build_fleet(socks=1, boots=0, seed=5, days=1, end=datetime.now(UTC), scenarios=["compliant"])
    now_ms = int(time.time() * 1000)
    items = [replace(m, publish_at_ms=now_ms + 500 * i) for i, m in enumerate(list(fleet.messages())[:6])]
    live = RetimedFleet(fleet.devices, fleet.seed, fleet.period, items)
    options = RunOptions(mosquitto.url, connections=1, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    seen: list[tuple[int, float]] = []

    def record(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        seen.append((msgspec.json.decode(message.payload).get("seq", -1), time.time() * 1000))

    watcher = paho.Client(paho.CallbackAPIVersion.VERSION2)
    watcher.on_message = record
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.subscribe(f"{names.topic_root}/+/telemetry", qos=1)
    watcher.loop_start()
    try:
        await asyncio.sleep(0.3)
        report = await asyncio.to_thread(run_fleet, live, options, True)  # type: ignore[arg-type]
        assert report.acked == report.messages == len(items)
        await asyncio.sleep(0.3)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    telemetry = [m for m in items if m.channel == "telemetry"]
    assert len(seen) == len(telemetry)
    for (_, arrived), message in zip(seen, telemetry, strict=True):
        assert arrived >= message.publish_at_ms - 5, "sent before it fell due"
        assert arrived < message.publish_at_ms + 1500, "sent long after it fell due"


async def test_gateways_log_in_with_their_own_credentials(
    influx: InfluxDB, names: Names, tmp_path: Path, servers_root: Path
) -> None:
    fleet = build_fleet(socks=2, boots=1, seed=9, days=1, end=datetime.now(UTC))
    gateways = [f"gw-{names.prefix}-{fleet.seed}-{i}" for i in range(2)]
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "ingest", "ingest-pw"], check=True)
    for gateway in gateways:
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), gateway, f"pw-{gateway}"], check=True)
    broker = start_mosquitto(servers_root, access=BrokerAccess(password_file=passwd))
    try:
        credentials = {g: f"pw-{g}" for g in gateways}
        options = RunOptions(broker.url, connections=2, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}",
                             credentials=credentials)  # fmt: skip
        ingest_url = f"mqtt://ingest:ingest-pw@127.0.0.1:{broker.port}"
        async with running(settings_for(broker, influx, names, mqtt_url=ingest_url)):
            report = await asyncio.to_thread(run_fleet, fleet, options)
            expected = sum(p["transport"]["samples_stored"] for p in fleet.ground_truth()["patients"])
            stored = await wait_for_count(influx, names.database, "SELECT count(worn) FROM sample", expected)
        assert report.acked == report.messages and stored == expected
    finally:
        broker.stop()
