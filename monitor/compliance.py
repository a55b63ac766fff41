"""Compliance per patient and local day: statistics from InfluxDB, the daily flags, adherence summaries.

One definition for the monitor and the dashboards (``docs/compliance.md``):
the flags are exactly those of ``docs/ground-truth.md``, which the simulators'
ground truth computes and the integration tests grade against.

- :func:`day_stats` asks InfluxDB for daily aggregates (``monitor.queries``),
  a handful of statements per clinic time zone for all its patients at once,
  and returns each patient's :class:`~monitor.model.DayStats`, oldest first.
  It recomputes the whole window every time it runs: data a garment stored
  and forwarded late (an offline phone, a gateway's backlog) lands on its
  own past days, and the next evaluation sees it there and updates those
  days' flags. Nothing is cached between runs, so late data always counts.
- :func:`with_windows` fills in the 7-day window values (weekly median
  test, sessions in the window) from the daily ones; pure.
- :func:`flags_for` turns a patient's days into flags; pure.
- :func:`adherence` summarises a patient's judged days for the digest and dashboards; pure.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import aiohttp

from devices.protocol import DEFAULT_MAX_FUTURE_MS, ZONES
from ingest.write import auth_headers
from monitor import queries as q
from monitor.model import (
    BOOT_LONG_SESSIONS,
    BOOT_MISSED_SESSIONS,
    BOOT_OVERPRESSURE,
    BOOT_SHORT_SESSIONS,
    COMPLIANT,
    ROLLED_DOWN,
    SILENT,
    TOO_LOOSE,
    TOO_TIGHT,
    UNDER_USE,
    WORN_OUT,
    BootRx,
    DayResult,
    DayStats,
    LegStats,
    PatientContext,
    SockRx,
)

DAILY_FLAGS: Final = frozenset({SILENT, UNDER_USE, TOO_TIGHT, TOO_LOOSE, ROLLED_DOWN, WORN_OUT, BOOT_OVERPRESSURE,
                                BOOT_SHORT_SESSIONS, BOOT_LONG_SESSIONS, BOOT_MISSED_SESSIONS})  # fmt: skip

WINDOW_DAYS: Final = 7  # worn_out's median and boot_missed_sessions' count: days d-6 .. d
SUSTAINED_S: Final = 1800.0  # rolled_down: more than 30 worn minutes with a reversed gradient
RTM_MIN_DAYS: Final = 16  # US remote therapeutic monitoring bills a 30-day period with 16+ days of data
DAY_MS: Final = 86_400_000
FUTURE_ALLOWANCE_MS: Final = DEFAULT_MAX_FUTURE_MS  # the ingester stores points at most this far ahead of its clock
LARGE_ANSWER: Final = 1 << 20  # bytes of a query's answer from which it is parsed in a worker thread


# --- InfluxDB ---------------------------------------------------------------------------------------------------------


class InfluxQueryError(RuntimeError):
    """InfluxDB refused a query or could not be reached."""


@dataclass(frozen=True, slots=True)
class InfluxReader:
    """Read-only InfluxQL over the v1 HTTP API (``/query``), with basic or token auth.

    ``concurrency`` statements run at once (InfluxDB uses a core per query:
    two suit a 2-core host).
    """

    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 60.0
    concurrency: int = 2

    def headers(self) -> dict[str, str]:
        """Authorization, if any."""
        return auth_headers(self.username, self.password, self.token)

    async def run(self, database: str, statements: Sequence[str]) -> list[list[dict[str, Any]]]:
        """Each statement's series (``name``, ``tags``, ``columns``, ``values``; times in epoch ms), in order."""
        gate = asyncio.Semaphore(max(1, self.concurrency))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers()) as session:

            async def one(statement: str) -> list[dict[str, Any]]:
                async with gate:
                    form = {"db": database, "q": statement, "epoch": "ms"}
                    try:
                        async with session.post(f"{self.url.rstrip('/')}/query", data=form) as resp:
                            raw = await resp.read()
                            status = resp.status
                        # A large answer (a full evaluation's summaries) is parsed off the event loop, which the
                        # safety checks share.
                        body = json.loads(raw) if len(raw) < LARGE_ANSWER else await asyncio.to_thread(json.loads, raw)
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        raise InfluxQueryError(f"InfluxDB query failed: {exc!r}") from exc
                if status != 200 or not isinstance(body, dict):
                    raise InfluxQueryError(f"InfluxDB answered {status}: {str(body)[:500]}")
                series: list[dict[str, Any]] = []
                for result in body.get("results", []):
                    if "error" in result:
                        raise InfluxQueryError(f"{result['error']} in: {statement[:300]}")
                    series.extend(result.get("series", []))
                return series

            return list(await asyncio.gather(*(one(s) for s in statements)))


