"""The patient page's charts, drawn on the server as SVG (no script, nothing loaded from elsewhere).

Why SVG from the server rather than a charting library in the browser: the registry's pages allow scripts and
styles from the site itself only (Content-Security-Policy ``default-src 'self'``), and these charts are simple
(bars, points with a range, a band, a line): a few dozen lines of geometry here, testable in Python, readable
without JavaScript, printable, and each chart carries its numbers in a table for screen readers and for checking.
Every chart is drawn twice, wide (desktop) and narrow (phone); the stylesheet shows one, so text stays readable at
both widths. Colours come from the stylesheet (classes), never from the data.

Each mark carries its numbers as ``data-*`` attributes (``data-day``, ``data-wear-h``, ``data-median``, ...): the
tests compare them with the monitor's figures for the same patient-days.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Final

from devices.protocol import ZONES
from monitor import evidence as ev
from monitor.compliance import SUSTAINED_S
from workspace.prescriptions import RxView
from workspace.readmodel import EpisodeView
from workspace.series import PatientSeries

WIDE: Final = (720, 230)
NARROW: Final = (360, 240)
ROW: Final = 30  # the episode timeline's row height: a label above a bar
SEVERITY_CLASS: Final[dict[str, str]] = {"critical": "sev-critical", "warning": "sev-warning", "info": "sev-info"}


@dataclass(frozen=True, slots=True)
class Mark:
    """One SVG element: its tag, attributes (geometry, class, data-*), text, and a tooltip."""

    tag: str
    attrs: dict[str, str]
    text: str = ""
    tip: str = ""


@dataclass(frozen=True, slots=True)
class Table:
    """The chart's numbers: a caption, column heads, rows."""

    caption: str
    heads: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class Drawing:
    """One size of a chart."""

    width: int
    height: int
    marks: tuple[Mark, ...]


@dataclass(frozen=True, slots=True)
class Chart:
    """A chart: its id, title, description (for screen readers), legend, wide and narrow drawings, numbers."""

    id: str
    title: str
    description: str
    wide: Drawing
    narrow: Drawing
    table: Table
    legend: tuple[tuple[str, str], ...] = field(default=())


