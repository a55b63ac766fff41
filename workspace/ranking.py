"""Who needs the physio first: the Today page's order, its sort columns and filters (pure functions).

Need, highest first: an urgent (safety) episode nobody has acknowledged, then one that is handled (acknowledged or
handed over), then warnings the same way, then what keeps a patient from being followed at all (no prescription,
no garment), then information, then snoozed episodes; patients with nothing open come last. Ties: more episodes
nobody handled, then the longest open, then the code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final, Literal

from workspace.readmodel import EpisodeView, TodayRow

NEED: Final[dict[tuple[str, bool], int]] = {
    ("critical", False): 600,
    ("critical", True): 500,
    ("warning", False): 400,
    ("warning", True): 300,
    ("info", False): 200,
    ("info", True): 150,
}
PROBLEM_NEED: Final = 250  # no prescription or no garment: not followed at all
SNOOZED_NEED: Final = 50
Show = Literal["all", "attention", "unhandled", "urgent"]
SHOWS: Final[dict[str, str]] = {
    "all": "everyone",
    "attention": "needing attention",
    "unhandled": "not yet handled",
    "urgent": "urgent only",
}


def episode_need(episode: EpisodeView) -> int:
    """How much one open episode calls for the physio (a snoozed one barely: until its date passes)."""
    if episode.handling.snoozed is not None:
        return SNOOZED_NEED
    handled = bool(episode.handling.acknowledged or episode.handling.handed_to)
    return NEED.get((episode.severity, handled), NEED[("info", handled)])


def need(row: TodayRow) -> int:
    """The row's need: its neediest episode, or its problems."""
    found = [episode_need(e) for e in row.episodes] + ([PROBLEM_NEED] if row.problems else [])
    return max(found, default=0)


def unhandled(row: TodayRow) -> int:
    """Open episodes nobody acknowledged, snoozed or took over."""
    return sum(1 for e in row.episodes if not e.handling.handled)


def _need_key(row: TodayRow) -> tuple[int, int, int, str]:
    longest = max((e.days_open for e in row.episodes), default=0)
    return (-row.need, -unhandled(row), -longest, row.code)


def _ratio(value: float | None, target: float | None) -> float | None:
    if value is None or not target:
        return None
    return value / target


def _wear(days: Literal[7, 30]) -> Callable[[TodayRow], float | None]:
    def key(row: TodayRow) -> float | None:
        f = row.figures
        if f is None:
            return None
        if f.kind == "boot":
            done = float(f.sessions_7d) if days == 7 else f.sessions_per_week_30d
            return _ratio(done, float(f.sessions_per_week or 0))
        return _ratio(f.wear_mean_7d_h if days == 7 else f.wear_mean_30d_h, f.wear_target_h)

    return key


def _contact(row: TodayRow) -> float | None:
    seen = row.figures.last_seen_at if row.figures else None
    return seen.timestamp() if seen else None


COLUMNS: Final[dict[str, Callable[[TodayRow], float | str | None]]] = {
    "patient": lambda r: r.code,
    "wear7": _wear(7),
    "wear30": _wear(30),
    "data": lambda r: r.figures.data_days_30d if r.figures else None,
    "band": lambda r: r.figures.outside_band_7d_min if r.figures and r.figures.kind == "sock" else None,
    "gradient": lambda r: r.figures.reversed_7d_min if r.figures and r.figures.kind == "sock" else None,
    "contact": _contact,
    "battery": lambda r: r.figures.battery_pct if r.figures else None,
}
# Which way shows the worst first when a column is chosen: low wear, few data days, old contact, low battery;
# many minutes out of band or reversed.
WORST_FIRST: Final[dict[str, Literal["asc", "desc"]]] = {
    "patient": "asc", "wear7": "asc", "wear30": "asc", "data": "asc", "band": "desc", "gradient": "desc",
    "contact": "asc", "battery": "asc",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class View:
    """The Today page's choices: whose patients, which, sorted how."""

    everyone: bool = False
    show: str = "all"
    kind: str = ""
    query: str = ""
    sort: str = "need"
    direction: Literal["asc", "desc"] = "asc"


def ranked(rows: Sequence[TodayRow]) -> list[TodayRow]:
    """The rows with their need, neediest first."""
    return sorted((replace(r, need=need(r)) for r in rows), key=_need_key)


def keep(row: TodayRow, view: View) -> bool:
    """Does ``row`` pass the view's filters?"""
    if view.show == "attention" and row.need == 0:
        return False
    if view.show == "unhandled" and unhandled(row) == 0:
        return False
    if view.show == "urgent" and not any(e.severity == "critical" for e in row.episodes):
        return False
    if view.kind and row.kind != view.kind:
        return False
    wanted = view.query.strip().lower()
    return not wanted or wanted in row.code.lower() or wanted in (row.name or "").lower()


def arrange(rows: Sequence[TodayRow], view: View) -> list[TodayRow]:
    """Rank, filter and (for a column other than need) sort; rows without a value for the column go last."""
    shown = [r for r in ranked(rows) if keep(r, view)]
    column = COLUMNS.get(view.sort)
    if column is None:
        return shown
    known = [r for r in shown if column(r) is not None]
    unknown = [r for r in shown if column(r) is None]
    known.sort(key=lambda r: _sortable(column(r)), reverse=view.direction == "desc")
    return known + unknown


def _sortable(value: float | str | None) -> tuple[float, str]:
    if isinstance(value, str):
        return (0.0, value)
    return (float(value or 0.0), "")


def now_utc() -> datetime:
    """Now (UTC), one place for the pages."""
    return datetime.now(UTC)
