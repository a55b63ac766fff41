"""What the workspace's pages show, read from the registry (as the signed-in physio) and the monitor's state database.

The registry answers who the patients are, their physio, prescriptions and garments (through its service, with the
physio's actor, so she sees her clinic only). The monitor's state database answers which episodes are open, what
was done about them (``monitor.actions``) and each patient's latest figures (``monitor.figures``). Nothing here
queries InfluxDB: the Today page stays fast whatever the number of patients (``workspace.series`` reads the day
series of one patient for its page).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Final

from sqlalchemy import select

from devices.registry import schemas as s
from devices.registry.service import Actor, Registry
from monitor import actions as acts
from monitor import figures as figs
from monitor.mail import SEVERITY_WORD, flag_explanation, flag_title
from monitor.state import Episode, State
from workspace import prescriptions as rxs

SEVERITY_RANK: Final[dict[str, int]] = {"critical": 0, "warning": 1, "info": 2}
# Why an episode matters, in a few words for Today's list (the patient page says it in full).
SHORT_REASON: Final[dict[str, str]] = {
    "silent": "no reading from the garment",
    "under_use": "worn fewer hours than prescribed",
    "too_tight": "ankle pressure above the prescribed band",
    "too_loose": "ankle pressure below the prescribed band",
    "rolled_down": "calf pressure above ankle: the top has probably rolled down",
    "worn_out": "pressure lost over the week: the garment needs replacing",
    "boot_overpressure": "a chamber went above the prescribed maximum",
    "boot_short_sessions": "sessions shorter than prescribed",
    "boot_long_sessions": "sessions longer than prescribed",
    "boot_missed_sessions": "fewer sessions than prescribed",
    "low_battery": "battery low",
}


@dataclass(frozen=True, slots=True)
class EpisodeView:
    """One episode with its words and what was done about it."""

    id: int
    patient: str
    flag: str
    severity: str
    start_day: date
    last_day: date
    end_day: date | None
    days_open: int
    note: str
    handling: acts.Handling

    @property
    def title(self) -> str:
        return flag_title(self.flag)

    @property
    def reason(self) -> str:
        return flag_explanation(self.flag)

    @property
    def short_reason(self) -> str:
        return SHORT_REASON.get(self.flag.partition(":")[0], self.reason)

    @property
    def severity_word(self) -> str:
        return SEVERITY_WORD.get(self.severity, self.severity)

    @property
    def is_open(self) -> bool:
        return self.end_day is None


def episode_view(episode: Episode, actions: Sequence[acts.Action], today: date) -> EpisodeView:
    """An episode as shown on ``today`` (the clinic's local date)."""
    end = episode.end_day if episode.open_key is None else None
    until = end or today
    return EpisodeView(episode.id, episode.patient, episode.flag, episode.severity, episode.start_day,
                       episode.last_day, end, max(1, (until - episode.start_day).days + (0 if end else 1)),
                       episode.note, acts.handling(actions, today))  # fmt: skip


def by_need(episodes: Sequence[EpisodeView]) -> list[EpisodeView]:
    """Open episodes first by severity, those nobody handled first, then the longest open."""
    return sorted(episodes, key=lambda e: (SEVERITY_RANK.get(e.severity, 3), e.handling.handled, -e.days_open,
                                           e.flag))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Colleague:
    """A physio of the clinic (for names, and to hand an episode over to)."""

    email: str
    name: str
    active: bool


@dataclass(frozen=True, slots=True)
class TodayRow:
    """One patient on the Today page."""

    code: str
    name: str | None
    physio: Colleague | None
    mine: bool
    kind: str | None
    garments: tuple[str, ...]
    rx: tuple[rxs.RxView, ...]
    episodes: tuple[EpisodeView, ...]
    problems: tuple[str, ...]
    figures: figs.Figures | None
    need: int = 0
    flags: tuple[str, ...] = field(default=())

    @property
    def worst(self) -> EpisodeView | None:
        """The episode that decides the row's place (the first by need)."""
        return self.episodes[0] if self.episodes else None


def open_episodes(state: State, patients: Sequence[str], today: date) -> dict[str, list[EpisodeView]]:
    """The open episodes of these patients, with their actions, by patient."""
    rows: list[Episode] = []
    with state.transaction() as session:
        for start in range(0, len(patients), 500):
            chunk = list(patients[start : start + 500])
            rows += session.scalars(select(Episode).where(Episode.patient.in_(chunk), Episode.open_key.is_not(None)))
    done = acts.for_episodes(state, [e.id for e in rows])
    out: dict[str, list[EpisodeView]] = defaultdict(list)
    for episode in rows:
        out[episode.patient].append(episode_view(episode, done[episode.id], today))
    return {code: by_need(found) for code, found in out.items()}


def patient_episodes(state: State, patient: str, today: date) -> list[EpisodeView]:
    """Every episode of one patient (open and past), newest first."""
    with state.transaction() as session:
        rows = list(session.scalars(select(Episode).where(Episode.patient == patient)))
    done = acts.for_episodes(state, [e.id for e in rows])
    views = [episode_view(e, done[e.id], today) for e in rows]
    return sorted(views, key=lambda e: (e.start_day, e.id), reverse=True)


def colleagues(registry: Registry, actor: Actor) -> dict[str, Colleague]:
    """The clinic's physios by e-mail."""
    return {p.email: Colleague(p.email, p.name, p.active) for p in registry.list_physios(actor)}


def garments_now(registry: Registry, actor: Actor, now: datetime) -> dict[str, list[str]]:
    """Each patient's garments worn now (device ids), from the registry's snapshot: one query for the clinic."""
    now_ms = int(now.timestamp() * 1000)
    worn: dict[str, list[str]] = defaultdict(list)
    for a in registry.snapshot(actor).assignments:
        if a.from_ms <= now_ms and (a.to_ms is None or now_ms < a.to_ms):
            worn[a.patient].append(a.device_id)
    return worn


@dataclass
class RxCache:
    """Each clinic's current prescriptions, kept until the registry changes (its version, the newest audit entry's
    id, moves with every change) or the day does: the registry builds them row by row (~0.2 ms each)."""

    entries: dict[tuple[int | None, date], tuple[int, dict[str, list[rxs.RxView]]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self, registry: Registry, actor: Actor, today: date) -> dict[str, list[rxs.RxView]]:
        """The clinic's current prescriptions by patient, as of ``today``."""
        key, version = (actor.clinic_id, today), registry.version()
        with self.lock:
            found = self.entries.get(key)
        if found is not None and found[0] == version:
            return found[1]
        fresh = rxs.current_by_patient(registry.list_prescriptions(actor), today)
        with self.lock:
            self.entries = {k: v for k, v in self.entries.items() if k[1] == today} | {key: (version, fresh)}
        return fresh


@dataclass(frozen=True, slots=True)
class Sources:
    """Where the pages read from: the registry and the monitor's state database (and a cache of the former)."""

    registry: Registry
    state: State
    rx_cache: RxCache = field(default_factory=RxCache)


def problems_of(rx: Sequence[rxs.RxView], garments: Sequence[str], figures: figs.Figures | None) -> tuple[str, ...]:
    """What keeps a patient from being followed fully, in the page's words."""
    found = []
    if not rx:
        found.append("no current prescription: wear and pressure cannot be judged")
    if not garments:
        found.append("no garment assigned")
    if rx and garments and figures is None:
        found.append("not evaluated by the monitor yet")
    return tuple(found)


def today_rows(sources: Sources, actor: Actor, me: str, everyone: bool, today: date, now: datetime,
               patients: Sequence[s.PatientOut] | None = None) -> list[TodayRow]:  # fmt: skip
    """The physio's patients (``everyone``: the clinic's), with what the Today page shows, unranked."""
    registry = sources.registry
    people = list(patients) if patients is not None else registry.list_patients(actor, physio=None if everyone else me)
    codes = [p.code for p in people]
    current = sources.rx_cache.current(registry, actor, today)
    worn = garments_now(registry, actor, now)
    team = colleagues(registry, actor)
    figures = figs.read(sources.state, codes)
    episodes = open_episodes(sources.state, codes, today)
    return [_row(p, me, team, current.get(p.code, []), worn.get(p.code, []), figures.get(p.code),
                 episodes.get(p.code, [])) for p in people]  # fmt: skip


def _row(p: s.PatientOut, me: str, team: dict[str, Colleague], rx: list[rxs.RxView], garments: list[str],
         figures: figs.Figures | None, episodes: list[EpisodeView]) -> TodayRow:  # fmt: skip
    physio = team.get(p.physio) if p.physio else None
    kind = rx[0].kind if rx else (figures.kind if figures else None)
    return TodayRow(code=p.code, name=p.display_name, physio=physio, mine=p.physio == me, kind=kind,
                    garments=tuple(garments), rx=tuple(rx), episodes=tuple(episodes),
                    problems=problems_of(rx, garments, figures), figures=figures,
                    flags=tuple(e.flag for e in episodes))  # fmt: skip
