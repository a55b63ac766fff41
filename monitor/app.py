"""``compression monitor``: the loop that evaluates, keeps episodes, and sends e-mails.

Each replica tries to hold the lease (``state.leases``); only the holder works:

- every ``interval_s``: every patient's last ``days_back`` local days from
  InfluxDB (recomputed each time, so late data counts), their flags, the
  episodes, the e-mails queued (``monitor.evaluate``), flags written back to
  InfluxDB for the dashboards;
- every ``safety_interval_s``: today's boot pressures only, so an
  over-pressure opens its episode and e-mail within seconds;
- at each clinic's ``digest_hour``: one digest per physio, queued once per day;
- all the time: due e-mails sent, retried with backoff until the server
  takes them.

If InfluxDB cannot be read, nothing is evaluated (no alert storm after an
outage); the outbox keeps its e-mails through any restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
from sqlalchemy import select

from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Actor, Registry
from ingest.encode import escape_key, escape_string
from ingest.reattribute import Influx, ReattributionError, reattribute, targets
from monitor import figures, summaries
from monitor import queries as q
from monitor.compliance import (
    WINDOW_DAYS,
    InfluxQueryError,
    InfluxReader,
    adherence,
    flags_for,
    healthy_share,
    local_days,
    outage_days,
    pipeline_hours,
    safety_flags,
    windowed,
)
from monitor.evaluate import CHUNK as EVALUATE_CHUNK
from monitor.evaluate import Ending, Live, MailData, Outcome, evaluate, open_urgent
from monitor.letters import Letters, also_to
from monitor.mail import (
    FLAG_TITLE,
    ChartSeries,
    DigestMail,
    DigestRow,
    EpisodeMail,
    MailError,
    SmtpSender,
    compose_digest,
    compose_episode,
    next_attempt,
)
from monitor.model import BootRx, DayResult, DayStats, LegStats, PatientContext, SockRx, split_flag
from monitor.registry import Contexts
from monitor.settings import MonitorSettings
from monitor.state import DayFlags, Episode, Outbox, State, shard_lease, shard_of
from monitor.summaries import Report

log = logging.getLogger(__name__)
CHART_DAYS = 14
MONITOR_ACTOR = Actor("monitor", "admin")  # in the registry's audit trail for the re-attributions it carries out
# Receipts are asked for from a little before the previous evaluation: one written while it ran is not missed.
RECEIPT_MARGIN_MS = 120_000
# A retention policy drops whole shard groups (7 days for a 13-month policy): days this close to the retention's
# edge are not rebuilt either, their raw samples may already be gone.
RETENTION_GRACE_DAYS = 8
REBUILD_AT_LEAST = 500  # patients whose summaries one evaluation may rebuild, whatever today's share


@dataclass(slots=True)
class Counters:
    """What the monitor did, for logs and tests."""

    evaluations: int = 0
    safety_checks: int = 0
    skipped_unreadable: int = 0
    opened: int = 0
    resolved: int = 0
    sent: int = 0
    retries: int = 0
    failed: int = 0
    digests: int = 0
    last_evaluation_s: float = 0.0
    last_read_days: dict[int, int] = field(default_factory=dict)  # days read back -> patients (last evaluation)
    last_rebuilt: int = 0  # patient-days rebuilt from raw samples by the last evaluation
    last_applied: int = 0  # patients whose episodes the last evaluation (or safety check) re-judged
    last_deferred: int = 0  # patients whose stale summaries wait for a later evaluation (the rebuild limit)
    rebuilt: int = 0
    summaries_read: int = 0
    lease_held: bool = False
    problems: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Recipients whose last e-mail failed for good (refused by the server, unusable address, not composable), with
    # the cause: logged once per cause, shown as a problem of their patients until an e-mail to them goes through.
    undeliverable: dict[str, str] = field(default_factory=dict)


class ChartMailData(MailData):
    """Episode e-mail data with the patient's last 14 days for the chart, from the evaluation's results."""

    def __init__(self, results: Mapping[str, Sequence[DayResult]]) -> None:
        super().__init__(results)

    def episode(self, ctx: PatientContext, episode: Episode, kind: str,
                ending: Ending | None = None) -> dict[str, Any]:  # fmt: skip
        """An :class:`EpisodeMail` as JSON-ready data (composed when it is sent)."""
        zone = ZoneInfo(ctx.timezone)
        start = datetime(episode.start_day.year, episode.start_day.month, episode.start_day.day, tzinfo=zone)
        end = episode.end_day
        mail = EpisodeMail(
            dedupe_key=f"{kind}:{episode.id}", kind=kind, patient=ctx.patient, clinic=ctx.clinic,  # type: ignore[arg-type]
            timezone=ctx.timezone, flag=episode.flag, severity=episode.severity,  # type: ignore[arg-type]
            started_at=start, physio_email=ctx.physio_email or "", physio_name=ctx.physio_name,
            ended_at=datetime(end.year, end.month, end.day, tzinfo=zone) if end else None,
            summary=_summary(ctx, episode, self.results.get(ctx.patient, ())),
            chart=chart_series(ctx, self.results.get(ctx.patient, ())),
            thread_key=f"opened:{episode.id}" if kind == "resolved" else None,
            ended_reason=ending.reason if ending else None,
            evidence=_evidence(ctx, episode.flag, ending, self.results.get(ctx.patient, ())) if ending else (),
        )  # fmt: skip
        return {"mail": msgspec.to_builtins(mail)}


def _evidence(ctx: PatientContext, flag: str, ending: Ending, results: Sequence[DayResult]) -> tuple[str, ...]:
    """What shows the episode over, in words: the detail of the ending, then each day that showed it gone."""
    by_day = {r.stats.day: r.stats for r in results}
    lines = [ending.detail] if ending.detail else []
    lines += [_day_evidence(ctx, flag, by_day[d]) for d in ending.cleared_by if d in by_day]
    return tuple(lines)


def _day_evidence(ctx: PatientContext, flag: str, s: DayStats) -> str:
    """One day's figures that bear on ``flag`` (the day showed it gone); a leg's flag, that leg's figures."""
    base, leg_name = split_flag(flag)
    rx = ctx.rx_on(s.day)
    if base == "silent":
        return f"{s.day}: readings received again ({s.points} stored)"
    if isinstance(rx, SockRx):
        if base == "under_use":
            return f"{s.day}: worn {s.wear_s / 3600:.1f} h of {rx.wear_hours_per_day:g} h"
        leg = s.legs.get(leg_name) if leg_name else None
        figures: DayStats | LegStats = leg or s
        worn = f"{s.day}: {leg_name + ' leg ' if leg else ''}worn {figures.wear_s / 3600:.1f} h"
        if base == "too_tight":
            return f"{worn}, {figures.above_range_s / 60:.0f} min above {rx.high_mmhg:g} mmHg"
        if base == "too_loose":
            return f"{worn}, {figures.below_range_s / 60:.0f} min below {rx.low_mmhg:g} mmHg"
        if base == "rolled_down":
            return f"{worn}, {figures.reversed_gradient_s / 60:.0f} min with calf above ankle"
        return f"{worn}, weekly ankle median not below {rx.low_mmhg:g} mmHg"
    if isinstance(ctx.rx, BootRx):
        lengths = ", ".join(f"{d / 60:.0f} min" for d in s.session_durations_s) or "none"
        peak = f", peak {s.peak_mmhg:.0f} mmHg" if s.peak_mmhg is not None else ""
        return f"{s.day}: {s.sessions_started} session(s) (lengths {lengths}){peak}"
    return f"{s.day}: data received"


