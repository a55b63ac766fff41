"""Issue 11's situations graded end to end: real broker, ingester, InfluxDB, monitor and SMTP server.

One 14-day backfill of the clinical scenarios (``simulators.scenarios.CLINICAL_SCENARIOS``) is published
through Mosquitto and the ingester (tagging from a registry file), then:

- every patient-day's flags, what it can judge, and its wear (per patient and per leg) are compared with the
  ground truth;
- the monitor is stepped through the period as if it had run live, evaluating after each local day (the
  registry changes a physio makes during the period are made at their day), and every e-mail it sends is
  compared with the ground truth's ``emails``: the same openings and resolutions, with the same reasons, and
  nothing else (no "[Resolved]" after a silence).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from compression.influxql import rows
from compression.localservers import InfluxDB, Mosquitto
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from monitor.app import Monitor
from monitor.compliance import day_stats, flags_for
from monitor.model import DayResult, PatientContext
from monitor.registry import load_contexts
from monitor.settings import MonitorSettings
from monitor.state import Outbox, State
from simulators.registration import register_fleet
from simulators.run import RunOptions, gateway_plan
from simulators.scenarios import CLINICAL_SCENARIOS, Fleet, build_fleet, small_clinic
from tests.integration.conftest import ROOT, Names, running, settings_for
from tests.integration.test_compliance_graded import Part, local_midnight, publish
from tests.smtp import SmtpTestServer

pytestmark = pytest.mark.integration

TZ = "America/Edmonton"
DAYS = 14
# Not in the ground truth: the live-only low-battery notice (today's battery, not a day's flag).
LIVE_ONLY = {"low_battery"}


@dataclass
class Graded:
    fleet: Fleet
    truth: dict[str, Any]
    database: str
    registry_url: str
    influx_url: str
    tmp: Path
    before_reattribution: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    reattribute_output: list[str] = field(default_factory=list)


def new_names() -> Names:
    token = uuid.uuid4().hex[:8]
    return Names(database=f"t_clinical_{token}", topic_root=f"test-{token}/garments/v1", client_id=f"ingest.{token}",
                 prefix=f"cln{token[:4]}")  # fmt: skip


def contexts_of(url: str, now: datetime) -> list[PatientContext]:
    engine = make_engine(url)
    try:
        return load_contexts(Registry(session_factory(engine)), now)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def graded(mosquitto: Mosquitto, influx: InfluxDB, tmp_path_factory: pytest.TempPathFactory) -> Graded:
    """The clinical scenarios over the 14 complete local days before today, stored through the pipeline."""
    end = local_midnight(datetime.now(UTC), TZ)
    fleet = build_fleet(seed=11, days=DAYS, end=end, scenarios=list(CLINICAL_SCENARIOS))
    g = through_pipeline(fleet, mosquitto, influx, tmp_path_factory.mktemp("clinical"))
    # The garment registered late: its first days are unassigned until `compression devices reattribute` (twice:
    # the second run finds it done).
    (late,) = [p for p in g.truth["patients"] if "assigned_late" in p["transport"]]
    g.before_reattribution[late["patient"]] = asyncio.run(flags_now(g, late["patient"]))
    start = datetime.fromtimestamp(g.truth["start_ms"] / 1000, UTC).isoformat()
    until = datetime.fromtimestamp(late["transport"]["assigned_late"]["assigned_from_ms"] / 1000, UTC).isoformat()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSION_")}
    env |= {"COMPRESSION_REGISTRY_DATABASE_URL": g.registry_url, "COMPRESSION_INFLUX_URL": g.influx_url,
            "COMPRESSION_INFLUX_DATABASE": g.database}  # fmt: skip
    for _ in range(2):
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "compression"), "devices", "reattribute",
                               late["device_id"], "--from", start, "--to", until, "--patient", late["patient"]],
                              env=env, capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        g.reattribute_output.append(done.stdout)
    return g


async def flags_now(g: Graded, patient: str) -> dict[str, list[str]]:
    return {day: list(r.flags or ()) for day, r in
            {r.stats.day.isoformat(): r for r in (await results_now(g))[patient]}.items() if r.flags}


def through_pipeline(fleet: Fleet, mosquitto: Mosquitto, influx: InfluxDB, tmp: Path) -> Graded:
    """``fleet`` registered in a registry file and published through Mosquitto and the ingester into InfluxDB."""
    names = new_names()
    truth = fleet.ground_truth()
    options = RunOptions(mosquitto.url, connections=2, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    url = f"sqlite:///{tmp / 'registry.db'}"
    engine = make_engine(url)
    migrate(engine)
    register_fleet(Registry(session_factory(engine)), fleet, gateway_plan(fleet, options))
    engine.dispose()

    async def go() -> None:
        async with running(settings_for(mosquitto, influx, names, registry_url=url)):
            await publish(Part(fleet, lambda m: True), options, influx, names.database, int(time.time() * 1000),
                          (0, 0))  # fmt: skip

    asyncio.run(go())
    return Graded(fleet, truth, names.database, url, influx.url, tmp)


def by_patient(truth: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["patient"]: p for p in truth["patients"]}


async def results_now(g: Graded) -> dict[str, list[DayResult]]:
    contexts = contexts_of(g.registry_url, datetime.now(UTC))
    stats = await day_stats(g.influx_url, g.database, contexts, DAYS)
    return {c.patient: flags_for(c, stats[c.patient]) for c in contexts}


async def test_days_flags_and_wear_match_the_ground_truth(graded: Graded) -> None:
    results = await results_now(graded)
    matched, worst, leg_days = 0, 0.0, 0
    for code, patient in by_patient(graded.truth).items():
        got = {r.stats.day.isoformat(): r for r in results[code]}
        for day in patient["days"]:
            if not day["complete"]:
                continue
            r = got[day["date"]]
            where = (patient["scenario"], day["date"])
            assert list(r.flags or ()) == day["flags"], where
            assert sorted(r.judged or ()) == day["judged"], where
            worst = max(worst, abs(r.stats.wear_s - day["wear_s"]))
            matched += 1
            for leg, want in (day.get("legs") or {}).items():  # a stocking on each leg: each judged apart
                got_leg = r.stats.legs[leg]
                assert (got_leg.samples, got_leg.worn_samples) == (want["samples"], want["worn_samples"]), where
                for name in ("wear_s", "above_range_s", "below_range_s", "reversed_gradient_s"):
                    assert getattr(got_leg, name) == pytest.approx(want[name], abs=1e-3), (where, leg, name)
                leg_days += 1
    assert worst < 0.01
    print(f"clinical: {matched} patient-days and {leg_days} leg-days graded, flags and judged flags exact, largest "
          f"wear difference {worst:.4f} s")  # fmt: skip


async def test_two_legs_are_not_double_wear(graded: Graded) -> None:
    """Both stockings worn about 7 h: the patient wore compression about 7 h (the union), not 14 h."""
    (patient,) = [p for p in graded.truth["patients"] if p["scenario"] == "bilateral"]
    results = {r.stats.day.isoformat(): r for r in (await results_now(graded))[patient["patient"]]}
    for day in patient["days"]:
        if not day["complete"]:
            continue
        r = results[day["date"]]
        legs = {leg: r.stats.legs[leg].wear_s for leg in ("left", "right")}
        assert r.stats.wear_sum_s == pytest.approx(sum(legs.values()))
        assert max(legs.values()) <= r.stats.wear_s < 8 * 3600 < r.stats.wear_sum_s
        assert "under_use" in (r.flags or ())
    assert any("rolled_down:right" in d["flags"] for d in patient["days"] if d["complete"])
    assert not any("rolled_down:left" in d["flags"] for d in patient["days"] if d["complete"])


def monitor_settings(g: Graded, smtp: SmtpTestServer, state: Path) -> MonitorSettings:
    return MonitorSettings(influx_url=g.influx_url, influx_database=g.database, registry_database_url=g.registry_url,
                           state_database_url=f"sqlite:///{state}", days_back=DAYS + 2, smtp_host="127.0.0.1",
                           smtp_port=smtp.port, smtp_tls="off", write_flags=False, log_format="console")  # fmt: skip


def sent_episodes(state: Path) -> list[dict[str, Any]]:
    """Every episode e-mail the monitor queued, as the ground truth lists them."""
    st = State(f"sqlite:///{state}")
    try:
        with st.transaction() as session:
            rows = [(o.kind, o.data["mail"]) for o in session.scalars(select(Outbox)) if o.kind != "digest"]
    finally:
        st.close()
    out = []
    for kind, mail in rows:
        if mail["flag"] in LIVE_ONLY:
            continue
        start = datetime.fromisoformat(mail["started_at"]).date().isoformat()
        entry = {"patient": mail["patient"], "kind": kind, "flag": mail["flag"], "start": start}
        if kind == "resolved":
            entry |= {"day": datetime.fromisoformat(mail["ended_at"]).date().isoformat(),
                      "reason": mail["ended_reason"]}  # fmt: skip
        else:
            entry["day"] = start
        out.append(entry)
    return sorted(out, key=lambda m: (m["patient"], m["day"], m["kind"], m["flag"]))


def expected_emails(truth: dict[str, Any]) -> list[dict[str, Any]]:
    out = [{"patient": p["patient"], **m} for p in truth["patients"] for m in p["emails"]]
    return sorted(out, key=lambda m: (m["patient"], m["day"], m["kind"], m["flag"]))


async def step_monitor(g: Graded, smtp: SmtpTestServer, state: Path,
                       on_day: Callable[[date], None] = lambda d: None) -> Monitor:  # fmt: skip
    """The monitor evaluating after each local day of the period, as if it had run live."""
    mon = Monitor(monitor_settings(g, smtp, state))
    for day in g.truth["patients"][0]["days"]:
        if not day["complete"]:
            continue
        on_day(date.fromisoformat(day["date"]))
        assert await mon.evaluate_once(now_ms=day["end_ms"] + 1)
        await mon.send_due()
    return mon


async def test_the_monitor_sends_exactly_the_ground_truths_emails(graded: Graded) -> None:
    state = graded.tmp / "monitor-stepped.db"
    with SmtpTestServer() as smtp:
        await step_monitor(graded, smtp, state)
        received = smtp.received()
    got = sent_episodes(state)
    want = expected_emails(graded.truth)
    assert got == want
    subjects = [str(m.message["Subject"]) for m in received]
    assert len([s for s in subjects if not s.startswith("Daily digest")]) >= len(want)
    # A problem followed by silence is not resolved: no such e-mail was sent.
    (rolled,) = [p for p in graded.truth["patients"] if p["scenario"] == "rolled_then_silent"]
    assert not [s for s in subjects if s.startswith("[Resolved]") and rolled["patient"] in s]
    assert any(s.startswith("[Warning] Rolled down") and rolled["patient"] in s for s in subjects)
    assert any(s.startswith("[Warning] No data from the garment") and rolled["patient"] in s for s in subjects)
    # Lowering the target ends the under-use episode in those words; raising it alerts only from the change on.
    (lowered,) = [p for p in graded.truth["patients"] if p["scenario"] == "rx_lowered"]
    (mail,) = [m for m in received if str(m.message["Subject"]).startswith("[Prescription changed] Under-use")]
    assert lowered["patient"] in str(mail.message["Subject"])
    body = mail.message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert "ended by a change of prescription, not by a change in wear" in text
    assert f"the prescription changed on {lowered['prescriptions'][1]['from']}: wear target 8 h -> 4 h" in text
    (raised,) = [p for p in graded.truth["patients"] if p["scenario"] == "rx_raised"]
    opened = [m for m in got if m["patient"] == raised["patient"]]
    assert [(m["kind"], m["flag"], m["start"]) for m in opened] == [
        ("opened", "under_use", raised["prescriptions"][1]["from"])]  # fmt: skip
    # A boot used three times a week, silent between sessions by design: no silence, no e-mail.
    (boot,) = [p for p in graded.truth["patients"] if p["scenario"] == "boot_three_a_week"]
    rest_days = [d for d in boot["days"] if d["complete"] and d["rest_day"] and d["points"] == 0]
    assert len(rest_days) >= 6 and all(d["flags"] == ["compliant"] for d in rest_days)
    assert not [m for m in got if m["patient"] == boot["patient"]]
    print(f"clinical: {len(got)} episode e-mails, exactly the ground truth's: "
          f"{sorted((m['kind'], m['flag']) for m in got)}")  # fmt: skip


async def test_a_small_clinic_with_most_garments_silent_is_told_of_each(mosquitto: Mosquitto, influx: InfluxDB,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    """Seven of twelve stop sending; the pipeline works (the others' readings keep arriving): seven silences."""
    fleet = small_clinic(seed=12, days=DAYS, end=local_midnight(datetime.now(UTC), TZ))
    g = await asyncio.to_thread(through_pipeline, fleet, mosquitto, influx, tmp_path)
    state = tmp_path / "monitor.db"
    with SmtpTestServer() as smtp:
        await step_monitor(g, smtp, state)
    got = sent_episodes(state)
    assert got == expected_emails(g.truth)
    quiet = {p["patient"] for p in g.truth["patients"] if p["scenario"] == "stops_sending"}
    assert {m["patient"] for m in got if m["flag"] == "silent" and m["kind"] == "opened"} == quiet
    assert len(quiet) == 7
    # The pipeline's own health: the ingester wrote its heartbeat while it ran.
    assert rows(influx.url, g.database, "SELECT count(connected) AS n FROM ingest_health")[0]["n"] >= 1
    print(f"small clinic: {len(got)} episode e-mails, exactly the ground truth's; 7 of 12 silences reported")


async def test_readings_of_a_garment_registered_late_are_reattributed(graded: Graded, influx: InfluxDB) -> None:
    """Before: the first days are silent for the patient (the readings are unassigned). `compression devices
    reattribute` rewrites them (audited), a second run changes nothing, and the days are the ground truth's."""
    (late,) = [p for p in graded.truth["patients"] if "assigned_late" in p["transport"]]
    before = graded.before_reattribution[late["patient"]]
    want_before = late["transport"]["assigned_late"]["flags_before_reattribution"]
    assert {d: before[d] for d in want_before} == want_before
    assert list(want_before.values()).count(["silent"]) == 4
    first, second = graded.reattribute_output
    assert "readings of" in first and f"now {late['patient']}'s" in first
    assert "already done" in second
    after = await flags_now(graded, late["patient"])
    assert {d["date"]: after[d["date"]] for d in late["days"] if d["complete"]} == {
        d["date"]: d["flags"] for d in late["days"] if d["complete"]}  # fmt: skip
    where = f"device = '{late['device_id']}' AND attribution = 'unassigned'"
    unassigned = rows(influx.url, graded.database, f"SELECT count(worn) FROM sample WHERE {where}")
    assert unassigned == []
    engine = make_engine(graded.registry_url)
    try:
        reg = Registry(session_factory(engine))
        (row,) = reg.list_reattributions(SYSTEM)
        assert row.state == "done" and row.points > 4 * 1400
        audit = [e.action for e in reg.audit(SYSTEM, entity="device", key=late["device_id"])]
        assert audit.count("reattribute") == 1 and audit.count("reattributed") == 1
    finally:
        engine.dispose()
