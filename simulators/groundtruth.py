"""Ground truth: what the platform must conclude from what a simulated device sent.

Computed from the generated messages themselves, through the same rules the
ingester applies (validation reasons, the time window, ``worn_s`` from
:func:`ingest.encode.wear_seconds`), so it is exact for what gets stored. The
flags follow the definitions in ``docs/ground-truth.md``; every constant of
those definitions is here, named.
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final, Literal

from devices.protocol import DEFAULT_MAX_AGE_MS, DEFAULT_MAX_FUTURE_MS, Event, Kind, Sample, Status, Telemetry
from ingest.encode import DEFAULT_MAX_WEAR_GAP_S, wear_seconds
from simulators.garments import Item, Period
from simulators.physiology import BootPrescription, SockPrescription

Mode = Literal["backfill", "live"]
MODES: Final = ("backfill", "live")

FORMAT: Final = "compression-ground-truth/1"
SUSTAINED_S: Final = 1800.0
GRADIENT_MMHG: Final = 3.0
WORN_OUT_WINDOW_DAYS: Final = 7
SESSION_WINDOW_DAYS: Final = 7

FLAGS: Final = (
    "compliant", "under_use", "worn_out", "too_tight", "too_loose", "rolled_down", "boot_overpressure",
    "boot_short_sessions", "boot_long_sessions", "boot_missed_sessions", "silent",
)  # fmt: skip


def rules() -> dict[str, Any]:
    """The constants the truth was computed with (written into every ground-truth file)."""
    return {
        "max_wear_gap_s": DEFAULT_MAX_WEAR_GAP_S,
        "max_future_ms": DEFAULT_MAX_FUTURE_MS,
        "max_age_ms": DEFAULT_MAX_AGE_MS,
        "sustained_s": SUSTAINED_S,
        "gradient_mmhg": GRADIENT_MMHG,
        "worn_out_window_days": WORN_OUT_WINDOW_DAYS,
        "session_window_days": SESSION_WINDOW_DAYS,
    }


@dataclass(slots=True)
class Stored:
    """What the ingester keeps of one device's messages, and what it rejects."""

    kind: Kind
    times: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    worn_s: list[float] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    rejections: Counter[str] = field(default_factory=Counter)
    bad_payloads: list[dict[str, Any]] = field(default_factory=list)


def time_reason(t: int, received_ms: int) -> str | None:
    """The ingester's time-window rule (default window) for a timestamp received at ``received_ms``."""
    if t > received_ms + DEFAULT_MAX_FUTURE_MS:
        return "timestamp_in_future"
    if t < received_ms - DEFAULT_MAX_AGE_MS:
        return "timestamp_too_old"
    return None


def received_at(item: Item, mode: Mode, period: Period) -> int:
    """When the ingester receives ``item``: at ``publish_at_ms`` live; at the period's end in a backfill.

    A backfill runner publishes after ``end``; any receive time from ``end``
    up to 30 days after the first sample gives the same result, because no
    timestamp a scenario produces lies near the window's edges then.
    """
    return item.publish_at_ms if mode == "live" else max(period.end_ms, item.publish_at_ms)


def store(items: Iterable[Item], kind: Kind, mode: Mode, period: Period) -> Stored:
    """Apply the ingester's rules to a device's messages."""
    out = Stored(kind)
    pending: list[tuple[int, Sample, float]] = []
    for item in items:
        now = received_at(item, mode, period)
        if isinstance(item.message, Telemetry):
            pending.extend(_store_telemetry(out, item, now))
        elif isinstance(item.message, Event):
            reason = time_reason(item.message.t, now)
            if reason is None:
                out.events.append(item.message)
            else:
                out.rejections[reason] += 1
        else:
            out.statuses.append(item.message)
    pending.sort(key=lambda p: p[0])
    out.times = [p[0] for p in pending]
    out.samples = [p[1] for p in pending]
    out.worn_s = [p[2] for p in pending]
    return out


