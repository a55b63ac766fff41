"""The evidence behind a flag, from the stored readings: what an e-mail, the digest and the workspace show.

A physio acts on numbers, not on a flag's name: the ankle median against the band, the minutes out of it, calf
against ankle for a stocking that rolled down, the session, chamber and peak of a boot that over-inflated. This
module composes them. Its inputs, and nothing else:

- the monitor's figures of each day (:class:`DayFigures`, made from ``monitor.compliance``'s day statistics by
  :func:`day_figures`, the one function that reads them): wear, worn seconds above / below the band and with a
  reversed gradient, sessions started and their lengths, the day's peak, the 7-day session window, battery;
- what InfluxDB holds beyond those (:func:`measure`, a few small statements about one patient and a few days):
  the daily ankle median and range of worn samples, calf and ankle while the gradient was reversed, each boot
  session with each chamber's peak, the 7-day ankle median, the last stored point.

:func:`compose` turns them into an :class:`Evidence` per flag: a headline, one line per day or session, a
suggested next step and the key values by name (``values``, which the tests compare with the simulators' ground
truth). All times are shown in the clinic's time zone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from devices.protocol import ZONES
from monitor import queries as q
from monitor.compliance import SUSTAINED_S, InfluxReader, local_midnight_ms
from monitor.model import (
    BOOT_LONG_SESSIONS,
    BOOT_MISSED_SESSIONS,
    BOOT_OVERPRESSURE,
    BOOT_SHORT_SESSIONS,
    LOW_BATTERY,
    ROLLED_DOWN,
    SILENT,
    TOO_LOOSE,
    TOO_TIGHT,
    UNDER_USE,
    WORN_OUT,
    BootRx,
    DayStats,
    SockRx,
)

MAX_DAYS: Final = 7  # days of an episode shown, the newest
MINUTE_MS: Final = 60_000
SESSION_SLACK_MS: Final = 2 * 3_600_000  # an unfinished session's samples are looked for this long after its start

# What a physio may do next, per flag (a suggestion: the physio decides).
NEXT_STEP: Final[dict[str, str]] = {
    BOOT_OVERPRESSURE: "Call the client today and ask them not to use the boot until it is checked. Compare the "
    "programme's pressure setting with the prescribed maximum, ask about pain, numbness, tingling or a change of "
    "skin colour in that leg (examine it if so), and resume only once the setting is corrected.",
    TOO_TIGHT: "Check the fit: measure ankle and calf again against the garment's size chart and ask about pain, "
    "numbness or deep marks; consider the next size up or a lower compression class.",
    TOO_LOOSE: "Check the size and how the garment is put on; a stretched or too large garment needs replacing.",
    ROLLED_DOWN: "Ask whether the top of the stocking rolls or folds down and constricts the leg; check its length "
    "and the fit at the top, show how to put it on, and consider a silicone top band or another length.",
    WORN_OUT: "The garment has probably lost its compression: replace it (daily-worn stockings usually last "
    "3-6 months).",
    UNDER_USE: "Ask what makes it hard to wear (putting it on, heat, discomfort, skin) and whether a donning aid, "
    "another garment or a different routine would help.",
    SILENT: "Check with the client that the garment is charged and worn, and that the phone app or hub is on.",
    BOOT_SHORT_SESSIONS: "Ask why the sessions stopped early (discomfort, time) and check the programme's length.",
    BOOT_LONG_SESSIONS: "Check the programme's length setting against the prescription.",
    BOOT_MISSED_SESSIONS: "Ask what keeps the client from the sessions and agree on a time of day for them.",
    LOW_BATTERY: "Remind the client to charge the garment today.",
}


# --- inputs ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayFigures:
    """The monitor's figures of one local day that evidence needs (durations in seconds)."""

    day: date
    complete: bool
    start_ms: int = 0  # the local day's bounds (epoch ms; 23 or 25 hours on daylight-saving days)
    end_ms: int = 0
    points: int = 0
    wear_s: float = 0.0
    above_range_s: float = 0.0
    below_range_s: float = 0.0
    reversed_gradient_s: float = 0.0
    sessions_started: int = 0
    session_durations_s: tuple[float, ...] = ()
    peak_mmhg: float | None = None
    sessions_in_window: int = 0
    sessions_required_in_window: int = 0
    window_days: int = 0
    battery_min_pct: float | None = None