# --- geometry --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """The plot area inside a drawing, and the value range of its y axis."""

    width: int
    height: int
    low: float
    high: float
    left: int = 40
    right: int = 8
    top: int = 20
    bottom: int = 24

    def x(self, index: float, count: int) -> float:
        """Centre of day ``index`` of ``count``."""
        return self.left + (index + 0.5) * self.step(count)

    def step(self, count: int) -> float:
        return (self.width - self.left - self.right) / max(1, count)

    def y(self, value: float) -> float:
        span = self.high - self.low or 1.0
        clipped = min(max(value, self.low), self.high)
        return self.top + (self.high - clipped) / span * (self.height - self.top - self.bottom)

    @property
    def base(self) -> float:
        return float(self.height - self.bottom)


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values covering ``low`` .. ``high``."""
    span = max(high - low, 1e-9)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    count = int((high - first) / step) + 2
    return [round(first + i * step, 6) for i in range(count) if first + i * step <= high + 1e-9]


def _f(value: float) -> str:
    return f"{value:.1f}"


def _axes(frame: Frame, days: Sequence[date], unit: str, ticks: Sequence[float]) -> list[Mark]:
    marks = []
    for tick in ticks:
        y = _f(frame.y(tick))
        marks.append(Mark("line", {"x1": str(frame.left), "x2": str(frame.width - frame.right), "y1": y, "y2": y,
                                   "class": "grid"}))  # fmt: skip
        marks.append(Mark("text", {"x": str(frame.left - 4), "y": _f(frame.y(tick) + 4), "class": "tick",
                                   "text-anchor": "end"}, f"{tick:g}"))  # fmt: skip
    marks.append(Mark("text", {"x": "2", "y": "11", "class": "unit"}, unit))
    every = 14 if frame.width < 500 and len(days) > 30 else 7
    for i, d in enumerate(days):
        if d.weekday() == 0 and (i % every < 7 or every == 7):
            marks.append(Mark("text", {"x": _f(frame.x(i, len(days))), "y": str(frame.height - 8), "class": "tick",
                                       "text-anchor": "middle"}, d.strftime("%d %b")))  # fmt: skip
    return marks


def _hline(frame: Frame, value: float, css: str, tip: str) -> Mark:
    y = _f(frame.y(value))
    return Mark("line", {"x1": str(frame.left), "x2": str(frame.width - frame.right), "y1": y, "y2": y,
                         "class": css}, tip=tip)  # fmt: skip


def _band(frame: Frame, low: float, high: float, css: str, tip: str) -> Mark:
    top, bottom = frame.y(high), frame.y(low)
    return Mark("rect", {"x": str(frame.left), "y": _f(top), "width": str(frame.width - frame.left - frame.right),
                         "height": _f(bottom - top), "class": css}, tip=tip)  # fmt: skip


# --- wear ------------------------------------------------------------------------------------------------------------


def _week_means(days: Sequence[ev.DayFigures]) -> list[tuple[int, int, float]]:
    """(first index, last index, mean hours) of each calendar week's complete days (Monday to Sunday), counting
    from the first day with data (before it the patient had no garment to measure)."""
    begun = next((i for i, d in enumerate(days) if d.points > 0), len(days))
    out = []
    start = begun
    for i in range(begun + 1, len(days) + 1):
        if i == len(days) or days[i].day.weekday() == 0:
            done = [d for d in days[start:i] if d.complete]
            if done:
                out.append((start, i - 1, sum(d.wear_s for d in done) / 3600 / len(done)))
            start = i
    return out


def _wear_marks(frame: Frame, days: Sequence[ev.DayFigures], target: float | None) -> list[Mark]:
    n = len(days)
    width = max(1.0, frame.step(n) * 0.7)
    begun = next((i for i, d in enumerate(days) if d.points > 0), n)
    marks = []
    for i, d in enumerate(days):
        if i < begun:
            continue  # before the first reading: no garment to measure yet
        hours = d.wear_s / 3600
        met = target is None or hours >= target
        css = "bar-today" if not d.complete else ("bar-none" if d.points == 0 else "bar-met" if met else "bar-short")
        top = frame.y(hours) if d.points else frame.base - 2
        tip = f"{d.day.isoformat()}: " + (f"{hours:.1f} h worn" if d.points else "no data") + (
            " (today, so far)" if not d.complete else "")  # fmt: skip
        marks.append(Mark("rect", {"x": _f(frame.x(i, n) - width / 2), "y": _f(top), "width": _f(width),
                                   "height": _f(max(frame.base - top, 1.0)), "class": css,
                                   "data-day": d.day.isoformat(), "data-wear-h": f"{hours:.4f}"}, tip=tip))
    for first, last, mean in _week_means(days):
        y = _f(frame.y(mean))
        half = frame.step(n) / 2
        marks.append(Mark("line", {"x1": _f(frame.x(first, n) - half), "x2": _f(frame.x(last, n) + half), "y1": y,
                                   "y2": y, "class": "week-mean", "data-week-mean-h": f"{mean:.4f}"},
                          tip=f"week of {days[first].day.isoformat()}: mean {mean:.1f} h a day"))  # fmt: skip
    if target is not None:
        marks.append(_hline(frame, target, "target", f"target {target:g} h a day"))
    return marks


def wear_chart(loaded: PatientSeries, target: float | None) -> Chart:
    """Wear hours per local day against the daily target, with each week's mean."""
    days = loaded.days
    top = max([d.wear_s / 3600 for d in days] + [target or 0.0, 1.0]) * 1.15

    def draw(size: tuple[int, int]) -> Drawing:
        frame = Frame(size[0], size[1], 0.0, top)
        labels = [d.day for d in days]
        return Drawing(size[0], size[1], tuple(_axes(frame, labels, "h", nice_ticks(0, top)) +
                                               _wear_marks(frame, days, target)))  # fmt: skip

    rows = tuple((d.day.isoformat(), f"{d.wear_s / 3600:.1f} h" if d.points else "no data",
                  "" if target is None else ("yes" if d.wear_s / 3600 >= target else "no")) for d in days)
    met = sum(1 for d in days if d.complete and target is not None and d.wear_s / 3600 >= target)
    complete = sum(1 for d in days if d.complete)
    description = (f"Wear per day over {len(days)} days; the target ({target:g} h) met on {met} of {complete} "
                   "complete days." if target is not None else f"Wear per day over {len(days)} days.")
    return Chart("wear", "Wear per day against the target", description, draw(WIDE), draw(NARROW),
                 Table("Wear per day", ("Day", "Worn", "Target met"), rows),
                 (("bar-met", "target met"), ("bar-short", "below target"), ("bar-none", "no data"),
                  ("target", "target"), ("week-mean", "week's mean")))  # fmt: skip


