"""The read model of a patient's record for a period: everything the FHIR export and the monthly report read.

Plain frozen dataclasses, filled by the adapters in :mod:`records.sources` (today: the registry's service and the
monitor's compliance computation and state database). Nothing here knows where the figures come from, so the
adapters can be re-pointed (prescription versions of issue 11, the persisted day summaries of issue 13) without
touching the export or the report.

Units are the platform's own: durations in seconds, pressures in mmHg, days are the clinic's local days.
Nothing here names the patient: ``PatientRef.code`` is the pseudonymous code; ``display_name`` is filled only for
a clinic that configured it (``RecordsSettings.names_for_clinics``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Final, Literal

Leg = Literal["left", "right", "both"]
GarmentKind = Literal["sock", "boot"]
LEGS: Final[tuple[Leg, ...]] = ("left", "right", "both")
# The longest period one export or report covers: a quarter and a bit (a year of daily Observations is for a bulk
# export, not for one request that recomputes every day from the telemetry).
MAX_PERIOD_DAYS: Final = 92


class PeriodError(ValueError):
    """A period that is not one: its end before its start, or longer than :data:`MAX_PERIOD_DAYS`."""


@dataclass(frozen=True, slots=True)
class Period:
    """Local days ``start`` to ``end``, both included."""

    start: date
    end: date

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise PeriodError(f"the period ends ({self.end}) before it starts ({self.start})")
        if self.length > MAX_PERIOD_DAYS:
            raise PeriodError(f"a period is at most {MAX_PERIOD_DAYS} days ({self.start} to {self.end} is "
                              f"{self.length})")  # fmt: skip

    @property
    def length(self) -> int:
        """Number of days."""
        return (self.end - self.start).days + 1

    def days(self) -> Iterator[date]:
        """Every day of the period, in order."""
        for n in range(self.length):
            yield self.start + timedelta(days=n)

    @classmethod
    def month(cls, text: str) -> Period:
        """The calendar month ``YYYY-MM``."""
        try:
            first = datetime.strptime(text, "%Y-%m").date()
        except ValueError as exc:
            raise PeriodError(f"not a month (YYYY-MM): {text!r}") from exc
        following = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
        return cls(first, following - timedelta(days=1))


@dataclass(frozen=True, slots=True)
class PatientRef:
    """Who the record is about: the pseudonymous code, the clinic and its time zone (which defines the days)."""

    code: str
    clinic: str
    clinic_name: str
    timezone: str
    display_name: str | None = None  # only for a clinic that configured names to leave the registry


@dataclass(frozen=True, slots=True)
class Garment:
    """A garment the patient held during the period."""

    device_id: str
    kind: str  # "sock" or "boot"
    zones: tuple[str, ...]
    serial: str = ""
    firmware: str = ""
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class GarmentUse:
    """One assignment: the garment worn by the patient from ``start`` until ``end`` (open while ``None``)."""

    id: int
    device_id: str
    start: datetime
    end: datetime | None
    leg: Leg | None = None  # None: not recorded


@dataclass(frozen=True, slots=True)
class PrescriptionVersion:
    """One version of a prescription, in force from ``valid_from`` to ``valid_to`` (inclusive; open while ``None``)."""

    id: int
    kind: str  # "sock" or "boot"
    valid_from: date
    valid_to: date | None
    created_at: datetime
    class_system: str | None = None
    class_name: str | None = None
    band_low_mmhg: float | None = None
    band_high_mmhg: float | None = None
    zones: tuple[str, ...] = ()
    wear_hours_per_day: float | None = None
    wear_days_per_week: int | None = None
    sessions_per_week: int | None = None
    session_min_minutes: float | None = None
    session_max_minutes: float | None = None
    max_chamber_mmhg: float | None = None
    tolerance_minutes: float = 30.0
    leg: Leg | None = None
    supersedes: int | None = None  # the version this one replaced

    def covers(self, day: date) -> bool:
        """In force on ``day``?"""
        return self.valid_from <= day and (self.valid_to is None or day <= self.valid_to)

    def overlaps(self, period: Period) -> bool:
        """In force on any day of ``period``?"""
        return self.valid_from <= period.end and (self.valid_to is None or self.valid_to >= period.start)


@dataclass(frozen=True, slots=True)
class LegFigures:
    """One leg's share of a sock day (issue 11's laterality): its garment's wear, pressure and gradient."""

    leg: Leg
    wear_s: float
    above_band_s: float = 0.0
    below_band_s: float = 0.0
    reversed_gradient_s: float = 0.0
    median_mmhg: tuple[tuple[str, float], ...] = ()  # (zone, median of the worn samples)