def _store_telemetry(out: Stored, item: Item, now: int) -> list[tuple[int, Sample, float]]:
    message = item.message
    assert isinstance(message, Telemetry)
    if item.whole_reason is not None:
        out.rejections[item.whole_reason] += 1
        _note_bad(out, item, 0, [item.whole_reason])
        return []
    candidates = item.kept if item.kept is not None else message.samples
    reasons = [reason for _, reason in item.sample_reasons]
    kept = []
    for sample in candidates:
        late = time_reason(sample.t, now)
        if late is None:
            kept.append(sample)
        else:
            reasons.append(late)
    out.rejections.update(reasons)
    if item.raw is not None:
        _note_bad(out, item, len(kept), reasons)
    if not kept:
        return []
    # The ingester sorts a message's samples by time before computing worn_s.
    kept.sort(key=lambda s: s.t)
    spans = wear_seconds([s.t for s in kept], message.kind, DEFAULT_MAX_WEAR_GAP_S)
    return [(s.t, s, span if s.worn else 0.0) for s, span in zip(kept, spans, strict=True)]


def _note_bad(out: Stored, item: Item, kept: int, reasons: list[str]) -> None:
    message = item.message
    assert isinstance(message, Telemetry)
    out.bad_payloads.append({
        "label": item.label,
        "publish_at_ms": item.publish_at_ms,
        "seq": message.seq,
        "whole_reason": item.whole_reason,
        "sample_rejections": [{"index": i, "reason": r} for i, r in item.sample_reasons],
        "samples_in_payload": len(message.samples),
        "samples_kept": kept,
        "reasons": sorted(reasons),
    })  # fmt: skip


# --- per-day evaluation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DaySlice:
    """One local day's stored data of a device."""

    day: date
    start_ms: int
    end_ms: int
    complete: bool
    samples: list[Sample]
    worn_s: list[float]
    events: list[Event]
    points: int

    @property
    def wear_s(self) -> float:
        """Seconds of wear stored for the day (the sum of ``worn_s``)."""
        return sum(self.worn_s, 0.0)

    def worn_ankles(self) -> list[float]:
        """Ankle pressure of the day's worn samples."""
        return [s.pressure_mmhg["ankle"] for s in self.samples if s.worn and "ankle" in s.pressure_mmhg]

    def worn_seconds_where(self, pick: Any) -> float:
        """Seconds of wear of the day's samples for which ``pick(sample)`` holds."""
        return sum((span for s, span in zip(self.samples, self.worn_s, strict=True) if s.worn and pick(s)), 0.0)


def slice_days(stored: Stored, period: Period) -> list[DaySlice]:
    """Stored data cut into the period's local days (daylight-saving days have 23 or 25 hours)."""
    event_times = sorted(e.t for e in stored.events)
    status_times = sorted(s.t for s in stored.statuses if s.t is not None)
    days = []
    for day in period.days:
        bounds = period.day_bounds(day)
        lo, hi = (bisect.bisect_left(stored.times, x) for x in (bounds.start_ms, bounds.end_ms))
        events = [e for e in stored.events if bounds.start_ms <= e.t < bounds.end_ms]
        points = hi - lo + len(events) + _count_in(status_times, bounds.start_ms, bounds.end_ms)
        assert len(events) == _count_in(event_times, bounds.start_ms, bounds.end_ms)
        days.append(DaySlice(day, bounds.start_ms, bounds.end_ms, bounds.end_ms <= period.end_ms,
                             stored.samples[lo:hi], stored.worn_s[lo:hi], events, points))  # fmt: skip
    return days


def _count_in(times: list[int], lo: int, hi: int) -> int:
    return bisect.bisect_left(times, hi) - bisect.bisect_left(times, lo)


