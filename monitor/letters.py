"""What an e-mail says beyond the episode itself, filled in just before it is sent (:class:`Letters`).

The outbox row of an episode e-mail holds the episode as the evaluation saw it. Before the row is composed, the
monitor adds:

- the evidence (``monitor.evidence``): the measured values behind the flag, looked up in InfluxDB for this one
  patient (a few small statements), outside the evaluation's transaction; and, for a stocking, the chart's daily
  ankle medians (the evaluation does not query medians: they cost as much as everything else together);
- what physios did about the episode (``monitor.actions``): acknowledged, snoozed, notes, hand-overs; the
  colleague it was handed over to is told too (``also_to``);
- for a digest, the same per open episode of each patient, and the episodes handed over to its physio.

The enriched row is stored back (``letter: true``), so a retry sends the same e-mail. If InfluxDB cannot be read,
the e-mail goes without measurements rather than late: a safety e-mail is never held back for its evidence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec
from sqlalchemy import select, update

from monitor import actions as acts
from monitor import evidence as ev
from monitor.compliance import InfluxQueryError, InfluxReader
from monitor.mail import flag_title
from monitor.model import BootRx, DayResult, PatientContext, SockRx
from monitor.recipients import AddressError, checked_address
from monitor.state import Episode, Outbox, State

log = logging.getLogger(__name__)
EPISODE_KINDS: Final = ("opened", "resolved", "handover")
DIGEST_MEASURED_MAX: Final = 40  # patients whose evidence a digest looks up (each a few small statements)


def episode_id(row: Outbox) -> int | None:
    """The episode an episode e-mail is about: its data's ``episode_id``, else its key (``opened:<id>``)."""
    given = row.data.get("mail", {}).get("episode_id")
    if isinstance(given, int):
        return given
    prefix, _, rest = row.dedupe_key.partition(":")
    return int(rest) if prefix in ("opened", "resolved") and rest.isdigit() else None


def also_to(row: Outbox) -> list[str]:
    """Who else gets this e-mail (checked plain addresses, the row's own recipient left out)."""
    extra = row.data.get("mail", {}).get("also_to") or []
    return [a for a in extra if isinstance(a, str) and a != row.recipient]


def _kind(ctx: PatientContext | None) -> str | None:
    if ctx is None:
        return None
    return "sock" if isinstance(ctx.rx, SockRx) else "boot" if isinstance(ctx.rx, BootRx) else None


def _stamp(action: acts.Action, zone: ZoneInfo) -> str:
    return f"{action.at.astimezone(zone).strftime('%a %d %b %H:%M')}: {action.words()}"


def _checked(addresses: Sequence[str | None]) -> list[str]:
    out = []
    for address in addresses:
        try:
            out.append(checked_address(address or ""))
        except AddressError:
            continue
    return out


@dataclass(frozen=True, slots=True)
class Patient:
    """One patient's context and day figures as the last evaluation left them."""

    ctx: PatientContext | None
    days: tuple[ev.DayFigures, ...]

    @classmethod
    def of(cls, code: str, contexts: Mapping[str, PatientContext],
           results: Mapping[str, Sequence[DayResult]]) -> Patient:  # fmt: skip
        return cls(contexts.get(code), tuple(ev.day_figures(r.stats) for r in results.get(code, ())))


