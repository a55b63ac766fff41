"""Day summaries: one point per patient, leg and local day, built from that day's raw samples, kept for ever.

What the monitor, the dashboards, the exports and the workspace read instead
of raw samples (``docs/monitor.md``, "Day summaries"). A summary is the
:class:`~monitor.model.DayStats` the raw-sample computation
(:func:`monitor.compliance.raw_day_stats`) gives for that day, stored in
InfluxDB in the retention policy ``forever`` (``monitor.queries.SUMMARY_RP``),
measurement ``day_summary``, at the day's local midnight, tags ``clinic``,
``patient`` and ``leg`` (``all``: the patient's own row; ``left``, ``right``,
``both``, ``unrecorded``: each garment's leg).

When a summary is (re)built: the ingester's ``receipt`` points say when it last
stored a reading of each patient-hour; a day whose newest receipt is not older
than its summary's ``summarised_ms`` (less :data:`MARGIN_MS`) is stale, as is a
day with receipts and no summary, and a summary computed against another ankle
band or other legs than the registry gives now (its ``basis``). Rebuilding is
idempotent: the same raw samples give the same summary, so late and duplicated
data end in what a full recomputation gives. The current, unfinished day is
rebuilt at most every ``today_every_ms`` (its flags wait for the day's end; the
safety checks read raw boot pressures themselves). A day older than the raw
retention (``horizon_ms``) is never rebuilt: its raw samples may be gone, its
summary is the record.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import aiohttp

from devices.protocol import ZONES
from ingest.encode import escape_key, escape_string
from monitor import queries as q
from monitor.compliance import (
    WINDOW_DAYS,
    InfluxQueryError,
    InfluxReader,
    local_days,
    raw_day_stats,
    windowed,
)
from monitor.model import DayStats, LegStats, PatientContext, SockRx

FORMAT: Final = 1  # the summary's layout; a summary of another format is stale
MARGIN_MS: Final = 120_000  # a receipt this close to a summary's time may be of a reading the summary missed
WRITE_BATCH: Final = 5000  # lines per write request
UNRECORDED: Final = "unrecorded"  # the leg tag of a garment whose leg the registry does not record

# DayStats fields kept in the patient's row, by type; legs keep LegStats' counterparts.
_INTS: Final = ("points", "statuses", "samples", "worn_samples", "ankle_samples", "below_samples", "sessions_started")
_FLOATS: Final = ("wear_s", "wear_sum_s", "above_range_s", "below_range_s", "reversed_gradient_s")
_OPTIONAL: Final = ("below_max_mmhg", "not_below_min_mmhg", "ankle_median_mmhg", "peak_mmhg", "battery_min_pct")
_LEG_INTS: Final = ("samples", "worn_samples", "ankle_samples", "below_samples")
_LEG_FLOATS: Final = ("wear_s", "above_range_s", "below_range_s", "reversed_gradient_s")
_LEG_OPTIONAL: Final = ("below_max_mmhg", "not_below_min_mmhg", "ankle_median_mmhg")


@dataclass(frozen=True, slots=True)
class Stored:
    """One day's summary as read back: its statistics, when it was built and against what."""

    stats: DayStats
    summarised_ms: int
    basis: str
    format: int


@dataclass(slots=True)
class Report:
    """What one load did (for logs, counters and the benchmark)."""

    read: int = 0  # summaries read
    rebuilt: int = 0  # patient-days rebuilt from raw samples
    patients: int = 0  # patients whose days were rebuilt
    # patient -> the unfinished day whose new readings wait for ``today_every_ms`` (the caller asks again later)
    deferred: dict[str, date] = field(default_factory=dict)


# --- what a summary depends on -----------------------------------------------------------------------------------


def basis(ctx: PatientContext, day: date, start_ms: int, end_ms: int) -> str:
    """What a day's figures were computed against besides the samples: the ankle band in force that day and each
    garment's leg. The registry changing either makes the summary stale."""
    rx = ctx.rx_on(day)
    band = f"{rx.low_mmhg:g}-{rx.high_mmhg:g}" if isinstance(rx, SockRx) else "-"
    legs = sorted(f"{g.device}:{g.leg or UNRECORDED}" for g in ctx.garments
                  if g.from_ms < end_ms and (g.to_ms is None or g.to_ms > start_ms))  # fmt: skip
    return band + "|" + ",".join(legs)


# --- encoding ----------------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    return repr(float(value))