def day_figures(stats: DayStats) -> DayFigures:
    """The figures evidence needs from the monitor's day statistics (the one place that reads them)."""
    return DayFigures(day=stats.day, complete=stats.complete, start_ms=stats.start_ms, end_ms=stats.end_ms,
                      points=stats.points, wear_s=stats.wear_s,
                      above_range_s=stats.above_range_s, below_range_s=stats.below_range_s,
                      reversed_gradient_s=stats.reversed_gradient_s, sessions_started=stats.sessions_started,
                      session_durations_s=tuple(stats.session_durations_s), peak_mmhg=stats.peak_mmhg,
                      sessions_in_window=stats.sessions_in_window,
                      sessions_required_in_window=stats.sessions_required_in_window, window_days=stats.window_days,
                      battery_min_pct=stats.battery_min_pct)  # fmt: skip


@dataclass(frozen=True, slots=True)
class AnkleDay:
    """Worn samples' ankle pressure on one day: median and range (mmHg)."""

    median_mmhg: float
    min_mmhg: float
    max_mmhg: float
    samples: int


@dataclass(frozen=True, slots=True)
class GradientDay:
    """While calf pressure was above ankle pressure (by more than 3 mmHg): mean calf, mean ankle (mmHg)."""

    calf_mmhg: float
    ankle_mmhg: float
    samples: int

    @property
    def calf_minus_ankle_mmhg(self) -> float:
        return self.calf_mmhg - self.ankle_mmhg


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """One boot session: start (epoch ms), device-reported length and end reason, each chamber's peak (mmHg)."""

    start_ms: int
    duration_s: float | None = None
    reason: str | None = None
    peaks: dict[str, float] = field(default_factory=dict)
    peak_at_ms: int | None = None

    @property
    def peak(self) -> tuple[str, float] | None:
        """The chamber that reached the highest pressure, and that pressure."""
        return max(self.peaks.items(), key=lambda kv: kv[1]) if self.peaks else None


@dataclass(frozen=True, slots=True)
class Measured:
    """What InfluxDB holds about one patient's days beyond the monitor's figures (keys: local days)."""

    ankle: dict[date, AnkleDay] = field(default_factory=dict)
    gradient: dict[date, GradientDay] = field(default_factory=dict)
    sessions: tuple[SessionFacts, ...] = ()
    ankle_median_7d_mmhg: float | None = None  # the 7 days ending with the last day asked for
    last_seen_ms: int | None = None


# --- queries ---------------------------------------------------------------------------------------------------------


def _where(patient: str, start_ms: int, end_ms: int) -> str:
    return f"{q.patient_filter([patient])} AND {q.time_range(start_ms, end_ms)}"


def ankle_statement(patient: str, timezone: str, start_ms: int, end_ms: int) -> str:
    """Per local day, worn samples: median, lowest and highest ankle pressure (the monitor's median definition)."""
    return ("SELECT median(ankle_mmhg) AS median, min(ankle_mmhg) AS low, max(ankle_mmhg) AS high, "
            f"count(ankle_mmhg) AS n FROM sample WHERE worn = true AND {_where(patient, start_ms, end_ms)} "
            f"GROUP BY time(1d) fill(none) {q.tz_clause(timezone)}")  # fmt: skip


def gradient_statement(patient: str, timezone: str, start_ms: int, end_ms: int) -> str:
    """Per local day, worn samples with calf above ankle by more than 3 mmHg: mean calf and mean ankle."""
    return ("SELECT mean(calf_mmhg) AS calf, mean(ankle_mmhg) AS ankle, count(ankle_mmhg) AS n FROM sample "
            f"WHERE worn = true AND calf_mmhg - ankle_mmhg > {q.GRADIENT_MMHG!r} AND "
            f"{_where(patient, start_ms, end_ms)} GROUP BY time(1d) fill(none) {q.tz_clause(timezone)}")  # fmt: skip


