"""The evidence of each flag from hand-made day figures and measurements (monitor/evidence.py), the rules of
actions on episodes (monitor/actions.py) and Today's order (workspace/ranking.py): pure functions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from monitor import actions as acts
from monitor import evidence as ev
from monitor.mail import WORKSPACE_PATIENT_PATH, workspace_link
from monitor.model import BootRx, SockRx
from monitor.state import Episode
from workspace import ranking
from workspace.readmodel import EpisodeView, TodayRow
from workspace.web import patient_path

SOCK = SockRx(low_mmhg=20.0, high_mmhg=30.0, wear_hours_per_day=8.0, wear_days_per_week=7, zones=("ankle", "calf"))
BOOT = BootRx(sessions_per_week=7, session_min_s=1200.0, session_max_s=1800.0, max_chamber_mmhg=60.0,
              zones=("foot", "calf"))  # fmt: skip
TZ = "Europe/Berlin"
MON = date(2025, 11, 10)
HOUR = 3_600_000


def day(n: int, **figures: float) -> ev.DayFigures:
    start = int(datetime(2025, 11, 10 + n, tzinfo=UTC).timestamp() * 1000) - HOUR  # Berlin's local midnight
    return ev.DayFigures(day=MON + timedelta(days=n), complete=True, start_ms=start, end_ms=start + 24 * HOUR,
                         points=100, **figures)  # type: ignore[arg-type]  # fmt: skip


def case(flag: str, rx: SockRx | BootRx, days: list[ev.DayFigures], measured: ev.Measured | None = None) -> ev.Case:
    return ev.Case(flag, TZ, rx, tuple(days), measured or ev.Measured())


def test_too_tight_states_the_median_range_minutes_and_band() -> None:
    days = [day(0, wear_s=9 * 3600, above_range_s=0.0), day(1, wear_s=9 * 3600, above_range_s=95 * 60)]
    measured = ev.Measured(ankle={MON + timedelta(days=1): ev.AnkleDay(34.2, 28.0, 39.5, 500)})
    found = ev.compose(case("too_tight", SOCK, days, measured))
    assert found is not None
    assert found.headline == ("On Tue 11 Nov the ankle median 34.2 mmHg (range 28.0-39.5) against the prescribed "
                              "20-30 mmHg: 95 min of wear above the band, peak 39.5 mmHg.")  # fmt: skip
    assert found.values["ankle_median_mmhg"] == 34.2 and found.values["above_min"] == 95.0
    assert found.next_step is not None and "size" in found.next_step


def test_too_loose_names_the_lowest_pressure() -> None:
    days = [day(0, wear_s=8 * 3600, below_range_s=40 * 60)]
    measured = ev.Measured(ankle={MON: ev.AnkleDay(21.0, 17.5, 26.0, 480)})
    found = ev.compose(case("too_loose", SOCK, days, measured))
    assert found is not None and "40 min of wear below the band, lowest 17.5 mmHg." in found.headline


def test_rolled_down_states_calf_against_ankle() -> None:
    days = [day(0, wear_s=9 * 3600, reversed_gradient_s=52 * 60)]
    measured = ev.Measured(gradient={MON: ev.GradientDay(calf_mmhg=28.1, ankle_mmhg=22.0, samples=52)})
    found = ev.compose(case("rolled_down", SOCK, days, measured))
    assert found is not None
    assert "calf pressure was above ankle pressure for 52 min of 9.0 h worn" in found.headline
    assert "calf 28.1 mmHg vs ankle 22.0 mmHg (calf - ankle +6.1 mmHg)" in found.headline
    assert found.values["calf_minus_ankle_mmhg"] == pytest.approx(6.1)


def test_the_headline_prefers_a_complete_day_to_today_so_far() -> None:
    days = [day(0, wear_s=9 * 3600, reversed_gradient_s=45 * 60),
            replace(day(1, wear_s=3 * 3600, reversed_gradient_s=50 * 60), complete=False)]  # fmt: skip
    found = ev.compose(case("rolled_down", SOCK, days))
    assert found is not None and found.headline.startswith("On Mon 10 Nov") and "(today, so far)" in found.lines[-1]


def test_under_use_worn_out_and_silent() -> None:
    days = [day(0, wear_s=4.5 * 3600), day(1, wear_s=5.5 * 3600)]
    under = ev.compose(case("under_use", SOCK, days))
    assert under is not None and under.headline == ("Worn 5.0 h a day on average over the last 2 complete day(s), "
                                                    "against 8 h prescribed; 5.5 h on Tue 11 Nov.")  # fmt: skip
    worn = ev.compose(case("worn_out", SOCK, days, ev.Measured(ankle_median_7d_mmhg=17.4)))
    assert worn is not None and "17.4 mmHg, below the band's 20 mmHg" in worn.headline
    seen = int(datetime(2025, 11, 9, 13, 5, tzinfo=UTC).timestamp() * 1000)
    silent = ev.compose(case("silent", SOCK, [replace(day(0), points=0)], ev.Measured(last_seen_ms=seen)))
    assert silent is not None and silent.headline == "Nothing stored from the garment since Sun 09 Nov 14:05."


def test_boot_over_pressure_names_session_chamber_peak_length_and_what_to_do() -> None:
    start = day(1).start_ms + 19 * HOUR + 40 * 60_000
    sessions = (ev.SessionFacts(start, 1440.0, "completed", {"foot": 69.8, "calf": 55.0}, start + 13 * 60_000),
                ev.SessionFacts(day(0).start_ms + 8 * HOUR, 1500.0, "completed", {"foot": 50.0}))
    found = ev.compose(case("boot_overpressure", BOOT, [day(0), day(1)], ev.Measured(sessions=sessions)))
    assert found is not None
    assert found.headline == ("Session started Tue 11 Nov 19:40 (24 min): the foot chamber reached 69.8 mmHg at "
                              "19:53, above the prescribed maximum 60 mmHg.")  # fmt: skip
    assert found.values["peak_mmhg"] == 69.8 and found.values["duration_s"] == 1440.0
    assert found.next_step is not None and found.next_step.startswith("Call the client today")


def test_sessions_outside_the_episodes_days_are_not_its_evidence() -> None:
    early = ev.SessionFacts(day(0).start_ms + HOUR, 1500.0, "completed", {"calf": 80.0})
    found = ev.compose(case("boot_overpressure", BOOT, [day(1)], ev.Measured(sessions=(early,))))
    assert found is not None and "Mon 10 Nov" not in found.headline


def test_long_and_short_sessions_and_missed_ones() -> None:
    start = day(0).start_ms + 9 * HOUR
    long_ = ev.compose(case("boot_long_sessions", BOOT, [day(0)],
                            ev.Measured(sessions=(ev.SessionFacts(start, 2700.0, "completed", {"foot": 50.0}),))))
    assert long_ is not None and "lasted 45 min (prescribed 20-30 min)" in long_.headline
    short = ev.compose(case("boot_short_sessions", BOOT, [day(0)],
                            ev.Measured(sessions=(ev.SessionFacts(start, 420.0, "stopped", {"foot": 50.0}),))))
    assert short is not None and "lasted 7 min" in short.headline and "ended: stopped" in short.lines[0]
    missed = ev.compose(case("boot_missed_sessions", BOOT, [day(0, sessions_in_window=3,
                                                                sessions_required_in_window=7, window_days=7)]))
    assert missed is not None and missed.headline.startswith("3 session(s) in the 7 day(s) to Mon 10 Nov, 7 required")


def test_low_battery_and_unknown_flags() -> None:
    found = ev.compose(case("low_battery", SOCK, [day(0, battery_min_pct=11.0)]))
    assert found is not None and found.headline == "Battery down to 11 % on Mon 10 Nov."
    assert ev.compose(case("something_new", SOCK, [day(0)])) is None
    assert ev.compose(case("too_tight", BOOT, [day(0)])) is None  # a stocking's flag without a stocking


def test_sessions_pair_starts_with_their_ends_and_minute_peaks() -> None:
    events = [{"name": "event", "tags": {"type": "session_start"}, "columns": ["time", "count", "duration_s",
                                                                               "reason"],
               "values": [[1_000_000, 1, None, None], [5_000_000, 1, None, None]]},
              {"name": "event", "tags": {"type": "session_end"}, "columns": ["time", "count", "duration_s", "reason"],
               "values": [[2_500_000, 1, 1500, "completed"]]}]  # fmt: skip
    minutes = [{"name": "sample", "columns": ["time", "foot", "ankle", "calf", "knee", "thigh"],
                "values": [[960_000, 50.0, 48.0, None, None, None], [2_400_000, 71.0, 60.0, None, None, None],
                           [5_040_000, 45.0, None, None, None, None]]}]  # fmt: skip
    first, second = ev.sessions_from(events, minutes)
    assert (first.duration_s, first.reason, first.peak, first.peak_at_ms) == (1500.0, "completed", ("foot", 71.0),
                                                                              2_400_000)  # fmt: skip
    assert second.duration_s is None and second.peaks == {"foot": 45.0}  # still running: no end yet


def episode(severity: str = "warning") -> Episode:
    return Episode(id=7, patient="PT-1", clinic="c", flag="under_use", severity=severity, start_day=MON,
                   last_day=MON, open_key="PT-1:under_use")  # fmt: skip


@pytest.mark.parametrize(("action", "field", "words"), [
    (acts.ActionIn(7, "snooze", "a@x.example", "Ann", "away", MON - timedelta(days=1)), "until", "in the past"),
    (acts.ActionIn(7, "snooze", "a@x.example", "Ann", "", MON + timedelta(days=3)), "note", "say why"),
    (acts.ActionIn(7, "snooze", "a@x.example", "Ann", "away", MON + timedelta(days=120)), "until", "at most 90"),
    (acts.ActionIn(7, "note", "a@x.example", "Ann", "  "), "note", "write the note"),
    (acts.ActionIn(7, "handover", "a@x.example", "Ann", "over to you"), "to", "colleague"),
    (acts.ActionIn(7, "delete", "a@x.example", "Ann"), "kind", "unknown action"),
])  # fmt: skip
def test_actions_that_cannot_be_recorded_name_their_field(action: acts.ActionIn, field: str, words: str) -> None:
    with pytest.raises(acts.ActionError, match=words) as refused:
        acts.check(action, episode(), MON)
    assert refused.value.field == field


def test_an_urgent_episode_cannot_be_snoozed() -> None:
    with pytest.raises(acts.ActionError, match="cannot be snoozed"):
        acts.check(acts.ActionIn(7, "snooze", "a@x.example", "Ann", "later", MON + timedelta(days=2)),
                   episode("critical"), MON)  # fmt: skip


def action(kind: str, at_day: int, **extra: object) -> acts.Action:
    at = datetime(2025, 11, 10 + at_day, 9, tzinfo=UTC)
    return acts.Action(at_day, 7, "PT-1", kind, "ann@x.example", "Ann Lee", at, **extra)  # type: ignore[arg-type]


def test_handling_keeps_the_latest_of_each_kind_and_a_snooze_only_while_it_lasts() -> None:
    done = [action("acknowledge", 0, note="called"), action("snooze", 1, note="away", until=MON + timedelta(days=3)),
            action("note", 2, note="new size ordered")]  # fmt: skip
    now = acts.handling(done, MON + timedelta(days=2))
    assert now.handled and now.snoozed is not None and now.acknowledged is not None
    later = acts.handling(done, MON + timedelta(days=4))
    assert later.snoozed is None and later.handled  # still acknowledged
    assert "snoozed until 2025-11-13 by Ann Lee: away" in now.summary()
    assert action("handover", 0, to_name="Bob Roy", note="away").words() == "handed over to Bob Roy by Ann Lee: away"


def view(severity: str, handled: list[acts.Action], days_open: int = 2) -> EpisodeView:
    return EpisodeView(1, "PT-1", "under_use", severity, MON, MON, None, days_open, "",
                       acts.handling(handled, MON))  # fmt: skip


def row(code: str, *episodes: EpisodeView, problems: tuple[str, ...] = ()) -> TodayRow:
    return TodayRow(code, None, None, True, "sock", (), (), tuple(episodes), problems, None)


def test_today_ranks_urgent_unhandled_first_snoozed_low_and_on_track_last() -> None:
    ack = [action("acknowledge", 0)]
    snoozed = [action("snooze", 0, until=MON + timedelta(days=5), note="away")]
    rows = [row("A-ok"), row("B-warn-acked", view("warning", ack)), row("C-urgent", view("critical", [])),
            row("D-warn", view("warning", [])), row("E-norx", problems=("no current prescription",)),
            row("F-urgent-acked", view("critical", ack)), row("G-snoozed", view("warning", snoozed)),
            row("H-info", view("info", []))]  # fmt: skip
    order = [r.code for r in ranking.ranked(rows)]
    assert order == ["C-urgent", "F-urgent-acked", "D-warn", "B-warn-acked", "E-norx", "H-info", "G-snoozed", "A-ok"]
    unhandled = ranking.arrange(rows, ranking.View(show="unhandled"))
    assert [r.code for r in unhandled] == ["C-urgent", "D-warn", "H-info"]
    urgent = ranking.arrange(rows, ranking.View(show="urgent", query="acked"))
    assert [r.code for r in urgent] == ["F-urgent-acked"]


def test_the_e_mails_link_is_the_workspaces_patient_page() -> None:
    assert patient_path("") == WORKSPACE_PATIENT_PATH
    assert workspace_link("https://clinic.example/", "PT-1/x", 7) == "https://clinic.example" + patient_path(
        "PT-1/x") + "#episode-7"
