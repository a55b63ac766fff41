"""The monitor's vocabulary: who is monitored against what, per-day statistics, flags and their severities."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date
from typing import Final, Literal

Severity = Literal["info", "warning", "critical"]

# Daily flags. The first block is the vocabulary of the simulators' ground truth (docs/ground-truth.md);
# the monitor implements exactly those definitions. The second block is the monitor's own.
SILENT: Final = "silent"
UNDER_USE: Final = "under_use"
TOO_TIGHT: Final = "too_tight"
ROLLED_DOWN: Final = "rolled_down"
WORN_OUT: Final = "worn_out"
BOOT_OVERPRESSURE: Final = "boot_overpressure"
BOOT_SHORT_SESSIONS: Final = "boot_short_sessions"
BOOT_MISSED_SESSIONS: Final = "boot_missed_sessions"
COMPLIANT: Final = "compliant"
TOO_LOOSE: Final = "too_loose"
BOOT_LONG_SESSIONS: Final = "boot_long_sessions"
# Live only (today's incomplete day), never a daily flag of the ground truth.
LOW_BATTERY: Final = "low_battery"

SEVERITY: Final[dict[str, Severity]] = {
    SILENT: "warning",
    UNDER_USE: "warning",
    TOO_TIGHT: "warning",
    ROLLED_DOWN: "warning",
    WORN_OUT: "info",
    BOOT_OVERPRESSURE: "critical",
    BOOT_SHORT_SESSIONS: "warning",
    BOOT_MISSED_SESSIONS: "warning",
    TOO_LOOSE: "info",
    BOOT_LONG_SESSIONS: "warning",
    LOW_BATTERY: "info",
}
# Safety flags are alerted the moment they are seen (also on the current, incomplete day).
SAFETY: Final = frozenset({BOOT_OVERPRESSURE})


def split_flag(flag: str) -> tuple[str, str]:
    """``rolled_down:right`` -> ``("rolled_down", "right")``; a flag of the patient has no leg (``""``)."""
    base, _, leg = flag.partition(":")
    return base, leg


def severity_of(flag: str) -> Severity:
    """A flag's severity (a leg's flag has its base flag's)."""
    return SEVERITY.get(split_flag(flag)[0], "info")


@dataclass(frozen=True, slots=True)
class SockRx:
    """A sock/stocking prescription as the monitor needs it."""

    low_mmhg: float
    high_mmhg: float
    wear_hours_per_day: float
    wear_days_per_week: int
    zones: tuple[str, ...]
    tolerance_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class BootRx:
    """A pneumatic boot prescription as the monitor needs it."""

    sessions_per_week: int
    session_min_s: float
    session_max_s: float
    max_chamber_mmhg: float
    zones: tuple[str, ...]


def describe_change(before: SockRx | BootRx, after: SockRx | BootRx) -> str:
    """What changed between two prescriptions, in a physio's words (``wear target 8 h -> 4 h``)."""
    if isinstance(before, SockRx) and isinstance(after, SockRx):
        pairs = [("wear target", f"{before.wear_hours_per_day:g} h", f"{after.wear_hours_per_day:g} h"),
                 ("wear days a week", f"{before.wear_days_per_week}", f"{after.wear_days_per_week}"),
                 ("ankle band", f"{before.low_mmhg:g}-{before.high_mmhg:g} mmHg",
                  f"{after.low_mmhg:g}-{after.high_mmhg:g} mmHg"),
                 ("time out of band allowed", f"{before.tolerance_s / 60:g} min", f"{after.tolerance_s / 60:g} min")]
    elif isinstance(before, BootRx) and isinstance(after, BootRx):
        pairs = [("sessions a week", f"{before.sessions_per_week}", f"{after.sessions_per_week}"),
                 ("session length", f"{before.session_min_s / 60:g}-{before.session_max_s / 60:g} min",
                  f"{after.session_min_s / 60:g}-{after.session_max_s / 60:g} min"),
                 ("maximum chamber pressure", f"{before.max_chamber_mmhg:g} mmHg", f"{after.max_chamber_mmhg:g} mmHg")]
    else:
        return "another kind of garment"
    changed = [f"{name} {old} -> {new}" for name, old, new in pairs if old != new]
    return ", ".join(changed) or "no change to the targets"


@dataclass(frozen=True, slots=True)
class RxVersion:
    """One version of a patient's prescription: what applied from ``valid_from`` to ``valid_to`` (inclusive)."""

    id: int
    valid_from: date
    valid_to: date | None
    rx: SockRx | BootRx

    def covers(self, day: date) -> bool:
        """Was this version in force on ``day``?"""
        return self.valid_from <= day and (self.valid_to is None or day <= self.valid_to)


LEGS: Final = ("left", "right", "both")


@dataclass(frozen=True, slots=True)
class Garment:
    """One assignment of a garment to the patient: device, the leg it is worn on ("" not recorded), when."""

    device: str
    leg: str
    from_ms: int
    to_ms: int | None


