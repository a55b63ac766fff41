"""One patient's day series for the patient page, from InfluxDB, computed by the monitor's own functions.

The wear, out-of-band and reversed-gradient seconds, sessions and flags of each day come from
``monitor.compliance.day_stats`` and ``flags_for`` (the very functions the monitor evaluates with), so the charts
show the monitor's figures for the same patient-days; the ankle range per day, the gradient while reversed and
each boot session's chamber peaks come from ``monitor.evidence.measure``. One patient over a few weeks is a
handful of small statements (tens of milliseconds on InfluxDB 1.6).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

from monitor import evidence as ev
from monitor import queries as q
from monitor.compliance import InfluxReader, day_stats, flags_for
from monitor.model import PatientContext

MIN_DAYS: Final = 7
MAX_DAYS: Final = 90
_DEVICE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")  # the protocol's device ids
PERIODS: Final[tuple[tuple[int, str], ...]] = ((14, "2 weeks"), (42, "6 weeks"), (90, "3 months"))


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A garment's last status message: online or not, firmware, battery, signal, when."""

    device: str
    state: str | None
    firmware: str | None
    battery_pct: float | None
    rssi_dbm: float | None
    at: datetime


@dataclass(frozen=True, slots=True)
class PatientSeries:
    """Each local day of the period (oldest first, today last): the monitor's figures, flags, ankle median."""

    days: tuple[ev.DayFigures, ...]
    flags: dict[date, tuple[str, ...] | None]
    ankle_median: dict[date, float]
    measured: ev.Measured
    status: tuple[DeviceStatus, ...] = field(default=())

    @property
    def first(self) -> date:
        return self.days[0].day

    @property
    def last(self) -> date:
        return self.days[-1].day


def clamp_days(days: int) -> int:
    """The period asked for, within what the page offers."""
    return max(MIN_DAYS, min(MAX_DAYS, days))


def status_statement(patient: str, start_ms: int, end_ms: int) -> str:
    """Each garment's newest status message in the period."""
    return (f"SELECT last(state) AS state FROM status WHERE {q.patient_filter([patient])} AND "
            f"{q.time_range(start_ms, end_ms)} GROUP BY device")  # fmt: skip


def status_detail_statement(patient: str, device: str, at_ms: int) -> str:
    """The fields of one status point."""
    return (f"SELECT state, fw, battery_pct, rssi_dbm FROM status WHERE {q.patient_filter([patient])} AND "
            f"device = '{device}' AND time = {int(at_ms)}ms")  # fmt: skip


def _statuses(answer: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in answer:
        device = (s.get("tags") or {}).get("device")
        if device and s.get("values") and _DEVICE.match(device):
            out[device] = int(s["values"][0][0])
    return out


async def _device_status(reader: InfluxReader, database: str, patient: str, start_ms: int,
                         end_ms: int) -> tuple[DeviceStatus, ...]:  # fmt: skip
    newest = _statuses((await reader.run(database, [status_statement(patient, start_ms, end_ms)]))[0])
    if not newest:
        return ()
    answers = await reader.run(database, [status_detail_statement(patient, d, t) for d, t in newest.items()])
    found = []
    for (device, at), series in zip(newest.items(), answers, strict=True):
        row = dict(zip(series[0]["columns"], series[0]["values"][0], strict=True)) if series else {}
        found.append(DeviceStatus(device, row.get("state"), row.get("fw"), _num(row.get("battery_pct")),
                                  _num(row.get("rssi_dbm")), datetime.fromtimestamp(at / 1000, UTC)))  # fmt: skip
    return tuple(sorted(found, key=lambda s: s.device))


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


async def load(reader: InfluxReader, database: str, ctx: PatientContext, days: int,
               now_ms: int | None = None) -> PatientSeries:  # fmt: skip
    """The last ``days`` local days of ``ctx``'s patient up to today."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    stats = (await day_stats(reader, database, [ctx], clamp_days(days) - 1, now_ms, medians=True))[ctx.patient]
    results = flags_for(ctx, stats)
    figures = tuple(ev.day_figures(s) for s in stats)
    measured = await ev.measure(reader, database, ctx.patient, ctx.timezone, ctx.kind, figures[0].day,
                                figures[-1].day)  # fmt: skip
    status = await _device_status(reader, database, ctx.patient, stats[0].start_ms, now_ms + 300_000)
    return PatientSeries(days=figures, flags={r.stats.day: r.flags for r in results},
                         ankle_median={s.day: s.ankle_median_mmhg for s in stats if s.ankle_median_mmhg is not None},
                         measured=measured, status=status)  # fmt: skip
