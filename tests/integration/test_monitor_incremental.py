"""Incremental evaluation: after the first full read, only days with new data (the ingester's receipts) are re-read,
and the answer is the same as a full recomputation, late store-and-forward data included."""

from __future__ import annotations

import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from compression.influxql import rows
from compression.localservers import InfluxDB
from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from ingest.encode import receipt_lines
from monitor.app import Monitor
from monitor.compliance import day_stats, raw_day_stats
from monitor.settings import MonitorSettings
from tests.integration.conftest import Names

pytestmark = pytest.mark.integration
TZ = ZoneInfo("America/Edmonton")
SPAN = 30 + 6


def write(influx: InfluxDB, database: str, lines: list[str]) -> None:
    create = urllib.request.Request(f"{influx.url}/query", data=f"q=CREATE DATABASE {database}".encode())
    urllib.request.urlopen(create, timeout=30).close()
    request = urllib.request.Request(f"{influx.url}/write?db={database}&precision=ns", data="\n".join(lines).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 204


def worn_minutes(day: datetime, hour: int, minutes: int, ankle: float, received_ms: int) -> list[str]:
    """``minutes`` worn samples from ``hour`` local on ``day`` (one a minute), as the ingester writes them, with
    the receipts it adds."""
    start = day.replace(hour=hour)
    lines = [f"sample,clinic=bow,device=sock-0001,kind=sock,patient=PT-INC1 ankle_mmhg={ankle},calf_mmhg=20.0,"
             f"worn=true,worn_s=60.0,skin_temp_c=32.0,seq=1i,battery_pct=80i "
             f"{int((start + timedelta(minutes=i)).timestamp()) * 10**9}" for i in range(minutes)]  # fmt: skip
    return lines + receipt_lines(lines, len(lines), received_ms)


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    engine = make_engine(url)
    migrate(engine)
    reg = Registry(session_factory(engine))
    reg.create_clinic(SYSTEM, s.ClinicIn(code="bow", name="Bow", timezone="America/Edmonton"))
    reg.create_physio(SYSTEM, s.PhysioIn(clinic="bow", name="Ann", email="ann@bow.example"))
    reg.create_patient(SYSTEM, s.PatientIn(clinic="bow", code="PT-INC1", physio="ann@bow.example"))
    reg.create_device(SYSTEM, s.DeviceIn(device_id="sock-0001", clinic="bow", kind="sock"))
    since = datetime.now(UTC) - timedelta(days=60)
    reg.assign(SYSTEM, s.AssignmentIn(device_id="sock-0001", patient="PT-INC1", valid_from=since))
    reg.prescribe(SYSTEM, s.PrescriptionIn(patient="PT-INC1", garment_kind="sock", valid_from=since.date(),
                                           class_system="ral", class_name="2", wear_hours_per_day=8))  # fmt: skip
    engine.dispose()
    return url


async def test_late_data_is_reread_alone_and_gives_the_full_answer(
    influx: InfluxDB, names: Names, registry_url: str, tmp_path: Path
) -> None:
    now = datetime.now(TZ)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    received = int(now.timestamp() * 1000)
    lines = []
    for back in range(1, 12):
        lines += worn_minutes(today - timedelta(days=back), 9, 9 * 60, 27.0, received - 86_400_000)
    write(influx, names.database, lines)
    settings = MonitorSettings(influx_url=influx.url, influx_database=names.database,
                               registry_database_url=registry_url, write_flags=False, smtp_port=1,
                               state_database_url=f"sqlite:///{tmp_path / 'monitor.db'}")  # fmt: skip
    monitor = Monitor(settings)
    assert await monitor.evaluate_once()
    assert monitor.counters.last_read_days == {SPAN: 1}, "the first evaluation reads the whole window"
    assert monitor.counters.last_rebuilt == 12, "the days with readings (11 back to today) summarised from raw"
    assert await monitor.evaluate_once()
    assert monitor.counters.last_read_days == {} and monitor.counters.last_rebuilt == 0, "nothing new: nothing read"

    # A backlog for 5 days ago: 45 worn minutes above the class at night -> too_tight on that day.
    late_day = today - timedelta(days=5)
    late = worn_minutes(late_day, 22, 45, 40.0, int(datetime.now(UTC).timestamp() * 1000))
    write(influx, names.database, late)
    assert await monitor.evaluate_once()
    assert monitor.counters.last_read_days == {5: 1}, "re-read from the late day on, not the whole window"
    flags = {r.stats.day: r.flags for r in monitor._results["PT-INC1"]}
    assert flags[late_day.date()] == ("too_tight",)

    # The same backlog delivered again (a redelivery): same points, new receipts; the day is rebuilt, unchanged.
    before = [r.stats for r in monitor._results["PT-INC1"]]
    write(influx, names.database, worn_minutes(late_day, 22, 45, 40.0, int(datetime.now(UTC).timestamp() * 1000)))
    assert await monitor.evaluate_once()
    assert monitor.counters.last_rebuilt > 0
    assert [r.stats for r in monitor._results["PT-INC1"]] == before

    # Equal to a full recomputation from the raw samples, field by field (legs, medians, counts included) ...
    ctx = monitor._contexts[0]
    raw = await raw_day_stats(monitor.reader, names.database, [ctx], SPAN, medians=True)
    assert list(monitor._raw["PT-INC1"][1].values()) == raw["PT-INC1"]
    # ... and to what a new replica reads from the stored summaries: it rebuilds only the days from the late one
    # on, whose receipts are within summaries.MARGIN_MS of their summary (a reading may still have been on its way).
    fresh = Monitor(settings.model_copy(update={"state_database_url": f"sqlite:///{tmp_path / 'other.db'}"}))
    assert await fresh.evaluate_once()
    assert fresh.counters.summaries_read == 12 and fresh.counters.last_rebuilt == 6
    assert [r.stats for r in fresh._results["PT-INC1"]] == before
    full = await day_stats(monitor.reader, names.database, monitor._contexts[:1], settings.days_back)
    # The read-only path of the workspace and the exports (no ingest heartbeat here: the monitor marks an outage).
    assert [replace(d, pipeline_outage=d.complete) for d in full["PT-INC1"]] == before
    monitor.state.close()
    fresh.state.close()


async def test_registry_problems_are_flagged_for_the_clinic(
    influx: InfluxDB, names: Names, registry_url: str, tmp_path: Path
) -> None:
    engine = make_engine(registry_url)
    reg = Registry(session_factory(engine))
    reg.create_patient(SYSTEM, s.PatientIn(clinic="bow", code="PT-ORPHAN", display_name="Jane Example"))
    engine.dispose()
    write(influx, names.database, [])
    settings = MonitorSettings(influx_url=influx.url, influx_database=names.database,
                               registry_database_url=registry_url, smtp_port=1,
                               state_database_url=f"sqlite:///{tmp_path / 'monitor.db'}")  # fmt: skip
    monitor = Monitor(settings)
    assert await monitor.evaluate_once()
    found = rows(influx.url, names.database, "SELECT problems, count FROM registry_problem GROUP BY patient")
    assert [(r["patient"], r["count"]) for r in found] == [("PT-ORPHAN", 3)]
    assert "no responsible physio" in found[0]["problems"] and "Jane" not in found[0]["problems"]
    monitor.state.close()
