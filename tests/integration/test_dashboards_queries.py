"""Every dashboard query, run against a real InfluxDB holding every simulated scenario, as Grafana would send it.

The module seeds one database the way production fills it: the every-scenario
fleet (10 days backfilled) registered in a registry file, published through
the real broker to the ingester (which tags each point with its patient and
writes receipts), then one evaluation of the monitor (``write_flags``: it
writes flag_day, flag_episode, registry_problem and patient_info). Then, per
dashboard, the template variables are resolved by running their own queries
(in order, All selected where Grafana would start with All), every panel
target and annotation is expanded with ``dashboards.render`` (``$timeFilter``,
``$__interval``, the variables in their regex forms) and executed: no error
anywhere, and the clinic overview and the patient dashboard say what the
monitor says. PromQL targets (the fleet dashboard's Prometheus row) are not
InfluxQL and are not run here (tests/unit/test_dashboards.py checks their
metric names against the ingester's).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from compression.influxql import query
from compression.localservers import InfluxDB, Mosquitto
from dashboards import build
from dashboards.build import NEEDS_ATTENTION
from dashboards.render import ALL, Context, Variable, expand
from dashboards.validate import panels
from monitor.app import Monitor
from monitor.model import DayResult, PatientContext
from monitor.settings import MonitorSettings
from simulators.run import RunOptions
from simulators.scenarios import every_scenario
from tests.integration.conftest import Names, running, settings_for
from tests.integration.test_compliance_graded import Part, contexts_of, local_midnight, publish, registry_for

pytestmark = pytest.mark.integration

TZ = "America/Edmonton"
DAYS = 10


@dataclass
class Seeded:
    influx: InfluxDB
    database: str
    start_ms: int
    scenario: dict[str, str]  # patient -> scenario
    contexts: list[PatientContext]
    results: dict[str, list[DayResult]]


@pytest.fixture(scope="module")
def seeded(mosquitto: Mosquitto, influx: InfluxDB, tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    token = uuid.uuid4().hex[:8]
    names = Names(database=f"t_dashboards_{token}", topic_root=f"test-{token}/garments/v1",
                  client_id=f"ingest.{token}", prefix=f"dsh{token[:4]}")  # fmt: skip
    fleet = every_scenario(seed=1, days=DAYS, end=local_midnight(datetime.now(UTC), TZ))
    truth = fleet.ground_truth()
    options = RunOptions(mosquitto.url, connections=3, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    folder = tmp_path_factory.mktemp("dashboards")
    url = registry_for(folder / "registry.db", fleet, options)

    async def go() -> Monitor:
        async with running(settings_for(mosquitto, influx, names, registry_url=url)):
            await publish(Part(fleet, lambda m: True), options, influx, names.database, int(time.time() * 1000), (0, 0))
        settings = MonitorSettings(influx_url=influx.url, influx_database=names.database, registry_database_url=url,
                                   state_database_url=f"sqlite:///{folder / 'monitor.db'}", write_flags=True,
                                   smtp_tls="off", _env_file=None)  # type: ignore[call-arg]  # fmt: skip
        mon = Monitor(settings)
        assert mon.state.acquire_lease(mon.replica, settings.lease_s)
        assert await mon.evaluate_once()
        return mon

    mon = asyncio.run(go())
    scenario = {p["patient"]: p["scenario"] for p in truth["patients"]}
    return Seeded(influx, names.database, truth["start_ms"], scenario, contexts_of(url, datetime.now(UTC)),
                  mon._results)  # fmt: skip


def run(seeded: Seeded, text: str) -> list[dict[str, Any]]:
    """The statement's series, as InfluxDB answers Grafana (an error raises)."""
    return query(seeded.influx.url, seeded.database, text)


def flat(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**(s.get("tags") or {}), **dict(zip(s["columns"], v, strict=True))} for s in series for v in s["values"]]


def resolve(seeded: Seeded, dashboard: dict[str, Any], start: str | int, chosen: dict[str, list[str]]) -> Context:
    """The dashboard's variables resolved like Grafana on load: each one's query run in order with the variables
    before it; multi-value ones start at All, single-value ones at their first option (or ``chosen``)."""
    ctx = Context(start=start, end="now", now_ms=int(time.time() * 1000))
    for model in dashboard["templating"]["list"]:
        text = expand(model["query"], ctx)
        options = sorted({str(row["value"]) for row in flat(run(seeded, text))})
        assert options, f"variable {model['name']} has no option: {text}"
        default = [ALL] if model.get("multi") else options[:1]
        current = chosen.get(model["name"], default)
        ctx.variables[model["name"]] = Variable.from_model(model, current, options)
    return ctx


def targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in panels(dashboard) for t in p.get("targets") or []]


def run_everything(seeded: Seeded, dashboard: dict[str, Any], ctx: Context) -> dict[tuple[int, str], list[Any]]:
    """Every InfluxQL target and annotation of ``dashboard``: their series by (panel id, refId)."""
    out: dict[tuple[int, str], list[Any]] = {}
    ran = 0
    for panel, target in targets(dashboard):
        if target["datasource"]["type"] != "influxdb":
            assert target["datasource"]["type"] == "prometheus" and target.get("expr")
            continue
        text = expand(target["query"], ctx)
        assert "$" not in text.replace("$/", ""), text
        out[(panel["id"], target["refId"])] = run(seeded, text)
        ran += 1
    for anno in dashboard["annotations"].get("list") or []:
        if not anno.get("builtIn"):
            run(seeded, expand(anno["target"]["query"], ctx))
            ran += 1
    assert ran >= 5
    return out


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_every_query_runs_and_returns_data(seeded: Seeded, name: str) -> None:
    dashboard = build.DASHBOARDS[name]()
    for start in ("now-30d", seeded.start_ms):
        ctx = resolve(seeded, dashboard, start, {})
        results = run_everything(seeded, dashboard, ctx)
        empty = [key for key, series in results.items() if not series]
        # Only panels about what this fleet has none of may be empty: lines InfluxDB refused, devices under 15 %
        # battery, samples without a patient, registry problems (every simulated patient is registered fully).
        titles = {p["id"]: p["title"] for p in panels(dashboard)}
        allowed = ("refused", "below 15", "without a patient", "Registry problems", "Boot sessions", "Gradient",
                   "Reversed gradient", "Rejected", "Flag episodes")  # fmt: skip
        assert all(any(a in titles[key[0]] for a in allowed) for key in empty), [titles[k[0]] for k in empty]


