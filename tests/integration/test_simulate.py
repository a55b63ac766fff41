"""Simulated fleets through the real broker, ingester and InfluxDB, graded by their ground truth."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from compression.influxql import rows
from compression.localservers import InfluxDB, Mosquitto
from devices.protocol import decode_telemetry
from simulators.run import RunOptions, run_fleet
from simulators.scenarios import Fleet, every_scenario
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
