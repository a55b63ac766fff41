"""The daily flags of docs/ground-truth.md on hand-made DayStats: every rule and its strict boundary."""

from __future__ import annotations

import statistics
from datetime import date, timedelta
from typing import Any, Literal

import pytest

from monitor import queries as q
from monitor.compliance import (
    adherence,
    day_flags,
    flags_for,
    local_days,
    safety_flags,
    weekly_median_below,
    with_windows,
)
from monitor.model import BootRx, DayStats, PatientContext, SockRx

SOCK = SockRx(low_mmhg=23.0, high_mmhg=32.0, wear_hours_per_day=8.0, wear_days_per_week=7,
              zones=("ankle", "calf"))  # fmt: skip
BOOT = BootRx(sessions_per_week=7, session_min_s=1200.0, session_max_s=1800.0, max_chamber_mmhg=60.0,
              zones=("foot", "ankle", "calf", "thigh"))  # fmt: skip
D0 = date(2026, 3, 1)


def ctx(rx: SockRx | BootRx | None = SOCK) -> PatientContext:
    kind: Literal["sock", "boot"] | None = "sock" if isinstance(rx, SockRx) else "boot" if rx else None
    return PatientContext("PT-000001", "clinic", "America/Edmonton", kind, rx, "p@x.example", "P")


def day(i: int = 0, *, complete: bool = True, **values: Any) -> DayStats:
    start = 1_772_348_400_000 + i * 86_400_000
    base: dict[str, Any] = {"points": 1440, "samples": 1440, "wear_s": 9 * 3600.0}
    base.update(values)
    return DayStats(D0 + timedelta(days=i), start, start + 86_400_000, complete, **base)


def sock_flags(**values: Any) -> tuple[str, ...] | None:
    return day_flags(ctx(), day(**values))


def boot_day(i: int = 0, **values: Any) -> DayStats:
    base: dict[str, Any] = {"points": 800, "samples": 750, "wear_s": 1500.0, "sessions_started": 1,
                            "session_durations_s": [1500.0], "peak_mmhg": 50.0, "sessions_in_window": 1,
                            "sessions_required_in_window": 1}  # fmt: skip
    base.update(values)
    return day(i, **base)


def test_a_normal_day_is_compliant_and_an_incomplete_day_is_not_judged() -> None:
    assert sock_flags() == ("compliant",)
    assert day_flags(ctx(), day(complete=False, points=0)) is None
    assert day_flags(ctx(BOOT), boot_day()) == ("compliant",)


def test_silent_carries_only_silent() -> None:
    # Nothing stored: silent alone, whatever the other values would say.
    assert sock_flags(points=0, samples=0, wear_s=0.0, above_range_s=5000.0) == ("silent",)
    assert day_flags(ctx(BOOT), boot_day(points=0, sessions_in_window=0, sessions_required_in_window=7)) == (
        "silent",)  # fmt: skip
    # One stored point (a status) is not silent: the wear rule judges the day.
    assert sock_flags(points=1, samples=0, wear_s=0.0) == ("under_use",)
    # Silent is judged even without a usable prescription; other days are not.
    assert day_flags(ctx(None), day(points=0)) == ("silent",)
    assert day_flags(ctx(None), day()) is None


def test_under_use_is_strictly_below_the_prescribed_hours() -> None:
    assert sock_flags(wear_s=8 * 3600.0) == ("compliant",)
    assert sock_flags(wear_s=8 * 3600.0 - 0.001) == ("under_use",)