# --- statistics from InfluxDB ---------------------------------------------------------------------------------------


def local_midnight_ms(day: date, zone: ZoneInfo) -> int:
    """Epoch ms of ``day``'s local midnight in ``zone``."""
    return int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp() * 1000)


def local_days(timezone: str, days_back: int, now_ms: int, lookback: int = 0) -> list[tuple[date, int, int]]:
    """``(day, start_ms, end_ms)`` of the local days from ``days_back + lookback`` days ago up to today, oldest first.

    Daylight-saving days span 23 or 25 hours.
    """
    zone = ZoneInfo(timezone)
    today = datetime.fromtimestamp(now_ms / 1000, zone).date()
    out = []
    for back in range(days_back + lookback, -1, -1):
        day = today - timedelta(days=back)
        out.append((day, local_midnight_ms(day, zone), local_midnight_ms(day + timedelta(days=1), zone)))
    return out


@dataclass(slots=True)
class _Zone:
    """The statements of one time zone and how to read their answers back."""

    timezone: str
    days: list[tuple[date, int, int]]
    statements: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)

    def add(self, statement: str, reader: str) -> None:
        self.statements.append(statement)
        self.readers.append(reader)


def plan_zone(timezone: str, contexts: Sequence[PatientContext], days: list[tuple[date, int, int]],
              now_ms: int, medians: bool = False, week_median: bool = False) -> _Zone:  # fmt: skip
    """The statements that give every patient of one time zone their daily statistics.

    ``medians``: each day's median ankle pressure per garment and every zone's median per patient (display
    figures kept in the day summaries); ``week_median``: the exact median of the last complete 7 days (display).
    """
    zone = _Zone(timezone, days)
    # Today ends now: nothing stamped later than the ingester's future allowance can be stored yet (an
    # evaluation "as of" a past moment, as the graded tests step through stored history, sees only the past).
    start, end = days[0][1], min(days[-1][2], now_ms + FUTURE_ALLOWANCE_MS)
    everyone = [c.patient for c in contexts]
    socks = [c for c in contexts if c.kind == "sock"]
    boots = [c.patient for c in contexts if c.kind == "boot"]
    zone.add(q.daily_samples(everyone, timezone, start, end, per_device=True), "samples")
    zone.add(q.daily_events(everyone, timezone, start, end), "events")
    zone.add(q.daily_statuses(everyone, timezone, start, end), "statuses")
    zone.add(q.daily_worn(everyone, timezone, start, end, medians, per_device=True), "worn")
    if socks:
        codes = [c.patient for c in socks]
        zone.add(q.daily_reversed(codes, timezone, start, end, per_device=True), "reversed")
        # Each day against its own prescription version's band: patients grouped by band and by the stretch of
        # days that band applied (usually the whole range: one statement per band, as before).
        bands: dict[tuple[float, float, int, int], list[str]] = defaultdict(list)
        for c in socks:
            for low, high, span_start, span_end in band_spans(c, days):
                bands[(low, high, max(span_start, start), min(span_end, end))].append(c.patient)
        for (low, high, span_start, span_end), members in sorted(bands.items()):
            zone.add(q.daily_above(members, high, timezone, span_start, span_end, per_device=True), "above")
            zone.add(q.daily_below(members, low, timezone, span_start, span_end, per_device=True), "below")
            zone.add(q.daily_not_below(members, low, timezone, span_start, span_end, per_device=True), "not_below")
        if medians:
            zone.add(q.daily_zone_medians(codes, timezone, start, end), "zone_medians")
        # The exact weekly median for display: the window ending with the last complete day.
        complete = [d for d in days if d[2] <= now_ms]
        if complete and week_median:
            last = complete[-1]
            window_start = days[max(0, days.index(last) - WINDOW_DAYS + 1)][1]
            zone.add(q.ankle_median(codes, window_start, last[2], per_device=True), "median_7d")
    if boots:
        zone.add(q.daily_peak(boots, timezone, start, end), "peak")
        zone.add(q.session_ends(boots, start, end), "ends")
    return zone


