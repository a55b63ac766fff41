"""The FHIR export and the monthly report on a simulated clinic: real broker, ingester, InfluxDB, monitor, registry.

A small fleet (socks: compliant, under-use, rolled down; boots: compliant, over-pressure) is simulated over the
last 10 local days, published through the broker and stored by the ingester, then the real monitor evaluates it
once (its day flags, wear and episodes land in its state database). The registry's app, with the records'
routes installed as ``compression devices serve`` installs them, then serves the export to physio tokens:

- every exported resource validates with the library (fhirclient, R4 4.0.1) and with FHIR.js (a second R4
  validator, tests/fhirjs); the project code systems too;
- the round trip (export, parse, compare) keeps every figure;
- each day's Observation equals the monitor's: wear and flags as it stored them, the ankle median and the boot
  figures as its computation gives them;
- a token of another clinic gets nothing (404, as the API answers for another clinic's patient), an ingester
  token 403, no token 401;
- the monthly PDF is rendered (pdftoppm) and its figures read back (pdftotext) equal the monitor's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from compression.influxql import scalar
from compression.localservers import InfluxDB, Mosquitto
from devices.registry import schemas as s
from devices.registry.api import create_app
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from devices.registry.web import SESSION_COOKIE
from monitor.app import Monitor
from monitor.compliance import InfluxReader, day_stats
from monitor.registry import load_contexts
from monitor.settings import MonitorSettings
from monitor.state import DayFlags, Episode
from records import codes, fhir
from records.api import install
from records.fhirread import expected_days, read_days
from records.settings import RecordsSettings
from records.sources import open_sources
from simulators.registration import DEMO_CLINIC, DEMO_PASSWORD, register_fleet
from simulators.run import RunOptions, gateway_plan, run_fleet
from simulators.scenarios import Fleet, build_fleet
from tests.integration.conftest import ROOT, Names, running, settings_for

pytestmark = pytest.mark.integration

TZ = "Europe/Berlin"
DAYS = 10
SCENARIOS = ["compliant", "under_use", "rolled_down", "boot_compliant", "boot_overpressure"]
FHIRJS = ROOT / "tests" / "fhirjs"
SCREENSHOT = ROOT / "docs" / "images" / "records-report-page1.png"
CLINIC_SYSTEM = "https://demo-clinic.example/fhir/sid/compression-code"


@dataclass
class Clinic:
    client: TestClient
    registry: Registry
    fleet: Fleet
    patients: list[str]
    tokens: dict[str, str]  # "physio", "other", "ingester", "admin"
    monitor: Monitor
    registry_url: str
    state_url: str
    database: str
    influx_url: str
    start: date  # first simulated local day
    yesterday: date


def _local_midnight(now: datetime) -> datetime:
    return now.astimezone(ZoneInfo(TZ)).replace(hour=0, minute=0, second=0, microsecond=0)


def _token(registry: Registry, role: str, physio: str | None = None) -> str:
    out = registry.create_token(SYSTEM, s.TokenIn(name=f"t-{uuid.uuid4().hex[:6]}", role=role, physio=physio))  # type: ignore[arg-type]
    return out.token


def _other_clinic(registry: Registry) -> str:
    """Clinic B: a physio of its own and a patient with a garment and a prescription; returns the physio's e-mail."""
    registry.create_clinic(SYSTEM, s.ClinicIn(code="other-clinic", name="Other Clinic", timezone=TZ))
    registry.create_physio(SYSTEM, s.PhysioIn(clinic="other-clinic", name="Olga Other", email="olga@other.example"))
    registry.create_patient(SYSTEM, s.PatientIn(code="PT-OTHER", clinic="other-clinic", display_name="Otto Other",
                                                physio="olga@other.example"))  # fmt: skip
    return "olga@other.example"