# --- ankle pressure --------------------------------------------------------------------------------------------------


def _ankle_marks(frame: Frame, loaded: PatientSeries, rx: RxView | None) -> list[Mark]:
    days = [d.day for d in loaded.days]
    n = len(days)
    marks = []
    if rx is not None and rx.band is not None:
        marks.append(_band(frame, rx.band.low_mmhg, rx.band.high_mmhg, "band",
                           f"prescribed {rx.band.low_mmhg:g}-{rx.band.high_mmhg:g} mmHg"))  # fmt: skip
    for i, day in enumerate(days):
        found = loaded.measured.ankle.get(day)
        median = loaded.ankle_median.get(day)
        if found is None or median is None:
            continue
        x = _f(frame.x(i, n))
        outside = rx is not None and rx.band is not None and not rx.band.low_mmhg <= median <= rx.band.high_mmhg
        marks.append(Mark("line", {"x1": x, "x2": x, "y1": _f(frame.y(found.max_mmhg)),
                                   "y2": _f(frame.y(found.min_mmhg)), "class": "range"}))  # fmt: skip
        marks.append(Mark("circle", {"cx": x, "cy": _f(frame.y(median)), "r": "3.5",
                                     "class": "median-out" if outside else "median", "data-day": day.isoformat(),
                                     "data-median": f"{median:.4f}", "data-min": f"{found.min_mmhg:.4f}",
                                     "data-max": f"{found.max_mmhg:.4f}"},
                          tip=f"{day.isoformat()}: median {median:.1f} mmHg, range {found.min_mmhg:.1f}-"
                              f"{found.max_mmhg:.1f}"))  # fmt: skip
    return marks


def ankle_chart(loaded: PatientSeries, rx: RxView | None) -> Chart:
    """Ankle pressure per day while worn: the median as a point, the day's range as a line, the band shaded."""
    values = [v for a in loaded.measured.ankle.values() for v in (a.min_mmhg, a.max_mmhg)]
    if rx is not None and rx.band is not None:
        values += [rx.band.low_mmhg, rx.band.high_mmhg]
    low, high = (min(values), max(values)) if values else (0.0, 50.0)
    low, high = max(0.0, low - 3), high + 3

    def draw(size: tuple[int, int]) -> Drawing:
        frame = Frame(size[0], size[1], low, high)
        return Drawing(size[0], size[1], tuple(_axes(frame, [d.day for d in loaded.days], "mmHg",
                                                     nice_ticks(low, high)) + _ankle_marks(frame, loaded, rx)))

    rows = []
    for d in loaded.days:
        a, m = loaded.measured.ankle.get(d.day), loaded.ankle_median.get(d.day)
        rows.append((d.day.isoformat(), "" if m is None else f"{m:.1f}",
                     "" if a is None else f"{a.min_mmhg:.1f}-{a.max_mmhg:.1f}",
                     f"{d.above_range_s / 60:.0f}", f"{d.below_range_s / 60:.0f}"))  # fmt: skip
    band = f" against the prescribed {rx.band.low_mmhg:g}-{rx.band.high_mmhg:g} mmHg" if rx and rx.band else ""
    outside = sum(1 for d in loaded.days if (m := loaded.ankle_median.get(d.day)) is not None and rx and rx.band
                  and not rx.band.low_mmhg <= m <= rx.band.high_mmhg)  # fmt: skip
    long_out = sum(1 for d in loaded.days if d.above_range_s + d.below_range_s > SUSTAINED_S)
    return Chart("ankle", "Ankle pressure while worn (median and range)",
                 f"Daily ankle pressure while worn{band}; the median was outside the band on {outside} day(s), and "
                 f"more than 30 worn minutes were outside it on {long_out} day(s).",
                 draw(WIDE), draw(NARROW),
                 Table("Ankle pressure per day (mmHg) and minutes outside the band",
                       ("Day", "Median", "Range", "Min above", "Min below"), tuple(rows)),
                 (("band", "prescribed band"), ("median", "median"), ("median-out", "median outside the band"),
                  ("range", "lowest to highest")))  # fmt: skip


