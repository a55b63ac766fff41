"""Flags over days become episodes: a start, an end and a severity; with hysteresis.

Pure functions. A run of a flag starts on a flagged day and goes on until
``resolve_after`` days in a row have shown the flag gone: a value hovering at
a threshold (flagged, clear, flagged, ...) makes one episode, not one per
crossing.

**Only data can show a problem gone.** Each day says which flags its data can
judge (:class:`Mark`'s ``judged``): a day without any stored point judges only
``silent``; a day with data but no wear judges ``under_use`` but not the
pressure flags; a boot's rest day judges no session flag. A day that cannot
judge a flag neither extends nor ends its run: a stocking that rolled down and
then stopped sending stays "rolled down" until readings show it worn properly.
The current, incomplete day judges only what it carries (live flags extend,
never end, a run).

Each evaluation recomputes the runs from the whole window of day flags, so
late data (store-and-forward) can move, extend or erase a run; ``reconcile``
says what that means for the one stored open episode of a patient and flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal, NamedTuple

from monitor.model import COMPLIANT


class Mark(NamedTuple):
    """One day for the runs: its flags (``None``: not judged at all) and the flags its data can judge.

    ``judged`` ``None`` means every flag (a day with full data).
    """

    day: date
    flags: tuple[str, ...] | None
    judged: frozenset[str] | None = None

    def judges(self, flag: str) -> bool:
        """Can this day extend or end a run of ``flag``?"""
        if self.flags is None:
            return False
        return self.judged is None or flag in self.judged


@dataclass(frozen=True, slots=True)
class Run:
    """A flag's run: first and last flagged day; ``end`` is the first day that showed it gone once resolved, else
    ``None`` (days that could not judge the flag, such as silent days, may lie between ``last`` and ``end``).

    ``cleared_by`` are the days whose data showed the flag gone (the ``resolve_after`` judged clear days).
    """

    flag: str
    start: date
    last: date
    end: date | None
    cleared_by: tuple[date, ...] = ()


def runs(days: Sequence[Mark], flag: str, resolve_after: int) -> list[Run]:
    """The runs of ``flag`` over ``days`` (oldest first)."""
    found: list[Run] = []
    start: date | None = None
    last: date | None = None
    clear: list[date] = []
    for mark in days:
        if not mark.judges(flag):
            continue
        if flag in (mark.flags or ()):
            start, last, clear = (start or mark.day), mark.day, []
            continue
        if start is None or last is None:
            continue
        clear.append(mark.day)
        if len(clear) >= resolve_after:
            found.append(Run(flag, start, last, clear[0], tuple(clear)))
            start = last = None
            clear = []
    if start is not None and last is not None:
        found.append(Run(flag, start, last, None))
    return found


def flags_seen(days: Sequence[Mark]) -> set[str]:
    """Every flag (other than ``compliant``) on any of ``days``."""
    return {f for mark in days if mark.flags for f in mark.flags if f != COMPLIANT}


Action = Literal["open", "update", "resolve", "none"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the stored open episode of one patient and flag."""

    action: Action
    run: Run | None = None
    end: date | None = None


def reconcile(found: Sequence[Run], open_start: date | None, today: date) -> Decision:
    """Compare the recomputed runs with the stored open episode (``open_start``; ``None``: none is open).

    - an ongoing run and no open episode: open one;
    - an ongoing run and an open episode: keep it, updated (start and last day may move with late data);
    - no ongoing run but an open episode: resolve it at the end of the run it belonged to, or today when
      late data erased the run (e.g. a "silent" day whose readings arrived after all).
    """
    ongoing = found[-1] if found and found[-1].end is None else None
    if ongoing is not None:
        return Decision("update" if open_start is not None else "open", ongoing)
    if open_start is None:
        return Decision("none")
    for run in reversed(found):
        if run.start <= open_start <= run.last or (run.end is not None and run.start <= open_start < run.end):
            return Decision("resolve", run, run.end)
    return Decision("resolve", None, today)


def closed_unrecorded(found: Sequence[Run], recorded_starts: Sequence[date]) -> list[Run]:
    """Resolved runs no stored episode covers (history seen for the first time: recorded, never e-mailed)."""
    out = []
    for run in found:
        if run.end is None:
            continue
        if not any(run.start <= start < run.end for start in recorded_starts):
            out.append(run)
    return out
