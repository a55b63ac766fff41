"""A simulated clinic through the real pipeline, with the monitor's first round and the workspace served.

Shared by the workspace's tests (session scope, through ``conftest.py``): the every-scenario fleet (14 days up to
now) is registered in a registry file, published through the real broker to the ingester (which tags every point
with its patient), the monitor evaluates once and sends its e-mails to a real SMTP server (aiosmtpd), and the
registry's app with the workspace runs under uvicorn on a free port (a thread of this process).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from compression.localservers import InfluxDB, Mosquitto, free_port
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import Registry
from devices.registry.settings import RegistrySettings
from monitor.app import Monitor
from monitor.settings import MonitorSettings
from records.api import install as install_records
from records.settings import RecordsSettings
from records.sources import open_sources
from simulators.registration import DEMO_PASSWORD
from simulators.run import RunOptions
from simulators.scenarios import Fleet, every_scenario
from tests.integration.conftest import Names, running, settings_for
from tests.integration.test_compliance_graded import Part, publish, registry_for
from tests.smtp import SmtpTestServer
from workspace.app import create, open_state, reader_of

DAYS = 14
PHYSIO1, PHYSIO2 = "physio1@demo-clinic.example", "physio2@demo-clinic.example"
PASSWORD = DEMO_PASSWORD


@dataclass
class Clinic:
    """The seeded clinic: its servers, fleet and ground truth, the monitor that evaluated it, the site's URL."""

    url: str
    fleet: Fleet
    truth: dict[str, Any]
    scenario: dict[str, str]  # patient -> scenario
    by_scenario: dict[str, str]  # scenario -> patient
    monitor: Monitor
    smtp: SmtpTestServer
    influx: InfluxDB
    database: str
    registry: Registry  # its own engine, to check what the site wrote
    folder: Path


def signed_in(url: str, email: str = PHYSIO1, password: str = PASSWORD) -> httpx.Client:
    """An HTTP client signed in to the site as a physio (the sign-in form's CSRF cookie and field, then the form);
    the caller closes it."""
    client = httpx.Client(base_url=url, timeout=60)
    form = client.get("/ui/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf is not None
    answer = client.post("/ui/login", data={"csrf": csrf.group(1), "email": email, "password": password,
                                            "next": "/ui/"})  # fmt: skip
    assert answer.status_code == 303, answer.text[:500]
    return client


def _monitor_settings(influx: InfluxDB, database: str, registry_url: str, folder: Path, smtp: SmtpTestServer,
                      site: str) -> MonitorSettings:  # fmt: skip
    return MonitorSettings(influx_url=influx.url, influx_database=database, registry_database_url=registry_url,
                           state_database_url=f"sqlite:///{folder / 'monitor.db'}", smtp_host="127.0.0.1",
                           smtp_port=smtp.port, smtp_tls="off", digest_hour=0, days_back=DAYS + 1, lease_s=600.0,
                           mail_from="Compression monitor <monitor@demo-clinic.example>", workspace_url=site,
                           _env_file=None)  # type: ignore[call-arg]  # fmt: skip


def _serve(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="workspace-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    return server, thread


@pytest.fixture(scope="session")
def clinic(mosquitto: Mosquitto, influx: InfluxDB, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    token = uuid.uuid4().hex[:8]
    names = Names(database=f"t_workspace_{token}", topic_root=f"test-{token}/garments/v1",
                  client_id=f"ingest.{token}", prefix=f"wsp{token[:4]}")  # fmt: skip
    fleet = every_scenario(seed=1, days=DAYS, end=datetime.now(UTC))
    truth = fleet.ground_truth()
    options = RunOptions(mosquitto.url, connections=3, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    folder = tmp_path_factory.mktemp("workspace")
    registry_url = registry_for(folder / "registry.db", fleet, options)
    port = free_port()
    site = f"http://127.0.0.1:{port}"
    with SmtpTestServer() as smtp:
        settings = _monitor_settings(influx, names.database, registry_url, folder, smtp, site)

        async def go() -> Monitor:
            async with running(settings_for(mosquitto, influx, names, registry_url=registry_url)):
                await publish(Part(fleet, lambda m: True), options, influx, names.database, int(time.time() * 1000),
                              (0, 0))  # fmt: skip
            mon = Monitor(settings)
            assert mon.state.acquire_lease(mon.replica, settings.lease_s)
            assert await mon.evaluate_once()
            await mon.send_due()
            return mon

        mon = asyncio.run(go())
        engines = [make_engine(registry_url), make_engine(registry_url)]
        migrate(engines[0])
        served = Registry(session_factory(engines[0]))
        state = open_state(settings.state_database_url)
        app = create(served, state, reader_of(settings), names.database,
                     RegistrySettings(database_url=registry_url, port=port))  # fmt: skip
        # The monthly report and the FHIR export, as `compression workspace serve` installs them (records/).
        records = open_sources(served, RecordsSettings(), reader_of(settings), names.database,
                               settings.state_database_url)  # fmt: skip
        install_records(app, records, RecordsSettings())
        server, thread = _serve(app, port)
        scenario = {p["patient"]: p["scenario"] for p in truth["patients"]}
        try:
            yield Clinic(site, fleet, truth, scenario, {v: k for k, v in scenario.items()}, mon, smtp, influx,
                         names.database, Registry(session_factory(engines[1])), folder)  # fmt: skip
        finally:
            server.should_exit = True
            thread.join(timeout=15)
            state.close()
            records.monitor.state.close()
            mon.state.close()
            for engine in engines:
                engine.dispose()