def overview_rows(seeded: Seeded) -> list[dict[str, Any]]:
    """The clinic overview's patient table as Grafana shows it: A, B, C joined by patient, sorted by attention."""
    dashboard = build.clinic_overview()
    ctx = resolve(seeded, dashboard, "now-7d", {})
    (panel,) = [p for p in panels(dashboard) if p["title"].startswith("Patients")]
    joined: dict[str, dict[str, Any]] = {}
    for target in panel["targets"]:
        for row in flat(run(seeded, expand(target["query"], ctx))):
            row.pop("time")
            joined.setdefault(row["patient"], {}).update(row)
    assert [t["id"] for t in panel["transformations"]][:1] == ["joinByField"]
    (sort,) = [t for t in panel["transformations"] if t["id"] == "sortBy"]
    key = sort["options"]["sort"][0]["field"]
    return sorted(joined.values(), key=lambda r: -(r.get(key) or 0))


def test_clinic_overview_puts_who_needs_attention_first(seeded: Seeded) -> None:
    rows = overview_rows(seeded)
    assert {r["patient"] for r in rows} == set(seeded.scenario)
    by_scenario = {seeded.scenario[r["patient"]]: r for r in rows}
    order = [seeded.scenario[r["patient"]] for r in rows]
    for name in ("under_use", "rolled_down"):
        row = by_scenario[name]
        assert row["attention"] >= NEEDS_ATTENTION and row["warning"] >= 1, row
        assert name in order[: order.index("compliant")]
    fine = by_scenario["compliant"]
    assert fine["attention"] < NEEDS_ATTENTION and fine["critical"] == 0 and fine["warning"] == 0, fine
    assert fine["covered_7d"] == 1.0 and fine["data_days_30d"] >= DAYS
    assert by_scenario["under_use"]["covered_7d"] < 0.5
    assert by_scenario["under_use"]["mean_7d_h"] < by_scenario["under_use"]["target_h"]
    scores = [r["attention"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    # Every patient with an open warning (or critical) episode comes before every patient without one.
    flagged = [bool(r["warning"] or r["critical"]) for r in rows]
    assert flagged == sorted(flagged, reverse=True) and sum(flagged) >= 5
    for row in rows:  # last heard from and battery come from the ingester's receipts and the samples
        assert row["last_received_ms"] > time.time() * 1000 - 3_600_000, row
        assert 0 <= row["battery_pct"] <= 100


def test_physio_and_clinic_variables_filter_the_patients(seeded: Seeded) -> None:
    dashboard = build.clinic_overview()
    physios = sorted({c.physio_email for c in seeded.contexts if c.physio_email})
    assert len(physios) >= 2
    ctx = resolve(seeded, dashboard, "now-7d", {"physio": [physios[0]]})
    assert set(ctx.variables["patient"].options) == {c.patient for c in seeded.contexts
                                                     if c.physio_email == physios[0]}  # fmt: skip
    assert r"\." in expand("physio =~ /^$physio$/", ctx)  # the e-mail's dots escaped, as Grafana does


def test_patient_wear_hours_per_day_are_the_monitors(seeded: Seeded) -> None:
    dashboard = build.patient()
    (panel,) = [p for p in panels(dashboard) if p["title"].startswith("Wear per local day")]
    (wear,) = [t for t in panel["targets"] if t["refId"] == "A"]
    compared = 0
    for ctx_patient in seeded.contexts:
        patient = ctx_patient.patient
        ctx = resolve(seeded, dashboard, seeded.start_ms, {"patient": [patient]})
        assert ctx.variables["tz"].current == [TZ]
        got = {row["time"]: row["wear_h"] for row in flat(run(seeded, expand(wear["query"], ctx)))}
        monitor = {r.stats.start_ms: r.stats.wear_s / 3600 for r in seeded.results[patient]
                   if r.stats.start_ms >= seeded.start_ms and r.stats.samples}  # fmt: skip
        assert set(got) == set(monitor), patient
        for day, hours in monitor.items():
            assert abs(got[day] - hours) * 60 <= 1.0, (patient, day)
            compared += 1
        target = flat(run(seeded, expand(panel["targets"][1]["query"], ctx)))
        if ctx_patient.kind == "sock":
            assert target[0]["wear_target_h"] == ctx_patient.rx.wear_hours_per_day  # type: ignore[union-attr]
        if seeded.scenario[patient] == "bilateral":  # a stocking on each leg: the union of their wear, not the sum
            legs = [r.stats for r in seeded.results[patient] if len(r.stats.legs) == 2 and r.stats.complete]
            assert legs and all(got[d.start_ms] * 3600 < d.wear_sum_s - 3600 for d in legs), "both legs summed"
            assert all(got[d.start_ms] < ctx_patient.rx.wear_hours_per_day for d in legs)  # type: ignore[union-attr]
    assert compared >= DAYS * len(seeded.contexts) // 2
