"""One evaluation against the durable state: e-mails queued once per episode change, no storms."""

from __future__ import annotations

import dataclasses
from datetime import date, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from monitor.compliance import outage_days
from monitor.evaluate import Live, MailData, evaluate
from monitor.model import DayResult, DayStats, PatientContext, SockRx
from monitor.state import Episode, Outbox, State

D0 = date(2026, 11, 1)
RX = SockRx(23.0, 32.0, 8.0, 7, ("ankle", "calf"))


def ctx(code: str, physio: str | None = "ann@clinic.example") -> PatientContext:
    name = "Ann" if physio else None
    return PatientContext(code, "bow", "America/Edmonton", "sock", RX, physio, name, ("d-" + code,))


def results(code: str, pattern: str) -> list[DayResult]:
    """``x`` under_use, ``s`` silent, ``.`` compliant; the last character is today (incomplete)."""
    out = []
    for i, c in enumerate(pattern):
        flags = ("silent",) if c == "s" else ("under_use",) if c == "x" else ("compliant",)
        last = i == len(pattern) - 1
        judged = frozenset({"silent"}) if c == "s" else None  # a silent day judges nothing but silence
        out.append(DayResult(code, DayStats(D0 + timedelta(days=i), 0, 0, not last), None if last else flags,
                             judged))  # fmt: skip
    return out


@pytest.fixture
def state(tmp_path: Path) -> State:
    return State(f"sqlite:///{tmp_path / 'monitor.db'}")


def run(state: State, patterns: dict[str, str], contexts: list[PatientContext] | None = None) -> None:
    contexts = contexts or [ctx(code) for code in patterns]
    res = {code: results(code, p) for code, p in patterns.items()}
    live = {code: Live(D0 + timedelta(days=len(p) - 1)) for code, p in patterns.items()}
    evaluate(state, contexts, res, live, resolve_after=2, mail_data=MailData())


def mails(state: State) -> list[str]:
    with state.transaction() as session:
        return sorted(f"{o.kind}:{o.data['patient']}:{o.data['flag']}" for o in session.scalars(select(Outbox)))


def test_one_opening_and_one_resolving_email_per_episode(state: State) -> None:
    run(state, {"P1": "...xx?"})
    run(state, {"P1": "...xx?"})  # re-evaluation, restart: nothing new
    run(state, {"P1": "...xxx?"})
    assert mails(state) == ["opened:P1:under_use"]
    run(state, {"P1": "...xxx.?"})  # one clear day: hysteresis keeps it open
    assert mails(state) == ["opened:P1:under_use"]
    run(state, {"P1": "...xxx..?"})
    assert mails(state) == ["opened:P1:under_use", "resolved:P1:under_use"]
    with state.transaction() as session:
        (episode,) = session.scalars(select(Episode)).all()
        assert (episode.start_day, episode.end_day, episode.open_key) == (D0 + timedelta(3), D0 + timedelta(6), None)


def test_history_seen_first_is_recorded_without_email(state: State) -> None:
    run(state, {"P1": "xx.....?"})
    assert mails(state) == []
    with state.transaction() as session:
        assert [(e.flag, e.end_day) for e in session.scalars(select(Episode))] == [("under_use", D0 + timedelta(2))]


def test_late_data_erasing_a_silent_day_resolves_it(state: State) -> None:
    run(state, {"P1": "....s?"})
    run(state, {"P1": "......?"})  # the day's readings arrived (store-and-forward)
    assert mails(state) == ["opened:P1:silent", "resolved:P1:silent"]
    with state.transaction() as session:
        (episode,) = session.scalars(select(Episode)).all()
        assert "late" in episode.note


def test_many_silent_with_a_working_pipeline_are_each_reported(state: State) -> None:
    # Seven of twelve quiet (holidays, a lost charger): each one is told, whatever the share.
    run(state, {f"P{i}": "....s?" if i < 7 else ".....?" for i in range(12)})
    assert mails(state) == sorted(f"opened:P{i}:silent" for i in range(7))


def test_a_pipeline_outage_holds_silence_back(state: State) -> None:
    # The days of an outage judge no missing data (compliance.outage_days): no silence opens, nothing resolves.
    hours: set[int] = set()  # nothing seen working
    def spanned(code: str) -> list[DayResult]:  # each day its own 24 hours
        return [dataclasses.replace(r, stats=dataclasses.replace(r.stats, start_ms=i * 86_400_000,
                                                                 end_ms=(i + 1) * 86_400_000))
                for i, r in enumerate(results(code, "....ss?"))]  # fmt: skip

    res = {code: outage_days(spanned(code), hours, 0.9) for code in ("P1", "P2")}
    assert all(r.stats.pipeline_outage for r in res["P1"][:-1])
    evaluate(state, [ctx("P1"), ctx("P2")], res, {c: Live(D0 + timedelta(days=6), silent_now=True, outage=True)
                                                   for c in res}, resolve_after=2, mail_data=MailData())  # fmt: skip
    assert mails(state) == []
    assert Live(D0, silent_now=True, outage=True).flags() is None


def test_no_physio_means_no_email_but_the_episode_is_kept(state: State) -> None:
    run(state, {"P1": "..xx?"}, [ctx("P1", physio=None)])
    assert mails(state) == []
    with state.transaction() as session:
        assert [e.open_key for e in session.scalars(select(Episode))] == ["P1:under_use"]


def test_a_problem_followed_by_silence_is_not_resolved(state: State) -> None:
    run(state, {"P1": "..xx?"})
    run(state, {"P1": "..xxsss?"})  # the garment stops sending: silence opens, under-use stays open
    assert mails(state) == ["opened:P1:silent", "opened:P1:under_use"]
    run(state, {"P1": "..xxsss..?"})  # readings again, two days on target: both end, shown by data
    assert mails(state) == ["opened:P1:silent", "opened:P1:under_use", "resolved:P1:silent",
                            "resolved:P1:under_use"]  # fmt: skip
    with state.transaction() as session:
        ended = {e.flag: (e.end_day, e.note) for e in session.scalars(select(Episode))}
        data = [o.data for o in session.scalars(select(Outbox)) if o.kind == "resolved"]
    assert ended["under_use"] == (D0 + timedelta(7), "data") and ended["silent"] == (D0 + timedelta(7), "data")
    assert {d["reason"] for d in data} == {"data"}


def test_an_over_pressure_the_evaluation_opens_is_marked_to_be_sent_at_once(state: State) -> None:
    """A first evaluation queues many e-mails; the over-pressure's key comes back so the monitor sends it first."""
    res = {code: results(code, "..x?") for code in ("P1", "P2")}
    live = {"P1": Live(D0 + timedelta(days=3), safety=("boot_overpressure",)), "P2": Live(D0 + timedelta(days=3))}
    outcome = evaluate(state, [ctx("P1"), ctx("P2")], res, live, resolve_after=2, mail_data=MailData())
    assert sorted(outcome.opened) == [("P1", "boot_overpressure"), ("P1", "under_use"), ("P2", "under_use")]
    with state.transaction() as session:
        (episode,) = session.scalars(select(Episode).where(Episode.flag == "boot_overpressure")).all()
    assert outcome.urgent == [f"opened:{episode.id}"]
    assert f"opened:{episode.id}" in {o.dedupe_key for o in state_rows(state)}


def state_rows(state: State) -> list[Outbox]:
    with state.transaction() as session:
        return list(session.scalars(select(Outbox)))