@dataclass(frozen=True, slots=True)
class DayFigures:
    """One patient-day as the monitor computes it (the same statistics its flags are judged on).

    ``points`` counts every stored reading of the day (samples, events, statuses): a day "with data" has one.
    ``wear_s`` is the union of the legs' worn time. ``median_mmhg`` holds each zone's median over the worn
    samples (socks). ``flags`` are the monitor's daily flags (``compliant`` when none holds; empty when the day
    could not be judged). ``target_s`` is the wear target of the prescription the day was judged against.
    """

    day: date
    start: datetime  # local midnight, aware
    end: datetime
    points: int
    wear_s: float
    target_s: float | None = None
    band_low_mmhg: float | None = None
    band_high_mmhg: float | None = None
    median_mmhg: tuple[tuple[str, float], ...] = ()
    above_band_s: float = 0.0
    below_band_s: float = 0.0
    reversed_gradient_s: float = 0.0
    sessions: int = 0
    session_durations_s: tuple[float, ...] = ()
    peak_mmhg: float | None = None
    max_chamber_mmhg: float | None = None
    flags: tuple[str, ...] = ()
    legs: tuple[LegFigures, ...] = ()

    @property
    def has_data(self) -> bool:
        """Did anything of the patient's garments reach the platform that day?"""
        return self.points > 0

    @property
    def target_met(self) -> bool | None:
        """Worn at least the target (``None``: no wear target, e.g. a boot)."""
        return None if self.target_s is None else self.wear_s >= self.target_s

    def median(self, zone: str) -> float | None:
        """The median pressure of ``zone`` (``None``: not measured that day)."""
        return dict(self.median_mmhg).get(zone)


@dataclass(frozen=True, slots=True)
class EpisodeAction:
    """Something a physio did about an episode (acknowledged, snoozed, noted, handed over), or the monitor's note."""

    kind: str  # "acknowledge", "snooze", "note", "handover", "monitor"
    at: datetime
    by: str  # the physio's display name, or "monitor"
    note: str = ""
    until: date | None = None  # a snooze's last day
    to: str | None = None  # a hand-over's new physio


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """A flag's run over days, as the monitor keeps it: open while ``end_day`` is ``None``."""

    id: int
    flag: str
    severity: str  # "info", "warning", "critical"
    start_day: date
    last_day: date
    end_day: date | None
    actions: tuple[EpisodeAction, ...] = ()

    @property
    def open(self) -> bool:
        """Still going on."""
        return self.end_day is None

    def touches(self, period: Period) -> bool:
        """Held on any day of ``period`` (an open episode goes on to today)?"""
        last = self.end_day - timedelta(days=1) if self.end_day else date.max
        return self.start_day <= period.end and last >= period.start


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """Everything exported for one patient and period."""

    patient: PatientRef
    period: Period
    generated_at: datetime
    garments: tuple[Garment, ...] = ()
    uses: tuple[GarmentUse, ...] = ()
    prescriptions: tuple[PrescriptionVersion, ...] = ()
    days: tuple[DayFigures, ...] = ()  # every complete day of the period, in order
    episodes: tuple[EpisodeRecord, ...] = ()
    problems: tuple[str, ...] = field(default=())  # what kept the figures from being complete, in words

    def garment(self, device_id: str) -> Garment | None:
        """The garment with this id, if it is in the record."""
        return next((g for g in self.garments if g.device_id == device_id), None)

    def prescription_on(self, day: date, kind: str | None = None) -> PrescriptionVersion | None:
        """The version in force on ``day`` (of ``kind``, if given)."""
        return next((p for p in self.prescriptions if p.covers(day) and (kind is None or p.kind == kind)), None)