def band_spans(ctx: PatientContext, days: Sequence[tuple[date, int, int]]) -> list[tuple[float, float, int, int]]:
    """``(low, high, start_ms, end_ms)`` of each run of consecutive ``days`` judged against one ankle band."""
    spans: list[tuple[float, float, int, int]] = []
    for day, start, end in days:
        rx = ctx.rx_on(day)
        if not isinstance(rx, SockRx):
            continue
        if spans and spans[-1][:2] == (rx.low_mmhg, rx.high_mmhg) and spans[-1][3] == start:
            spans[-1] = (rx.low_mmhg, rx.high_mmhg, spans[-1][2], end)
        else:
            spans.append((rx.low_mmhg, rx.high_mmhg, start, end))
    return spans


def _rows(series: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for s in series:
        tags = s.get("tags") or {}
        for values in s["values"]:
            yield {**tags, **dict(zip(s["columns"], values, strict=True))}


_LEG_READERS: Final = frozenset({"samples", "worn", "reversed", "above", "below", "not_below"})


def _apply(zone: _Zone, reader: str, series: list[dict[str, Any]], stats: dict[str, dict[date, DayStats]],
           contexts: Mapping[str, PatientContext]) -> None:  # fmt: skip
    by_start = {start: day for day, start, _ in zone.days}
    bounds = [(start, end, day) for day, start, end in zone.days]

    def day_of(t: int) -> date | None:
        found = by_start.get(t)
        if found is not None:
            return found
        # Not a bucket start (a raw point such as a session_end): the fetched local day it falls in.
        return next((day for start, end, day in bounds if start <= t < end), None)

    for row in _rows(series):
        patient = row.get("patient")
        day = day_of(int(row["time"]))
        if patient not in stats or day is None or day not in stats[patient]:
            continue
        s = stats[patient][day]
        if reader in _LEG_READERS:
            device = str(row.get("device") or "")
            leg = s.legs.setdefault(contexts[patient].leg_of(device, s.start_ms, s.end_ms), LegStats())
            _apply_leg(reader, row, s, leg, device)
        elif reader == "events":
            n = int(row["events"] or 0)
            s.points += n
            if row.get("type") == "session_start":
                s.sessions_started += n
        elif reader == "statuses":
            n = int(row["statuses"] or 0)
            s.points, s.statuses = s.points + n, s.statuses + n
        elif reader == "peak":
            values = [float(v) for k, v in row.items() if k in ZONES and v is not None]
            s.peak_mmhg = max(values) if values else None
        elif reader == "ends" and row.get("duration_s") is not None:
            s.session_durations_s.append(float(row["duration_s"]))
        elif reader == "zone_medians":
            s.zone_medians = {z: float(row[z]) for z in ZONES if row.get(z) is not None}


def _apply_leg(reader: str, row: Mapping[str, Any], s: DayStats, leg: LegStats, device: str) -> None:
    """One garment's row of a day: into its leg's figures and the patient's totals (sums; wear becomes the union
    of the garments' worn time later, when more than one was worn)."""
    if reader == "samples":
        n, worn_s = int(row["samples"] or 0), float(row["wear_s"] or 0.0)
        leg.samples, leg.wear_s = leg.samples + n, leg.wear_s + worn_s
        s.samples, s.points = s.samples + n, s.points + n
        s.wear_s, s.wear_sum_s = s.wear_s + worn_s, s.wear_sum_s + worn_s
        battery = _float(row["battery_min_pct"])
        s.battery_min_pct = _lowest(s.battery_min_pct, battery)
    elif reader == "worn":
        n, ankles = int(row["worn_samples"] or 0), int(row["ankle_samples"] or 0)
        leg.worn_samples, leg.ankle_samples = leg.worn_samples + n, leg.ankle_samples + ankles
        s.worn_samples, s.ankle_samples = s.worn_samples + n, s.ankle_samples + ankles
        leg.ankle_median_mmhg = _float(row.get("ankle_median_mmhg"))
        if n:
            s.worn_devices.add(device)
    elif reader == "reversed":
        value = float(row["reversed_gradient_s"] or 0.0)
        leg.reversed_gradient_s, s.reversed_gradient_s = leg.reversed_gradient_s + value, s.reversed_gradient_s + value
    elif reader == "above":
        value = float(row["above_range_s"] or 0.0)
        leg.above_range_s, s.above_range_s = leg.above_range_s + value, s.above_range_s + value
    elif reader == "below":
        value, n = float(row["below_range_s"] or 0.0), int(row["below_samples"] or 0)
        high = _float(row["below_max_mmhg"])
        leg.below_range_s, leg.below_samples = leg.below_range_s + value, leg.below_samples + n
        s.below_range_s, s.below_samples = s.below_range_s + value, s.below_samples + n
        leg.below_max_mmhg, s.below_max_mmhg = _highest(leg.below_max_mmhg, high), _highest(s.below_max_mmhg, high)
    elif reader == "not_below":
        low = _float(row["not_below_min_mmhg"])
        leg.not_below_min_mmhg = _lowest(leg.not_below_min_mmhg, low)
        s.not_below_min_mmhg = _lowest(s.not_below_min_mmhg, low)


def _lowest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _highest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def union_seconds(spans: Iterable[tuple[int, float]]) -> float:
    """Seconds covered by the union of ``[t, t + worn_s)`` (``t`` epoch ms): the time in any garment, never a sum."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((float(t), float(t) + worn * 1000.0) for t, worn in spans if worn > 0):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1000.0


async def _unions(reader: InfluxReader, database: str, stats: Mapping[str, Mapping[date, DayStats]]) -> None:
    """Each patient-day with more than one garment worn: wear becomes the union of their worn spans, read exactly
    (one statement per such patient over the range of those days)."""
    wanted = {code: [d for d in days.values() if len(d.worn_devices) > 1] for code, days in stats.items()}
    wanted = {code: days for code, days in wanted.items() if days}
    codes = sorted(wanted)
    statements = [q.worn_spans(c, min(d.start_ms for d in wanted[c]), max(d.end_ms for d in wanted[c])) for c in codes]
    for code, series in zip(codes, await reader.run(database, statements) if statements else [], strict=True):
        spans = [(int(row["time"]), float(row["worn_s"] or 0.0)) for row in _rows(series)]
        for day in wanted[code]:
            day.wear_s = union_seconds((t, w) for t, w in spans if day.start_ms <= t < day.end_ms)


def _median_7d(series: list[dict[str, Any]], stats: dict[str, dict[date, DayStats]], last: date,
               contexts: Mapping[str, PatientContext]) -> None:  # fmt: skip
    for row in _rows(series):
        patient = row.get("patient")
        if patient in stats and last in stats[patient]:
            s = stats[patient][last]
            leg = s.legs.setdefault(contexts[patient].leg_of(str(row.get("device") or ""), s.start_ms, s.end_ms),
                                    LegStats())  # fmt: skip
            leg.ankle_median_7d_mmhg = _float(row["ankle_median_mmhg"])


def _one_leg_medians(days: Iterable[DayStats]) -> None:
    """The patient's medians are their garment's when they wear one (with two, the medians are per leg)."""
    for s in days:
        if len(s.legs) == 1:
            (leg,) = s.legs.values()
            s.ankle_median_mmhg, s.ankle_median_7d_mmhg = leg.ankle_median_mmhg, leg.ankle_median_7d_mmhg


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


async def day_stats(
    influx: InfluxReader | str,
    database: str,
    contexts: Sequence[PatientContext],
    days_back: int,
    now_ms: int | None = None,
    medians: bool = False,
) -> dict[str, list[DayStats]]:
    """Each patient's statistics for the local days from ``days_back`` days ago to today, oldest first.

    Days are the local days of the patient's clinic (``ctx.timezone``); the
    last one, today, is incomplete (``complete=False``). The 7-day windows
    (:func:`with_windows`) are filled in, with 6 more days read before the
    first one so every returned day has its whole window.

    Read from the day summaries (``monitor.summaries``); a day whose summary
    is missing or stale (its receipts are newer, the registry's band or legs
    changed) is computed from the raw samples here, exactly as the summary
    would be (:func:`raw_day_stats`), but not written: the monitor writes
    summaries, the workspace and the exports only read. So late data counts
    the moment it is stored, and every reader gives the monitor's figures.

    ``medians`` adds the exact median ankle pressure of the last complete 7
    days (``ankle_median_7d_mmhg``), a display figure read from the raw samples
    (no summary can hold it); each day's own medians are in its summary.
    """
    from monitor import summaries  # summaries build on this module

    return await summaries.day_stats(influx, database, contexts, days_back, now_ms, medians)


def windowed(ctx: PatientContext, days: list[DayStats]) -> list[DayStats]:
    """``days`` (consecutive, oldest first) with their 7-day windows filled in, less the first 6 (their windows
    reach before ``days``)."""
    return with_windows(ctx, days)[WINDOW_DAYS - 1 :]


async def raw_day_stats(
    influx: InfluxReader | str,
    database: str,
    contexts: Sequence[PatientContext],
    days_back: int,
    now_ms: int | None = None,
    medians: bool = False,
    week_median: bool = False,
) -> dict[str, list[DayStats]]:
    """Per patient, the statistics of each local day from ``days_back`` days ago to today, windows not filled in,
    computed from the raw samples: what a day summary is built from (``monitor.summaries``).

    Only these days are read from InfluxDB (the tag index narrows each
    statement to the given patients, the time range to these days), so asking
    for today and yesterday costs a thirtieth of the whole window.
    """
    reader = InfluxReader(influx) if isinstance(influx, str) else influx
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    by_zone: dict[str, list[PatientContext]] = defaultdict(list)
    for ctx in contexts:
        by_zone[ctx.timezone].append(ctx)
    zones = [plan_zone(tz, members, local_days(tz, days_back, now_ms), now_ms, medians, week_median)
             for tz, members in sorted(by_zone.items())]  # fmt: skip
    answers = await reader.run(database, [s for z in zones for s in z.statements])
    out: dict[str, list[DayStats]] = {}
    position = 0
    for zone in zones:
        members = by_zone[zone.timezone]
        by_code = {c.patient: c for c in members}
        stats = {c.patient: {day: DayStats(day, start, end, end <= now_ms) for day, start, end in zone.days}
                 for c in members}  # fmt: skip
        complete = [d for d, _, end in zone.days if end <= now_ms]
        for reader_name in zone.readers:
            series = answers[position]
            position += 1
            if reader_name == "median_7d":
                _median_7d(series, stats, complete[-1], by_code)
            else:
                _apply(zone, reader_name, series, stats, by_code)
        await _unions(reader, database, stats)
        for ctx in members:
            out[ctx.patient] = [stats[ctx.patient][d] for d, _, _ in zone.days]
            _one_leg_medians(out[ctx.patient])
    return out


# --- pipeline health -------------------------------------------------------------------------------------------------

HOUR_MS: Final = 3_600_000
# What a pipeline outage can fake: data that is missing. These are not judged on a day the pipeline was down.
NO_DATA_FLAGS: Final = frozenset({SILENT, UNDER_USE, BOOT_MISSED_SESSIONS})


async def pipeline_hours(reader: InfluxReader, database: str, start_ms: int, end_ms: int) -> set[int]:
    """Start (epoch ms) of each hour in ``[start_ms, end_ms)`` the pipeline was seen working (``monitor.queries``)."""
    hours: set[int] = set()
    for series in await reader.run(database, q.pipeline_hours(start_ms, end_ms)):
        hours |= {int(row["time"]) for row in _rows(series) if row.get("n")}
    return hours


def healthy_share(hours: set[int], start_ms: int, end_ms: int) -> float:
    """The share of ``[start_ms, end_ms)`` covered by healthy hours (1.0 for an empty span)."""
    if end_ms <= start_ms:
        return 1.0
    covered, hour = 0, start_ms - start_ms % HOUR_MS
    while hour < end_ms:
        if hour in hours:
            covered += min(end_ms, hour + HOUR_MS) - max(start_ms, hour)
        hour += HOUR_MS
    return covered / (end_ms - start_ms)


def outage_days(results: Sequence[DayResult], hours: set[int], needed: float) -> list[DayResult]:
    """``results`` with each complete day the pipeline was healthy for less than ``needed`` of unable to judge the
    flags of missing data (silence, under-use, missed sessions): an outage neither opens nor ends them."""
    out = []
    for r in results:
        if r.flags is not None and healthy_share(hours, r.stats.start_ms, r.stats.end_ms) < needed:
            judged = (r.judged if r.judged is not None else frozenset(r.flags)) - NO_DATA_FLAGS
            r = replace(r, judged=judged, stats=replace(r.stats, pipeline_outage=True))
        out.append(r)
    return out


# --- windows (pure) --------------------------------------------------------------------------------------------------


def weekly_median_below(days: Sequence[DayStats | LegStats], low_mmhg: float) -> bool | None:
    """Is the median ankle pressure of all worn samples of ``days`` strictly below ``low_mmhg``? ``None``: no sample.

    Composed exactly from the daily counts (the median itself is not
    additive): with ``n`` worn samples, ``k`` of them below, the median is
    below when ``k > n / 2``; when ``k == n / 2`` (``n`` even) it is the mean
    of the highest sample below and the lowest not below.
    """
    n = sum(d.ankle_samples for d in days)
    k = sum(d.below_samples for d in days)
    if n == 0:
        return None
    if 2 * k > n:
        return True
    if 2 * k < n:
        return False
    highs = [d.below_max_mmhg for d in days if d.below_max_mmhg is not None]
    lows = [d.not_below_min_mmhg for d in days if d.not_below_min_mmhg is not None]
    if not highs or not lows:
        return None  # inconsistent statistics (a sample stored between the queries): judge it next time
    return (max(highs) + min(lows)) / 2 < low_mmhg


def with_windows(ctx: PatientContext, days: list[DayStats]) -> list[DayStats]:
    """``days`` (consecutive, oldest first) with each day's 7-day window values filled in.

    The window of day ``d`` is ``d-6 .. d``. The patient's monitoring starts on
    their first day with a stored point among ``days``: the missed-sessions
    window never reaches before it (``max(first, d-6) .. d``, the requirement
    pro rata), as in the ground truth, where the first day is the simulation's.
    """
    first = next((i for i, d in enumerate(days) if d.points > 0), 0)
    out = []
    for i, day in enumerate(days):
        window = days[max(0, i - WINDOW_DAYS + 1) : i + 1]
        lo = max(first, i - WINDOW_DAYS + 1)
        held = max(0, i + 1 - lo)
        changes: dict[str, Any] = {"window_days": held}
        rx = ctx.rx_on(day.day)  # the window is judged against the day's own prescription version
        if isinstance(rx, SockRx):
            changes["ankle_7d_below_low"] = weekly_median_below(window, rx.low_mmhg)
            changes["legs"] = {name: replace(leg, ankle_7d_below_low=weekly_median_below(
                [d.legs[name] for d in window if name in d.legs], rx.low_mmhg)) for name, leg in day.legs.items()}
            target = rx.wear_hours_per_day * 3600
            changes["target_days_in_window"] = sum(1 for d in days[lo : i + 1] if d.wear_s >= target)
            changes["target_days_required_in_window"] = -(-rx.wear_days_per_week * held // 7)
        elif isinstance(rx, BootRx):
            changes["sessions_in_window"] = sum(d.sessions_started for d in days[lo : i + 1])
            changes["sessions_required_in_window"] = rx.sessions_per_week * held // 7
            changes["reports_idle"] = reports_idle(days[max(0, i - WINDOW_DAYS) : i])
        out.append(replace(day, **changes))
    return out


def reports_idle(before: Sequence[DayStats]) -> bool:
    """Did the boot send a status on a day without a session among ``before`` (the 7 days before a day)? Such a boot
    is heard from while idle, so a day without any point is silence; one that speaks only in sessions is resting."""
    return any(d.statuses > 0 and d.sessions_started == 0 for d in before)


def rest_day(ctx: PatientContext, day: DayStats) -> bool:
    """A boot's day without any stored point that is not silence: it does not report while idle (its plan and its
    own status messages say so); missing sessions is ``boot_missed_sessions``'s to judge."""
    return isinstance(ctx.rx_on(day.day), BootRx) and day.points == 0 and not day.reports_idle