# --- gradient --------------------------------------------------------------------------------------------------------


def gradient_chart(loaded: PatientSeries) -> Chart:
    """Worn minutes per day with calf pressure above ankle pressure (a reversed gradient); 30 is ``rolled down``."""
    days = loaded.days
    limit = SUSTAINED_S / 60
    top = max([d.reversed_gradient_s / 60 for d in days] + [limit * 1.5])

    def draw(size: tuple[int, int]) -> Drawing:
        frame = Frame(size[0], size[1], 0.0, top * 1.1)
        n = len(days)
        width = max(1.0, frame.step(n) * 0.7)
        marks = _axes(frame, [d.day for d in days], "min", nice_ticks(0, top * 1.1))
        for i, d in enumerate(days):
            value = d.reversed_gradient_s / 60
            css = "bar-over" if value > limit else "bar-under"
            marks.append(Mark("rect", {"x": _f(frame.x(i, n) - width / 2), "y": _f(frame.y(value)), "width": _f(width),
                                       "height": _f(max(frame.base - frame.y(value), 0.0)), "class": css,
                                       "data-day": d.day.isoformat(), "data-reversed-min": f"{value:.4f}"},
                              tip=f"{d.day.isoformat()}: {value:.0f} min"))  # fmt: skip
        marks.append(_hline(frame, limit, "limit", f"{limit:g} min: rolled down"))
        return Drawing(size[0], size[1], tuple(marks))

    rows = tuple((d.day.isoformat(), f"{d.reversed_gradient_s / 60:.0f}",
                  _gradient_words(loaded.measured.gradient.get(d.day))) for d in days)  # fmt: skip
    over = sum(1 for d in days if d.reversed_gradient_s > SUSTAINED_S)
    return Chart("gradient", "Calf above ankle (reversed gradient), minutes per day",
                 f"Worn minutes per day with calf pressure above ankle pressure; over {limit:g} minutes on {over} "
                 "day(s), which the monitor flags as rolled down.", draw(WIDE), draw(NARROW),
                 Table("Reversed gradient per day", ("Day", "Minutes", "Calf − ankle while reversed"), rows),
                 (("bar-under", "minutes"), ("bar-over", f"over {limit:g} min"), ("limit", "rolled-down limit")))


def _gradient_words(g: ev.GradientDay | None) -> str:
    return "" if g is None else f"{g.calf_minus_ankle_mmhg:+.1f} mmHg"


# --- boot sessions ---------------------------------------------------------------------------------------------------


def _day_index(days: Sequence[date], start_ms: int, session_days: dict[int, date]) -> int | None:
    day = session_days.get(start_ms)
    return days.index(day) if day is not None and day in days else None