def lines_for(ctx: PatientContext, s: DayStats, summarised_ms: int) -> list[str]:
    """The summary of one patient-day as line protocol (ms precision): the patient's row and one per leg."""
    tags = f"clinic={escape_key(ctx.clinic)},patient={escape_key(ctx.patient)}"
    values = [f"{name}={int(getattr(s, name))}i" for name in _INTS]
    values += [f"{name}={_num(getattr(s, name))}" for name in _FLOATS]
    values += [f"{name}={_num(v)}" for name in _OPTIONAL if (v := getattr(s, name)) is not None]
    values += [f"median_{z}_mmhg={_num(v)}" for z, v in sorted(s.zone_medians.items()) if z in ZONES]
    values.append(f"session_durations_s={escape_string(','.join(repr(float(d)) for d in s.session_durations_s))}")
    values.append(f"worn_devices={escape_string(','.join(sorted(s.worn_devices)))}")
    values.append(f"legs={escape_string(','.join(sorted(name or UNRECORDED for name in s.legs)))}")
    values.append(f"basis={escape_string(basis(ctx, s.day, s.start_ms, s.end_ms))}")
    values.append(f"end_ms={s.end_ms}i,summarised_ms={summarised_ms}i,format={FORMAT}i")
    values.append(f"complete={'true' if s.complete else 'false'}")
    out = [f"{q.SUMMARY},{tags},leg={q.PATIENT_ROW} {','.join(values)} {s.start_ms}"]
    for name, leg in sorted(s.legs.items()):
        leg_values = [f"{f}={int(getattr(leg, f))}i" for f in _LEG_INTS]
        leg_values += [f"{f}={_num(getattr(leg, f))}" for f in _LEG_FLOATS]
        leg_values += [f"{f}={_num(v)}" for f in _LEG_OPTIONAL if (v := getattr(leg, f)) is not None]
        out.append(f"{q.SUMMARY},{tags},leg={escape_key(name or UNRECORDED)} {','.join(leg_values)} {s.start_ms}")
    return out


def _split(text: Any) -> list[str]:
    return [part for part in str(text or "").split(",") if part]


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def from_rows(day: date, start_ms: int, end_ms: int, now_ms: int, row: Mapping[str, Any],
              legs: Mapping[str, Mapping[str, Any]]) -> Stored:  # fmt: skip
    """A summary read back (the patient's row and its legs' rows) as the day's statistics."""
    s = DayStats(day, start_ms, end_ms, end_ms <= now_ms)
    for name in _INTS:
        setattr(s, name, int(row.get(name) or 0))
    for name in _FLOATS:
        setattr(s, name, float(row.get(name) or 0.0))
    for name in _OPTIONAL:
        setattr(s, name, _opt(row.get(name)))
    s.zone_medians = {z: float(row[f"median_{z}_mmhg"]) for z in ZONES if row.get(f"median_{z}_mmhg") is not None}
    s.session_durations_s = [float(d) for d in _split(row.get("session_durations_s"))]
    s.worn_devices = set(_split(row.get("worn_devices")))
    for name in _split(row.get("legs")):
        leg_row = legs.get(name, {})
        leg = LegStats()
        for f in _LEG_INTS:
            setattr(leg, f, int(leg_row.get(f) or 0))
        for f in _LEG_FLOATS:
            setattr(leg, f, float(leg_row.get(f) or 0.0))
        for f in _LEG_OPTIONAL:
            setattr(leg, f, _opt(leg_row.get(f)))
        s.legs["" if name == UNRECORDED else name] = leg
    return Stored(s, int(row.get("summarised_ms") or 0), str(row.get("basis") or ""), int(row.get("format") or 0))


# --- InfluxDB ----------------------------------------------------------------------------------------------------


async def ensure_policy(reader: InfluxReader, database: str, raw_days: int | None = None) -> None:
    """The database, its ``forever`` retention policy (infinite: summaries and flags) and, with ``raw_days``, the
    default retention policy's duration (the raw samples': ``raw_days`` days, 0 for ever). Idempotent; needs an
    InfluxDB admin (``deploy/influxdb/compression-users.sh`` does the same at the first start)."""
    await reader.run(database, [f'CREATE DATABASE "{database}"',
                                f'CREATE RETENTION POLICY "{q.SUMMARY_RP}" ON "{database}" DURATION INF '
                                "REPLICATION 1"])  # fmt: skip
    if raw_days is None:
        return
    (series,) = await reader.run(database, [f'SHOW RETENTION POLICIES ON "{database}"'])
    policies = [dict(zip(s["columns"], v, strict=True)) for s in series for v in s["values"]]
    default = next((p for p in policies if p.get("default")), None)
    if default is None or default["name"] == q.SUMMARY_RP:
        raise InfluxQueryError(f"database {database} has no default retention policy for the raw samples")
    wanted = f"{raw_days * 24}h0m0s" if raw_days else "0s"
    if default.get("duration") != wanted:
        duration = f"{raw_days}d" if raw_days else "INF"
        await reader.run(database, [f'ALTER RETENTION POLICY "{default["name"]}" ON "{database}" '
                                    f"DURATION {duration}"])  # fmt: skip