@dataclass
class Letters:
    """Fills in the evidence and the actions of outbox rows before they are composed."""

    state: State
    reader: InfluxReader
    database: str

    async def enrich(self, row: Outbox, contexts: Sequence[PatientContext],
                     results: Mapping[str, Sequence[DayResult]]) -> Outbox:  # fmt: skip
        """``row`` with its letter filled in (stored back, so a retry sends the same); as it was if done before."""
        if row.data.get("letter") or "mail" not in row.data:
            return row
        by_code = {c.patient: c for c in contexts}
        if row.kind == "digest":
            mail, complete = await self._digest(row, by_code, results)
        elif row.kind in EPISODE_KINDS:
            mail, complete = await self._episode(row, by_code, results)
        else:
            return row
        row.data = {**row.data, "mail": mail, "letter": complete}
        if complete:
            with self.state.transaction() as session:
                session.execute(update(Outbox).where(Outbox.id == row.id).values(data=row.data))
        return row

    # --- episodes ---------------------------------------------------------------------------------------------

    async def _episode(self, row: Outbox, contexts: Mapping[str, PatientContext],
                       results: Mapping[str, Sequence[DayResult]]) -> tuple[dict[str, Any], bool]:  # fmt: skip
        mail = dict(row.data["mail"])
        found = episode_id(row)
        episode = self._load(found) if found is not None else None
        if episode is None:
            return mail, True
        patient = Patient.of(episode.patient, contexts, results)
        zone = ZoneInfo(mail.get("timezone") or (patient.ctx.timezone if patient.ctx else "UTC"))
        done = acts.for_episodes(self.state, [episode.id])[episode.id]
        mail |= {"episode_id": episode.id, "handling": [_stamp(a, zone) for a in done],
                 "also_to": _checked([a.to_email for a in done if a.kind == "handover"])}  # fmt: skip
        if row.kind == "handover":
            given = next((a for a in reversed(done) if a.kind == "handover" and a.to_email == row.recipient), None)
            mail |= {"handed_by": given.by_name if given else None, "handover_note": given.note if given else ""}
        measured = await self._measure(episode.patient, patient, _first(episode, mail), _last(episode, patient))
        if measured is None:
            return mail, False
        case = ev.Case(episode.flag, zone.key, patient.ctx.rx if patient.ctx else None,
                       ev.episode_days(patient.days, episode.start_day, _last(episode, patient)), measured)  # fmt: skip
        evidence = ev.compose(case)
        mail["measured"] = msgspec.to_builtins(evidence) if evidence else None
        mail["chart"] = _with_medians(mail.get("chart"), measured)
        return mail, True

    def _load(self, found: int) -> Episode | None:
        with self.state.transaction() as session:
            return session.scalars(select(Episode).where(Episode.id == found)).first()

    async def _measure(self, code: str, patient: Patient, first: date, last: date) -> ev.Measured | None:
        if patient.ctx is None:
            return ev.Measured()
        try:
            return await ev.measure(self.reader, self.database, code, patient.ctx.timezone, _kind(patient.ctx),
                                    min(first, last), last)  # fmt: skip
        except InfluxQueryError as exc:
            log.warning("evidence for %s not read (the e-mail goes without it; the next attempt tries again): %s",
                        code, exc)  # fmt: skip
            return None

    # --- digests ----------------------------------------------------------------------------------------------

    async def _digest(self, row: Outbox, contexts: Mapping[str, PatientContext],
                      results: Mapping[str, Sequence[DayResult]]) -> tuple[dict[str, Any], bool]:  # fmt: skip
        mail = dict(row.data["mail"])
        zone = ZoneInfo(mail.get("timezone") or "UTC")
        rows = [dict(r) for r in mail.get("rows", [])]
        codes = [r["patient"] for r in rows]
        episodes = self._open_of(codes)
        handed = self._handed_to(row.recipient, set(codes))
        done = acts.for_episodes(self.state, [e.id for e in [*episodes, *handed]])
        complete = True
        measured_patients = 0
        for r in rows:
            mine = [e for e in episodes if e.patient == r["patient"]]
            today = datetime.now(zone).date()
            r["handling"] = [f"{flag_title(e.flag)}: {acts.handling(done[e.id], today).summary()}" for e in mine
                             if done[e.id]]  # fmt: skip
            if mine and measured_patients < DIGEST_MEASURED_MAX:
                measured_patients += 1
                lines, ok = await self._headlines(mine, Patient.of(r["patient"], contexts, results), zone)
                r["evidence"], complete = lines, complete and ok
        rows += [_handed_row(e, done[e.id], contexts.get(e.patient), row.recipient, zone) for e in handed]
        mail["rows"] = rows
        return mail, complete

    def _open_of(self, codes: Sequence[str]) -> list[Episode]:
        with self.state.transaction() as session:
            return list(session.scalars(select(Episode).where(Episode.patient.in_(list(codes)),
                                                              Episode.open_key.is_not(None))))  # fmt: skip

    def _handed_to(self, email: str, known: set[str]) -> list[Episode]:
        """Open episodes of other physios' patients handed over to ``email`` (the latest hand-over is to her)."""
        with self.state.transaction() as session:
            rows = list(session.scalars(select(acts.EpisodeAction).where(acts.EpisodeAction.kind == "handover")))
            latest: dict[int, acts.EpisodeAction] = {}
            for a in sorted(rows, key=lambda a: a.id):
                latest[a.episode_id] = a
            wanted = [i for i, a in latest.items() if a.to_email == email and a.patient not in known]
            if not wanted:
                return []
            return list(session.scalars(select(Episode).where(Episode.id.in_(wanted), Episode.open_key.is_not(None))))

    async def _headlines(self, episodes: Sequence[Episode], patient: Patient,
                         zone: ZoneInfo) -> tuple[list[str], bool]:  # fmt: skip
        first = min(e.start_day for e in episodes)
        last = max(_last(e, patient) for e in episodes)
        measured = await self._measure(episodes[0].patient, patient, max(first, _week_before(last)), last)
        if measured is None or patient.ctx is None:
            return [], measured is not None
        out = []
        for e in episodes:
            found = ev.compose(ev.Case(e.flag, zone.key, patient.ctx.rx,
                                       ev.episode_days(patient.days, e.start_day, _last(e, patient)), measured))
            if found is not None:
                out.append(f"{flag_title(e.flag)}: {found.headline}")
        return out, True


