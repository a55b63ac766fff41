"""Flags over days become episodes: a start, an end and a severity; with hysteresis.

Pure functions. A run of a flag starts on a flagged day and goes on through
clear days until ``resolve_after`` clear days in a row have been seen: a value
hovering at a threshold (flagged, clear, flagged, ...) makes one episode, not
one per crossing. Days that cannot be judged (``flags is None``: the current,
incomplete day) neither extend nor end a run.

Each evaluation recomputes the runs from the whole window of day flags, so
late data (store-and-forward) can move, extend or erase a run; ``reconcile``
says what that means for the one stored open episode of a patient and flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

from monitor.model import COMPLIANT


@dataclass(frozen=True, slots=True)
class Run:
    """A flag's run: first and last flagged day; ``end`` is the first clear day once resolved, else ``None``."""

    flag: str
    start: date
    last: date
    end: date | None


DayFlags = tuple[date, tuple[str, ...] | None]


def runs(days: Sequence[DayFlags], flag: str, resolve_after: int) -> list[Run]:
    """The runs of ``flag`` over ``days`` (oldest first)."""
    found: list[Run] = []
    start: date | None = None
    last: date | None = None
    clear = 0
    for day, flags in days:
        if flags is None:
            continue
        if flag in flags:
            start, last, clear = (start or day), day, 0
            continue
        if start is None or last is None:
            continue
        clear += 1
        if clear >= resolve_after:
            found.append(Run(flag, start, last, last + timedelta(days=1)))
            start = last = None
            clear = 0
    if start is not None and last is not None:
        found.append(Run(flag, start, last, None))
    return found


def flags_seen(days: Sequence[DayFlags]) -> set[str]:
    """Every flag (other than ``compliant``) on any of ``days``."""
    return {f for _, flags in days if flags for f in flags if f != COMPLIANT}


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