def test_too_tight_too_loose_and_rolled_down_need_more_than_the_tolerance() -> None:
    for name, flag in (("above_range_s", "too_tight"), ("below_range_s", "too_loose"),
                       ("reversed_gradient_s", "rolled_down")):  # fmt: skip
        assert sock_flags(**{name: 1800.0}) == ("compliant",), name
        assert sock_flags(**{name: 1800.001}) == (flag,), name
        assert sock_flags(**{name: 60.0}) == ("compliant",), "a spike never flags"
    # The band flags follow the prescription's tolerance; the gradient's 30 minutes are fixed.
    strict = PatientContext("PT-1", "c", "UTC", "sock", SockRx(23.0, 32.0, 8.0, 7, ("ankle",), tolerance_s=600.0),
                            None, None)  # fmt: skip
    assert day_flags(strict, day(above_range_s=601.0, reversed_gradient_s=601.0)) == ("too_tight",)


def test_several_flags_are_sorted() -> None:
    got = sock_flags(wear_s=3600.0, below_range_s=2000.0, reversed_gradient_s=2000.0, ankle_7d_below_low=True)
    assert got == ("rolled_down", "too_loose", "under_use", "worn_out")


def test_worn_out_only_when_the_weekly_median_is_below() -> None:
    assert sock_flags(ankle_7d_below_low=True) == ("worn_out",)
    assert sock_flags(ankle_7d_below_low=False) == ("compliant",)
    assert sock_flags(ankle_7d_below_low=None) == ("compliant",), "no worn sample in the window: no flag"


def _counts(values: list[float], low: float, i: int = 0) -> DayStats:
    below = [v for v in values if v < low]
    rest = [v for v in values if v >= low]
    return day(i, ankle_samples=len(values), below_samples=len(below), below_max_mmhg=max(below, default=None),
               not_below_min_mmhg=min(rest, default=None))  # fmt: skip


@pytest.mark.parametrize(
    "days",
    [
        [[22.0, 23.0, 24.0]],  # odd: median 23.0, equal to the bound: not below
        [[22.0, 22.5, 24.0]],  # odd: 22.5 below
        [[22.0, 23.5], [22.5, 30.0]],  # even, half below: (22.5 + 23.5) / 2 = 23.0, not below
        [[22.0, 23.2], [22.5, 30.0]],  # even, half below: (22.5 + 23.2) / 2 = 22.85, below
        [[22.9, 23.0]],  # even, half below: 22.95 below
        [[21.0, 22.0], [22.0, 40.0]],  # three of four below
        [[30.0], [], [10.0, 10.0]],  # a day without worn samples counts nothing
        [[23.0, 23.0]],  # none below
    ],
)
def test_the_weekly_median_test_composed_from_daily_counts_is_exact(days: list[list[float]]) -> None:
    low = 23.0
    stats = [_counts(values, low, i) for i, values in enumerate(days)]
    everything = [v for values in days for v in values]
    assert weekly_median_below(stats, low) is (statistics.median(everything) < low)


def test_the_weekly_median_window_is_seven_days() -> None:
    # Six days well below, then eight days well above: the median follows once most of the window is above.
    days = [_counts([20.0] * 10, 23.0, i) for i in range(6)] + [_counts([30.0] * 10, 23.0, i) for i in range(6, 14)]
    judged = with_windows(ctx(), days)
    assert [d.ankle_7d_below_low for d in judged] == [True] * 9 + [False] * 5
    assert weekly_median_below([day(ankle_samples=0)], 23.0) is None


def test_boot_overpressure_is_strictly_above_the_maximum_also_today() -> None:
    assert day_flags(ctx(BOOT), boot_day(peak_mmhg=60.0)) == ("compliant",)
    assert day_flags(ctx(BOOT), boot_day(peak_mmhg=60.01)) == ("boot_overpressure",)
    today = boot_day(complete=False, peak_mmhg=75.0)
    assert day_flags(ctx(BOOT), today) is None and safety_flags(ctx(BOOT), today) == ("boot_overpressure",)
    assert safety_flags(ctx(), day(peak_mmhg=500.0)) == ()