async def write_lines(reader: InfluxReader, database: str, lines: Sequence[str], rp: str | None = q.SUMMARY_RP) -> None:
    """Write line protocol (ms precision) to ``rp`` (``None``: the database's default retention policy)."""
    if not lines:
        return
    params = {"db": database, "precision": "ms", **({"rp": rp} if rp else {})}
    timeout = aiohttp.ClientTimeout(total=reader.timeout_s)
    try:
        async with aiohttp.ClientSession(headers=reader.headers(), timeout=timeout) as http:
            for i in range(0, len(lines), WRITE_BATCH):
                body = "\n".join(lines[i : i + WRITE_BATCH]).encode()
                async with http.post(f"{reader.url.rstrip('/')}/write", params=params, data=body) as resp:
                    if resp.status >= 300:
                        raise InfluxQueryError(f"InfluxDB refused a write: {resp.status} {(await resp.text())[:300]}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise InfluxQueryError(f"InfluxDB write failed: {exc!r}") from exc


READ_CHUNK: Final = 1000  # patients per statement when summaries are read: answers of a few MB each
_PATIENT_FIELDS: Final = (*_INTS, *_FLOATS, *_OPTIONAL, *(f"median_{z}_mmhg" for z in ZONES), "session_durations_s",
                          "worn_devices", "legs", "basis", "end_ms", "summarised_ms", "format")  # fmt: skip
_LEG_FIELDS: Final = (*_LEG_INTS, *_LEG_FLOATS, *_LEG_OPTIONAL)


async def read(reader: InfluxReader, database: str, contexts: Sequence[PatientContext], start_ms: int, end_ms: int,
               now_ms: int) -> dict[str, dict[int, Stored]]:  # fmt: skip
    """Every stored summary of these patients in ``[start_ms, end_ms)``: per patient, by the day's start (ms)."""
    if not contexts:
        return {}
    codes = sorted(c.patient for c in contexts)
    chunks = [codes[i : i + READ_CHUNK] for i in range(0, len(codes), READ_CHUNK)]
    statements = [q.summary_rows(chunk, start_ms, end_ms, fields, legs) for chunk in chunks
                  for fields, legs in ((_PATIENT_FIELDS, False), (_LEG_FIELDS, True))]  # fmt: skip
    try:
        answers = await reader.run(database, statements)
    except InfluxQueryError as exc:
        if "retention policy not found" in str(exc):
            return {}  # no summary was ever written to this database
        raise
    return await asyncio.to_thread(_stored, answers, {c.patient: c for c in contexts}, now_ms)


def _stored(answers: Sequence[list[dict[str, Any]]], contexts: Mapping[str, PatientContext],
            now_ms: int) -> dict[str, dict[int, Stored]]:  # fmt: skip
    rows: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for series in answers:
        for s in series:
            tags = s.get("tags") or {}
            patient, leg = tags.get("patient", ""), tags.get("leg", q.PATIENT_ROW)
            columns = s["columns"]
            for values in s["values"]:
                row = dict(zip(columns, values, strict=True))
                rows[(patient, int(row["time"]))][leg] = row
    out: dict[str, dict[int, Stored]] = defaultdict(dict)
    zones: dict[str, ZoneInfo] = {}
    for (patient, start), legs in rows.items():
        ctx = contexts.get(patient)
        if ctx is None or q.PATIENT_ROW not in legs:
            continue
        row = legs[q.PATIENT_ROW]
        zone = zones.get(ctx.timezone) or zones.setdefault(ctx.timezone, ZoneInfo(ctx.timezone))
        day = datetime.fromtimestamp(start / 1000, zone).date()
        end = int(row.get("end_ms") or start + 86_400_000)
        out[patient][start] = from_rows(day, start, end, now_ms, row, legs)
    return dict(out)


async def receipts(reader: InfluxReader, database: str, contexts: Sequence[PatientContext], start_ms: int,
                   end_ms: int, since_ms: int | None = None) -> dict[str, dict[int, int]]:  # fmt: skip
    """Per patient, each local day's (start ms) newest receipt (when the ingester last stored a reading of it);
    with ``since_ms``, only the days that got one after it."""
    by_zone: dict[str, list[str]] = defaultdict(list)
    for c in contexts:
        by_zone[c.timezone].append(c.patient)
    zones = sorted(by_zone)
    if not zones:
        return {}
    answers = await reader.run(database, [q.receipt_days(by_zone[tz], tz, start_ms, end_ms, since_ms)
                                          for tz in zones])  # fmt: skip
    out: dict[str, dict[int, int]] = defaultdict(dict)
    for series in answers:
        for s in series:
            patient = (s.get("tags") or {}).get("patient")
            for t, received in s["values"]:
                if patient and received is not None:
                    out[patient][int(t)] = int(received)
    return dict(out)


# --- staleness and rebuilding ------------------------------------------------------------------------------------


FRESH: Final = "fresh"
STALE: Final = "stale"
DEFERRED: Final = "deferred"  # stale, but the unfinished day was rebuilt less than ``today_every_ms`` ago


def staleness(ctx: PatientContext, day: tuple[date, int, int], stored: Stored | None, received_ms: int | None,
              now_ms: int, today_every_ms: int, horizon_ms: int | None) -> str:  # fmt: skip
    """Must this patient-day's summary be (re)built from the raw samples? (See the module's docstring.)"""
    when, start, end = day
    if stored is None:
        return STALE if received_ms is not None else FRESH
    if horizon_ms is not None and start < horizon_ms:
        return FRESH  # its raw samples may be gone: the summary is the record
    if stored.format != FORMAT or stored.basis != basis(ctx, when, start, end):
        return STALE
    if received_ms is None or received_ms < stored.summarised_ms - MARGIN_MS:
        return FRESH
    return STALE if end <= now_ms or now_ms - stored.summarised_ms >= today_every_ms else DEFERRED


async def rebuild(reader: InfluxReader, database: str, wanted: Mapping[str, date], contexts: Sequence[PatientContext],
                  now_ms: int, write: bool) -> dict[str, dict[date, DayStats]]:  # fmt: skip
    """Each patient's days from ``wanted[patient]`` to today, computed from the raw samples (and written back as
    summaries when ``write``). Patients are read in groups of the same first day: one set of statements each."""
    by_code = {c.patient: c for c in contexts}
    groups: dict[int, list[PatientContext]] = defaultdict(list)
    for code, first in wanted.items():
        ctx = by_code[code]
        today = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(ctx.timezone)).date()
        groups[max(0, (today - first).days)].append(ctx)
    summarised = int(time.time() * 1000)  # before reading: a reading stored from now on makes the day stale again
    out: dict[str, dict[date, DayStats]] = {}
    lines: list[str] = []
    for days_back, members in sorted(groups.items()):
        fresh = await raw_day_stats(reader, database, members, days_back, now_ms, medians=True)
        for ctx in members:
            days = {d.day: d for d in fresh.get(ctx.patient, [])}
            out[ctx.patient] = days
            if write:
                for d in days.values():
                    lines += lines_for(ctx, d, summarised)
    if write:
        await write_lines(reader, database, lines)
    return out


