"""One evaluation: day results -> stored day flags and episodes -> e-mails queued in the outbox, in one transaction.

Everything a physio is told follows from the stored episodes: an e-mail is
queued when an episode opens and when it resolves, each under a unique key,
so re-evaluating (every minute, after a restart, on another replica) never
queues it twice. History seen for the first time (the monitor's first run,
or late data revealing a run that is already over) is recorded without
e-mails: it shows on dashboards and in the digest, and no storm follows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from monitor.compliance import day_flags
from monitor.episodes import Decision, Mark, Run, closed_unrecorded, flags_seen, reconcile, runs
from monitor.model import LOW_BATTERY, SAFETY, SILENT, DayResult, PatientContext, describe_change, severity_of
from monitor.state import DayFlags, Episode, State

log = logging.getLogger(__name__)
LOW_BATTERY_PCT = 15.0


@dataclass(frozen=True, slots=True)
class Live:
    """What is true right now of a patient, beyond complete days: today's safety flags, silence, battery."""

    today: date
    safety: tuple[str, ...] = ()
    silent_now: bool = False
    battery_pct: float | None = None
    outage: bool = False  # the pipeline was down for part of the silence allowance: silence is held back

    def flags(self) -> tuple[str, ...] | None:
        """Today's flags for the runs (``None`` when nothing is known yet for today)."""
        found = list(self.safety)
        if self.silent_now and not self.outage:
            found.append(SILENT)
        if self.battery_pct is not None and self.battery_pct < LOW_BATTERY_PCT:
            found.append(LOW_BATTERY)
        return tuple(sorted(found)) or None


@dataclass(slots=True)
class Outcome:
    """What one evaluation changed (for logs, metrics and tests)."""

    opened: list[tuple[str, str]] = field(default_factory=list)
    resolved: list[tuple[str, str]] = field(default_factory=list)
    recorded: list[tuple[str, str]] = field(default_factory=list)
    day_changes: int = 0
    held_back: list[str] = field(default_factory=list)
    urgent: list[str] = field(default_factory=list)  # outbox keys of safety episodes opened: sent at once

    def add(self, other: Outcome) -> None:
        """Add what another part of the same evaluation changed (``CHUNK``)."""
        self.urgent += other.urgent
        self.opened += other.opened
        self.resolved += other.resolved
        self.recorded += other.recorded
        self.day_changes += other.day_changes
        self.held_back += other.held_back


# Patients per call of ``evaluate`` (one transaction each): a write transaction holds SQLite's only write lock, so
# the lease, the outbox and the safety checks get theirs between two chunks (a first evaluation of 10,000 patients
# in one transaction held it for over 30 s, past SQLite's busy timeout: "database is locked").
CHUNK = 50


def evaluate(
    state: State,
    contexts: Sequence[PatientContext],
    results: Mapping[str, Sequence[DayResult]],
    live: Mapping[str, Live],
    resolve_after: int,
    mail_data: MailData,
) -> Outcome:
    """Apply one evaluation of these patients to the state, in one transaction (each patient's days, episodes and
    e-mails together; the monitor calls it for ``CHUNK`` patients at a time).

    A pipeline outage is already taken out of ``results`` and ``live`` (``monitor.compliance.outage_days``,
    ``Live.outage``): the days it touched do not judge missing data, and today's silence is held back.
    """
    out = Outcome()
    with state.transaction() as session:
        # One query per 500 patients instead of one per patient-day (1,000 patients x 37 days cost 16 s before).
        codes = [c.patient for c in contexts]
        episodes: dict[str, list[Episode]] = {code: [] for code in codes}
        stored: dict[tuple[str, date], DayFlags] = {}
        for i in range(0, len(codes), 500):
            chunk = codes[i : i + 500]
            stored.update(((r.patient, r.day), r)
                          for r in session.scalars(select(DayFlags).where(DayFlags.patient.in_(chunk))))  # fmt: skip
            for episode in session.scalars(select(Episode).where(Episode.patient.in_(chunk))):
                episodes[episode.patient].append(episode)
        new_days: list[dict[str, Any]] = []
        for ctx in contexts:
            days = list(results.get(ctx.patient, ()))
            now = live.get(ctx.patient)
            out.day_changes += _store_days(stored, ctx, days, new_days)
            series = [Mark(r.stats.day, r.flags, r.judged) for r in days if r.flags]
            if now is not None:
                today_flags = now.flags()
                if now.outage:
                    out.held_back.append(ctx.patient)
                # Today is incomplete: what it shows extends a run, what it lacks ends none.
                series.append(Mark(now.today, today_flags, frozenset(today_flags or ())))
            today = now.today if now else _last_day(days)
            _episodes(session, state, ctx, episodes.get(ctx.patient, []), series, today, resolve_after, out,
                      mail_data)  # fmt: skip
        if new_days:
            # One Core executemany (the ORM's bulk insert spent 8.6 s on 300,000 rows of a first evaluation).
            session.connection().execute(insert(cast(Table, DayFlags.__table__)), new_days)
    return out