def _sock_day(rx: SockPrescription, days: list[DaySlice], i: int) -> dict[str, Any]:
    day = days[i]
    band = rx.pressure_class
    window = [a for d in days[max(0, i - WORN_OUT_WINDOW_DAYS + 1) : i + 1] for a in d.worn_ankles()]
    median_7d = statistics.median(window) if window else None
    above = day.worn_seconds_where(lambda s: s.pressure_mmhg["ankle"] > band.high_mmhg)
    below = day.worn_seconds_where(lambda s: s.pressure_mmhg["ankle"] < band.low_mmhg)
    reversed_ = day.worn_seconds_where(lambda s: s.pressure_mmhg["calf"] - s.pressure_mmhg["ankle"] > GRADIENT_MMHG)
    flags = []
    if day.wear_s < rx.wear_hours_per_day * 3600:
        flags.append("under_use")
    if median_7d is not None and median_7d < band.low_mmhg:
        flags.append("worn_out")
    if above > SUSTAINED_S:
        flags.append("too_tight")
    if below > SUSTAINED_S:
        flags.append("too_loose")
    if reversed_ > SUSTAINED_S:
        flags.append("rolled_down")
    ankles = day.worn_ankles()
    return {
        "ankle_median_mmhg": _r(statistics.median(ankles)) if ankles else None,
        "ankle_median_7d_mmhg": _r(median_7d) if median_7d is not None else None,
        "above_range_s": _r(above),
        "below_range_s": _r(below),
        "reversed_gradient_s": _r(reversed_),
        "_flags": flags,
    }


def _boot_day(rx: BootPrescription, days: list[DaySlice], i: int) -> dict[str, Any]:
    day = days[i]
    ends = [e for e in day.events if e.type == "session_end"]
    peak = max((max(s.pressure_mmhg.values()) for s in day.samples), default=None)
    first = max(0, i - SESSION_WINDOW_DAYS + 1)
    started = sum(1 for d in days[first : i + 1] for e in d.events if e.type == "session_start")
    required = rx.sessions_per_week * (i + 1 - first) // 7
    flags = []
    if peak is not None and peak > rx.max_mmhg:
        flags.append("boot_overpressure")
    if any(e.duration_s is not None and e.duration_s < rx.session_min_s for e in ends):
        flags.append("boot_short_sessions")
    if any(e.duration_s is not None and e.duration_s > rx.session_max_s for e in ends):
        flags.append("boot_long_sessions")
    if started < required:
        flags.append("boot_missed_sessions")
    return {
        "sessions": [{"end_ms": e.t, "duration_s": e.duration_s, "reason": e.reason} for e in ends],
        "peak_mmhg": peak,
        "sessions_in_window": started,
        "sessions_required_in_window": required,
        "_flags": flags,
    }


def _r(value: float) -> float:
    return round(value, 3)


def evaluate_days(stored: Stored, period: Period, rx: SockPrescription | BootPrescription) -> list[dict[str, Any]]:
    """The per-day truth: wear, the values the flags are computed from, and the flags."""
    days = slice_days(stored, period)
    out = []
    for i, day in enumerate(days):
        detail = _sock_day(rx, days, i) if isinstance(rx, SockPrescription) else _boot_day(rx, days, i)
        flags: list[str] = detail.pop("_flags")
        if day.points == 0:
            flags = ["silent"]
        out.append({
            "date": day.day.isoformat(),
            "start_ms": day.start_ms,
            "end_ms": day.end_ms,
            "hours": (day.end_ms - day.start_ms) / 3_600_000,
            "complete": day.complete,
            "samples": len(day.samples),
            "worn_samples": sum(1 for s in day.samples if s.worn),
            "wear_s": _r(day.wear_s),
            "wear_minutes": _r(day.wear_s / 60.0),
            **detail,
            "flags": (sorted(flags) or ["compliant"]) if day.complete else None,
        })  # fmt: skip
    return out


def flags_as_of(
    items: list[Item], kind: Kind, period: Period, rx: SockPrescription | BootPrescription, as_of_ms: int
) -> dict[str, list[str]]:
    """Flags of the days complete at ``as_of_ms`` from only what was sent before it (live reception)."""
    early = [item for item in items if item.publish_at_ms < as_of_ms]
    days = evaluate_days(store(early, kind, "live", period), period, rx)
    return {d["date"]: d["flags"] for d in days if d["end_ms"] <= as_of_ms and d["flags"] is not None}
