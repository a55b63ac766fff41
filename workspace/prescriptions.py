"""Prescriptions as the workspace shows them: the one place that turns the registry's prescriptions into what the
pages need (history, the current one, its band and targets, conflicts with contraindications).

Prescription versions with effective dates and per-leg figures arrive with the registry's clinical rework (issue
11): they extend :class:`RxView` (a version's ``supersedes``, its legs) and :func:`history` here, and every page
follows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

from devices.registry import schemas as s
from devices.registry.classes import Band, Finding, conflicts
from devices.registry.web import rx_summary

RxState = Literal["current", "upcoming", "ended"]


@dataclass(frozen=True, slots=True)
class RxView:
    """One prescription: its dates, state on the page's day, a one-line summary and the targets the charts use."""

    id: int
    patient: str
    kind: str
    valid_from: date
    valid_to: date | None
    state: RxState
    summary: str
    band: Band | None = None
    wear_target_h: float | None = None
    sessions_per_week: int | None = None
    session_min_minutes: float | None = None
    session_max_minutes: float | None = None
    max_chamber_mmhg: float | None = None
    override_by: str | None = None
    override_reason: str | None = None


def _state(rx: s.PrescriptionOut, today: date) -> RxState:
    if rx.valid_from > today:
        return "upcoming"
    if rx.valid_to is not None and rx.valid_to < today:
        return "ended"
    return "current"


def _band(rx: s.PrescriptionOut) -> Band | None:
    if rx.ankle_min_mmhg is None or rx.ankle_max_mmhg is None:
        return None
    return Band(rx.ankle_min_mmhg, rx.ankle_max_mmhg)


def view(rx: s.PrescriptionOut, today: date) -> RxView:
    """The workspace's view of one registry prescription on ``today`` (the clinic's local date)."""
    return RxView(id=rx.id, patient=rx.patient, kind=rx.garment_kind, valid_from=rx.valid_from,
                  valid_to=rx.valid_to, state=_state(rx, today), summary=rx_summary(rx), band=_band(rx),
                  wear_target_h=rx.wear_hours_per_day, sessions_per_week=rx.sessions_per_week,
                  session_min_minutes=rx.session_min_minutes, session_max_minutes=rx.session_max_minutes,
                  max_chamber_mmhg=rx.max_chamber_mmhg, override_by=rx.override_by,
                  override_reason=rx.override_reason)  # fmt: skip


def history(rxs: Iterable[s.PrescriptionOut], today: date) -> list[RxView]:
    """Every prescription of a patient, newest first."""
    return sorted((view(rx, today) for rx in rxs), key=lambda r: (r.valid_from, r.id), reverse=True)


def current_by_patient(rxs: Iterable[s.PrescriptionOut], today: date) -> dict[str, list[RxView]]:
    """Each patient's prescriptions in force on ``today``."""
    out: dict[str, list[RxView]] = defaultdict(list)
    for rx in rxs:
        shown = view(rx, today)
        if shown.state == "current":
            out[rx.patient].append(shown)
    return out


def active(contraindications: Sequence[s.ContraindicationOut], today: date) -> list[s.ContraindicationOut]:
    """The contraindications not resolved by ``today``."""
    return [c for c in contraindications if c.resolved_on is None or c.resolved_on > today]


def findings(current: Sequence[RxView], contraindications: Sequence[s.ContraindicationOut],
             today: date) -> list[tuple[RxView, Finding]]:  # fmt: skip
    """Each way a current prescription conflicts with an active contraindication (the registry's own rules)."""
    live = [(c.kind, c.abpi) for c in active(contraindications, today)]
    return [(rx, f) for rx in current for f in conflicts(live, rx.kind, rx.band)]