# --- flags (pure) ----------------------------------------------------------------------------------------------------


def day_flags(ctx: PatientContext, day: DayStats) -> tuple[str, ...] | None:
    """The flags of one complete day with its window values filled in (``docs/ground-truth.md``).

    ``("silent",)`` alone when nothing was stored; ``("compliant",)`` when no
    rule holds; ``None`` when the day is incomplete or the patient has no
    usable prescription (``ctx.problems`` says why; a silent day is still silent).
    """
    rx = ctx.rx_on(day.day)
    if not day.complete or day.pending or (ctx.versions and rx is None):
        return None  # incomplete, its summary awaiting a rebuild, or before (between) the prescription's versions
    if day.points == 0 and not rest_day(ctx, day):
        return (SILENT,)
    flags: list[str] = []
    if isinstance(rx, SockRx):
        target = rx.wear_hours_per_day * 3600
        if day.wear_s < target and (rx.wear_days_per_week >= 7
                                    or day.target_days_in_window < day.target_days_required_in_window):  # fmt: skip
            flags.append(UNDER_USE)
        for name, leg in sorted(day.legs.items()) if day.legs else [("", day)]:
            flags += leg_flags(rx, leg, name)
    elif isinstance(rx, BootRx):
        flags.extend(safety_flags(ctx, day))
        if any(s < rx.session_min_s for s in day.session_durations_s):
            flags.append(BOOT_SHORT_SESSIONS)
        if any(s > rx.session_max_s for s in day.session_durations_s):
            flags.append(BOOT_LONG_SESSIONS)
        if day.sessions_in_window < day.sessions_required_in_window:
            flags.append(BOOT_MISSED_SESSIONS)
    else:
        return None
    return tuple(sorted(flags)) or (COMPLIANT,)