def open_urgent(state: State, ctx: PatientContext, today: date, flag: str, mail_data: MailData) -> str | None:
    """A safety flag seen today (the safety checks, between evaluations): open its episode and queue its e-mail in
    one transaction, unless one is open already (then it runs to today). Returns the e-mail's outbox key when it
    opened one now ("" without a physio to tell), else ``None``. The evaluation finds the same run later and keeps
    the episode; it alone resolves episodes."""
    with state.transaction() as session:
        current = session.scalars(select(Episode).where(Episode.open_key == f"{ctx.patient}:{flag}")).first()
        if current is not None:
            current.last_day = max(current.last_day, today)
            return None
        episode = _episode(ctx, Run(flag, today, today, None), open_=True)
        session.add(episode)
        session.flush()
        episode.notified = _notify(session, state, ctx, episode, "opened", mail_data)
        return f"opened:{episode.id}" if episode.notified else ""


# Why an episode ended (``Episode.note`` starts with one of these; the resolving e-mail says it in words).
ENDED_BY_DATA = "data"  # days with data showed the flag gone
ENDED_BY_LATE_DATA = "late_data"  # data that arrived late erased the run
ENDED_BY_PRESCRIPTION = "prescription"  # the days since are judged against a changed prescription


@dataclass(frozen=True, slots=True)
class Ending:
    """Why and on what evidence an episode resolved: the reason and the days that showed it gone."""

    reason: str
    cleared_by: tuple[date, ...] = ()
    detail: str = ""


class MailData:
    """Builds the data an episode e-mail is composed from (kept in the outbox row); the app supplies charts.

    ``results`` are the evaluation's days per patient (what shows an episode over is read from them).
    """

    def __init__(self, results: Mapping[str, Sequence[DayResult]] | None = None) -> None:
        self.results: Mapping[str, Sequence[DayResult]] = results or {}

    def episode(self, ctx: PatientContext, episode: Episode, kind: str,
                ending: Ending | None = None) -> dict[str, Any]:  # fmt: skip
        """Everything the e-mail about ``episode`` needs; only the pseudonymous code identifies the patient."""
        return {"kind": kind, "patient": ctx.patient, "clinic": ctx.clinic, "flag": episode.flag,
                "severity": episode.severity, "start_day": episode.start_day.isoformat(),
                "end_day": episode.end_day.isoformat() if episode.end_day else None,
                "physio_name": ctx.physio_name, "physio_email": ctx.physio_email, "note": episode.note,
                "reason": ending.reason if ending else None}  # fmt: skip

    def ending(self, ctx: PatientContext, flag: str, run: Run | None) -> Ending:
        """Why a run that was open has ended: late data erased it, or days with data showed the flag gone."""
        if run is None:
            return Ending(ENDED_BY_LATE_DATA, (), "data that arrived late shows the flag did not hold")
        changed = prescription_ending(ctx, flag, run, self.results.get(ctx.patient, ()))
        if changed:
            return Ending(ENDED_BY_PRESCRIPTION, run.cleared_by, changed)
        return Ending(ENDED_BY_DATA, run.cleared_by)


def prescription_ending(ctx: PatientContext, flag: str, run: Run, days: Sequence[DayResult]) -> str:
    """Why ``run`` ended, when a change of prescription ended it: the days that showed it gone are judged against
    a newer version, and under the version of its last flagged day they would still carry the flag (the client
    did not do better). Empty otherwise."""
    before = ctx.version_on(run.last)
    stats = {r.stats.day: r.stats for r in days}
    cleared = [stats[d] for d in run.cleared_by if d in stats]
    after = [ctx.version_on(d.day) for d in cleared]
    if before is None or not cleared or all(v is None or v.id == before.id for v in after):
        return ""
    old = ctx.pinned(before)
    if not all(flag in (day_flags(old, d) or ()) for d in cleared):
        return ""
    new = next(v for v in after if v is not None and v.id != before.id)
    return (f"the prescription changed on {new.valid_from}: {describe_change(before.rx, new.rx)}; under the "
            f"previous prescription the days since would still show it")  # fmt: skip