def session_statements(patient: str, start_ms: int, end_ms: int) -> list[str]:
    """Session starts and ends (with the device's length and reason), and each chamber's highest pressure per
    minute (boots sample every few seconds, only while running)."""
    chambers = ", ".join(f"max({z}_mmhg) AS {z}" for z in ZONES)
    return [(f"SELECT \"count\", duration_s, reason FROM event WHERE (\"type\" = 'session_start' OR \"type\" = "
             f"'session_end') AND {_where(patient, start_ms, end_ms)} GROUP BY \"type\""),
            f"SELECT {chambers} FROM sample WHERE {_where(patient, start_ms, end_ms)} GROUP BY time(1m) fill(none)"]


def last_seen_statements(patient: str, start_ms: int, end_ms: int) -> list[str]:
    """The newest stored sample, event and status."""
    where = _where(patient, start_ms, end_ms)
    return [f"SELECT last(seq) FROM sample WHERE {where}", f'SELECT last("count") FROM event WHERE {where}',
            f"SELECT last(state) FROM status WHERE {where}"]  # fmt: skip


def _rows(series: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for s in series:
        tags = s.get("tags") or {}
        for values in s.get("values") or []:
            yield {**tags, **dict(zip(s["columns"], values, strict=True))}


def _day(t_ms: int, zone: ZoneInfo) -> date:
    return datetime.fromtimestamp(t_ms / 1000, zone).date()


def _ankle(series: list[dict[str, Any]], zone: ZoneInfo) -> dict[date, AnkleDay]:
    return {_day(int(r["time"]), zone): AnkleDay(float(r["median"]), float(r["low"]), float(r["high"]), int(r["n"]))
            for r in _rows(series) if r.get("median") is not None}  # fmt: skip


def _gradient(series: list[dict[str, Any]], zone: ZoneInfo) -> dict[date, GradientDay]:
    return {_day(int(r["time"]), zone): GradientDay(float(r["calf"]), float(r["ankle"]), int(r["n"]))
            for r in _rows(series) if r.get("calf") is not None and r.get("ankle") is not None}  # fmt: skip


def sessions_from(events: list[dict[str, Any]], minutes: list[dict[str, Any]]) -> tuple[SessionFacts, ...]:
    """Pair each ``session_start`` with the next ``session_end`` (if any before the next start) and give it the
    per-minute chamber maxima that fall within it."""
    starts = sorted(int(r["time"]) for r in _rows(events) if r.get("type") == "session_start")
    ends = sorted((int(r["time"]), r) for r in _rows(events) if r.get("type") == "session_end")
    peaks = [(int(r["time"]), {z: float(r[z]) for z in ZONES if r.get(z) is not None}) for r in _rows(minutes)]
    out = []
    for i, start in enumerate(starts):
        following = starts[i + 1] if i + 1 < len(starts) else None
        end = next((e for e in ends if start <= e[0] and (following is None or e[0] < following)), None)
        until = end[0] if end else min(start + SESSION_SLACK_MS, following or start + SESSION_SLACK_MS)
        out.append(_session(start, end[1] if end else None, until, peaks))
    return tuple(out)


def _session(start: int, end: dict[str, Any] | None, until: int,
             peaks: list[tuple[int, dict[str, float]]]) -> SessionFacts:  # fmt: skip
    inside = [(t, p) for t, p in peaks if start - MINUTE_MS < t <= until]
    best: dict[str, float] = {}
    peak_at: int | None = None
    for t, values in inside:
        for zone, value in values.items():
            if value > best.get(zone, -math.inf):
                best[zone] = value
                if value >= max(best.values()):
                    peak_at = t
    duration = float(end["duration_s"]) if end and end.get("duration_s") is not None else None
    return SessionFacts(start, duration, str(end["reason"]) if end and end.get("reason") else None, best, peak_at)


def _last_seen(answers: Sequence[list[dict[str, Any]]]) -> int | None:
    times = [int(r["time"]) for series in answers for r in _rows(series)]
    return max(times, default=None)


async def measure(reader: InfluxReader, database: str, patient: str, timezone: str, kind: str | None,
                  first: date, last: date) -> Measured:  # fmt: skip
    """Query InfluxDB for one patient's local days ``first`` .. ``last`` (inclusive): socks their ankle range and
    gradient, boots their sessions; both the 7-day ankle median (socks) and the last stored point."""
    zone = ZoneInfo(timezone)
    start, end = local_midnight_ms(first, zone), local_midnight_ms(last + timedelta(days=1), zone)
    week_start = local_midnight_ms(last - timedelta(days=6), zone)
    statements = last_seen_statements(patient, start - 30 * 86_400_000, end + 300_000)
    if kind == "sock":
        statements += [ankle_statement(patient, timezone, start, end), gradient_statement(patient, timezone, start,
                                                                                           end),
                       q.ankle_median([patient], week_start, end)]  # fmt: skip
    elif kind == "boot":
        statements += session_statements(patient, start, end)
    answers = await reader.run(database, statements)
    seen = _last_seen(answers[:3])
    if kind == "sock":
        week = [r.get("ankle_median_mmhg") for r in _rows(answers[5])]
        return Measured(_ankle(answers[3], zone), _gradient(answers[4], zone),
                        ankle_median_7d_mmhg=float(week[0]) if week and week[0] is not None else None,
                        last_seen_ms=seen)  # fmt: skip
    if kind == "boot":
        return Measured(sessions=sessions_from(answers[3], answers[4]), last_seen_ms=seen)
    return Measured(last_seen_ms=seen)


# --- composition (pure) ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evidence:
    """The measured case for one flag: a headline, one line per day or session, a next step, the key values."""

    flag: str
    headline: str
    lines: tuple[str, ...] = ()
    next_step: str | None = None
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Case:
    """Everything :func:`compose` needs about one patient's episode."""

    flag: str
    timezone: str
    rx: SockRx | BootRx | None
    days: tuple[DayFigures, ...]  # the episode's days, oldest first
    measured: Measured


def _when(day: date) -> str:
    return day.strftime("%a %d %b")


def _day_label(d: DayFigures) -> str:
    """``Tue 18 Nov``, or ``Wed 19 Nov (today, so far)`` for the day still running."""
    return _when(d.day) + ("" if d.complete else " (today, so far)")


def _last_flagged(days: Sequence[DayFigures], shows: Callable[[DayFigures], bool]) -> DayFigures | None:
    """The newest day showing the problem, complete days first (the flags judge complete days), else any day."""
    for pool in ([d for d in days if d.complete and shows(d)], [d for d in days if shows(d)], list(days)):
        if pool:
            return pool[-1]
    return None


def _local_time(t_ms: int, timezone: str) -> str:
    return datetime.fromtimestamp(t_ms / 1000, ZoneInfo(timezone)).strftime("%a %d %b %H:%M")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _band(rx: SockRx) -> str:
    return f"{rx.low_mmhg:g}-{rx.high_mmhg:g} mmHg"


def _worn_days(case: Case) -> list[DayFigures]:
    return [d for d in case.days if d.points > 0][-MAX_DAYS:]


def _under_use(case: Case) -> Evidence:
    assert isinstance(case.rx, SockRx)
    target = case.rx.wear_hours_per_day
    days = [d for d in case.days if d.complete][-MAX_DAYS:]
    lines = tuple(f"{_when(d.day)}: worn {_hours(d.wear_s)} of {target:g} h" for d in days)
    mean = sum(d.wear_s for d in days) / 3600 / len(days) if days else 0.0
    last = days[-1] if days else None
    headline = (f"Worn {mean:.1f} h a day on average over the last {len(days)} complete day(s), against {target:g} h "
                "prescribed"
                + (f"; {_hours(last.wear_s)} on {_when(last.day)}." if last else "."))  # fmt: skip
    values = {"wear_h": round(last.wear_s / 3600, 2), "target_h": target} if last else {"target_h": target}
    return Evidence(UNDER_USE, headline, lines, NEXT_STEP[UNDER_USE], values)


def _ankle_words(a: AnkleDay | None) -> str:
    if a is None:
        return "no ankle reading while worn"
    return f"ankle median {a.median_mmhg:.1f} mmHg (range {a.min_mmhg:.1f}-{a.max_mmhg:.1f})"


def _out_of_band(case: Case, flag: str) -> Evidence:
    assert isinstance(case.rx, SockRx)
    above = flag == TOO_TIGHT
    limit = case.rx.high_mmhg if above else case.rx.low_mmhg
    side = "above" if above else "below"
    pick: Callable[[DayFigures], float] = (lambda d: d.above_range_s) if above else (lambda d: d.below_range_s)
    days = _worn_days(case)
    lines = tuple(f"{_day_label(d)}: {_ankle_words(case.measured.ankle.get(d.day))}; {_minutes(pick(d))} {side} "
                  f"{limit:g} mmHg of {_hours(d.wear_s)} worn" for d in days)  # fmt: skip
    last = _last_flagged(days, lambda d: pick(d) > 0)
    if last is None:
        return Evidence(flag, f"No worn day with ankle readings; prescribed band {_band(case.rx)}.", lines,
                        NEXT_STEP[flag])  # fmt: skip
    ankle = case.measured.ankle.get(last.day)
    extreme = (ankle.max_mmhg if above else ankle.min_mmhg) if ankle else None
    headline = (f"On {_when(last.day)} the {_ankle_words(ankle)} against the prescribed {_band(case.rx)}: "
                f"{_minutes(pick(last))} of wear {side} the band"
                + (f", {'peak' if above else 'lowest'} {extreme:.1f} mmHg." if extreme is not None else "."))
    values = {f"{side}_min": round(pick(last) / 60, 1), "band_low_mmhg": case.rx.low_mmhg,
              "band_high_mmhg": case.rx.high_mmhg}  # fmt: skip
    if ankle:
        values |= {"ankle_median_mmhg": ankle.median_mmhg, "ankle_max_mmhg": ankle.max_mmhg,
                   "ankle_min_mmhg": ankle.min_mmhg}  # fmt: skip
    return Evidence(flag, headline, lines, NEXT_STEP[flag], values)


def _gradient_words(g: GradientDay | None) -> str:
    if g is None:
        return ""
    return (f"; while reversed, calf {g.calf_mmhg:.1f} mmHg vs ankle {g.ankle_mmhg:.1f} mmHg "
            f"(calf - ankle {g.calf_minus_ankle_mmhg:+.1f} mmHg)")  # fmt: skip


def _rolled_down(case: Case) -> Evidence:
    days = _worn_days(case)
    lines = tuple(f"{_day_label(d)}: {_minutes(d.reversed_gradient_s)} of {_hours(d.wear_s)} worn with calf above "
                  f"ankle{_gradient_words(case.measured.gradient.get(d.day))}" for d in days)  # fmt: skip
    last = _last_flagged(days, lambda d: d.reversed_gradient_s > SUSTAINED_S)
    if last is None:
        return Evidence(ROLLED_DOWN, "No worn day in the episode's range.", lines, NEXT_STEP[ROLLED_DOWN])
    g = case.measured.gradient.get(last.day)
    headline = (f"On {_when(last.day)} calf pressure was above ankle pressure for {_minutes(last.reversed_gradient_s)}"
                f" of {_hours(last.wear_s)} worn{_gradient_words(g)}: the gradient is reversed.")  # fmt: skip
    values = {"reversed_min": round(last.reversed_gradient_s / 60, 1)}
    if g:
        values |= {"calf_minus_ankle_mmhg": round(g.calf_minus_ankle_mmhg, 2), "calf_mmhg": g.calf_mmhg,
                   "ankle_mmhg": g.ankle_mmhg}  # fmt: skip
    return Evidence(ROLLED_DOWN, headline, lines, NEXT_STEP[ROLLED_DOWN], values)


def _worn_out(case: Case) -> Evidence:
    assert isinstance(case.rx, SockRx)
    week = case.measured.ankle_median_7d_mmhg
    days = _worn_days(case)
    lines = tuple(f"{_day_label(d)}: {_ankle_words(case.measured.ankle.get(d.day))}" for d in days)
    last = days[-1].day if days else None
    median = f"{week:.1f} mmHg" if week is not None else "unknown"
    headline = (f"Ankle median over the 7 days to {_when(last) if last else '-'}: {median}, below the band's "
                f"{case.rx.low_mmhg:g} mmHg (prescribed {_band(case.rx)}).")  # fmt: skip
    values = {"ankle_median_7d_mmhg": week, "band_low_mmhg": case.rx.low_mmhg} if week is not None else {}
    return Evidence(WORN_OUT, headline, lines, NEXT_STEP[WORN_OUT], values)


def _silent(case: Case) -> Evidence:
    seen = case.measured.last_seen_ms
    quiet = [d for d in case.days if d.points == 0]
    lines = tuple(f"{_when(d.day)}: nothing stored" for d in quiet[-MAX_DAYS:])
    since = _local_time(seen, case.timezone) if seen else "more than 30 days ago"
    values = {"last_seen_ms": float(seen)} if seen else {}
    return Evidence(SILENT, f"Nothing stored from the garment since {since}.", lines, NEXT_STEP[SILENT], values)


def _session_words(s: SessionFacts, case: Case) -> str:
    length = f"{s.duration_s / 60:.0f} min" if s.duration_s is not None else "still running or not ended"
    peak = s.peak
    chamber = f", {peak[0]} chamber peak {peak[1]:.1f} mmHg" if peak else ""
    ended = f", ended: {s.reason}" if s.reason else ""
    return f"session at {_local_time(s.start_ms, case.timezone)}: {length}{chamber}{ended}"


def _in_days(case: Case) -> list[SessionFacts]:
    """The sessions that started on the case's days (the episode's, not the whole period measured)."""
    if not case.days:
        return list(case.measured.sessions)
    start, end = case.days[0].start_ms, case.days[-1].end_ms
    return [s for s in case.measured.sessions if start <= s.start_ms < end or not end]


def _overpressure(case: Case) -> Evidence:
    assert isinstance(case.rx, BootRx)
    limit = case.rx.max_chamber_mmhg
    over = [s for s in _in_days(case) if s.peak is not None and s.peak[1] > limit]
    lines = tuple(_session_words(s, case) + f" (prescribed maximum {limit:g} mmHg)" for s in over[-MAX_DAYS:])
    if not over:
        peak = max((d.peak_mmhg for d in case.days if d.peak_mmhg is not None), default=None)
        words = f"{peak:.1f} mmHg" if peak is not None else "unknown"
        return Evidence(BOOT_OVERPRESSURE, f"A chamber reached {words}, above the prescribed maximum {limit:g} mmHg.",
                        lines, NEXT_STEP[BOOT_OVERPRESSURE], {"max_chamber_mmhg": limit})  # fmt: skip
    last = over[-1]
    chamber, peak = last.peak or ("?", 0.0)
    at = f" at {_local_time(last.peak_at_ms, case.timezone)[-5:]}" if last.peak_at_ms else ""
    length = f"{last.duration_s / 60:.0f} min" if last.duration_s is not None else "not ended yet"
    headline = (f"Session started {_local_time(last.start_ms, case.timezone)} ({length}): the {chamber} chamber "
                f"reached {peak:.1f} mmHg{at}, above the prescribed maximum {limit:g} mmHg.")  # fmt: skip
    values = {"peak_mmhg": peak, "max_chamber_mmhg": limit, "session_start_ms": float(last.start_ms)}
    if last.duration_s is not None:
        values["duration_s"] = last.duration_s
    return Evidence(BOOT_OVERPRESSURE, headline, lines, NEXT_STEP[BOOT_OVERPRESSURE], values)


def _session_length(case: Case, flag: str) -> Evidence:
    assert isinstance(case.rx, BootRx)
    short = flag == BOOT_SHORT_SESSIONS
    lo, hi = case.rx.session_min_s, case.rx.session_max_s
    wrong = [s for s in _in_days(case) if s.duration_s is not None
             and (s.duration_s < lo if short else s.duration_s > hi)]  # fmt: skip
    plan = f"prescribed {lo / 60:g}-{hi / 60:g} min"
    lines = tuple(_session_words(s, case) + f" ({plan})" for s in wrong[-MAX_DAYS:])
    if not wrong:
        return Evidence(flag, f"Session lengths outside the {plan}.", lines, NEXT_STEP[flag])
    last = wrong[-1]
    assert last.duration_s is not None
    headline = (f"{len(wrong)} session(s) {'shorter' if short else 'longer'} than prescribed; the last, started "
                f"{_local_time(last.start_ms, case.timezone)}, lasted {last.duration_s / 60:.0f} min ({plan}).")
    return Evidence(flag, headline, lines, NEXT_STEP[flag], {"duration_s": last.duration_s,
                                                              "count": float(len(wrong))})  # fmt: skip


def _missed(case: Case) -> Evidence:
    assert isinstance(case.rx, BootRx)
    days = [d for d in case.days if d.complete][-MAX_DAYS:]
    lines = tuple(f"{_when(d.day)}: {d.sessions_started} session(s); {d.sessions_in_window} in the 7 days to it, "
                  f"{d.sessions_required_in_window} required" for d in days)  # fmt: skip
    last = days[-1] if days else None
    if last is None:
        return Evidence(BOOT_MISSED_SESSIONS, "No complete day yet.", lines, NEXT_STEP[BOOT_MISSED_SESSIONS])
    headline = (f"{last.sessions_in_window} session(s) in the {last.window_days} day(s) to {_when(last.day)}, "
                f"{last.sessions_required_in_window} required ({case.rx.sessions_per_week} a week prescribed).")
    values = {"sessions": float(last.sessions_in_window), "required": float(last.sessions_required_in_window)}
    return Evidence(BOOT_MISSED_SESSIONS, headline, lines, NEXT_STEP[BOOT_MISSED_SESSIONS], values)


def _battery(case: Case) -> Evidence:
    known = [d for d in case.days if d.battery_min_pct is not None]
    if not known:
        return Evidence(LOW_BATTERY, "Battery low.", (), NEXT_STEP[LOW_BATTERY])
    last = known[-1]
    assert last.battery_min_pct is not None
    return Evidence(LOW_BATTERY, f"Battery down to {last.battery_min_pct:.0f} % on {_when(last.day)}.", (),
                    NEXT_STEP[LOW_BATTERY], {"battery_pct": last.battery_min_pct})  # fmt: skip


_COMPOSERS: Final[dict[str, Callable[[Case], Evidence]]] = {
    UNDER_USE: _under_use,
    TOO_TIGHT: lambda c: _out_of_band(c, TOO_TIGHT),
    TOO_LOOSE: lambda c: _out_of_band(c, TOO_LOOSE),
    ROLLED_DOWN: _rolled_down,
    WORN_OUT: _worn_out,
    SILENT: _silent,
    BOOT_OVERPRESSURE: _overpressure,
    BOOT_SHORT_SESSIONS: lambda c: _session_length(c, BOOT_SHORT_SESSIONS),
    BOOT_LONG_SESSIONS: lambda c: _session_length(c, BOOT_LONG_SESSIONS),
    BOOT_MISSED_SESSIONS: _missed,
    LOW_BATTERY: _battery,
}
_NEEDS: Final[dict[str, type]] = {UNDER_USE: SockRx, TOO_TIGHT: SockRx, TOO_LOOSE: SockRx, WORN_OUT: SockRx,
                                  BOOT_OVERPRESSURE: BootRx, BOOT_SHORT_SESSIONS: BootRx, BOOT_LONG_SESSIONS: BootRx,
                                  BOOT_MISSED_SESSIONS: BootRx}  # fmt: skip


def compose(case: Case) -> Evidence | None:
    """The evidence for ``case.flag``; ``None`` for a flag without a composer or without the prescription it needs."""
    composer = _COMPOSERS.get(case.flag)
    needed = _NEEDS.get(case.flag)
    if composer is None or (needed is not None and not isinstance(case.rx, needed)):
        return None
    return composer(case)


def episode_days(days: Sequence[DayFigures], start: date, last: date) -> tuple[DayFigures, ...]:
    """The days of an episode (``start`` .. ``last``, inclusive), at most the newest :data:`MAX_DAYS`."""
    return tuple(d for d in days if start <= d.day <= last)[-MAX_DAYS:]