def leg_flags(rx: SockRx, leg: DayStats | LegStats, name: str = "") -> list[str]:
    """Pressure, gradient and wear-out of one leg's garment, named ``flag:leg`` when the leg is recorded."""
    found = []
    if leg.ankle_7d_below_low is True:
        found.append(WORN_OUT)
    if leg.above_range_s > rx.tolerance_s:
        found.append(TOO_TIGHT)
    if leg.below_range_s > rx.tolerance_s:
        found.append(TOO_LOOSE)
    if leg.reversed_gradient_s > SUSTAINED_S:
        found.append(ROLLED_DOWN)
    return [f"{flag}:{name}" if name else flag for flag in found]


def safety_flags(ctx: PatientContext, day: DayStats) -> tuple[str, ...]:
    """The safety flags of any day, the current incomplete one included (alerted the moment they are seen)."""
    rx = ctx.rx_on(day.day)
    if isinstance(rx, BootRx) and day.peak_mmhg is not None and day.peak_mmhg > rx.max_chamber_mmhg:
        return (BOOT_OVERPRESSURE,)
    return ()


def flags_for(ctx: PatientContext, days: list[DayStats]) -> list[DayResult]:
    """Each day's result: its statistics, flags (``None`` for the incomplete current day) and what it can judge.

    ``days`` come from :func:`day_stats` (windows filled in). Hand-made days
    should go through :func:`with_windows` first, with the 6 days before the
    first one to judge, or the first days' windows are shorter.
    """
    return [DayResult(ctx.patient, day, day_flags(ctx, day), judged_flags(ctx, day)) for day in days]


