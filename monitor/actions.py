"""What physios did about an episode: acknowledged, snoozed, noted, handed over. Kept in the monitor's state database.

The physios' workspace (``workspace/``) records these; the monitor reads them when it composes a later e-mail
about the same episode (the resolving e-mail, a hand-over) and each digest, so a colleague sees what was done.
They live here, in the monitor's own database beside the episodes they are about (``monitor.state.Base``), because
the monitor must read them and the monitor depends on nothing above it. Each action is also written to the
registry's audit trail by the workspace (``Registry.record_episode_action``).

- ``acknowledge``: seen and being dealt with (an optional note says how);
- ``snooze``: not to be raised again until a date (inclusive, the clinic's local date), with a reason. A snooze
  belongs to one episode: a new episode, urgent or not, is never covered by it. Urgent (critical) episodes cannot
  be snoozed at all (:data:`SNOOZE_REFUSED`);
- ``note``: free text ("I called the client: the stocking rolls at the knee; new size ordered");
- ``handover``: another physio of the clinic takes the episode over; she gets an e-mail at once and is told of
  later e-mails about the episode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Final, Literal, get_args

from sqlalchemy import Date, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from devices.registry.models import UTCDateTime, utcnow
from monitor.state import Base, Episode, State

ActionKind = Literal["acknowledge", "snooze", "note", "handover"]
ACTION_KINDS: Final[tuple[str, ...]] = get_args(ActionKind)
NOTE_MAX: Final = 2000  # characters of a note or reason
SNOOZE_MAX_DAYS: Final = 90  # a snooze longer than this is a care decision for the prescription, not a snooze
SNOOZE_REFUSED: Final = "an urgent (safety) episode cannot be snoozed: acknowledge it and note what was done"
ACTION_WORDS: Final[dict[str, str]] = {
    "acknowledge": "acknowledged",
    "snooze": "snoozed",
    "note": "note",
    "handover": "handed over",
}


class EpisodeAction(Base):
    """One thing a physio did about an episode."""

    __tablename__ = "episode_actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    episode_id: Mapped[int] = mapped_column(Integer, index=True)
    patient: Mapped[str] = mapped_column(String(64), index=True)
    clinic: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    by_email: Mapped[str] = mapped_column(String(254))
    by_name: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")
    until: Mapped[date | None] = mapped_column(Date, default=None)
    to_email: Mapped[str | None] = mapped_column(String(254), default=None)
    to_name: Mapped[str | None] = mapped_column(String(200), default=None)


class ActionError(ValueError):
    """An action that cannot be recorded (unknown episode, a snooze of an urgent one, a date in the past, ...)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Action:
    """An action as read back."""

    id: int
    episode_id: int
    patient: str
    kind: str
    by_email: str
    by_name: str
    at: datetime
    note: str = ""
    until: date | None = None
    to_email: str | None = None
    to_name: str | None = None

    def words(self) -> str:
        """``acknowledged by Ann Lee``, ``snoozed until 2025-11-20 by Ann Lee``, ``handed over to Bob Roy by ...``."""
        what = ACTION_WORDS.get(self.kind, self.kind)
        if self.kind == "snooze" and self.until is not None:
            what += f" until {self.until.isoformat()}"
        if self.kind == "handover":
            what += f" to {self.to_name or self.to_email}"
        who = f"{what} by {self.by_name}" if self.kind != "note" else f"note by {self.by_name}"
        return f"{who}: {self.note}" if self.note else who


@dataclass(frozen=True, slots=True)
class Handling:
    """What was done about one episode, as of a day: the latest acknowledgement, snooze and hand-over."""

    actions: tuple[Action, ...] = ()
    acknowledged: Action | None = None
    snoozed: Action | None = None  # only while the snooze lasts (``until`` not passed)
    handed_to: Action | None = None
    notes: tuple[Action, ...] = field(default=())

    @property
    def handled(self) -> bool:
        """Acknowledged, handed over or snoozed: someone is on it."""
        return bool(self.acknowledged or self.snoozed or self.handed_to)

    def summary(self) -> str:
        """One line for lists and e-mails: the latest of each kind, newest first (empty: nothing done)."""
        latest = sorted(self.actions, key=lambda a: a.at, reverse=True)
        picked = [a for a in (self.snoozed, self.handed_to, self.acknowledged) if a is not None]
        last_note = next((a for a in latest if a.kind == "note"), None)
        lines = [f"{a.words()} ({a.at.date().isoformat()})" for a in sorted(picked, key=lambda a: a.at, reverse=True)]
        if last_note is not None:
            lines.append(f"{last_note.words()} ({last_note.at.date().isoformat()})")
        return "; ".join(lines)