def sessions_chart(loaded: PatientSeries, rx: RxView | None, session_days: dict[int, date]) -> Chart:
    """Each boot session's length (a point on its day) against the prescribed shortest and longest session."""
    days = [d.day for d in loaded.days]
    lengths = [s.duration_s / 60 for s in loaded.measured.sessions if s.duration_s is not None]
    lo, hi = (rx.session_min_minutes, rx.session_max_minutes) if rx else (None, None)
    top = max([*lengths, hi or 0.0, 10.0]) * 1.15

    def draw(size: tuple[int, int]) -> Drawing:
        frame = Frame(size[0], size[1], 0.0, top)
        marks = _axes(frame, days, "min", nice_ticks(0, top))
        if lo is not None and hi is not None:
            marks.append(_band(frame, lo, hi, "band", f"prescribed {lo:g}-{hi:g} min"))
        for s in loaded.measured.sessions:
            i = _day_index(days, s.start_ms, session_days)
            if i is None or s.duration_s is None:
                continue
            value = s.duration_s / 60
            bad = (lo is not None and value < lo) or (hi is not None and value > hi)
            marks.append(Mark("circle", {"cx": _f(frame.x(i, len(days))), "cy": _f(frame.y(value)), "r": "3.5",
                                         "class": "median-out" if bad else "median", "data-day": days[i].isoformat(),
                                         "data-length-min": f"{value:.4f}"},
                              tip=f"{days[i].isoformat()}: {value:.0f} min"))  # fmt: skip
        return Drawing(size[0], size[1], tuple(marks))

    per_day = {d: sum(1 for s in loaded.measured.sessions if session_days.get(s.start_ms) == d) for d in days}
    rows = tuple((d.isoformat(), str(per_day[d]), ", ".join(f"{s.duration_s / 60:.0f}" for s in loaded.measured.sessions
                                                             if session_days.get(s.start_ms) == d and s.duration_s))
                 for d in days)  # fmt: skip
    plan = f" ({rx.sessions_per_week} a week prescribed, {lo:g}-{hi:g} min each)" if rx and lo and hi else ""
    return Chart("sessions", "Boot sessions: length of each", f"{sum(per_day.values())} sessions in {len(days)} days"
                 f"{plan}.", draw(WIDE), draw(NARROW),
                 Table("Boot sessions per day", ("Day", "Sessions", "Lengths (min)"), rows),
                 (("band", "prescribed length"), ("median", "session"), ("median-out", "too short or too long")))


def peaks_chart(loaded: PatientSeries, rx: RxView | None, session_days: dict[int, date]) -> Chart:
    """Each session's highest pressure per chamber against the prescribed maximum."""
    days = [d.day for d in loaded.days]
    limit = rx.max_chamber_mmhg if rx else None
    values = [v for s in loaded.measured.sessions for v in s.peaks.values()] + [limit or 0.0, 10.0]
    top = max(values) * 1.15
    zones = [z for z in ZONES if any(z in s.peaks for s in loaded.measured.sessions)]

    def draw(size: tuple[int, int]) -> Drawing:
        frame = Frame(size[0], size[1], 0.0, top)
        marks = _axes(frame, days, "mmHg", nice_ticks(0, top))
        for s in loaded.measured.sessions:
            i = _day_index(days, s.start_ms, session_days)
            if i is None:
                continue
            for j, zone in enumerate(zones):
                if zone not in s.peaks:
                    continue
                x = frame.x(i, len(days)) + (j - (len(zones) - 1) / 2) * min(3.0, frame.step(len(days)) / 6)
                marks.append(Mark("circle", {"cx": _f(x), "cy": _f(frame.y(s.peaks[zone])), "r": "2.8",
                                             "class": f"chamber-{zone}", "data-day": days[i].isoformat(),
                                             "data-chamber": zone, "data-peak": f"{s.peaks[zone]:.4f}"},
                                  tip=f"{days[i].isoformat()} {zone}: {s.peaks[zone]:.1f} mmHg"))  # fmt: skip
        if limit is not None:
            marks.append(_hline(frame, limit, "limit", f"prescribed maximum {limit:g} mmHg"))
        return Drawing(size[0], size[1], tuple(marks))

    rows = tuple((days[i].isoformat() if (i := _day_index(days, s.start_ms, session_days)) is not None else "",
                  *(f"{s.peaks[z]:.1f}" if z in s.peaks else "" for z in zones)) for s in loaded.measured.sessions)
    over = sum(1 for s in loaded.measured.sessions if limit is not None and s.peak and s.peak[1] > limit)
    return Chart("peaks", "Boot sessions: highest pressure per chamber",
                 f"Highest chamber pressure of each session; above the prescribed maximum in {over} session(s).",
                 draw(WIDE), draw(NARROW), Table("Peak per chamber per session (mmHg)", ("Day", *zones), rows),
                 (*tuple((f"chamber-{z}", z) for z in zones), ("limit", "prescribed maximum")))  # fmt: skip


