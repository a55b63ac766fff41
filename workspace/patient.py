"""A patient's page: open episodes with their evidence and actions, charts, prescriptions, garments, audit.

:meth:`PatientPages.context` gathers what the page shows; :meth:`PatientPages.act` records an action on an episode
(in the monitor's state database, ``monitor.actions``), audits it in the registry, and for a hand-over queues an
e-mail to the colleague in the monitor's outbox (sent by the monitor with the episode's evidence).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import anyio
import msgspec

from devices.registry import schemas as s
from devices.registry.errors import NotFoundError
from devices.registry.service import Registry
from devices.registry.web import WebSession
from monitor import actions as acts
from monitor import evidence as ev
from monitor import figures as figs
from monitor.compliance import InfluxQueryError, InfluxReader
from monitor.mail import EpisodeMail
from monitor.model import PatientContext
from monitor.registry import load_context
from monitor.state import Episode
from workspace import charts, series
from workspace import prescriptions as rxs
from workspace.readmodel import Colleague, EpisodeView, Sources, by_need, colleagues, patient_episodes

log = logging.getLogger(__name__)
AUDIT_ENTRIES: Final = 30


@dataclass(frozen=True, slots=True)
class ActionForm:
    """An action as posted: which kind, the note or reason, the snooze date, the colleague."""

    episode_id: int
    kind: str
    note: str = ""
    until: str = ""
    to: str = ""

    @classmethod
    def from_form(cls, episode_id: int, form: Mapping[str, str]) -> ActionForm:
        """From the posted fields (missing ones empty)."""
        return cls(episode_id, form.get("kind", "").strip(), form.get("note", "")[: acts.NOTE_MAX + 1],
                   form.get("until", "").strip(), form.get("to", "").strip())  # fmt: skip


def _until(text: str) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError as exc:
        raise acts.ActionError("give a date as YYYY-MM-DD", "until") from exc


def _colleague(team: Mapping[str, Colleague], email: str, me: str) -> Colleague | None:
    if not email:
        return None
    found = team.get(email)
    if found is None or not found.active:
        raise acts.ActionError("choose an active physio of your clinic", "to")
    if found.email == me:
        raise acts.ActionError("choose a colleague, not yourself", "to")
    return found


@dataclass(frozen=True, slots=True)
class Registered:
    """What the page reads from the registry about one patient."""

    patient: s.PatientOut
    clinic: s.ClinicOut
    prescriptions: list[s.PrescriptionOut]
    contraindications: list[s.ContraindicationOut]
    assignments: list[s.AssignmentOut]
    devices: dict[str, s.DeviceOut]
    audit: list[s.AuditOut]
    team: dict[str, Colleague]


def _registered(registry: Registry, session: WebSession, code: str) -> Registered:
    actor = session.actor
    patient = registry.get_patient(actor, code)
    return Registered(patient, registry.get_clinic(actor, patient.clinic), registry.list_prescriptions(actor, code),
                      registry.list_contraindications(actor, code), registry.list_assignments(actor, patient=code),
                      {d.device_id: d for d in registry.list_devices(actor)},
                      registry.patient_audit(actor, code, AUDIT_ENTRIES), colleagues(registry, actor))  # fmt: skip


def _context_of(registry: Registry, code: str) -> PatientContext | None:
    return load_context(registry, code)


@dataclass
class PatientPages:
    """Builds the patient page and records actions."""

    sources: Sources
    reader: InfluxReader | None = None
    database: str = ""

    async def context(self, session: WebSession, code: str, days: int,
                      failed: tuple[ActionForm, acts.ActionError] | None = None) -> dict[str, Any]:  # fmt: skip
        """Everything the page shows; :class:`~devices.registry.errors.NotFoundError` for a patient she may not see."""
        reg = await anyio.to_thread.run_sync(_registered, self.sources.registry, session, code)
        zone = ZoneInfo(reg.clinic.timezone)
        now = datetime.now(UTC)
        today = now.astimezone(zone).date()
        episodes = await anyio.to_thread.run_sync(patient_episodes, self.sources.state, code, today)
        figures = (await anyio.to_thread.run_sync(figs.read, self.sources.state, [code])).get(code)
        ctx = await anyio.to_thread.run_sync(_context_of, self.sources.registry, code)
        loaded, problem = await self._series(ctx, days)
        history = rxs.history(reg.prescriptions, today)
        current = [r for r in history if r.state == "current"]
        evidence = _evidence(ctx, loaded, [e for e in episodes if e.is_open])
        return {"patient": reg.patient, "clinic": reg.clinic, "zone": zone, "today": today, "now": now,
                "episodes": episodes, "open": by_need([e for e in episodes if e.is_open]),
                "past": [e for e in episodes if not e.is_open], "evidence": evidence, "figures": figures,
                "prescriptions": history, "current": current,
                "findings": rxs.findings(current, reg.contraindications, today),
                "contraindications": rxs.active(reg.contraindications, today), "garments": _garments(reg, now),
                "audit": reg.audit, "team": sorted((c for c in reg.team.values() if c.active and c.email
                                                    != session.email), key=lambda c: c.name),
                "physio": reg.team.get(reg.patient.physio or ""), "series": loaded, "series_problem": problem,
                "statuses": {st.device: st for st in loaded.status} if loaded else {},
                "charts": charts.for_patient(loaded, current, episodes) if loaded else None,
                "days": series.clamp_days(days), "periods": series.PERIODS, "failed": failed,
                "problems": ctx.problems if ctx else ()}  # fmt: skip

    async def _series(self, ctx: PatientContext | None, days: int) -> tuple[series.PatientSeries | None, str]:
        if ctx is None or ctx.rx is None:
            return None, "No current prescription: there is nothing to judge the days against."
        if self.reader is None:
            return None, "The workspace has no InfluxDB configured: charts are not available."
        try:
            return await series.load(self.reader, self.database, ctx, days), ""
        except InfluxQueryError as exc:
            log.warning("patient page of %s: InfluxDB not readable: %s", ctx.patient, exc)
            return None, "InfluxDB could not be read just now: the charts and evidence are missing. Try again shortly."

    async def act(self, session: WebSession, episode: Episode, form: ActionForm) -> str:
        """Record ``form`` on ``episode``; the flash message. :class:`~monitor.actions.ActionError` names the field
        at fault; another clinic's episode is not found."""
        registry = self.sources.registry
        try:  # another clinic's episode is not found, in the same words as one that does not exist
            patient = await anyio.to_thread.run_sync(registry.get_patient, session.actor, episode.patient)
        except NotFoundError as exc:
            raise NotFoundError(f"no episode {episode.id}") from exc
        if patient.clinic != episode.clinic:
            raise NotFoundError(f"no episode {episode.id}")
        clinic = await anyio.to_thread.run_sync(registry.get_clinic, session.actor, patient.clinic)
        team = await anyio.to_thread.run_sync(colleagues, registry, session.actor)
        today = datetime.now(ZoneInfo(clinic.timezone)).date()
        to = _colleague(team, form.to, session.email) if form.kind == "handover" else None
        action = acts.ActionIn(episode.id, form.kind, session.email, session.name, form.note, _until(form.until),
                               to.email if to else None, to.name if to else None)  # fmt: skip
        if form.kind == "handover" and to is None:
            raise acts.ActionError("choose the colleague who takes it over", "to")
        done = await anyio.to_thread.run_sync(acts.record, self.sources.state, action, today)
        changes = {"flag": episode.flag, "note": done.note, "until": done.until, "to": done.to_email}
        await anyio.to_thread.run_sync(lambda: registry.record_episode_action(
            session.actor, episode.patient, episode.id, form.kind, {k: v for k, v in changes.items() if v}))
        if to is not None:
            await anyio.to_thread.run_sync(self._hand_over, episode, clinic, done)
        words = done.words()
        return f"{words[:1].upper()}{words[1:]} — {episode.patient}."

    def _hand_over(self, episode: Episode, clinic: s.ClinicOut, done: acts.Action) -> None:
        """Queue the e-mail that tells the colleague (sent by the monitor, with the episode's evidence)."""
        zone = ZoneInfo(clinic.timezone)
        start = datetime(episode.start_day.year, episode.start_day.month, episode.start_day.day, tzinfo=zone)
        mail = EpisodeMail(dedupe_key=f"handover:{done.id}", kind="handed_over", patient=episode.patient,
                           clinic=episode.clinic, timezone=clinic.timezone, flag=episode.flag,
                           severity=episode.severity, started_at=start,  # type: ignore[arg-type]
                           physio_email=done.to_email or "", physio_name=done.to_name,
                           episode_id=episode.id)  # fmt: skip
        state = self.sources.state
        with state.transaction() as session:
            state.enqueue(session, mail.dedupe_key, "handover", mail.physio_email, {"mail": msgspec.to_builtins(mail)})


def _garments(reg: Registered, now: datetime) -> list[dict[str, Any]]:
    out = []
    for a in reversed(reg.assignments):
        current = a.valid_from <= now and (a.valid_to is None or a.valid_to > now)
        out.append({"assignment": a, "device": reg.devices.get(a.device_id), "current": current})
    return out


def _evidence(ctx: PatientContext | None, loaded: series.PatientSeries | None,
              episodes: Sequence[EpisodeView]) -> dict[int, ev.Evidence]:  # fmt: skip
    if ctx is None or loaded is None:
        return {}
    out = {}
    for e in episodes:
        case = ev.Case(e.flag, ctx.timezone, ctx.rx, ev.episode_days(loaded.days, e.start_day, loaded.last),
                       loaded.measured)  # fmt: skip
        found = ev.compose(case)
        if found is not None:
            out[e.id] = found
    return out


__all__ = ["ActionForm", "PatientPages"]
