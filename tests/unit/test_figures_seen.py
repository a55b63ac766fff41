"""The workspace's figures: a last contact that moved alone is written by one statement, the rest kept."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from monitor import figures
from monitor.model import DayResult, DayStats, PatientContext, SockRx
from monitor.state import State

RX = SockRx(20.0, 30.0, 8.0, 7, ("ankle", "calf"))
NOW = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)


def test_only_the_last_contact_moves(tmp_path: Path) -> None:
    state = State(f"sqlite:///{tmp_path / 'monitor.db'}")
    figures.ensure_tables(state)
    ctx = PatientContext("P1", "bow", "America/Edmonton", "sock", RX, "ann@clinic.example", "Ann", ("d-p1",))
    days = [DayResult("P1", DayStats(date(2026, 12, 1) + timedelta(days=i), 0, 0, True, wear_s=9 * 3600.0),
                      ("compliant",)) for i in range(3)]  # fmt: skip
    first = int((NOW - timedelta(hours=2)).timestamp() * 1000)
    assert figures.record(state, [ctx], {"P1": days}, {"P1": first}, NOW) == 1
    before = figures.read(state, ["P1"])["P1"]
    later = int(NOW.timestamp() * 1000)
    assert figures.record_seen(state, {"P1": later, "P-UNKNOWN": later}) == 2  # an unknown patient changes nothing
    after = figures.read(state, ["P1"])
    assert after["P1"].last_seen_at == NOW and before.last_seen_at == NOW - timedelta(hours=2)
    assert after["P1"].wear_mean_7d_h == before.wear_mean_7d_h == 9.0
    assert set(after) == {"P1"}