@pytest.fixture(scope="module")
def clinic(mosquitto: Mosquitto, influx: InfluxDB, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    token = uuid.uuid4().hex[:8]
    names = Names(f"t_records_{token}", f"test-{token}/garments/v1", f"ingest.{token}", f"rec{token[:4]}")
    end = _local_midnight(datetime.now(UTC))
    fleet = build_fleet(seed=7, days=DAYS, end=end, tz=TZ, scenarios=SCENARIOS)
    options = RunOptions(mosquitto.url, connections=2, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    folder = tmp_path_factory.mktemp("records")
    registry_url = f"sqlite:///{folder / 'registry.db'}"
    engine = make_engine(registry_url)
    migrate(engine)
    registry = Registry(session_factory(engine))
    registered = register_fleet(registry, fleet, gateway_plan(fleet, options))
    other = _other_clinic(registry)

    async def publish() -> None:
        async with running(settings_for(mosquitto, influx, names, registry_url=registry_url)):
            report = await asyncio.to_thread(run_fleet, fleet, options)
            assert report.acked == report.messages
            # Wait until the ingester has stored everything (the count stops growing).
            last, stable = -1, 0
            while stable < 10:
                n = int(scalar(influx.url, names.database, "SELECT count(worn) FROM sample") or 0)
                stable = stable + 1 if n == last and n > 0 else 0
                last = n
                await asyncio.sleep(0.2)

    asyncio.run(publish())
    state_url = f"sqlite:///{folder / 'monitor.db'}"
    settings = MonitorSettings(influx_url=influx.url, influx_database=names.database,
                               registry_database_url=registry_url, state_database_url=state_url,
                               write_flags=False)  # fmt: skip
    monitor = Monitor(settings)
    assert monitor.state.acquire_lease(monitor.replica, 60)
    assert asyncio.run(monitor.evaluate_once())
    records = RecordsSettings(patient_identifier_systems={DEMO_CLINIC: CLINIC_SYSTEM})
    app = create_app(registry)
    source = open_sources(registry, records, InfluxReader(influx.url), names.database, state_url)
    install(app, source, records)
    physio = sorted(registered.physios)[0]
    tokens = {"physio": _token(registry, "physio", physio), "other": _token(registry, "physio", other),
              "ingester": _token(registry, "ingester"), "admin": _token(registry, "admin")}  # fmt: skip
    patients = [p.code for p in registry.list_patients(SYSTEM, clinic=DEMO_CLINIC)]
    start = datetime.fromtimestamp(fleet.period.start_ms / 1000, ZoneInfo(TZ)).date()
    with TestClient(app) as client:
        yield Clinic(client, registry, fleet, patients, tokens, monitor, registry_url, state_url, names.database,
                     influx.url, start, end.date() - timedelta(days=1))  # fmt: skip
    monitor.state.close()
    source.monitor.state.close()
    engine.dispose()


def _get(c: Clinic, path: str, who: str | None = "physio", **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {c.tokens[who]}"} if who else {}
    return c.client.get(path, params=params, headers=headers)


def _bundle(c: Clinic, code: str, start: date, end: date, who: str = "physio") -> dict[str, Any]:
    resp = _get(c, f"/fhir/Patient/{code}/$everything", who, start=start.isoformat(), end=end.isoformat())
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/fhir+json")
    return dict(resp.json())


def _fhirjs(paths: list[Path]) -> dict[str, Any]:
    node = shutil.which("node")
    assert node and (FHIRJS / "node_modules" / "fhir").is_dir(), "FHIR.js not installed: run scripts/bootstrap"
    done = subprocess.run([node, str(FHIRJS / "validate.js"), *map(str, paths)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    result = dict(json.loads(done.stdout))
    assert done.returncode == 0, result["errors"][:20]
    return result


def test_every_resource_validates_and_the_round_trip_keeps_every_figure(clinic: Clinic, tmp_path: Path) -> None:
    files, counted = [], 0
    for code in clinic.patients:
        bundle = _bundle(clinic, code, clinic.start, clinic.yesterday)
        model = fhir.parse_bundle(bundle)  # the library, strict
        counted += len(model.entry or [])
        kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
        assert {"Device", "DeviceUseStatement", "DeviceRequest", "Observation"} <= kinds
        for entry in bundle["entry"]:
            subject = entry["resource"].get("subject") or {}
            if subject:
                # The patient only by pseudonymous code under the clinic's system: no name, no Patient resource.
                assert subject == {"type": "Patient", "identifier": {"system": CLINIC_SYSTEM, "value": code}}
        assert "Patient" not in kinds
        # The round trip: what a receiving system reads is what the read model held.
        record = asyncio.run(clinic.client.app.state.records_source.record(SYSTEM, code,  # type: ignore[attr-defined]
                                                                           _period(clinic)))  # fmt: skip
        assert read_days(json.loads(json.dumps(bundle))) == expected_days(record)
        path = tmp_path / f"{code}.json"
        path.write_text(json.dumps(bundle))
        files.append(path)
    for identifier in codes.CODE_SYSTEM_IDS:
        resp = _get(clinic, f"/fhir/CodeSystem/{identifier}")
        assert resp.status_code == 200
        path = tmp_path / f"cs-{identifier}.json"
        path.write_text(resp.text)
        files.append(path)
    result = _fhirjs(files)
    # Every bundle, each of its entries and both code systems went through FHIR.js without an error.
    assert result["resources"] == counted + len(clinic.patients) + len(codes.CODE_SYSTEM_IDS)
    print(f"\nFHIR.js validated {result['resources']} resources: 0 errors, {result['warnings']} warnings "
          "(project codes outside example value sets)")


def _period(c: Clinic) -> Any:
    from records.model import Period

    return Period(c.start, c.yesterday)


def test_observations_equal_the_monitors_figures(clinic: Clinic) -> None:
    with clinic.monitor.state.transaction() as session:
        stored = {(d.patient, d.day): d for d in session.scalars(select(DayFlags))}
    contexts = {c.patient: c for c in load_contexts(clinic.registry)}
    compared = 0
    for code in clinic.patients:
        bundle = _bundle(clinic, code, clinic.start, clinic.yesterday)
        days = read_days(bundle)
        ctx = contexts[code]
        end_ms = int(_local_midnight(datetime.now(UTC)).timestamp() * 1000)
        mine = asyncio.run(day_stats(clinic.influx_url, clinic.database, [ctx], DAYS, end_ms, medians=True))[code]
        computed = {d.day: d for d in mine}
        for day in (clinic.start + timedelta(days=n) for n in range((clinic.yesterday - clinic.start).days + 1)):
            row = stored[(code, day)]
            if row.flags == ["silent"]:
                assert day not in days  # no data, no Observation
                continue
            got = days[day]
            assert got.wear_min == pytest.approx(row.wear_s / 60, abs=1e-4)  # the monitor's stored wear
            assert got.flags == row.flags  # the monitor's stored flags
            st = computed[day]
            assert got.points == st.points
            if ctx.kind == "sock":
                assert got.median_mmhg.get("ankle") == pytest.approx(st.ankle_median_mmhg, abs=1e-4)
                assert got.above_min == pytest.approx(st.above_range_s / 60, abs=1e-4)
                assert got.reversed_min == pytest.approx(st.reversed_gradient_s / 60, abs=1e-4)
            else:
                assert got.sessions == st.sessions_started
                assert got.peak_mmhg == pytest.approx(st.peak_mmhg, abs=1e-4)
            compared += 1
    assert compared >= len(clinic.patients) * (DAYS - 2)
    print(f"\n{compared} patient-days: every Observation equals the monitor's figures")


def test_open_episodes_are_flags(clinic: Clinic) -> None:
    with clinic.monitor.state.transaction() as session:
        episodes = list(session.scalars(select(Episode).where(Episode.open_key.is_not(None))))
    # Open now and begun by the period's last day (one that began today belongs to a later period).
    open_ = [(e.patient, e.flag, e.start_day.isoformat()) for e in episodes if e.start_day <= clinic.yesterday]
    assert open_, "the simulated clinic should have open episodes (under-use, rolled down, over-pressure)"
    exported = []
    for code in clinic.patients:
        bundle = _bundle(clinic, code, clinic.start, clinic.yesterday)
        exported += [(code, f["code"]["coding"][0]["code"], f["period"]["start"]) for f in fhir.entries(bundle, "Flag")]
    assert sorted(exported) == sorted(open_)


def test_another_clinics_token_gets_nothing(clinic: Clinic) -> None:
    code = clinic.patients[0]
    path = f"/fhir/Patient/{code}/$everything"
    period = {"start": clinic.start.isoformat(), "end": clinic.yesterday.isoformat()}
    other = _get(clinic, path, "other", **period)
    unknown = _get(clinic, "/fhir/Patient/PT-NOBODY/$everything", "other", **period)
    assert other.status_code == unknown.status_code == 404  # alike: no telling whether the code exists
    assert other.json()["detail"].replace(code, "?") == unknown.json()["detail"].replace("PT-NOBODY", "?")
    assert _get(clinic, path, "ingester", **period).status_code == 403
    assert _get(clinic, path, None, **period).status_code == 401
    assert _get(clinic, f"/records/patients/{code}/report.pdf", "other", month=f"{clinic.yesterday:%Y-%m}"
                ).status_code == 404  # fmt: skip
    # Clinic B's own patient: nothing of clinic A in it.
    own = _bundle(clinic, "PT-OTHER", clinic.start, clinic.yesterday, who="other")
    assert all(c not in json.dumps(own) for c in clinic.patients) and DEMO_CLINIC not in json.dumps(own)


def _text(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def test_the_monthly_report_shows_the_monitors_figures(clinic: Clinic, tmp_path: Path) -> None:
    # The month holding most of the simulated days (the screenshot shows more than a month's first days).
    days = [clinic.start + timedelta(days=n) for n in range((clinic.yesterday - clinic.start).days + 1)]
    month = max({d.replace(day=1) for d in days}, key=lambda m: sum(1 for d in days if d.replace(day=1) == m))
    last = min(clinic.yesterday, (month + timedelta(days=31)).replace(day=1) - timedelta(days=1))
    sock = next(c for c in load_contexts(clinic.registry) if c.kind == "sock" and c.patient in clinic.patients)
    resp = _get(clinic, f"/records/patients/{sock.patient}/report.pdf", month=f"{month:%Y-%m}")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/pdf"
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(resp.content)
    with clinic.monitor.state.transaction() as session:
        rows = [d for d in session.scalars(select(DayFlags).where(DayFlags.patient == sock.patient))
                if month <= d.day <= last]  # fmt: skip
    assert sock.rx is not None
    target_s = sock.rx.wear_hours_per_day * 3600  # type: ignore[union-attr]
    with_data = [d for d in rows if d.flags != ["silent"]]
    met = sum(1 for d in with_data if d.wear_s >= target_s)
    # The fleet got its garments the day before the first simulated day (a day the monitor does not judge: the
    # prescription starts with the simulation), so the garment was held from then on.
    held = (last - max(month, clinic.start - timedelta(days=1))).days + 1
    text = _text(pdf)
    assert f"Days with data {len(with_data)} of {held}" in " ".join(text.split())
    assert f"Days meeting the wear target {met} of {len(with_data)}" in " ".join(text.split())
    assert sock.patient in text
    # Page 1 at print size, for the README (and for a person to look at).
    subprocess.run(["pdftoppm", "-r", "80", "-png", "-f", "1", "-l", "1", "-singlefile", str(pdf),
                    str(tmp_path / "page1")], check=True)  # fmt: skip
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "page1.png", SCREENSHOT)
    # The CSV: a row per complete day of the month, the monitor's wear.
    csv_resp = _get(clinic, f"/records/patients/{sock.patient}/report.csv", month=f"{month:%Y-%m}")
    lines = csv_resp.text.strip().splitlines()
    days_in_csv = (last - month).days + 1
    assert len(lines) == 1 + days_in_csv
    by_day = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    for d in rows:
        assert float(by_day[d.day.isoformat()][2]) == pytest.approx(d.wear_s / 60, abs=0.05)


def test_the_cli_writes_the_same_bundle(clinic: Clinic, tmp_path: Path) -> None:
    code = clinic.patients[0]
    env = {"COMPRESSION_MONITOR_INFLUX_URL": clinic.influx_url, "COMPRESSION_MONITOR_INFLUX_DATABASE": clinic.database,
           "COMPRESSION_MONITOR_REGISTRY_DATABASE_URL": clinic.registry_url,
           "COMPRESSION_MONITOR_STATE_DATABASE_URL": clinic.state_url,
           "COMPRESSION_RECORDS_PATIENT_IDENTIFIER_SYSTEMS": json.dumps({DEMO_CLINIC: CLINIC_SYSTEM})}  # fmt: skip
    out = tmp_path / "b.json"
    started = time.monotonic()
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "compression"), "export", "fhir", "--patient", code, "--from",
                           clinic.start.isoformat(), "--to", clinic.yesterday.isoformat(), "--out", str(out)],
                          env={**_base_env(), **env}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    from_cli = json.loads(out.read_text())
    from_api = _bundle(clinic, code, clinic.start, clinic.yesterday)
    assert read_days(from_cli) == read_days(from_api)
    assert [e["fullUrl"] for e in from_cli["entry"]] == [e["fullUrl"] for e in from_api["entry"]]
    assert time.monotonic() - started < 120


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSION_")}


def test_the_patient_page_has_the_report_button(clinic: Clinic) -> None:
    physio = next(p for p in clinic.registry.list_physios(SYSTEM) if p.clinic == DEMO_CLINIC)
    session = clinic.registry.login(physio.email, DEMO_PASSWORD)
    code = next(p.code for p in clinic.registry.list_patients(SYSTEM, physio=physio.email))
    clinic.client.cookies.set(SESSION_COOKIE, session)
    try:
        page = clinic.client.get(f"/ui/patients/{code}")
        assert page.status_code == 200
        assert f'action="/ui/records/patients/{code}/report.pdf"' in page.text
        month = f"{clinic.yesterday:%Y-%m}"
        pdf = clinic.client.get(f"/ui/records/patients/{code}/report.pdf", params={"month": month})
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        assert clinic.client.get("/ui/records/patients/PT-OTHER/report.pdf", params={"month": month}).status_code == 404
    finally:
        clinic.client.cookies.clear()
    assert clinic.client.get(f"/ui/records/patients/{code}/report.pdf", params={"month": month}).status_code == 404