@dataclass(frozen=True, slots=True)
class PatientContext:
    """One monitored patient: pseudonymous code, clinic and its time zone, physio, prescription, devices.

    ``problems`` lists what keeps the patient from being evaluated fully (no
    physio, no prescription, a prescription missing a field): they are logged
    and flagged for the clinic, never a crash.
    """

    patient: str
    clinic: str
    timezone: str
    kind: Literal["sock", "boot"] | None
    rx: SockRx | BootRx | None
    physio_email: str | None
    physio_name: str | None
    devices: tuple[str, ...] = ()
    max_silence_hours: float = 24.0
    problems: tuple[str, ...] = ()
    # Every version of the prescription of this kind, oldest first; each day is judged against its own.
    # Empty (hand-made contexts): ``rx`` applies to every day.
    versions: tuple[RxVersion, ...] = ()
    garments: tuple[Garment, ...] = ()  # every assignment of a garment to the patient, oldest first

    def leg_of(self, device: str, start_ms: int, end_ms: int) -> str:
        """The leg ``device`` was worn on in ``[start_ms, end_ms)`` ("" when not recorded or not known)."""
        held = [g for g in self.garments if g.device == device and g.from_ms < end_ms
                and (g.to_ms is None or g.to_ms > start_ms)]  # fmt: skip
        return held[-1].leg if held else ""

    def version_on(self, day: date) -> RxVersion | None:
        """The prescription version in force on ``day`` (``None``: none, or no versions known)."""
        return next((v for v in self.versions if v.covers(day)), None)

    def rx_on(self, day: date) -> SockRx | BootRx | None:
        """The prescription a day is judged against: its version's, ``None`` before the first or in a gap."""
        if not self.versions:
            return self.rx
        version = self.version_on(day)
        return version.rx if version is not None else None

    def pinned(self, version: RxVersion) -> PatientContext:
        """This patient as if ``version`` applied to every day (what a day would have been under it)."""
        return replace(self, rx=version.rx, versions=())


@dataclass(slots=True)
class LegStats:
    """One leg's share of a day (socks): its garment's wear, pressure against the band, gradient, the weekly median
    test. The leg is "" when the registry does not record it (one garment: the patient's figures)."""

    samples: int = 0
    worn_samples: int = 0
    wear_s: float = 0.0
    ankle_samples: int = 0
    above_range_s: float = 0.0
    below_range_s: float = 0.0
    reversed_gradient_s: float = 0.0
    below_samples: int = 0
    below_max_mmhg: float | None = None
    not_below_min_mmhg: float | None = None
    ankle_median_mmhg: float | None = None
    ankle_median_7d_mmhg: float | None = None
    ankle_7d_below_low: bool | None = None


@dataclass(slots=True)
class DayStats:
    """What the stored data says about one patient's local day (times are epoch ms, durations seconds)."""

    day: date
    start_ms: int
    end_ms: int
    complete: bool
    points: int = 0  # samples + events + statuses stored with a time in the day
    statuses: int = 0  # of which status messages
    # boots: the device reported while idle (a status on a day without a session) in the 7 days before: a day
    # without any point is then silence; a boot that speaks only in sessions is resting on such a day
    reports_idle: bool = True
    samples: int = 0
    worn_samples: int = 0
    wear_s: float = 0.0
    # socks
    ankle_median_mmhg: float | None = None
    ankle_median_7d_mmhg: float | None = None
    above_range_s: float = 0.0
    below_range_s: float = 0.0
    reversed_gradient_s: float = 0.0
    # socks, the weekly median test of worn_out composed from daily counts (monitor.compliance.weekly_median_below)
    ankle_samples: int = 0  # worn samples with an ankle pressure
    below_samples: int = 0  # ... of which strictly below the band's low bound
    below_max_mmhg: float | None = None  # the highest of those below
    not_below_min_mmhg: float | None = None  # the lowest of those at or above the low bound
    ankle_7d_below_low: bool | None = None  # window d-6..d: median below the low bound (None: no worn sample)
    target_days_in_window: int = 0  # days of the window worn at least the prescribed hours
    target_days_required_in_window: int = 0  # ceil(wear_days_per_week x window_days / 7)
    window_days: int = 0  # days of the window from the patient's first day with data (at most 7)
    # boots
    peak_mmhg: float | None = None
    sessions_started: int = 0
    session_durations_s: list[float] = field(default_factory=list)
    sessions_in_window: int = 0
    sessions_required_in_window: int = 0
    battery_min_pct: float | None = None
    # socks, per leg ("left", "right", "both"; "" not recorded); wear_s above is the union of the legs' worn time
    legs: dict[str, LegStats] = field(default_factory=dict)
    wear_sum_s: float = 0.0  # the garments' worn seconds added up (more than wear_s when two were worn at once)
    worn_devices: set[str] = field(default_factory=set)  # garments with worn samples that day
    pipeline_outage: bool = False  # the pipeline was down for part of the day: missing data is not the patient's
    zone_medians: dict[str, float] = field(default_factory=dict)  # zone -> median pressure while worn (display)
    pending: bool = False  # its summary is stale and waits for a rebuild: the day is not judged until then


@dataclass(frozen=True, slots=True)
class DayResult:
    """One patient's evaluated day: its statistics and its sorted flags (``None`` for an incomplete day).

    ``judged``: the flags this day's data can judge, i.e. extend or end a run of (``None``: all of them);
    see ``monitor.episodes``: a silent day judges only ``silent``.
    """

    patient: str
    stats: DayStats
    flags: tuple[str, ...] | None
    judged: frozenset[str] | None = None