def test_boot_session_lengths_are_strict() -> None:
    assert day_flags(ctx(BOOT), boot_day(session_durations_s=[1200.0, 1800.0])) == ("compliant",)
    assert day_flags(ctx(BOOT), boot_day(session_durations_s=[1199.0])) == ("boot_short_sessions",)
    assert day_flags(ctx(BOOT), boot_day(session_durations_s=[1801.0])) == ("boot_long_sessions",)
    assert day_flags(ctx(BOOT), boot_day(session_durations_s=[300.0, 2400.0])) == (
        "boot_long_sessions", "boot_short_sessions")  # fmt: skip


def test_boot_missed_sessions_window_starts_at_the_first_day_with_data() -> None:
    # Two empty look-back days, then data: a session on days 0, 2 and 3 of the monitoring, none on day 1.
    started = [0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    days = [boot_day(i, points=0 if i < 2 else 50, sessions_started=n, session_durations_s=[1500.0] * n)
            for i, n in enumerate(started)]  # fmt: skip
    judged = with_windows(ctx(BOOT), days)
    assert [(d.sessions_in_window, d.sessions_required_in_window) for d in judged] == [
        (0, 0), (0, 0), (1, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (6, 7), (7, 7), (7, 7)]  # fmt: skip
    flags = [r.flags for r in flags_for(ctx(BOOT), judged)]
    # Nothing stored and never heard from while idle: rest days, not silence (nothing is required yet either).
    assert flags[:2] == [("compliant",), ("compliant",)]
    assert flags[2] == ("compliant",)
    assert all(f == ("boot_missed_sessions",) for f in flags[3:10]) and flags[10:] == [("compliant",)] * 2
    # Fewer sessions a week: the requirement is pro rata, rounded down.
    three = BootRx(3, 1200.0, 1800.0, 60.0, ("calf",))
    w = with_windows(ctx(three), days)
    assert [d.sessions_required_in_window for d in w][2:] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]


def test_under_use_with_fewer_wear_days_a_week_looks_at_the_window() -> None:
    five = SockRx(23.0, 32.0, 8.0, 5, ("ankle", "calf"))
    wear = [9.0, 0.5, 9.0, 9.0, 0.5, 9.0, 9.0, 0.5]
    days = with_windows(ctx(five), [day(i, wear_s=h * 3600) for i, h in enumerate(wear)])
    flags = [r.flags for r in flags_for(ctx(five), days)]
    # Day 1: 1 of 2 days worn, ceil(5 x 2 / 7) = 2 needed; day 4: 3 of 5, 4 needed; day 7: 4 of 7, 5 needed.
    assert flags == [("compliant",), ("under_use",), ("compliant",), ("compliant",), ("under_use",),
                     ("compliant",), ("compliant",), ("under_use",)]  # fmt: skip
    # A short day while the window still holds enough worn days is not under use.
    enough = with_windows(ctx(five), [day(i, wear_s=(0.5 if i == 6 else 9.0) * 3600) for i in range(7)])
    assert flags_for(ctx(five), enough)[-1].flags == ("compliant",)


def test_adherence_summarises_the_last_7_and_30_days() -> None:
    hours = [9.0] * 20 + [5.0] * 5 + [9.0] * 5
    days = [day(i, wear_s=h * 3600, above_range_s=600.0, below_range_s=300.0, points=0 if i < 10 else 100)
            for i, h in enumerate(hours)] + [day(30, complete=False, wear_s=3600.0)]  # fmt: skip
    results = flags_for(ctx(), with_windows(ctx(), days))
    a = adherence(ctx(), results)
    assert (a.judged_7d, a.judged_30d) == (7, 30)
    assert a.target_days_7d == 5 and a.covered_7d == pytest.approx(5 / 7)
    assert a.target_days_30d == 25 and a.covered_30d == pytest.approx(25 / 30)
    # The last 30 local days, today included: days 1..30, of which 10..30 hold data.
    assert a.data_days_30d == 21 and a.rtm_eligible
    worn = sum(h * 3600 for h in hours)
    assert a.in_range_share_30d == pytest.approx((worn - 30 * 900) / worn)
    assert a.flag_days_30d == {"silent": 10, "under_use": 5}
    boots = [boot_day(i, sessions_started=1 if i % 2 else 0, session_durations_s=[1500.0] if i % 2 else [],
                      peak_mmhg=50.0 + i) for i in range(14)]  # fmt: skip
    b = adherence(ctx(BOOT), flags_for(ctx(BOOT), with_windows(ctx(BOOT), boots)))
    assert b.sessions_7d == 4 and b.sessions_30d == 7 and b.sessions_per_week_30d == pytest.approx(3.5)
    assert b.session_mean_s_30d == 1500.0 and b.peak_mmhg_30d == 63.0 and not b.rtm_eligible


def test_local_days_span_23_and_25_hours_across_daylight_saving() -> None:
    spring = local_days("America/Edmonton", 2, 1_773_130_000_000)  # 2026-03-10 in Edmonton
    assert [(d.isoformat(), (e - s) / 3_600_000) for d, s, e in spring] == [
        ("2026-03-08", 23.0), ("2026-03-09", 24.0), ("2026-03-10", 24.0)]  # fmt: skip
    autumn = local_days("America/Edmonton", 1, 1_762_200_000_000)  # 2025-11-03
    assert [(e - s) / 3_600_000 for _, s, e in autumn] == [25.0, 24.0]


def test_query_texts_filter_codes_and_group_by_local_day() -> None:
    text = q.daily_above(["PT-0A", "PT-0B"], 32.0, "America/Edmonton", 0, 86_400_000)
    assert "patient =~ /^(PT\\-0A|PT\\-0B)$/" in text and "ankle_mmhg > 32.0" in text and "worn = true" in text
    assert text.endswith("GROUP BY time(1d), patient fill(none) tz('America/Edmonton')")
    with pytest.raises(ValueError):
        q.patient_filter([])
    with pytest.raises(ValueError):
        q.tz_clause("UTC') DROP")


def test_a_boot_is_silent_only_if_it_reports_while_idle() -> None:
    three = BootRx(3, 1200.0, 1800.0, 60.0, ("calf",))
    session = {"points": 800, "sessions_started": 1, "session_durations_s": [1500.0]}
    rest = {"points": 0, "samples": 0, "sessions_started": 0, "session_durations_s": []}
    # Sessions on days 0, 2, 4 and nothing in between (no status messages): the days between are rest days.
    plan = [session, rest, session, rest, session, rest, rest, session, rest]
    days = with_windows(ctx(three), [boot_day(i, **v) for i, v in enumerate(plan)])
    results = flags_for(ctx(three), days)
    assert [r.flags for r in results] == [("compliant",)] * len(plan)
    assert results[1].judged == frozenset({"boot_missed_sessions"})  # a rest day judges only the plan
    # The same boot sending a status every few hours between sessions: a day without anything is silence.
    idle = {"points": 6, "statuses": 6, "samples": 0, "sessions_started": 0, "session_durations_s": []}
    plan = [session, idle, session, idle, rest]
    days = with_windows(ctx(three), [boot_day(i, **v) for i, v in enumerate(plan)])
    assert [r.flags for r in flags_for(ctx(three), days)][-1] == ("silent",)


def test_a_prescription_for_both_legs_with_one_garment_is_a_registry_problem() -> None:
    from monitor.model import Garment
    from monitor.registry import _legs_problem

    left, right, pair = Garment("s-1", "left", 0, None), Garment("s-2", "right", 0, None), Garment("b", "both", 0, None)
    assert _legs_problem("both", [left]) == (
        "prescribed for the right leg, but no garment is recorded there (garments on: left)")  # fmt: skip
    assert _legs_problem("both", [left, right]) == _legs_problem("both", [pair]) == ""
    assert _legs_problem("left", [right]).startswith("prescribed for the left leg")
    assert _legs_problem(None, [left]) == _legs_problem("both", [Garment("s", "", 0, None)]) == ""  # not recorded
