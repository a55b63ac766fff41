"""Episodes from day flags: hysteresis, late data, reconciliation with the stored open episode."""

from __future__ import annotations

from datetime import date, timedelta

from monitor.episodes import Decision, Mark, Run, closed_unrecorded, reconcile, runs

D0 = date(2026, 11, 1)


def days(pattern: str, flag: str = "under_use") -> list[Mark]:
    """``x`` flagged, ``.`` clear, ``?`` not judged (incomplete), ``s`` silent (no data: judges only silence)."""
    out: list[Mark] = []
    for i, c in enumerate(pattern):
        day = D0 + timedelta(days=i)
        if c == "s":
            out.append(Mark(day, ("silent",), frozenset({"silent"})))
        else:
            out.append(Mark(day, None if c == "?" else (flag,) if c == "x" else ("compliant",)))
    return out


def d(i: int) -> date:
    return D0 + timedelta(days=i)


def test_hovering_at_a_threshold_is_one_episode() -> None:
    assert runs(days("x.x.x.x.x"), "under_use", 2) == [Run("under_use", d(0), d(8), None)]
    assert runs(days("x.x.x..x"), "under_use", 2) == [Run("under_use", d(0), d(4), d(5), (d(5), d(6))),
                                                      Run("under_use", d(7), d(7), None)]  # fmt: skip


def test_resolution_needs_enough_clear_days_and_ignores_unjudged_ones() -> None:
    assert runs(days("xx.?"), "under_use", 2) == [Run("under_use", d(0), d(1), None)]
    assert runs(days("xx..?"), "under_use", 2) == [Run("under_use", d(0), d(1), d(2), (d(2), d(3)))]
    assert runs(days("xx."), "under_use", 1) == [Run("under_use", d(0), d(1), d(2), (d(2),))]
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


def test_silence_is_not_recovery() -> None:
    # Rolled down for two days, then nothing from the garment: the run stays open, however long the silence.
    assert runs(days("xxssssss", "rolled_down"), "rolled_down", 2) == [Run("rolled_down", d(0), d(1), None)]
    # Silent days neither extend nor end it: readings showing it gone end it on the first of them.
    assert runs(days("xxss..", "rolled_down"), "rolled_down", 2) == [
        Run("rolled_down", d(0), d(1), d(4), (d(4), d(5)))]  # fmt: skip
    # Flagged again after the silence: the same run, its last day moves.
    assert runs(days("xxssx.", "rolled_down"), "rolled_down", 2) == [Run("rolled_down", d(0), d(4), None)]
    # The silence is its own episode, ended by the first days with data.
    assert runs(days("xxss..", "rolled_down"), "silent", 2) == [Run("silent", d(2), d(3), d(4), (d(4), d(5)))]


def test_a_day_judges_only_what_its_data_can_show() -> None:
    worn_nothing = Mark(d(2), ("under_use",), frozenset({"silent", "under_use"}))
    series = [Mark(d(0), ("too_tight",)), Mark(d(1), ("too_tight",)), worn_nothing, worn_nothing._replace(day=d(3))]
    # Two days with data but no wear: under-use, and no word on the pressure: too_tight stays open.
    assert runs(series, "too_tight", 2) == [Run("too_tight", d(0), d(1), None)]
    assert runs(series, "under_use", 2) == [Run("under_use", d(2), d(3), None)]
    # Today (incomplete) extends with what it shows and ends nothing.
    today = Mark(d(4), ("low_battery",), frozenset({"low_battery"}))
    assert runs([*series, today], "too_tight", 1) == [Run("too_tight", d(0), d(1), None)]
