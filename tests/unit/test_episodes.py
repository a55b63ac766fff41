"""Episodes from day flags: hysteresis, late data, reconciliation with the stored open episode."""

from __future__ import annotations

from datetime import date, timedelta

from monitor.episodes import Decision, Run, closed_unrecorded, reconcile, runs

D0 = date(2026, 11, 1)


def days(pattern: str, flag: str = "under_use") -> list[tuple[date, tuple[str, ...] | None]]:
    """``x`` flagged, ``.`` clear, ``?`` not judged (incomplete)."""
    out: list[tuple[date, tuple[str, ...] | None]] = []
    for i, c in enumerate(pattern):
        out.append((D0 + timedelta(days=i), None if c == "?" else (flag,) if c == "x" else ("compliant",)))
    return out


def d(i: int) -> date:
    return D0 + timedelta(days=i)


def test_hovering_at_a_threshold_is_one_episode() -> None:
    assert runs(days("x.x.x.x.x"), "under_use", 2) == [Run("under_use", d(0), d(8), None)]
    assert runs(days("x.x.x..x"), "under_use", 2) == [Run("under_use", d(0), d(4), d(5)),
                                                      Run("under_use", d(7), d(7), None)]  # fmt: skip


def test_resolution_needs_enough_clear_days_and_ignores_unjudged_ones() -> None:
    assert runs(days("xx.?"), "under_use", 2) == [Run("under_use", d(0), d(1), None)]
    assert runs(days("xx..?"), "under_use", 2) == [Run("under_use", d(0), d(1), d(2))]
    assert runs(days("xx."), "under_use", 1) == [Run("under_use", d(0), d(1), d(2))]
    assert runs(days("...."), "under_use", 2) == []


def test_reconcile_opens_updates_and_resolves() -> None:
    ongoing = runs(days("..xx"), "under_use", 2)
    assert reconcile(ongoing, None, d(4)) == Decision("open", ongoing[-1])
    assert reconcile(ongoing, d(2), d(4)) == Decision("update", ongoing[-1])
    closed = runs(days("..xx.."), "under_use", 2)
    assert reconcile(closed, d(2), d(6)) == Decision("resolve", closed[0], d(4))
    assert reconcile(closed, None, d(6)) == Decision("none")


def test_late_data_that_erases_a_run_resolves_its_episode_today() -> None:
    # "silent" opened on day 3; the readings of day 3 arrived later: no run any more.
    assert reconcile(runs(days("....", "silent"), "silent", 2), d(3), d(4)) == Decision("resolve", None, d(4))


def test_history_seen_for_the_first_time_is_recorded_once() -> None:
    found = runs(days("xx...x..x"), "under_use", 2)
    assert closed_unrecorded(found, []) == found[:2]
    assert closed_unrecorded(found, [d(0)]) == [found[1]]