def _first(episode: Episode, mail: Mapping[str, Any]) -> date:
    """The first day to read: the chart's first day (its medians), else the episode's start."""
    chart = mail.get("chart") or {}
    days = chart.get("days") or []
    first = date.fromisoformat(days[0]) if days and isinstance(days[0], str) else episode.start_day
    return min(first, episode.start_day)


def _last(episode: Episode, patient: Patient) -> date:
    """The episode's last day to show: the day it was last flagged, or today while open (a safety flag today)."""
    if episode.open_key is not None and patient.days:
        return max(episode.last_day, patient.days[-1].day)
    return episode.last_day


def _week_before(day: date) -> date:
    return date.fromordinal(day.toordinal() - ev.MAX_DAYS + 1)


def _with_medians(chart: Any, measured: ev.Measured) -> Any:
    """The chart's pressure series with each day's ankle median where the evaluation left none (socks)."""
    if not isinstance(chart, dict) or chart.get("pressure_label") != "ankle median" or not measured.ankle:
        return chart
    days = [date.fromisoformat(d) for d in chart.get("days", [])]
    given = chart.get("pressure_mmhg") or [None] * len(days)
    filled = [p if p is not None else (measured.ankle[d].median_mmhg if d in measured.ankle else None)
              for d, p in zip(days, given, strict=True)]  # fmt: skip
    return {**chart, "pressure_mmhg": filled}


def _handed_row(episode: Episode, done: Sequence[acts.Action], ctx: PatientContext | None, recipient: str,
                zone: ZoneInfo) -> dict[str, Any]:  # fmt: skip
    """A digest row for an episode of another physio's patient handed over to the digest's physio."""
    given = next((a for a in reversed(done) if a.kind == "handover" and a.to_email == recipient), None)
    who = f"handed over to you by {given.by_name}" + (f": {given.note}" if given and given.note else "") if given \
        else "handed over to you"
    return {"patient": episode.patient, "kind": ctx.kind if ctx else None, "days_on_target": None,
            "open_flags": [episode.flag], "notes": [who],
            "handling": [f"{flag_title(episode.flag)}: {acts.handling(done, datetime.now(zone).date()).summary()}"]}