def chart_series(ctx: PatientContext, results: Sequence[DayResult]) -> ChartSeries | None:
    """The last 14 complete days: wear hours against the target, ankle median (sock) or peak (boot) against the band."""
    days = [r.stats for r in results if r.stats.complete][-CHART_DAYS:]
    if not days:
        return None
    wear = tuple(round(d.wear_s / 3600, 2) if d.points else None for d in days)
    if isinstance(ctx.rx, SockRx):
        targets = tuple(rx.wear_hours_per_day if isinstance(rx := ctx.rx_on(d.day), SockRx) else None for d in days)
        changed = len(set(targets)) > 1 or targets[-1] != ctx.rx.wear_hours_per_day
        return ChartSeries(tuple(d.day for d in days), wear, ctx.rx.wear_hours_per_day,
                           tuple(d.ankle_median_mmhg for d in days), ctx.rx.low_mmhg, ctx.rx.high_mmhg,
                           day_targets=targets if changed else None)  # fmt: skip
    if isinstance(ctx.rx, BootRx):
        return ChartSeries(tuple(d.day for d in days), wear, None, tuple(d.peak_mmhg for d in days), None,
                           ctx.rx.max_chamber_mmhg, pressure_label="peak chamber")  # fmt: skip
    return None


def _summary(ctx: PatientContext, episode: Episode, results: Sequence[DayResult]) -> tuple[str, ...]:
    """The episode's days in figures, a line each. Today is unfinished: a sock's wear so far says nothing (it is
    left out); a boot's sessions so far are what a safety alert is about (shown as today, so far)."""
    lines = []
    for r in results:
        if r.stats.day < episode.start_day or (episode.end_day and r.stats.day >= episode.end_day):
            continue
        s = r.stats
        rx = ctx.rx_on(s.day)  # each day against its own prescription version
        if isinstance(rx, SockRx) and not s.complete:
            continue
        if isinstance(rx, SockRx):
            ankle = f", ankle median {s.ankle_median_mmhg:.1f} mmHg" if s.ankle_median_mmhg else ""
            if len(s.legs) > 1:  # a stocking on each leg: each leg's time and median
                ankle = "".join(f"; {name} leg {leg.wear_s / 3600:.1f} h" + (
                    f", ankle median {leg.ankle_median_mmhg:.1f} mmHg" if leg.ankle_median_mmhg else "")
                    for name, leg in sorted(s.legs.items()))  # fmt: skip
            lines.append(f"{s.day}: worn {s.wear_s / 3600:.1f} h of {rx.wear_hours_per_day:g} h{ankle}")
        elif isinstance(rx, BootRx):
            peak = f", peak {s.peak_mmhg:.0f} mmHg (max {rx.max_chamber_mmhg:g})" if s.peak_mmhg else ""
            today = "" if s.complete else " (today, so far)"
            lines.append(f"{s.day}{today}: {s.sessions_started} session(s){peak}")
    return tuple(lines[-7:])