async def load(reader: InfluxReader, database: str, contexts: Sequence[PatientContext], days_back: int,
               now_ms: int, *, write: bool = False, today_every_ms: int = 0, horizon_ms: int | None = None,
               report: Report | None = None, limit: int | None = None) -> dict[str, dict[date, DayStats]]:  # fmt: skip
    """Each patient's statistics of the local days from ``days_back`` days ago to today (windows not filled in),
    from the stored summaries; stale or missing ones are rebuilt from the raw samples first (and written back
    when ``write``: the monitor writes, the workspace and the exports only read).

    ``limit``: rebuild the days of at most that many patients, those with a stale finished day first (oldest
    first); the others' stale finished days come back ``pending`` (not judged until rebuilt) and, like their
    unfinished day, are listed in ``report.deferred`` for the caller to ask again."""
    report = report if report is not None else Report()
    if not contexts:
        return {}
    days = {c.timezone: local_days(c.timezone, days_back, now_ms) for c in contexts}
    start = min(d[0][1] for d in days.values())
    end = max(d[-1][2] for d in days.values())
    stored, received = await asyncio.gather(read(reader, database, contexts, start, end, now_ms),
                                            receipts(reader, database, contexts, start, end + 300_000))  # fmt: skip
    report.read += sum(len(v) for v in stored.values())
    out: dict[str, dict[date, DayStats]] = {}
    wanted: dict[str, date] = {}
    for ctx in contexts:
        mine, got = stored.get(ctx.patient, {}), received.get(ctx.patient, {})
        result: dict[date, DayStats] = {}
        for day in days[ctx.timezone]:
            when, day_start, day_end = day
            found = mine.get(day_start)
            verdict = staleness(ctx, day, found, got.get(day_start), now_ms, today_every_ms, horizon_ms)
            if verdict == STALE:
                wanted[ctx.patient] = min(wanted.get(ctx.patient, when), when)
            elif verdict == DEFERRED:
                report.deferred[ctx.patient] = when
            result[when] = found.stats if found else DayStats(when, day_start, day_end, day_end <= now_ms)
        out[ctx.patient] = result
    if limit is not None and len(wanted) > limit:
        wanted = _within(wanted, out, limit, report)
    if wanted:
        report.patients += len(wanted)
        fresh = await rebuild(reader, database, wanted, contexts, now_ms, write)
        for code, rebuilt in fresh.items():
            report.rebuilt += len(rebuilt)
            out[code].update({d: s for d, s in rebuilt.items() if d in out[code]})
            if code in report.deferred and report.deferred[code] in rebuilt:
                del report.deferred[code]  # rebuilt with an earlier stale day after all
    return out