# --- episodes --------------------------------------------------------------------------------------------------------


def timeline_chart(days: Sequence[date], episodes: Sequence[EpisodeView]) -> Chart:
    """Each episode in the period as a bar from its first day to its end (or today), one row per flag."""
    first, last = days[0], days[-1]
    shown = [e for e in episodes if (e.end_day or last + timedelta(days=1)) > first and e.start_day <= last]
    flags = sorted({e.flag for e in shown})

    def draw(size: tuple[int, int]) -> Drawing:
        height = 30 + ROW * max(1, len(flags))
        frame = Frame(size[0], height, 0.0, 1.0, left=8)
        n = len(days)
        marks = _axes(frame, days, "", [])[1:]
        for row, flag in enumerate(flags):
            label = next(e.title for e in shown if e.flag == flag)
            marks.append(Mark("text", {"x": str(frame.left), "y": str(12 + ROW * row), "class": "bar-label"}, label))
        for e in shown:
            row = flags.index(e.flag)
            a = max(0, (e.start_day - first).days)
            until = (e.end_day - timedelta(days=1)) if e.end_day else last
            b = min(n - 1, (until - first).days)
            x = frame.x(a, n) - frame.step(n) / 2
            marks.append(Mark("rect", {"x": _f(x), "y": str(16 + ROW * row), "height": "10",
                                       "width": _f(max(frame.step(n) * (b - a + 1), 2.0)),
                                       "class": SEVERITY_CLASS.get(e.severity, "sev-info"), "data-episode": str(e.id)},
                              tip=f"{e.title}: {e.start_day.isoformat()} – "
                                  f"{e.end_day.isoformat() if e.end_day else 'open'}"))  # fmt: skip
        return Drawing(size[0], height, tuple(marks))

    rows = tuple((e.title, e.severity_word, e.start_day.isoformat(), e.end_day.isoformat() if e.end_day else "open")
                 for e in shown)  # fmt: skip
    return Chart("episodes", "Episodes in the period", f"{len(shown)} episode(s) in the period.", draw(WIDE),
                 draw(NARROW), Table("Episodes", ("Flag", "Severity", "From", "Until"), rows),
                 (("sev-critical", "urgent"), ("sev-warning", "warning"), ("sev-info", "information")))


def for_patient(loaded: PatientSeries, current: Sequence[RxView], episodes: Sequence[EpisodeView]) -> list[Chart]:
    """The charts of a patient's page, for the garment kind of the current prescription."""
    rx = current[0] if current else None
    days = [d.day for d in loaded.days]
    found: list[Chart] = []
    if rx is not None and rx.kind == "boot":
        session_days = _session_days(loaded)
        found += [sessions_chart(loaded, rx, session_days), peaks_chart(loaded, rx, session_days)]
    else:
        found += [wear_chart(loaded, rx.wear_target_h if rx else None), ankle_chart(loaded, rx),
                  gradient_chart(loaded)]  # fmt: skip
    return [*found, timeline_chart(days, episodes)]


def _session_days(loaded: PatientSeries) -> dict[int, date]:
    """Each session's local day (the days' bounds come with the monitor's figures)."""
    out: dict[int, date] = {}
    for s in loaded.measured.sessions:
        for d in loaded.days:
            if d.start_ms <= s.start_ms < d.end_ms:
                out[s.start_ms] = d.day
    return out
