"""Today loads in under a second for a clinic of 500 patients (the issue's bar), over HTTP against the real app.

The registry (SQLite file) holds 500 patients of two physios with a garment and a prescription each; the monitor's
state database holds each patient's figures, 150 open episodes and some actions, as after the monitor's
evaluations. The page is fetched signed in, as a browser would, whole clinic and own patients.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn

from compression.localservers import free_port
from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from devices.registry.settings import RegistrySettings
from monitor import actions as acts
from monitor.figures import PatientFigures
from monitor.state import Episode, State
from tests.integration.clinic import signed_in
from workspace.app import create, open_state

pytestmark = pytest.mark.integration

PATIENTS = 500
CLINIC, ANN, BOB, PASSWORD = "big", "ann@big.example", "bob@big.example", "lantern-quay-2029"
OTHER, EVE = "small", "eve@small.example"  # another clinic's physio: sees nothing of "big"
LIMIT_S = 1.0


@dataclass
class Site:
    url: str
    state: State


def _seed_registry(registry: Registry, today: date) -> None:
    with registry.unit_of_work():
        registry.create_clinic(SYSTEM, s.ClinicIn(code=CLINIC, name="Big Clinic", timezone="Europe/Berlin"))
        for email, name in ((ANN, "Ann Big"), (BOB, "Bob Big")):
            registry.create_physio(SYSTEM, s.PhysioIn(clinic=CLINIC, name=name, email=email, password=PASSWORD))
        registry.create_clinic(SYSTEM, s.ClinicIn(code=OTHER, name="Small Clinic", timezone="Europe/Berlin"))
        registry.create_physio(SYSTEM, s.PhysioIn(clinic=OTHER, name="Eve Small", email=EVE, password=PASSWORD))
        since = datetime.now(UTC) - timedelta(days=40)
        for n in range(PATIENTS):
            code, boot = f"BG-{n:04d}", n % 5 == 0
            registry.create_patient(SYSTEM, s.PatientIn(clinic=CLINIC, code=code, display_name=f"Client {n}",
                                                        physio=ANN if n % 2 else BOB))  # fmt: skip
            device = f"{'boot' if boot else 'sock'}-{n:04d}"
            registry.create_device(SYSTEM, s.DeviceIn(device_id=device, clinic=CLINIC, kind="boot" if boot else "sock"))
            registry.assign(SYSTEM, s.AssignmentIn(device_id=device, patient=code, valid_from=since))
            if boot:
                registry.prescribe(SYSTEM, s.PrescriptionIn(patient=code, garment_kind="boot", valid_from=today
                                   - timedelta(days=40), sessions_per_week=5, session_min_minutes=20,
                                   session_max_minutes=30, max_chamber_mmhg=60))  # fmt: skip
            else:
                registry.prescribe(SYSTEM, s.PrescriptionIn(patient=code, garment_kind="sock", valid_from=today
                                   - timedelta(days=40), class_system="ral", class_name="2", wear_hours_per_day=8))


def _seed_state(state: State, today: date) -> None:
    now = datetime.now(UTC)
    with state.transaction() as session:
        for n in range(PATIENTS):
            code, boot = f"BG-{n:04d}", n % 5 == 0
            session.add(PatientFigures(patient=code, clinic=CLINIC, kind="boot" if boot else "sock", evaluated_at=now,
                                       judged_7d=7, judged_30d=30, clear_days_7d=n % 8, target_days_7d=n % 8,
                                       data_days_30d=30 - n % 20, wear_mean_7d_h=4 + n % 6, wear_mean_30d_h=6.5,
                                       wear_target_h=None if boot else 8.0, above_7d_min=float(n % 90),
                                       reversed_7d_min=float(n % 45), sessions_7d=n % 6, sessions_per_week=5 if boot
                                       else None, last_seen_at=now - timedelta(minutes=n), battery_pct=n % 100))
            if n % 10 < 3:  # 150 open episodes
                flag = "boot_overpressure" if boot and n % 20 == 0 else "under_use"
                session.add(Episode(patient=code, clinic=CLINIC, flag=flag,
                                    severity="critical" if flag == "boot_overpressure" else "warning",
                                    start_day=today - timedelta(days=n % 9), last_day=today - timedelta(days=1),
                                    open_key=f"{code}:{flag}", notified=True))  # fmt: skip
    with state.transaction() as session:
        episodes = list(session.query(Episode).all())
    for episode in episodes[::3]:
        acts.record(state, acts.ActionIn(episode.id, "acknowledge", ANN, "Ann Big", "called"), today)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder: Path = tmp_path_factory.mktemp("workspace-load")
    url = f"sqlite:///{folder / 'registry.db'}"
    engine = make_engine(url)
    migrate(engine)
    registry = Registry(session_factory(engine))
    today = datetime.now(UTC).date()
    _seed_registry(registry, today)
    state = open_state(f"sqlite:///{folder / 'monitor.db'}")
    _seed_state(state, today)
    port = free_port()
    app = create(registry, state, None, "", RegistrySettings(database_url=url, port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield Site(f"http://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        state.close()
        engine.dispose()


def timed(client: httpx.Client, path: str, times: int = 5) -> tuple[float, str]:
    """The median of ``times`` fetches (seconds) and the last page."""
    spent, text = [], ""
    for _ in range(times):
        started = time.perf_counter()
        response = client.get(path)
        spent.append(time.perf_counter() - started)
        assert response.status_code == 200
        text = response.text
    return statistics.median(spent), text


def test_today_loads_within_a_second_for_500_patients(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    client = signed_in(site.url, ANN, PASSWORD)
    try:
        clinic, page = timed(client, "/ui/workspace/?scope=all")
        assert page.count('data-patient="') == PATIENTS
        mine, page = timed(client, "/ui/workspace/")
        assert page.count('data-patient="') == PATIENTS // 2
        sorted_, _ = timed(client, "/ui/workspace/?scope=all&sort=wear7&dir=asc")
    finally:
        client.close()
    with capsys.disabled():
        print(f"\nToday, {PATIENTS} patients: whole clinic {clinic * 1000:.0f} ms, own {PATIENTS // 2} "
              f"{mine * 1000:.0f} ms, sorted by wear {sorted_ * 1000:.0f} ms (median of 5)")
    assert max(clinic, mine, sorted_) < LIMIT_S


def test_another_clinics_physio_sees_nothing_of_this_clinic(site: Site) -> None:
    with site.state.transaction() as session:
        episode = session.query(Episode).first()
        assert episode is not None
        code, episode_id = episode.patient, episode.id
    client = signed_in(site.url, EVE, PASSWORD)
    try:
        today = client.get("/ui/workspace/?scope=all")
        assert today.status_code == 200 and "data-patient=" not in today.text and "BG-" not in today.text
        page = client.get(f"/ui/workspace/patients/{code}")
        assert page.status_code == 404 and "Client" not in page.text
        form = client.get("/ui/workspace/").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        acted = client.post(f"/ui/workspace/episodes/{episode_id}/actions",
                            data={"csrf": csrf.group(1), "kind": "note", "note": "not mine"})  # fmt: skip
        assert acted.status_code == 404 and f"no episode {episode_id}" in acted.text and code not in acted.text
    finally:
        client.close()
    assert acts.for_episodes(site.state, [episode_id])[episode_id] == [] or all(
        a.by_email != EVE for a in acts.for_episodes(site.state, [episode_id])[episode_id])
