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
from collections.abc import Iterable, Sequence
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


Rx = SockPrescription | BootPrescription


def version_index(changes: Sequence[tuple[int, Rx]], i: int) -> int:
    """Which prescription version applies on day ``i``: 0 the first, k after the k-th change."""
    return sum(1 for first, _ in changes if first <= i)


def _day_detail(rx: Rx, days: list[DaySlice], i: int) -> dict[str, Any]:
    return _sock_day(rx, days, i) if isinstance(rx, SockPrescription) else _boot_day(rx, days, i)


IDLE_WINDOW_DAYS: Final = 7  # a boot heard from while idle in the 7 days before: a day without a point is silence


def _started(day: DaySlice) -> bool:
    return any(e.type == "session_start" for e in day.events)


def reports_idle(days: list[DaySlice], i: int) -> bool:
    """Did the boot send a status on a day without a session in the 7 days before day ``i``? Then a day without any
    point is silence; a boot that speaks only in sessions is resting (its missed sessions are another flag)."""
    return any(d.points - len(d.samples) - len(d.events) > 0 and not _started(d)
               for d in days[max(0, i - IDLE_WINDOW_DAYS) : i])  # fmt: skip


def evaluate_days(stored: Stored, period: Period, rx: Rx,
                  changes: Sequence[tuple[int, Rx]] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """The per-day truth: wear, the values the flags are computed from, and the flags.

    Each day is judged against the prescription version in force that day (``rx``, then each of ``changes``
    from its day index on); a day under a newer version also says what it would have been under the previous
    one (``flags_under_previous``: what tells an episode ended by the change from one the client ended).
    """
    days = slice_days(stored, period)
    versions = [rx, *(new for _, new in changes)]
    out = []
    for i, day in enumerate(days):
        version = version_index(changes, i)
        detail = _day_detail(versions[version], days, i)
        flags: list[str] = detail.pop("_flags")
        previous = _day_detail(versions[version - 1], days, i).pop("_flags") if version else None
        resting = stored.kind == "boot" and day.points == 0 and not reports_idle(days, i)
        if day.points == 0 and not resting:
            flags = ["silent"]
            previous = ["silent"] if version else None
        entry = {
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
            "points": day.points,
            **({"rest_day": not _started(day), "reports_idle": reports_idle(days, i)} if stored.kind == "boot" else {}),
            "prescription_version": version,
            "flags": (sorted(flags) or ["compliant"]) if day.complete else None,
        }  # fmt: skip
        if previous is not None and day.complete:
            entry["flags_under_previous"] = sorted(previous) or ["compliant"]
        entry["judged"] = judged(stored.kind, entry) if day.complete else None
        out.append(entry)
    return out


def flags_as_of(
    items: list[Item], kind: Kind, period: Period, rx: Rx, as_of_ms: int, changes: Sequence[tuple[int, Rx]] = ()
) -> dict[str, list[str]]:
    """Flags of the days complete at ``as_of_ms`` from only what was sent before it (live reception)."""
    early = [item for item in items if item.publish_at_ms < as_of_ms]
    days = evaluate_days(store(early, kind, "live", period), period, rx, changes)
    return {d["date"]: d["flags"] for d in days if d["end_ms"] <= as_of_ms and d["flags"] is not None}


# --- episodes and e-mails (docs/ground-truth.md, "Episodes") --------------------------------------------------------

RESOLVE_AFTER_DAYS: Final = 2  # days in a row showing a flag gone before its episode resolves
SAFETY_FLAGS: Final = frozenset({"boot_overpressure"})  # resolve after one day showing them gone
WEAR_FLAGS: Final = frozenset({"too_tight", "too_loose", "rolled_down", "worn_out"})
SESSION_FLAGS: Final = frozenset({"boot_short_sessions", "boot_long_sessions"})


def judged(kind: Kind, day: dict[str, Any]) -> list[str]:
    """The flags a complete day's data can judge (extend or end a run of); a leg suffix follows its base flag.

    No stored point: only ``silent``. Sock: ``silent``, ``under_use``, and the pressure flags only with worn
    samples (of that leg). Boot: ``silent``, ``boot_missed_sessions``, session lengths only with a session
    that ended that day, over-pressure only with samples.
    """
    if day["points"] == 0:
        return ["boot_missed_sessions"] if kind == "boot" and not day["reports_idle"] else ["silent"]
    found = {"silent"}
    if kind == "sock":
        found.add("under_use")
        for leg, stats in (day.get("legs") or {"": day}).items():
            if stats["worn_samples"] > 0:
                found |= {f"{flag}:{leg}" if leg else flag for flag in WEAR_FLAGS}
    else:
        found.add("boot_missed_sessions")
        if day["sessions"]:
            found |= SESSION_FLAGS
        if day["samples"] > 0:
            found.add("boot_overpressure")
    return sorted(found)


def _base(flag: str) -> str:
    return flag.partition(":")[0]


def episodes(days: list[dict[str, Any]], resolve_after: int = RESOLVE_AFTER_DAYS) -> list[dict[str, Any]]:
    """Each flag's runs over the complete days, oldest first: a run ends after ``resolve_after`` judged days in a
    row without the flag (one for safety flags); days that cannot judge a flag neither extend nor end its run.

    ``end`` is the first day that showed the flag gone (``None``: still open at the end of the period),
    ``cleared_by`` the days that did, ``ended_by`` why: ``data`` or ``prescription`` (the days that showed it
    gone were judged against a newer prescription version, under which alone the flag no longer held).
    """
    complete = [d for d in days if d["complete"]]
    flags = sorted({f for d in complete for f in d["flags"] if f != "compliant"})
    out = []
    for flag in flags:
        out += _runs(complete, flag, 1 if _base(flag) in SAFETY_FLAGS else resolve_after)
    return sorted(out, key=lambda e: (e["start"], e["flag"]))


def _runs(days: list[dict[str, Any]], flag: str, resolve_after: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    start: str | None = None
    last: dict[str, Any] | None = None
    clear: list[dict[str, Any]] = []
    for day in days:
        if flag not in day["judged"]:
            continue
        if flag in day["flags"]:
            start, last, clear = start or day["date"], day, []
            continue
        if start is None or last is None:
            continue
        clear.append(day)
        if len(clear) >= resolve_after:
            found.append(_episode(flag, start, last, clear))
            start, last, clear = None, None, []
    if start is not None and last is not None:
        found.append({"flag": flag, "start": start, "last": last["date"], "end": None, "cleared_by": [],
                      "ended_by": None})  # fmt: skip
    return found


def _episode(flag: str, start: str, last: dict[str, Any], clear: list[dict[str, Any]]) -> dict[str, Any]:
    changed = any(d.get("prescription_version") != last.get("prescription_version") for d in clear)
    by_rx = changed and all(flag in d.get("flags_under_previous", ()) for d in clear)
    return {"flag": flag, "start": start, "last": last["date"], "end": clear[0]["date"],
            "cleared_by": [d["date"] for d in clear], "ended_by": "prescription" if by_rx else "data"}  # fmt: skip


def emails(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The episode e-mails of a monitor evaluating after each day of the period from the first on: one when an
    episode opens, one when it ends (``reason``: ``data`` or ``prescription``). Sorted by day, kind, flag."""
    out = []
    for e in found:
        out.append({"kind": "opened", "flag": e["flag"], "start": e["start"], "day": e["start"]})
        if e["end"] is not None:
            out.append({"kind": "resolved", "flag": e["flag"], "start": e["start"], "day": e["end"],
                        "reason": e["ended_by"]})  # fmt: skip
    return sorted(out, key=lambda m: (m["day"], m["kind"], m["flag"]))


# --- several garments: a stocking on each leg (docs/ground-truth.md, "Legs") -----------------------------------------

LEG_FLAGS: Final = ("too_tight", "too_loose", "rolled_down", "worn_out")  # pressure, gradient and wear-out: per leg


def union_seconds(spans: Iterable[tuple[int, float]]) -> float:
    """Seconds covered by the union of ``[t, t + worn_s)`` (``t`` in epoch ms): time in any garment, never a sum."""
    total, end = 0.0, float("-inf")
    for start, length in sorted((float(t), float(t) + s * 1000.0) for t, s in spans if s > 0):
        if length > end:
            total += length - max(start, end)
            end = length
    return total / 1000.0


def _union_of(slices: list[DaySlice]) -> float:
    spans = [(s.t, w) for day in slices for s, w in zip(day.samples, day.worn_s, strict=True) if s.worn]
    return union_seconds(spans)


def _leg_detail(rx: SockPrescription, days: list[DaySlice], i: int) -> tuple[dict[str, Any], list[str]]:
    detail = _sock_day(rx, days, i)
    flags = [f for f in detail.pop("_flags") if f in LEG_FLAGS]
    day = days[i]
    head = {"samples": len(day.samples), "worn_samples": sum(1 for s in day.samples if s.worn),
            "wear_s": _r(day.wear_s), "wear_minutes": _r(day.wear_s / 60.0)}  # fmt: skip
    return head | detail, flags


def evaluate_legs(legs: list[tuple[str, Stored]], period: Period, rx: SockPrescription,
                  changes: Sequence[tuple[int, SockPrescription]] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """The per-day truth of a patient wearing a stocking on each leg (``legs``: leg name, its stored data).

    Wear is the time in any garment: the union of the legs' worn spans when more than one leg has worn
    samples that day (else the one leg's sum). Pressure, gradient and wear-out are judged per leg and their
    flags carry the leg (``rolled_down:right``); under-use and silence are the patient's.
    """
    sliced = [(leg, slice_days(stored, period)) for leg, stored in legs]
    versions = [rx, *(new for _, new in changes)]
    out = []
    for i, day in enumerate(period.days):
        version = version_index(changes, i)
        today = [days[i] for _, days in sliced]
        worn_legs = [d for d in today if any(s.worn for s in d.samples)]
        wear = _union_of(worn_legs) if len(worn_legs) > 1 else sum(d.wear_s for d in today)
        per_leg = {}
        flags = []
        for leg, days in sliced:
            per_leg[leg], leg_flags = _leg_detail(versions[version], days, i)
            flags += [f"{flag}:{leg}" for flag in leg_flags]
        if wear < versions[version].wear_hours_per_day * 3600:
            flags.append("under_use")
        points = sum(d.points for d in today)
        entry = {
            "date": day.isoformat(), "start_ms": today[0].start_ms, "end_ms": today[0].end_ms,
            "hours": (today[0].end_ms - today[0].start_ms) / 3_600_000, "complete": today[0].complete,
            "samples": sum(len(d.samples) for d in today), "worn_samples": sum(len(d.worn_ankles()) for d in today),
            "wear_s": _r(wear), "wear_minutes": _r(wear / 60.0), "wear_sum_s": _r(sum(d.wear_s for d in today)),
            "legs": per_leg, "points": points, "prescription_version": version,
            "flags": ((sorted(flags) or ["compliant"]) if points else ["silent"]) if today[0].complete else None,
        }  # fmt: skip
        entry["judged"] = judged("sock", entry) if today[0].complete else None
        out.append(entry)
    return out


def stored_from(stored: Stored, start_ms: int) -> Stored:
    """Only what is stored from ``start_ms`` on (what the patient's tags cover when the device was assigned late)."""
    keep = [i for i, t in enumerate(stored.times) if t >= start_ms]
    out = Stored(stored.kind, [stored.times[i] for i in keep], [stored.samples[i] for i in keep],
                 [stored.worn_s[i] for i in keep], [e for e in stored.events if e.t >= start_ms],
                 [x for x in stored.statuses if x.t is not None and x.t >= start_ms])  # fmt: skip
    return out