class Monitor:
    """One replica of the monitor."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.state = State(settings.state_database_url)
        engine = make_engine(settings.registry_database_url)
        migrate(engine)
        self.registry = Registry(session_factory(engine))
        self.contexts = Contexts(self.registry)  # the registry read again only when it changed
        self.reader = InfluxReader(settings.influx_url, settings.influx_username, settings.influx_password,
                                   settings.influx_token)  # fmt: skip
        self.sender = SmtpSender.from_settings(settings)
        self.letters = Letters(self.state, self.reader, settings.influx_database)
        self.replica = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.counters = Counters()
        self._stop = asyncio.Event()
        self._contexts: list[PatientContext] = []
        self._results: dict[str, list[DayResult]] = {}
        # Incremental evaluation: each patient's raw day statistics (and the context they were computed for),
        # refreshed for the days that received data since the last evaluation (the ingester's receipts).
        self._raw: dict[str, tuple[PatientContext, dict[date, DayStats]]] = {}
        self._receipts_since_ms = 0
        self._full_at = 0.0
        self._healthy: set[int] = set()
        self._shards: set[int] | None = None  # the shards held (None: not run by run(); every patient is ours)
        self._holding = asyncio.Event()  # set while this replica holds the lease: the workers run
        self._writing = asyncio.Lock()  # the evaluation and the safety checks write the state one at a time
        self._policy_ready = False  # the summaries' retention policy exists
        # Per patient, what the last applied evaluation judged by and showed (``_fingerprints``): unchanged ones
        # are not applied again.
        self._marks: dict[str, tuple[int, int, int | None]] = {}
        self._info_hour_ms = 0  # the hour everyone's patient_info was last written
        # Work saved between evaluations: patients whose days were read again (their windows are recomputed), each
        # patient's windowed days and the key they were made for, and the results judged from them.
        self._touched: set[str] = set()
        self._windowed: dict[str, tuple[Any, list[DayStats]]] = {}
        self._judged: dict[str, tuple[list[DayStats], int, list[DayResult]]] = {}
        self._deferred: dict[str, date] = {}  # unfinished days with readings newer than their summary
        self._peaks: dict[str, tuple[date, float]] = {}  # today's highest boot pressure, from the safety checks

    def stop(self) -> None:
        """Finish the current step, give up the lease, return from :meth:`run`."""
        self._stop.set()

    async def run(self) -> None:
        """Work while holding the lease, until :meth:`stop`: three tasks, so none waits for another.

        - the evaluation (every ``interval_s``; a full one can take a minute at 10,000 patients);
        - the safety checks (every ``safety_interval_s``): today's boot pressures, an over-pressure opens its
          episode and queues its e-mail at once, whatever the evaluation is doing;
        - the lease, the digest and the outbox (this loop), so e-mails go out during an evaluation too.

        The state database is written under one lock (:attr:`_writing`), held for the writes only.
        """
        log.info("monitor %s: influx=%s db=%s registry=%s state=%s smtp=%s:%d every %gs (safety %gs)",
                 self.replica, self.settings.influx_url, self.settings.influx_database,
                 self.settings.registry_database_url.split("@")[-1], self.settings.state_database_url.split("@")[-1],
                 self.settings.smtp_host, self.settings.smtp_port, self.settings.interval_s,
                 self.settings.safety_interval_s)  # fmt: skip
        workers = [asyncio.create_task(self._every(self._evaluation_round, "evaluation")),
                   asyncio.create_task(self._every(self._safety_round, "safety check"))]  # fmt: skip
        try:
            renewed = -math.inf  # when the lease was last renewed (monotonic)
            while not self._stop.is_set():
                held = False
                try:
                    shards = await asyncio.to_thread(self._take_share)
                    held = bool(shards)
                    renewed = time.monotonic() if held else -math.inf
                    if shards != self._shards:
                        log.info("monitor %s holds %s", self.replica,
                                 f"shards {sorted(shards)} of {self.settings.shards}" if shards else "no lease")
                    self._shards = shards
                    self.counters.lease_held = held
                    self._holding.set() if held else self._holding.clear()
                    if held:
                        await self.digest_if_due()
                        await self.send_due()
                except Exception as exc:  # e.g. the state database restarting: log, wait, try again; never exit
                    if self._holding.is_set() and time.monotonic() - renewed < self.settings.lease_s / 2:
                        # The lease renewed moments ago is still ours (a busy database): the work goes on.
                        held = True
                        log.warning("monitor %s: this round failed (%s); the lease renewed %.0f s ago is still "
                                    "held, trying again shortly", self.replica, str(exc).splitlines()[0][:200],
                                    time.monotonic() - renewed)  # fmt: skip
                    else:
                        self.counters.lease_held = held = False
                        self._holding.clear()
                        log.exception("monitor %s: this round failed; trying again shortly", self.replica)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=self._pause(held))
        finally:
            self._holding.clear()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.to_thread(self.state.release_all, self.replica)

    def _take_share(self) -> set[int]:
        """The shards of clinics this replica works on now (``State.share``; one shard: the single lease)."""
        if self.settings.shards == 1:
            return {0} if self.state.acquire_lease(self.replica, self.settings.lease_s) else set()
        return self.state.share(self.replica, self.settings.shards, self.settings.lease_s)

    def _renew(self) -> bool:
        """Renew this replica's leases; False when it lost one (another replica works on those clinics now)."""
        if self.settings.shards == 1:
            return self.state.acquire_lease(self.replica, self.settings.lease_s)
        shards = self._shards if self._shards is not None else set(range(self.settings.shards))
        return bool(shards) and all([self.state.acquire_lease(self.replica, self.settings.lease_s,
                                                              shard_lease(i, self.settings.shards))
                                     for i in sorted(shards)])  # fmt: skip

    def _mine(self, contexts: list[PatientContext]) -> list[PatientContext]:
        """The patients of the clinics of this replica's shards (all of them with one shard, or when called
        directly rather than from :meth:`run`)."""
        if self.settings.shards == 1 or self._shards is None:
            return contexts
        return [c for c in contexts if shard_of(c.clinic, self.settings.shards) in self._shards]

    async def _every(self, step: Callable[[], Awaitable[float]], name: str) -> None:
        """Run ``step`` while the lease is held, waiting the seconds it returns between runs; never exits on error."""
        while not self._stop.is_set():
            await self._holding.wait()
            try:
                pause = await step()
            except Exception:  # logged with its traceback: one failed round must not stop the task
                log.exception("monitor %s: %s failed; trying again shortly", self.replica, name)
                pause = min(10.0, self.settings.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=pause)

    async def _evaluation_round(self) -> float:
        started = time.monotonic()
        ok = await self.evaluate_once()
        wait = self.settings.interval_s if ok else min(10.0, self.settings.interval_s)
        return max(0.0, wait - (time.monotonic() - started))

    async def _safety_round(self) -> float:
        started = time.monotonic()
        await self.safety_once()
        return max(0.0, self.settings.safety_interval_s - (time.monotonic() - started))

    def _pause(self, held: bool) -> float:
        if not held:
            return max(1.0, self.settings.lease_s / 3)
        return max(0.2, min(1.0, self.settings.safety_interval_s / 5))

    # --- evaluation ---------------------------------------------------------------------------------------------

    async def evaluate_once(self, now_ms: int | None = None) -> bool:
        """Evaluate every patient; False (and nothing changed) when InfluxDB cannot be read."""
        started = time.monotonic()
        await self.reattribute_pending()
        contexts = self._with_delivery_problems(self._mine(await asyncio.to_thread(self.contexts.get)))
        self._note_problems(contexts)
        judged = [c for c in contexts if c.rx is not None]
        try:
            if not self._policy_ready:
                await self.ensure_retention()
            stats = await self._day_stats(judged, now_ms)
            seen = await self._last_seen(judged, now_ms)
            healthy = await self._pipeline_hours(now_ms)
        except InfluxQueryError as exc:
            self.counters.skipped_unreadable += 1
            log.warning("evaluation skipped, InfluxDB unreadable (no flags change until it answers): %s", exc)
            return False
        if not await self._still_holding():
            return False
        self._contexts = contexts
        self._healthy = healthy
        self._results = await asyncio.to_thread(self._judge, judged, stats, healthy)
        await self._apply(seen, now_ms)
        self.counters.evaluations += 1
        self.counters.last_evaluation_s = time.monotonic() - started
        log.info("evaluated %d patients (%d judged) in %.2fs", len(contexts), len(judged),
                 self.counters.last_evaluation_s)  # fmt: skip
        return True

    def _judge(self, judged: Sequence[PatientContext], stats: Mapping[str, list[DayStats]],
               healthy: set[int]) -> dict[str, list[DayResult]]:  # fmt: skip
        """Each patient's days with their flags (pure; in a worker thread, off the loop the safety checks share).
        A patient whose windowed days are last time's, with the same pipeline health, keeps last time's results."""
        share = self.settings.pipeline_healthy_share
        health = hash(frozenset(healthy))
        out = {}
        for c in judged:
            days = stats.get(c.patient, [])
            before = self._judged.get(c.patient)
            if before is not None and before[0] is days and before[1] == health:
                out[c.patient] = before[2]
                continue
            out[c.patient] = outage_days(flags_for(c, days), healthy, share)
            self._judged[c.patient] = (days, health, out[c.patient])
        return out

    async def ensure_retention(self) -> None:
        """The retention policies (``monitor.summaries.ensure_policy``): summaries and flags for ever, raw samples for
        ``raw_retention_days``. Without the InfluxDB admin right this needs, a warning says what to run, and the
        monitor goes on (an admin or deploy/influxdb/compression-users.sh sets them)."""
        try:
            await summaries.ensure_policy(self.reader, self.settings.influx_database, self.settings.raw_retention_days)
        except InfluxQueryError as exc:
            if "authoriz" not in str(exc):
                raise
            log.warning("cannot set the retention policies (%s): an InfluxDB admin must create the retention policy "
                        "%r (DURATION INF) and give the default one %d days (deploy/influxdb/compression-users.sh)",
                        exc, q.SUMMARY_RP, self.settings.raw_retention_days)  # fmt: skip
        self._policy_ready = True

    async def _day_stats(self, judged: Sequence[PatientContext], now_ms: int | None) -> dict[str, list[DayStats]]:
        """Every judged patient's last ``days_back`` days with their windows, from the day summaries
        (``monitor.summaries``): all of them every ``full_every_s`` (and first); in between, only the days whose
        receipts are newer than the last evaluation, and patients whose context changed. Stale summaries are
        rebuilt from the raw samples and written back on the way."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        span = self.settings.days_back + WINDOW_DAYS - 1
        full = time.monotonic() - self._full_at > self.settings.full_every_s or not self._raw
        since, self._receipts_since_ms = self._receipts_since_ms, now - RECEIPT_MARGIN_MS
        if full:
            back = {c.patient: span for c in judged}
            self._full_at = time.monotonic()
        else:
            start = now - (span + 2) * 86_400_000
            changed = await summaries.receipts(self.reader, self.settings.influx_database, judged, start,
                                               now + 300_000, since_ms=since)  # fmt: skip
            back = {}
            for ctx in judged:
                earliest = min(changed.get(ctx.patient, {}), default=None)
                pending = self._deferred.get(ctx.patient)
                wanted = self._days_to_read(ctx, earliest, pending, now, span)
                if wanted is not None:
                    back[ctx.patient] = wanted
        buckets: dict[int, list[PatientContext]] = defaultdict(list)
        for ctx in judged:
            if ctx.patient in back:
                buckets[back[ctx.patient]].append(ctx)
        report = Report()
        limit = self._rebuild_limit(len(judged))
        for days_back, members in sorted(buckets.items()):
            fresh = await summaries.load(self.reader, self.settings.influx_database, members, days_back, now,
                                         write=True, today_every_ms=int(self.settings.today_every_s * 1000),
                                         horizon_ms=self._horizon_ms(now), report=report,
                                         limit=max(0, limit - report.patients))  # fmt: skip
            for ctx in members:
                cached = self._raw.get(ctx.patient)
                read = fresh.get(ctx.patient, {})
                if cached and cached[0] == ctx and all(cached[1].get(d) == s for d, s in read.items()):
                    continue  # the same summaries as last time (new readings of today, its rebuild deferred)
                days = dict(cached[1]) if cached and cached[0] == ctx and days_back < span else {}
                days.update(read)
                self._raw[ctx.patient] = (ctx, days)
                self._touched.add(ctx.patient)
        self._deferred = dict(report.deferred)
        self.counters.last_read_days = dict(sorted((k, len(v)) for k, v in buckets.items()))
        self.counters.last_rebuilt = report.rebuilt
        self.counters.last_deferred = len(report.deferred)
        self.counters.summaries_read += report.read
        self.counters.rebuilt += report.rebuilt
        return await asyncio.to_thread(self._windows, judged, span, now)

    def _rebuild_limit(self, patients: int) -> int:
        """Patients whose summaries one evaluation rebuilds at most: today's are due every ``today_every_s`` for
        everyone, so each evaluation takes its share of them (at least 500); the rest wait for the next ones (a
        finished day waiting is not judged until then, ``DayStats.pending``)."""
        if self.settings.rebuilds_per_evaluation:
            return self.settings.rebuilds_per_evaluation
        if self.settings.today_every_s <= 0:
            return patients
        share = patients * self.settings.interval_s / self.settings.today_every_s
        return max(REBUILD_AT_LEAST, int(share * 1.5) + 1)

    def _windows(self, judged: Sequence[PatientContext], span: int, now: int) -> dict[str, list[DayStats]]:
        """Each patient's cached days of the window, with their 7-day windows filled in (pure CPU: in a thread).
        A patient whose days were not read again, on the same days and with the same peak, keeps last time's."""
        out = {}
        days_of: dict[str, list[tuple[date, int, int]]] = {}
        for ctx in judged:
            span_days = days_of.get(ctx.timezone) or days_of.setdefault(ctx.timezone, local_days(ctx.timezone, span,
                                                                                                  now))  # fmt: skip
            complete = tuple(end <= now for _, _, end in span_days)
            key = (ctx, span_days[0][0], complete, self._peaks.get(ctx.patient))
            kept_before = self._windowed.get(ctx.patient)
            if ctx.patient not in self._touched and kept_before is not None and kept_before[0] == key:
                out[ctx.patient] = kept_before[1]
                continue
            have = self._raw[ctx.patient][1]
            kept = {}
            for d, start, end in span_days:
                day = have.get(d) or DayStats(d, start, end, end <= now)
                kept[d] = day if day.complete == (end <= now) else replace(day, complete=end <= now)
            self._raw[ctx.patient] = (ctx, kept)
            out[ctx.patient] = windowed(ctx, [self._with_peak(ctx, kept[d]) for d, _, _ in span_days])
            self._windowed[ctx.patient] = (key, out[ctx.patient])
        self._touched.clear()
        return out

    def _with_peak(self, ctx: PatientContext, day: DayStats) -> DayStats:
        """Today's figures with the highest pressure the safety checks saw (they read it before any summary)."""
        seen = self._peaks.get(ctx.patient)
        if day.complete or seen is None or seen[0] != day.day:
            return day
        return replace(day, peak_mmhg=max(seen[1], day.peak_mmhg or 0.0))

    def _horizon_ms(self, now_ms: int) -> int | None:
        """Days starting before this may have lost their raw samples to the retention policy: never rebuilt."""
        if not self.settings.raw_retention_days:
            return None
        return now_ms - (self.settings.raw_retention_days - RETENTION_GRACE_DAYS) * 86_400_000

    def _days_to_read(self, ctx: PatientContext, earliest_ms: int | None, pending: date | None, now: int,
                      span: int) -> int | None:  # fmt: skip
        """How many days back to read for ``ctx`` (``None``: nothing): everything when its context changed or its
        cache has gaps, else from the earliest day with new readings (or a deferred unfinished day), and at least
        yesterday and today after a change of day."""
        cached = self._raw.get(ctx.patient)
        if cached is None or cached[0] != ctx:
            return span
        zone = ZoneInfo(ctx.timezone)
        today = datetime.fromtimestamp(now / 1000, zone).date()
        missing = [d for d, _, _ in local_days(ctx.timezone, span, now) if d not in cached[1]]
        found = [d for d in (min(missing, default=None), pending) if d is not None]
        if earliest_ms is not None:
            found.append(datetime.fromtimestamp(earliest_ms / 1000, zone).date())
        if not found:
            return None
        return min(span, max(0, (today - min(found)).days))

    async def reattribute_pending(self) -> int:
        """Carry out the re-attributions asked through the API (``POST /devices/{id}/reattributions``): rewrite the
        readings, mark them done; their receipts make this evaluation recompute those days. Returns how many."""
        rows = await asyncio.to_thread(self.registry.list_reattributions, SYSTEM, "pending")
        influx = Influx(self.settings.influx_url, self.settings.influx_database, self.settings.influx_username,
                        self.settings.influx_password, self.settings.influx_token)  # fmt: skip
        done = 0
        for row, target in zip(rows, targets(rows), strict=True):
            try:
                result = await reattribute(influx, target)
            except ReattributionError as exc:
                log.warning("re-attribution %d of %s stays pending (tried again next evaluation): %s", row.id,
                            row.device_id, exc)  # fmt: skip
                continue
            note = f"previous holders: {', '.join(sorted(result.previous))}" if result.previous else ""
            await asyncio.to_thread(self.registry.finish_reattribution, MONITOR_ACTOR, row.id, result.points, note)
            done += 1
        return done

    async def _pipeline_hours(self, now_ms: int | None) -> set[int]:
        """The hours of the evaluated window the pipeline was seen working (``monitor.compliance.pipeline_hours``)."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        start = now - (self.settings.days_back + WINDOW_DAYS + 1) * 86_400_000
        return await pipeline_hours(self.reader, self.settings.influx_database, start, now + 300_000)

    async def _still_holding(self) -> bool:
        """Renew the lease after the slow part of an evaluation; if another replica took it meanwhile, apply nothing."""
        held = await asyncio.to_thread(self._renew)
        if not held:
            self.counters.lease_held = False
            log.warning("monitor %s lost the lease during an evaluation (longer than lease_s=%gs); its result is "
                        "dropped, the holder evaluates", self.replica, self.settings.lease_s)  # fmt: skip
        return held

    async def safety_once(self, now_ms: int | None = None) -> int:
        """Today's boot pressures of every boot patient: an over-pressure opens its episode and queues its e-mail now,
        independently of the evaluation (before the first one too). Returns how many episodes it opened; resolving
        them is the evaluation's (a safety episode ends after a clear day)."""
        contexts = self._mine(self._contexts or await asyncio.to_thread(self.contexts.get))
        boots = [c for c in contexts if isinstance(c.rx, BootRx)]
        if not boots:
            return 0
        try:
            peaks = await self._today_peaks(boots, now_ms)
        except InfluxQueryError as exc:
            log.warning("safety check skipped, InfluxDB unreadable: %s", exc)
            return 0
        now = (now_ms if now_ms is not None else int(time.time() * 1000)) / 1000
        urgent = []
        for ctx in boots:
            if ctx.patient not in peaks:
                continue
            today = datetime.fromtimestamp(now, ZoneInfo(ctx.timezone)).date()
            known = self._peaks.get(ctx.patient)
            peak = max(peaks[ctx.patient], known[1] if known and known[0] == today else 0.0)
            self._peaks[ctx.patient] = (today, peak)
            days = self._results.get(ctx.patient)
            if days and not days[-1].stats.complete and days[-1].stats.day == today:
                stats = replace(days[-1].stats, peak_mmhg=max(peak, days[-1].stats.peak_mmhg or 0.0))
                days[-1] = DayResult(ctx.patient, stats, None)
            found = safety_flags(ctx, DayStats(today, 0, 0, False, peak_mmhg=peak))
            urgent += [(ctx, today, flag) for flag in found]
        keys: list[str] = []
        if urgent and await self._still_holding():
            async with self._writing:
                mail = ChartMailData(self._results)
                for ctx, today, flag in urgent:
                    key = await asyncio.to_thread(open_urgent, self.state, ctx, today, flag, mail)
                    if key is not None:
                        keys.append(key)
                        log.info("episode opened: %s %s (safety check)", ctx.patient, flag)
        self.counters.safety_checks += 1
        self.counters.opened += len(keys)
        if any(keys):
            await self.send_due([k for k in keys if k])  # at once, ahead of whatever else waits in the outbox
        return len(keys)

    async def _apply(self, seen: Mapping[str, int], now_ms: int | None, only: Sequence[PatientContext] = ()) -> None:
        """Apply the results: episodes and e-mails (``evaluate``), the workspace's figures, the dashboards' points.

        Only for the patients whose judged days, today's flags or context changed since the last evaluation
        (``evaluate``), or whose figures did (``figures.record``): at 10,000 patients most of a steady evaluation
        changes nothing, and re-applying it would cost seconds of SQL. Everyone is written to InfluxDB's
        ``patient_info`` once an hour."""
        contexts = list(only) or [c for c in self._contexts if c.patient in self._results]
        now = (now_ms if now_ms is not None else int(time.time() * 1000)) / 1000
        live = {c.patient: self._live(c, seen.get(c.patient), now) for c in contexts}
        for c in contexts:  # a silence the pipeline could not have heard is held back
            allowance = int((now - c.max_silence_hours * 3600) * 1000)
            share = healthy_share(self._healthy, allowance, int(now * 1000))
            live[c.patient] = replace(live[c.patient], outage=share < self.settings.pipeline_healthy_share)
        marks = await asyncio.to_thread(self._fingerprints, contexts, live, seen)
        before = {c.patient: self._marks.get(c.patient, (None, None, None)) for c in contexts}
        judge = [c for c in contexts if before[c.patient][0] != marks[c.patient][0]]
        refigure = [c for c in contexts if before[c.patient][1] != marks[c.patient][1]]
        # Only the last contact moved (every garment that sends, every minute): one UPDATE, not 10,000 rows.
        reseen = {c.patient: seen[c.patient] for c in contexts if before[c.patient][1] == marks[c.patient][1]
                  and before[c.patient][2] != marks[c.patient][2] and c.patient in seen}  # fmt: skip
        outcome = Outcome()
        mail = ChartMailData(self._results)
        for i in range(0, len(judge), EVALUATE_CHUNK):  # the lock is free between chunks: safety checks get in
            async with self._writing:
                part = await asyncio.to_thread(evaluate, self.state, judge[i : i + EVALUATE_CHUNK], self._results,
                                               live, self.settings.resolve_after_days, mail)  # fmt: skip
            outcome.add(part)
            if part.urgent:  # a safety episode this evaluation opened: its e-mail now, not behind the others
                await self.send_due(part.urgent)
        if outcome.held_back:
            log.warning("silence held back for %d patient(s): the pipeline was down for part of their silence (no "
                        "heartbeat from the ingester, nothing stored from anyone); alerts follow once it works "
                        "again", len(outcome.held_back))  # fmt: skip
        # The workspace's figures (monitor/figures.py): one row per patient, the numbers this evaluation used.
        for i in range(0, len(refigure), EVALUATE_CHUNK):  # short transactions here too (10,000 rows took > 5 s)
            async with self._writing:
                await asyncio.to_thread(figures.record, self.state, refigure[i : i + EVALUATE_CHUNK], self._results,
                                        seen)  # fmt: skip
        if reseen:
            async with self._writing:
                await asyncio.to_thread(figures.record_seen, self.state, reseen)
        self._marks.update({c.patient: marks[c.patient] for c in contexts})
        self.counters.last_applied = len(judge)
        self.counters.opened += len(outcome.opened)
        self.counters.resolved += len(outcome.resolved)
        for patient, flag in outcome.opened:
            log.info("episode opened: %s %s", patient, flag)
        for patient, flag in outcome.resolved:
            log.info("episode resolved: %s %s", patient, flag)
        if self.settings.write_flags:
            hour_ms = int(time.time() // 3600 * 3600 * 1000)
            everyone = hour_ms != self._info_hour_ms
            await self._write_flags(judge, contexts if everyone else refigure, hour_ms)
            self._info_hour_ms = hour_ms

    def _fingerprints(self, contexts: Sequence[PatientContext], live: Mapping[str, Live],
                      seen: Mapping[str, int]) -> dict[str, tuple[int, int, int | None]]:  # fmt: skip
        """Per patient, a hash of what ``evaluate`` judges by (context, judged days, today's live flags), one of
        what the figures show besides (today's and every day's figures), and the last contact."""
        out = {}
        for c in contexts:
            days = self._results.get(c.patient, [])
            judged = hash((c, live[c.patient], tuple((r.stats.day, r.flags, r.judged, round(r.stats.wear_s))
                                                      for r in days if r.flags is not None)))  # fmt: skip
            shown = hash((judged, tuple(
                (d.wear_s, d.points, d.battery_min_pct, d.peak_mmhg, d.sessions_started, d.above_range_s,
                 d.below_range_s, d.reversed_gradient_s, d.ankle_median_mmhg) for d in (r.stats for r in days))))
            out[c.patient] = (judged, shown, seen.get(c.patient))
        return out

    def _live(self, ctx: PatientContext, last_seen_ms: int | None, now_s: float) -> Live:
        days = self._results.get(ctx.patient, [])
        today_stats = days[-1].stats if days and not days[-1].stats.complete else None
        today = today_stats.day if today_stats else datetime.fromtimestamp(now_s, ZoneInfo(ctx.timezone)).date()
        # A boot that speaks only in sessions is not silent between them (boot_missed_sessions judges those).
        heard_idle = today_stats.reports_idle if today_stats and isinstance(ctx.rx, BootRx) else True
        silent = bool(ctx.devices) and heard_idle and (
            last_seen_ms is None or now_s - last_seen_ms / 1000 > ctx.max_silence_hours * 3600)  # fmt: skip
        return Live(today, safety_flags(ctx, today_stats) if today_stats else (), silent,
                    today_stats.battery_min_pct if today_stats else None)  # fmt: skip

    async def _today_peaks(self, boots: Sequence[PatientContext], now_ms: int | None) -> dict[str, float]:
        by_zone: dict[str, list[str]] = defaultdict(list)
        for c in boots:
            by_zone[c.timezone].append(c.patient)
        now = (now_ms if now_ms is not None else int(time.time() * 1000)) / 1000
        statements = []
        for tz, patients in by_zone.items():
            zone = ZoneInfo(tz)
            midnight = datetime.fromtimestamp(now, zone).replace(hour=0, minute=0, second=0, microsecond=0)
            statements.append(q.daily_peak(patients, tz, int(midnight.timestamp() * 1000), int(now * 1000) + 300_000))
        peaks: dict[str, float] = {}
        for series in await self.reader.run(self.settings.influx_database, statements):
            for s in series:
                patient = (s.get("tags") or {}).get("patient")
                for row in s["values"]:
                    values = [v for v in row[1:] if isinstance(v, int | float)]
                    if patient and values:
                        peaks[patient] = max(peaks.get(patient, 0.0), float(max(values)))
        return peaks

    async def _last_seen(self, contexts: Sequence[PatientContext], now_ms: int | None) -> dict[str, int]:
        """Newest stored point per patient (sample, event or status) within its silence allowance (else absent)."""
        if not contexts:
            return {}
        end = (now_ms if now_ms is not None else int(time.time() * 1000)) + 300_000
        # Only "silent longer than max_silence_hours" is asked of it: look back that far (and an hour more),
        # not over the whole evaluated window, on every evaluation and safety check.
        hours = max(c.max_silence_hours for c in contexts) + 1.0
        start = end - 300_000 - int(hours * 3_600_000)
        patients = [c.patient for c in contexts]
        where = f"{q.patient_filter(patients)} AND {q.time_range(start, end)}"
        statements = [f"SELECT last(seq) FROM sample WHERE {where} GROUP BY patient",
                      f'SELECT last("count") FROM event WHERE {where} GROUP BY patient',
                      f"SELECT last(state) FROM status WHERE {where} GROUP BY patient"]  # fmt: skip
        seen: dict[str, int] = {}
        for series in await self.reader.run(self.settings.influx_database, statements):
            for s in series:
                patient = (s.get("tags") or {}).get("patient")
                if patient and s["values"]:
                    seen[patient] = max(seen.get(patient, 0), int(s["values"][0][0]))
        return seen

    def _with_delivery_problems(self, contexts: list[PatientContext]) -> list[PatientContext]:
        """Each patient whose physio's e-mails fail for good gets that as a problem (digest, registry_problem)."""
        bad = self.counters.undeliverable
        if not bad:
            return contexts
        prefix = "e-mails to the responsible physio fail for good: "
        return [replace(c, problems=(*c.problems, prefix + bad[c.physio_email])) if c.physio_email in bad else c
                for c in contexts]  # fmt: skip

    def _failed_for_good(self, row: Outbox, cause: str, exc: Exception | None = None) -> None:
        """Count a permanent failure; log it once per recipient and cause (not once per e-mail or per round)."""
        self.counters.failed += 1
        if self.counters.undeliverable.get(row.recipient) != cause:
            log.error("e-mails to %s fail for good (kept in the outbox as failed; shown as a registry problem of "
                      "their patients until one goes through): %s; first: %s", row.recipient, cause,
                      row.dedupe_key, exc_info=exc)  # fmt: skip
        else:
            log.debug("e-mail %s to %s failed for good again: %s", row.dedupe_key, row.recipient, cause)
        self.counters.undeliverable[row.recipient] = cause

    def _note_problems(self, contexts: Sequence[PatientContext]) -> None:
        for ctx in contexts:
            if ctx.problems and self.counters.problems.get(ctx.patient) != ctx.problems:
                log.warning("patient %s (%s): %s", ctx.patient, ctx.clinic, "; ".join(ctx.problems))
        self.counters.problems = {c.patient: c.problems for c in contexts if c.problems}

    async def _write_flags(self, judged: Sequence[PatientContext], shown: Sequence[PatientContext],
                           hour_ms: int) -> None:  # fmt: skip
        """``flag_day`` (one point per patient-day, every flag a boolean field) and ``flag_episode`` points of the
        ``judged`` patients, kept for ever (retention policy ``forever``, like the summaries); ``registry_problem``
        and the ``shown`` patients' ``patient_info`` (the present) in the default one."""
        lasting = []
        for ctx in judged:
            for r in self._results.get(ctx.patient, []):
                if r.flags is not None:
                    lasting.append(_flag_day_line(ctx, r))
        lasting += await asyncio.to_thread(self._episode_lines, [c.patient for c in judged])
        present = [_problem_line(ctx, hour_ms) for ctx in self._contexts if ctx.problems]
        present += await asyncio.to_thread(self._patient_info_lines, shown, hour_ms)
        try:
            await summaries.write_lines(self.reader, self.settings.influx_database, lasting, q.SUMMARY_RP)
            await summaries.write_lines(self.reader, self.settings.influx_database, present, None)
        except InfluxQueryError as exc:
            log.warning("writing flags to InfluxDB failed (kept in the state database; next evaluation retries): %s",
                        exc)  # fmt: skip

    def _patient_info_lines(self, contexts: Sequence[PatientContext], hour_ms: int) -> list[str]:
        """``patient_info``: per patient, what the dashboards cannot read from the samples (physio, targets, band,
        the adherence summary, open episodes by severity, an ``attention`` score); one point per patient and hour,
        overwritten by every evaluation of that hour (docs/schema.md)."""
        wanted = {c.patient for c in contexts}
        episodes: dict[str, list[Episode]] = defaultdict(list)
        with self.state.transaction() as session:
            for e in session.scalars(select(Episode).where(Episode.open_key.is_not(None))):
                if e.patient in wanted:
                    episodes[e.patient].append(e)
        lines = []
        for ctx in contexts:
            results = self._results.get(ctx.patient, [])
            opened = episodes.get(ctx.patient, [])
            counts = {sev: sum(1 for e in opened if e.severity == sev) for sev in ("critical", "warning", "info")}
            fields: dict[str, str] = {f"open_{sev}": f"{n}i" for sev, n in counts.items()}
            fields["open_flags"] = '"' + ",".join(sorted({e.flag for e in opened})) + '"'
            fields["problems"] = f"{len(ctx.problems)}i"
            # Who needs attention first: 100 per open critical episode, 10 per warning or registry problem, 1 per info.
            score = 100 * counts["critical"] + 10 * (counts["warning"] + bool(ctx.problems)) + counts["info"]
            fields["attention"] = f"{score}i"
            if isinstance(ctx.rx, SockRx):
                fields.update(wear_target_h=repr(ctx.rx.wear_hours_per_day), band_low=repr(ctx.rx.low_mmhg),
                              band_high=repr(ctx.rx.high_mmhg))  # fmt: skip
            elif isinstance(ctx.rx, BootRx):
                fields.update(max_chamber_mmhg=repr(ctx.rx.max_chamber_mmhg),
                              sessions_per_week=f"{ctx.rx.sessions_per_week}i")  # fmt: skip
            if results:
                today = results[-1].stats
                if not today.complete:
                    fields["wear_today_h"] = repr(round(today.wear_s / 3600, 4))
                a = adherence(ctx, results)
                fields["data_days_30d"] = f"{a.data_days_30d}i"
                fields["target_days_7d"] = f"{a.target_days_7d}i"
                fields["judged_7d"] = f"{a.judged_7d}i"
                shares = ("covered_7d", "covered_30d", "wear_hours_mean_7d", "in_range_share_30d",
                          "above_range_share_30d", "below_range_share_30d", "reversed_gradient_share_30d")  # fmt: skip
                for name in shares:
                    value = getattr(a, name)
                    if value is not None:
                        fields[name] = repr(round(float(value), 4))
                if isinstance(ctx.rx, BootRx):
                    fields["sessions_7d"] = f"{a.sessions_7d}i"
            tags = (f"clinic={_tag(ctx.clinic)},kind={ctx.kind or 'none'},patient={_tag(ctx.patient)},"
                    f"physio={_tag(ctx.physio_email or 'none')},timezone={_tag(ctx.timezone)}")  # fmt: skip
            lines.append(f"patient_info,{tags} {','.join(f'{k}={v}' for k, v in sorted(fields.items()))} {hour_ms}")
        return lines

    def _episode_lines(self, patients: Sequence[str]) -> list[str]:
        with self.state.transaction() as session:
            lines = []
            for i in range(0, len(patients), 500):  # in the database, not every episode loaded and filtered here
                chunk = list(patients[i : i + 500])
                lines += [_episode_line(e) for e in session.scalars(select(Episode).where(Episode.patient.in_(chunk)))]
            return lines

    # --- digest -------------------------------------------------------------------------------------------------

    async def digest_if_due(self, now: datetime | None = None) -> int:
        """Queue each physio's digest once per local day, from ``digest_hour`` on; returns how many were queued."""
        now = now or datetime.now(UTC)
        by_physio: dict[tuple[str, str], list[PatientContext]] = defaultdict(list)
        problems: dict[str, list[PatientContext]] = defaultdict(list)
        for ctx in self._contexts:
            if ctx.physio_email:
                by_physio[(ctx.clinic, ctx.physio_email)].append(ctx)
            elif ctx.problems:
                problems[ctx.clinic].append(ctx)  # no physio: every physio of the clinic hears of it
        queued = 0
        for (clinic, email), patients in sorted(by_physio.items()):
            tz = ZoneInfo(patients[0].timezone)
            local = now.astimezone(tz)
            if local.hour < self.settings.digest_hour:
                continue
            day = local.date() - timedelta(days=1)
            key = f"digest:{email}:{local.date().isoformat()}"
            rows = await asyncio.to_thread(self._digest_rows, patients + problems.get(clinic, []), day)
            mail = DigestMail(key, email, clinic, patients[0].timezone, day, tuple(rows),
                              physio_name=patients[0].physio_name)  # fmt: skip
            if await asyncio.to_thread(self._enqueue, key, "digest", email, {"mail": msgspec.to_builtins(mail)}):
                queued += 1
        self.counters.digests += queued
        return queued

    def _enqueue(self, key: str, kind: str, recipient: str, data: dict[str, Any]) -> bool:
        with self.state.transaction() as session:
            return self.state.enqueue(session, key, kind, recipient, data)

    def _digest_rows(self, patients: Sequence[PatientContext], day: date) -> list[DigestRow]:
        since = datetime.now(UTC) - timedelta(days=1)
        with self.state.transaction() as session:
            episodes = list(session.scalars(select(Episode).where(Episode.patient.in_([p.patient for p in patients]))))
            changed = {(d.patient, d.day) for d in session.scalars(
                select(DayFlags).where(DayFlags.patient.in_([p.patient for p in patients]),
                                       DayFlags.changed_at >= since, DayFlags.changed_at > DayFlags.computed_at,
                                       DayFlags.day <= day))}  # fmt: skip
        rows = []
        for ctx in patients:
            mine = [e for e in episodes if e.patient == ctx.patient]
            results = self._results.get(ctx.patient, [])
            summary = adherence(ctx, results) if results else None
            last = next((r.stats for r in reversed(results) if r.stats.complete), None)
            late = sorted(d.isoformat() for p, d in changed if p == ctx.patient)
            notes = list(ctx.problems) + ([f"late data changed: {', '.join(late)}"] if late else [])
            rows.append(DigestRow(
                patient=ctx.patient, kind=ctx.kind,
                days_on_target=summary.target_days_7d if summary else None,
                days_clear=figures.clear_days(results)[0] if results else None,
                days_judged=summary.judged_7d if summary else 7,
                wear_hours=round(last.wear_s / 3600, 2) if last else None,
                target_hours=ctx.rx.wear_hours_per_day if isinstance(ctx.rx, SockRx) else None,
                open_flags=tuple(sorted(e.flag for e in mine if e.open_key)),
                opened=tuple(sorted(e.flag for e in mine if e.opened_at >= since and e.notified)),
                resolved=tuple(sorted(e.flag for e in mine if e.resolved_at and e.resolved_at >= since
                                      and e.notified)),  # history recorded without e-mail is no change
                notes=tuple(notes), chart=chart_series(ctx, results)))  # fmt: skip
        return rows

    # --- sending ------------------------------------------------------------------------------------------------

    async def send_due(self, keys: Sequence[str] | None = None) -> int:
        """Send every due e-mail of the outbox (only those of ``keys`` when given: the safety checks send their own
        at once, not behind a queue of others); failures are retried later with backoff. Returns how many went."""
        sent = 0
        # One e-mail at a time, each claimed just before its attempt for as long as an attempt can last (compose,
        # then at most 3 x smtp_timeout_s): a replica killed mid-send holds back that one e-mail only, and not for
        # long; and the lease is renewed before each, so a replica that lost it stops sending at once.
        claim_s = 3 * self.settings.smtp_timeout_s + 5.0
        while not self._stop.is_set():
            if not await asyncio.to_thread(self._renew):
                self.counters.lease_held = False
                break
            rows = await asyncio.to_thread(self.state.claim_due, self.replica, 1, claim_s, keys)
            if not rows:
                break
            outcome = await self._deliver(rows[0])
            if outcome == "retry":
                break  # the server is away: the rest waits for the next round
            sent += outcome == "sent"
        self.counters.sent += sent
        return sent

    async def _deliver(self, claimed: Outbox) -> str:
        """Compose and send one claimed e-mail: ``sent``, ``retry`` (a temporary failure) or ``failed`` (for good)."""
        # The evidence and what physios did about the episode (monitor/letters.py), looked up once and kept.
        row = await self.letters.enrich(claimed, self._contexts, self._results)
        try:
            message = await asyncio.to_thread(self._compose, row)
        except Exception as exc:  # noqa: BLE001 (logged with its traceback once per cause) a row that cannot become an e-mail: kept as failed, the others go on
            self._failed_for_good(row, f"cannot compose: {type(exc).__name__}: {str(exc)[:200]}", exc)
            await asyncio.to_thread(self.state.mark_retry, row.id, f"cannot compose: {exc!r}", 0.0, True)
            return "failed"
        try:
            # The envelope recipient is the outbox row's (the registry's checked address), given explicitly.
            await self.sender.send(message, [row.recipient, *also_to(row)])
        except MailError as exc:
            delay = next_attempt(row.attempts + 1)
            await asyncio.to_thread(self.state.mark_retry, row.id, str(exc), delay, not exc.temporary)
            if exc.temporary:
                self.counters.retries += 1
                log.warning("e-mail %s to %s not sent (attempt %d), retry in %.0fs: %s", row.dedupe_key,
                            row.recipient, row.attempts + 1, delay, exc)  # fmt: skip
                return "retry"
            self._failed_for_good(row, str(exc)[:300])
            return "failed"
        await asyncio.to_thread(self.state.mark_sent, row.id)
        self.counters.undeliverable.pop(row.recipient, None)
        log.info("e-mail %s sent to %s", row.dedupe_key, row.recipient)
        return "sent"

    def _compose(self, row: Outbox) -> Any:
        sender, url, page = self.settings.mail_from, self.settings.dashboard_url, self.settings.workspace_url
        if row.kind == "digest":
            return compose_digest(msgspec.convert(row.data["mail"], DigestMail), sender=sender, dashboard_url=url,
                                  workspace_url=page)  # fmt: skip
        return compose_episode(msgspec.convert(row.data["mail"], EpisodeMail), sender=sender, dashboard_url=url,
                               workspace_url=page)  # fmt: skip


_tag = escape_key  # the ingester's line-protocol escaping, one definition for every writer


def _flag_day_line(ctx: PatientContext, r: DayResult) -> str:
    flags = r.flags or ()
    fields = [f"{name}={'true' if name in flags else 'false'}" for name in sorted({*FLAG_TITLE, *flags})]
    fields.append(f"flags={escape_string(','.join(flags))}")
    fields.append(f"wear_s={r.stats.wear_s}")
    return f"flag_day,clinic={_tag(ctx.clinic)},patient={_tag(ctx.patient)} {','.join(fields)} {r.stats.start_ms}"


def _problem_line(ctx: PatientContext, hour_ms: int) -> str:
    """A flag for the clinic: what keeps this patient from being monitored fully (one point per hour)."""
    return (f"registry_problem,clinic={_tag(ctx.clinic)},patient={_tag(ctx.patient)} "
            f"problems={escape_string('; '.join(ctx.problems))},count={len(ctx.problems)}i {hour_ms}")


def _episode_line(e: Episode) -> str:
    start_ms = int(datetime(e.start_day.year, e.start_day.month, e.start_day.day, tzinfo=UTC).timestamp() * 1000)
    end = f',end_day="{e.end_day.isoformat()}"' if e.end_day else ""
    return (f"flag_episode,clinic={_tag(e.clinic)},flag={_tag(e.flag)},patient={_tag(e.patient)},"
            f"severity={e.severity} id={e.id}i,open={'true' if e.open_key else 'false'},"
            f"start_day=\"{e.start_day.isoformat()}\",last_day=\"{e.last_day.isoformat()}\"{end} "
            f"{start_ms}")  # fmt: skip


async def run_monitor(settings: MonitorSettings) -> None:
    """Run until SIGTERM/SIGINT."""
    monitor = Monitor(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, monitor.stop)
    await monitor.run()