WEAR_FLAGS: Final = frozenset({TOO_TIGHT, TOO_LOOSE, ROLLED_DOWN, WORN_OUT})
SESSION_FLAGS: Final = frozenset({BOOT_SHORT_SESSIONS, BOOT_LONG_SESSIONS})


def judged_flags(ctx: PatientContext, day: DayStats) -> frozenset[str]:
    """The flags whose runs this day's data can extend or end (``docs/compliance.md``, "Episodes").

    No stored point: only ``silent``. A sock day with data judges ``silent`` and ``under_use``, and the
    pressure flags only with worn samples. A boot day judges ``silent`` and the missed-sessions window, the
    session lengths only with a session that ended, over-pressure only with samples (a session ran).
    """
    rx = ctx.rx_on(day.day)
    if day.pending or (ctx.versions and rx is None):
        return frozenset()
    if rest_day(ctx, day):
        return frozenset({BOOT_MISSED_SESSIONS})
    if day.points == 0:
        return frozenset({SILENT})
    found = {SILENT}
    if isinstance(rx, SockRx):
        found.add(UNDER_USE)
        for name, leg in day.legs.items() if day.legs else [("", day)]:
            if leg.worn_samples > 0:
                found |= {f"{flag}:{name}" if name else flag for flag in WEAR_FLAGS}
    elif isinstance(rx, BootRx):
        found.add(BOOT_MISSED_SESSIONS)
        if day.session_durations_s:
            found |= SESSION_FLAGS
        if day.samples > 0:
            found.add(BOOT_OVERPRESSURE)
    return frozenset(found)