def _within(wanted: dict[str, date], out: dict[str, dict[date, DayStats]], limit: int,
            report: Report) -> dict[str, date]:  # fmt: skip
    """The ``limit`` patients to rebuild now (a stale finished day first, the oldest first); the others deferred,
    their stale finished days marked pending."""
    def urgency(code: str) -> tuple[bool, date]:
        first = wanted[code]
        return (out[code][first].complete is False, first)

    ordered = sorted(wanted, key=urgency)
    for code in ordered[limit:]:
        report.deferred[code] = wanted[code]
        for when, stats in out[code].items():
            if when >= wanted[code] and stats.complete:
                out[code][when] = replace(stats, pending=True)
    return {code: wanted[code] for code in ordered[:limit]}


async def day_stats(influx: InfluxReader | str, database: str, contexts: Sequence[PatientContext], days_back: int,
                    now_ms: int | None = None, medians: bool = False) -> dict[str, list[DayStats]]:  # fmt: skip
    """:func:`monitor.compliance.day_stats` from the summaries (read-only: a stale day is computed, not written)."""
    reader = InfluxReader(influx) if isinstance(influx, str) else influx
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    raw = await load(reader, database, contexts, days_back + WINDOW_DAYS - 1, now_ms)
    by_code = {c.patient: c for c in contexts}
    out = {code: windowed(by_code[code], [days[d] for d in sorted(days)]) for code, days in raw.items()}
    if medians:
        await week_medians(reader, database, contexts, out, now_ms)
    return out


async def week_medians(reader: InfluxReader, database: str, contexts: Sequence[PatientContext],
                       days: Mapping[str, list[DayStats]], now_ms: int) -> None:  # fmt: skip
    """The exact median ankle pressure of the 7 days ending with the last complete day, per garment (a display
    figure; a median cannot be composed from daily summaries, so it is read from the raw samples while they are
    kept, and is absent after)."""
    socks = [c for c in contexts if c.kind == "sock" and days.get(c.patient)]
    if not socks:
        return
    statements, lasts = [], []
    for ctx in socks:
        complete = [d for d in days[ctx.patient] if d.complete]
        if not complete:
            continue
        last = complete[-1]
        first = complete[max(0, len(complete) - WINDOW_DAYS)]
        statements.append(q.ankle_median([ctx.patient], first.start_ms, last.end_ms, per_device=True))
        lasts.append((ctx, last))
    for (ctx, last), series in zip(lasts, await reader.run(database, statements), strict=True):
        for s in series:
            device = str((s.get("tags") or {}).get("device") or "")
            for values in s["values"]:
                value = _opt(dict(zip(s["columns"], values, strict=True)).get("ankle_median_mmhg"))
                leg = last.legs.setdefault(ctx.leg_of(device, last.start_ms, last.end_ms), LegStats())
                leg.ankle_median_7d_mmhg = value
        if len(last.legs) == 1:
            (leg,) = last.legs.values()
            last.ankle_median_7d_mmhg = leg.ankle_median_7d_mmhg