def _last_day(days: Sequence[DayResult]) -> date:
    return days[-1].stats.day if days else datetime.now(UTC).date()


def _store_days(stored: Mapping[tuple[str, date], DayFlags], ctx: PatientContext, days: Sequence[DayResult],
                new: list[dict[str, Any]]) -> int:  # fmt: skip
    """Record each judged day (``stored``: the patient's rows, loaded; new ones appended to ``new`` for one bulk
    insert); count those whose flags changed since last time (late data, new days). A dictionary, not
    ``session.get``: a day not stored yet costs ``get`` a SELECT (300,000 of them, 57 s, in a first evaluation of
    10,000 patients)."""
    changes = 0
    now = datetime.now(UTC)
    for result in days:
        if result.flags is None:
            continue
        row = stored.get((ctx.patient, result.stats.day))
        flags = list(result.flags)
        if row is None:
            # computed_at == changed_at: first seen, not a change (the digest reports only changes).
            new.append({"patient": ctx.patient, "day": result.stats.day, "flags": flags,
                        "wear_s": result.stats.wear_s, "computed_at": now, "changed_at": now})  # fmt: skip
            changes += 1
        elif row.flags != flags or abs(row.wear_s - result.stats.wear_s) > 30:
            row.flags, row.wear_s, row.changed_at = flags, result.stats.wear_s, now
            changes += 1
    return changes


def _episodes(
    session: Session, state: State, ctx: PatientContext, stored: list[Episode],
    series: list[Mark], today: date, resolve_after: int, out: Outcome, mail_data: MailData,
) -> None:  # fmt: skip
    flags = flags_seen(series) | {e.flag for e in stored if e.open_key is not None}
    for flag in sorted(flags):
        # Safety flags resolve after one clear day: they are about single events, not a tendency.
        found = runs(series, flag, 1 if flag in SAFETY else resolve_after)
        mine = [e for e in stored if e.flag == flag]
        current = next((e for e in mine if e.open_key is not None), None)
        decision = reconcile(found, current.start_day if current else None, today)
        _apply(session, state, ctx, flag, decision, current, out, mail_data)
        for run in closed_unrecorded(found, [e.start_day for e in mine]):
            session.add(_episode(ctx, run, open_=False))
            out.recorded.append((ctx.patient, flag))


def _episode(ctx: PatientContext, run: Run, open_: bool) -> Episode:
    return Episode(patient=ctx.patient, clinic=ctx.clinic, flag=run.flag, severity=severity_of(run.flag),
                   start_day=run.start, last_day=run.last, end_day=None if open_ else run.end,
                   open_key=f"{ctx.patient}:{run.flag}" if open_ else None,
                   resolved_at=None if open_ else datetime.now(UTC))  # fmt: skip


def _apply(
    session: Session, state: State, ctx: PatientContext, flag: str, decision: Decision, current: Episode | None,
    out: Outcome, mail_data: MailData,
) -> None:  # fmt: skip
    if decision.action == "open" and decision.run is not None:
        episode = _episode(ctx, decision.run, open_=True)
        session.add(episode)
        session.flush()
        episode.notified = _notify(session, state, ctx, episode, "opened", mail_data)
        out.opened.append((ctx.patient, flag))
        if flag in SAFETY and episode.notified:
            out.urgent.append(f"opened:{episode.id}")
    elif decision.action == "update" and current is not None and decision.run is not None:
        current.start_day, current.last_day = decision.run.start, decision.run.last
    elif decision.action == "resolve" and current is not None:
        current.end_day = decision.end or current.last_day
        current.open_key = None
        current.resolved_at = datetime.now(UTC)
        ending = mail_data.ending(ctx, flag, decision.run)
        current.note = f"{ending.reason}: {ending.detail}" if ending.detail else ending.reason
        if current.notified:
            _notify(session, state, ctx, current, "resolved", mail_data, ending)
        out.resolved.append((ctx.patient, flag))


def _notify(session: Session, state: State, ctx: PatientContext, episode: Episode, kind: str,
            mail_data: MailData, ending: Ending | None = None) -> bool:  # fmt: skip
    if not ctx.physio_email:
        log.warning("episode %s of %s %s: no physio to tell (%s)", episode.flag, ctx.patient, kind,
                    "; ".join(ctx.problems) or "none registered")  # fmt: skip
        return False
    return state.enqueue(session, f"{kind}:{episode.id}", kind, ctx.physio_email,
                         mail_data.episode(ctx, episode, kind, ending)) or True  # fmt: skip