# --- adherence (pure) ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Adherence:
    """A patient's adherence over the last 7 and 30 local days, for the digest and the dashboards.

    ``*_7d`` / ``*_30d`` count the complete days among the last 7 / 30
    (``judged_*``); ``covered_*`` is the share of them meeting the target
    (sock: worn at least the prescribed hours; boot: a session started).
    ``data_days_30d`` counts the days with any stored point among the last 30
    local days, today included; the US remote-therapeutic-monitoring codes
    bill a 30-day period only with 16 or more (``rtm_eligible``).
    """

    patient: str
    kind: str | None
    judged_7d: int
    judged_30d: int
    target_days_7d: int
    target_days_30d: int
    covered_7d: float | None
    covered_30d: float | None
    data_days_30d: int
    rtm_eligible: bool
    flag_days_30d: dict[str, int]
    # socks
    wear_hours_mean_7d: float | None = None
    wear_hours_mean_30d: float | None = None
    in_range_share_30d: float | None = None
    above_range_share_30d: float | None = None
    below_range_share_30d: float | None = None
    reversed_gradient_share_30d: float | None = None
    ankle_median_7d_mmhg: float | None = None
    # boots
    sessions_7d: int = 0
    sessions_30d: int = 0
    sessions_per_week_30d: float | None = None
    session_mean_s_30d: float | None = None
    session_longest_s_30d: float | None = None
    peak_mmhg_30d: float | None = None