def handling(actions: Iterable[Action], today: date) -> Handling:
    """Fold one episode's actions (any order) into what holds on ``today`` (the clinic's local date)."""
    ordered = tuple(sorted(actions, key=lambda a: (a.at, a.id)))
    last: dict[str, Action] = {a.kind: a for a in ordered}
    snooze = last.get("snooze")
    active = snooze if snooze is not None and snooze.until is not None and snooze.until >= today else None
    return Handling(ordered, last.get("acknowledge"), active, last.get("handover"),
                    tuple(a for a in ordered if a.kind == "note"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class ActionIn:
    """An action to record: by whom (the signed-in physio), on which episode, what."""

    episode_id: int
    kind: str
    by_email: str
    by_name: str
    note: str = ""
    until: date | None = None
    to_email: str | None = None
    to_name: str | None = None


def ensure_tables(state: State) -> None:
    """Create the actions table if it is missing (``State`` creates it too when this module was imported first)."""
    Base.metadata.create_all(state.engine, tables=[EpisodeAction.__table__])  # type: ignore[list-item]


def check(action: ActionIn, episode: Episode, today: date) -> None:
    """Refuse what cannot be recorded (:class:`ActionError` naming the form field at fault)."""
    if action.kind not in ACTION_KINDS:
        raise ActionError(f"unknown action {action.kind!r}", "kind")
    if len(action.note) > NOTE_MAX:
        raise ActionError(f"at most {NOTE_MAX} characters", "note")
    if action.kind in ("note", "snooze") and not action.note.strip():
        raise ActionError("say why" if action.kind == "snooze" else "write the note", "note")
    if action.kind == "snooze":
        _check_snooze(action, episode, today)
    if action.kind == "handover" and not action.to_email:
        raise ActionError("choose the colleague who takes it over", "to")


def _check_snooze(action: ActionIn, episode: Episode, today: date) -> None:
    if episode.severity == "critical":
        raise ActionError(SNOOZE_REFUSED, "until")
    if action.until is None:
        raise ActionError("give the date until which it is snoozed", "until")
    if action.until < today:
        raise ActionError(f"the date is in the past (today is {today.isoformat()})", "until")
    if (action.until - today).days > SNOOZE_MAX_DAYS:
        raise ActionError(f"at most {SNOOZE_MAX_DAYS} days ahead; for longer, change the prescription", "until")


def record(state: State, action: ActionIn, today: date) -> Action:
    """Record ``action`` on its episode (which must exist); :class:`ActionError` when it cannot be."""
    with state.transaction() as session:
        episode = session.get(Episode, action.episode_id)
        if episode is None:
            raise ActionError(f"no episode {action.episode_id}", "episode")
        check(action, episode, today)
        row = EpisodeAction(episode_id=episode.id, patient=episode.patient, clinic=episode.clinic, kind=action.kind,
                            by_email=action.by_email, by_name=action.by_name, note=action.note.strip(),
                            until=action.until if action.kind == "snooze" else None,
                            to_email=action.to_email if action.kind == "handover" else None,
                            to_name=action.to_name if action.kind == "handover" else None)  # fmt: skip
        session.add(row)
        session.flush()
        return _out(row)


def for_episodes(state: State, episode_ids: Sequence[int]) -> dict[int, list[Action]]:
    """Every action on these episodes, oldest first, by episode."""
    out: dict[int, list[Action]] = {i: [] for i in episode_ids}
    with state.transaction() as session:
        for start in range(0, len(episode_ids), 500):
            chunk = list(episode_ids[start : start + 500])
            query = select(EpisodeAction).where(EpisodeAction.episode_id.in_(chunk)).order_by(EpisodeAction.id)
            for row in session.scalars(query):
                out[row.episode_id].append(_out(row))
    return out


def for_patients(state: State, patients: Sequence[str]) -> list[Action]:
    """Every action on these patients' episodes, oldest first."""
    found: list[Action] = []
    with state.transaction() as session:
        for start in range(0, len(patients), 500):
            chunk = list(patients[start : start + 500])
            query = select(EpisodeAction).where(EpisodeAction.patient.in_(chunk)).order_by(EpisodeAction.id)
            found += [_out(row) for row in session.scalars(query)]
    return sorted(found, key=lambda a: a.id)


def _out(row: EpisodeAction) -> Action:
    return Action(row.id, row.episode_id, row.patient, row.kind, row.by_email, row.by_name, row.at, row.note,
                  row.until, row.to_email, row.to_name)  # fmt: skip


__all__ = [
    "ACTION_KINDS",
    "SNOOZE_REFUSED",
    "Action",
    "ActionError",
    "ActionIn",
    "EpisodeAction",
    "Handling",
    "ensure_tables",
    "for_episodes",
    "for_patients",
    "handling",
    "record",
]
