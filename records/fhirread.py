"""Read an exported Bundle back into figures, through the FHIR library's models (the round trip's other half).

:func:`read_days` parses a Bundle with ``fhirclient`` and takes each daily Observation's figures out of its
components by code; :func:`expected_days` gives the same projection of the read model, as the export rounds it.
The two are equal for every export (tests/unit/test_records_fhir.py), so nothing is lost on the way into a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

from records import codes as c
from records.fhir import Json, parse_bundle
from records.model import DayFigures, PatientRecord

MINUTE_DIGITS = 4  # the export's rounding of minutes (records.codes.quantity)


@dataclass(slots=True)
class DayRead:
    """One day's figures as a receiving system reads them (minutes, mm[Hg], counts)."""

    day: date
    points: int = 0
    wear_min: float = 0.0
    target_min: float | None = None
    target_met: bool | None = None
    median_mmhg: dict[str, float] = field(default_factory=dict)
    above_min: float | None = None
    below_min: float | None = None
    reversed_min: float | None = None
    sessions: int | None = None
    session_min: list[float] = field(default_factory=list)
    peak_mmhg: float | None = None
    flags: list[str] = field(default_factory=list)
    legs: dict[str, float] = field(default_factory=dict)  # leg -> wear minutes


def _code(concept: Any, system: str) -> str | None:
    for coding in concept.coding or []:
        if coding.system == system:
            return str(coding.code)
    return None


def read_days(data: Json) -> dict[date, DayRead]:
    """Every day's figures of an exported Bundle, parsed by the library."""
    model = parse_bundle(data)
    days: dict[date, DayRead] = {}
    legs: list[Any] = []
    for entry in model.entry or []:
        obs = entry.resource
        if obs is None or obs.resource_type != "Observation" or _code(obs.code, c.COMPRESSION) != "daily-use":
            continue
        if obs.bodySite is not None:
            legs.append(obs)
            continue
        day = obs.effectivePeriod.start.date
        read = DayRead(day.date() if hasattr(day, "date") else day)
        for comp in obs.component or []:
            _component(read, comp)
        read.flags = [f for f in (_code(i, c.FLAG) for i in obs.interpretation or []) if f]
        days[read.day] = read
    for obs in legs:
        day = obs.effectivePeriod.start.date
        key = day.date() if hasattr(day, "date") else day
        leg = (_code(obs.bodySite, c.COMPRESSION) or "").removeprefix("leg-")
        wear = next((comp.valueQuantity.value for comp in obs.component or []
                     if _code(comp.code, c.COMPRESSION) == "wear-time"), None)  # fmt: skip
        if key in days and wear is not None:
            days[key].legs[leg] = float(wear)
    return days


def _component(read: DayRead, comp: Any) -> None:
    code = _code(comp.code, c.COMPRESSION) or ""
    quantity = float(comp.valueQuantity.value) if comp.valueQuantity is not None else None
    if code == "data-points":
        read.points = int(comp.valueInteger)
    elif code == "wear-time" and quantity is not None:
        read.wear_min = quantity
        ranges = comp.referenceRange or []
        read.target_min = float(ranges[0].low.value) if ranges and ranges[0].low is not None else None
    elif code == "wear-target-met":
        read.target_met = bool(comp.valueBoolean)
    elif code.startswith("pressure-median-") and quantity is not None:
        read.median_mmhg[code.removeprefix("pressure-median-")] = quantity
    elif code == "time-above-band":
        read.above_min = quantity
    elif code == "time-below-band":
        read.below_min = quantity
    elif code == "reversed-gradient-time":
        read.reversed_min = quantity
    elif code == "sessions":
        read.sessions = int(comp.valueInteger)
    elif code == "session-duration" and quantity is not None:
        read.session_min.append(quantity)
    elif code == "peak-chamber-pressure":
        read.peak_mmhg = quantity


def _minutes(seconds: float) -> float:
    return round(seconds / 60.0, MINUTE_DIGITS)


def expected(d: DayFigures) -> DayRead:
    """What a receiving system must read of ``d`` (the export's rounding applied)."""
    sock = d.target_s is not None
    return DayRead(
        day=d.day, points=d.points, wear_min=_minutes(d.wear_s),
        target_min=_minutes(d.target_s) if d.target_s is not None else None, target_met=d.target_met,
        median_mmhg={z: round(v, MINUTE_DIGITS) for z, v in d.median_mmhg},
        above_min=_minutes(d.above_band_s) if sock else None, below_min=_minutes(d.below_band_s) if sock else None,
        reversed_min=_minutes(d.reversed_gradient_s) if sock else None, sessions=None if sock else d.sessions,
        session_min=[] if sock else [_minutes(s) for s in d.session_durations_s],
        peak_mmhg=None if sock or d.peak_mmhg is None else round(d.peak_mmhg, MINUTE_DIGITS), flags=list(d.flags),
        legs={leg.leg: _minutes(leg.wear_s) for leg in d.legs},
    )  # fmt: skip


def expected_days(record: PatientRecord) -> dict[date, DayRead]:
    """:func:`expected` of every day with data (the days the export has an Observation for)."""
    return {d.day: expected(d) for d in record.days if d.has_data}
