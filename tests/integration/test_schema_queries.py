"""The schema answers the next issues' questions in plain InfluxQL: daily wear in the clinic's time zone."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from compression.influxql import rows
from compression.localservers import InfluxDB, Mosquitto
from devices.protocol import Sample, Telemetry, encode, topic_for
from simulators.publisher import Outgoing, Publisher
from tests.integration.conftest import Names, running, settings_for, wait_for_count

pytestmark = pytest.mark.integration

ZONE = ZoneInfo("America/Edmonton")
# 2026-03-08 is a 23-hour day in Edmonton (daylight saving starts at 02:00).
DAYS = [datetime(2026, 3, 7, tzinfo=ZONE), datetime(2026, 3, 8, tzinfo=ZONE), datetime(2026, 3, 9, tzinfo=ZONE)]


def worn_day(device: str, root: str, day: datetime, seq0: int) -> list[Outgoing]:
    """Worn 08:00-18:00 local time, a sample a minute, ten samples a message; off at night."""
    start = day.replace(hour=8)
    out = []
    for m in range(60):
        first = start + timedelta(minutes=10 * m)
        samples = [Sample(t=int((first + timedelta(minutes=i)).timestamp() * 1000), worn=True,
                          pressure_mmhg={"ankle": 25.0, "calf": 19.0}) for i in range(10)]  # fmt: skip
        message = Telemetry(v=1, device_id=device, kind="sock", seq=seq0 + m, samples=samples)
        out.append(Outgoing(topic_for(device, "telemetry", root), encode(message), 10))
    night = int(day.replace(hour=22).timestamp() * 1000)
    off = [Sample(t=night + i * 60_000, worn=False, pressure_mmhg={"ankle": 0.0}) for i in range(10)]
    night_message = Telemetry(v=1, device_id=device, kind="sock", seq=seq0 + 60, samples=off)
    out.append(Outgoing(topic_for(device, "telemetry", root), encode(night_message), 10))
    return out


async def test_daily_wear_hours_in_the_clinic_time_zone(mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    device = f"{names.prefix}-0001"
    messages = [m for i, day in enumerate(DAYS) for m in worn_day(device, names.topic_root, day, 100 * i)]
    settings = settings_for(mosquitto, influx, names, max_age_s=20 * 365 * 86_400)
    async with running(settings):

        def publish() -> None:
            with Publisher(mosquitto.url, f"pub-{names.client_id}") as pub:
                pub.publish_all(messages)

        await asyncio.to_thread(publish)
        await wait_for_count(influx, names.database, "SELECT count(worn) FROM sample", 3 * 610)
    start = DAYS[0].astimezone(ZONE).isoformat()
    end = (DAYS[-1] + timedelta(days=1)).isoformat()
    q = (f"SELECT sum(worn_s) / 3600 AS hours FROM sample WHERE device = '{device}' "
         f"AND time >= '{start}' AND time < '{end}' GROUP BY time(1d) tz('America/Edmonton')")  # fmt: skip
    daily = rows(influx.url, names.database, q)
    assert [round(r["hours"], 6) for r in daily] == [10.0, 10.0, 10.0]
    day_starts = [datetime.fromtimestamp(r["time"] / 1000, ZONE) for r in daily]
    assert [d.date() for d in day_starts] == [d.date() for d in DAYS]
    assert all(d.hour == 0 for d in day_starts), "buckets start at local midnight, across the DST change"