def meets_target(ctx: PatientContext, day: DayStats) -> bool:
    """Did the day meet its prescription's daily target (sock: the wear hours; boot: a session)?"""
    rx = ctx.rx_on(day.day)
    if isinstance(rx, SockRx):
        return day.wear_s >= rx.wear_hours_per_day * 3600
    if isinstance(rx, BootRx):
        return day.sessions_started > 0
    return False


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def adherence(ctx: PatientContext, results: Sequence[DayResult]) -> Adherence:
    """Summary of ``results`` (one patient's consecutive days, oldest first, as :func:`flags_for` gives them)."""
    recent = list(results)[-30:]
    judged = [r for r in results if r.stats.complete][-30:]
    week = judged[-7:]
    flag_days: dict[str, int] = defaultdict(int)
    for r in judged:
        for flag in r.flags or ():
            if flag != COMPLIANT:
                flag_days[flag] += 1
    target_7 = sum(1 for r in week if meets_target(ctx, r.stats))
    target_30 = sum(1 for r in judged if meets_target(ctx, r.stats))
    data_days = sum(1 for r in recent if r.stats.points > 0)
    common: dict[str, Any] = {
        "patient": ctx.patient, "kind": ctx.kind, "judged_7d": len(week), "judged_30d": len(judged),
        "target_days_7d": target_7, "target_days_30d": target_30, "covered_7d": _share(target_7, len(week)),
        "covered_30d": _share(target_30, len(judged)), "data_days_30d": data_days,
        "rtm_eligible": data_days >= RTM_MIN_DAYS, "flag_days_30d": dict(sorted(flag_days.items())),
    }  # fmt: skip
    if isinstance(ctx.rx, SockRx):
        worn = sum(r.stats.wear_s for r in judged)
        above = sum(r.stats.above_range_s for r in judged)
        below = sum(r.stats.below_range_s for r in judged)
        medians = [r.stats.ankle_median_7d_mmhg for r in judged if r.stats.ankle_median_7d_mmhg is not None]
        return Adherence(**common,
                         wear_hours_mean_7d=_share(sum(r.stats.wear_s for r in week) / 3600, len(week)),
                         wear_hours_mean_30d=_share(worn / 3600, len(judged)),
                         in_range_share_30d=_share(worn - above - below, worn),
                         above_range_share_30d=_share(above, worn), below_range_share_30d=_share(below, worn),
                         reversed_gradient_share_30d=_share(sum(r.stats.reversed_gradient_s for r in judged), worn),
                         ankle_median_7d_mmhg=medians[-1] if medians else None)  # fmt: skip
    if isinstance(ctx.rx, BootRx):
        durations = [s for r in judged for s in r.stats.session_durations_s]
        peaks = [r.stats.peak_mmhg for r in judged if r.stats.peak_mmhg is not None]
        sessions_30 = sum(r.stats.sessions_started for r in judged)
        return Adherence(**common, sessions_7d=sum(r.stats.sessions_started for r in week), sessions_30d=sessions_30,
                         sessions_per_week_30d=_share(sessions_30 * 7, len(judged)),
                         session_mean_s_30d=_share(sum(durations), len(durations)),
                         session_longest_s_30d=max(durations, default=None),
                         peak_mmhg_30d=max(peaks, default=None))  # fmt: skip
    return Adherence(**common)


def adherence_all(contexts: Sequence[PatientContext], results: Mapping[str, Sequence[DayResult]]) -> list[Adherence]:
    """:func:`adherence` of every patient with results, in ``contexts`` order."""
    return [adherence(c, results[c.patient]) for c in contexts if c.patient in results]
