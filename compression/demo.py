"""``compression demo``: the whole path on this machine, ending with what was stored."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from compression.influxql import rows, scalar
from compression.localservers import (
    InfluxDB,
    Mosquitto,
    remove_server_folder,
    start_influxdb,
    start_platform_broker,
)
from compression.mailcatcher import MailCatcher, start_mailcatcher
from devices.registry.broker import BrokerSync
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from ingest.app import Ingester
from ingest.settings import IngestSettings
from monitor.app import Monitor
from monitor.settings import MonitorSettings
from simulators.registration import DEMO_CLINIC, Registered, register_fleet
from simulators.run import RunOptions, RunReport, gateway_plan, run_fleet
from simulators.scenarios import Fleet, SimMessage, every_scenario

DATABASE = "compression_demo"
WORKSPACE_PORT = 8070  # the registry's web app with the physios' workspace (--port)
INGEST_ACCOUNT = "svc.ingest"
CONNECTIONS = 2


@dataclass(frozen=True, slots=True)
class DemoRegistry:
    """The demo's registry: its database URL, what registration handed out, the ingester's broker password."""

    url: str
    registry: Registry
    registered: Registered
    ingest_password: str


def _register(root: Path, mq: Mosquitto, fleet: Fleet, options: RunOptions) -> DemoRegistry:
    """A fresh registry for the demo clinic; the broker's account files follow it."""
    path = root / "registry.db"
    for stale in root.glob("registry.db*"):
        stale.unlink()
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrate(engine)
    registry = Registry(session_factory(engine))
    registry.on_credentials_changed = BrokerSync(registry, mq.accounts_dir, mq.pid_file)
    ingest = registry.create_service_account(SYSTEM, INGEST_ACCOUNT)
    registered = register_fleet(registry, fleet, gateway_plan(fleet, options))
    return DemoRegistry(url, registry, registered, ingest.password)


def _with_user(url: str, user: str, password: str) -> str:
    scheme, _, host = url.partition("://")
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}"


def _say(text: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + text)


@dataclass(slots=True)
class Phases:
    """What the demo ran: the ingester, the backfill and live reports, the monitor."""

    ingester: Ingester
    backfill: RunReport
    live: RunReport | None
    monitor: Monitor


def _ingest_settings(mq: Mosquitto, db: InfluxDB, reg: DemoRegistry) -> IngestSettings:
    # The services' listener; the ingester's default topic root (fleet/garments/v1) is the deployed one.
    return IngestSettings(mqtt_url=_with_user(mq.service_url, INGEST_ACCOUNT, reg.ingest_password),
                          influx_url=db.url, influx_database=DATABASE, metrics_port=0, registry_url=reg.url,
                          registry_refresh_s=1.0, mqtt_client_id=f"demo.ingest-{uuid.uuid4().hex[:6]}")  # fmt: skip


def _readings(fleet: Fleet, keep: Callable[[SimMessage], bool]) -> int:
    """The fleet's telemetry and event messages that ``keep`` selects (status messages are left out: the gateways
    publish statuses of their own, so a count of every message would be reached too early)."""
    return sum(1 for m in fleet.messages() if keep(m) and m.channel != "status")


async def _stored(ingester: Ingester, readings: int) -> None:
    """Until the ingester has received ``readings`` telemetry and event messages in all and written and acknowledged
    everything it received (at most 2 minutes)."""
    value = ingester.metrics.value
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        received = sum(value("compression_ingest_messages_received_total", channel=c) for c in ("telemetry", "event"))
        if received >= readings and value("compression_ingest_inflight_messages") == 0:
            return
        await asyncio.sleep(0.2)


async def _run_phases(
    mq: Mosquitto, db: InfluxDB, fleet: Fleet, reg: DemoRegistry, options: RunOptions, catcher: MailCatcher,
    root: Path, days: int, cutoff_ms: int, port: int = WORKSPACE_PORT,
) -> Phases:  # fmt: skip
    ingester = Ingester(_ingest_settings(mq, db, reg))
    task = asyncio.create_task(ingester.run())
    await asyncio.sleep(0.5)
    _say(f"ingester running (metrics: http://127.0.0.1:{ingester.metrics_port}/metrics)")

    def progress(report: RunReport) -> None:
        click.echo(f"\r    sent {report.messages:>7,} messages, {report.samples:>9,} samples", nl=False)

    backfill = await asyncio.to_thread(run_fleet, fleet, options, False, progress, 600.0,
                                       lambda m: m.publish_at_ms <= cutoff_ms)  # fmt: skip
    click.echo()
    _say(f"backfill: {backfill.messages:,} messages ({backfill.samples:,} samples, {backfill.bad_payloads} "
         f"deliberately malformed) in {backfill.seconds:.1f} s; the broker took {backfill.acked:,}")  # fmt: skip
    await _stored(ingester, _readings(fleet, lambda m: m.publish_at_ms <= cutoff_ms))
    _say(f"the monitor evaluates the clinic (e-mails to a local SMTP catcher on {catcher.url})")
    monitor = await _first_round(root, db, reg, catcher, days, port)
    live = None
    if fleet.period.end_ms > cutoff_ms:
        live = await _live(fleet, options, monitor, cutoff_ms, catcher)
        await _stored(ingester, _readings(fleet, lambda m: True))
    ingester.stop()
    await task
    return Phases(ingester, backfill, live, monitor)


async def _live(
    fleet: Fleet, options: RunOptions, monitor: Monitor, cutoff_ms: int, catcher: MailCatcher
) -> RunReport:
    """The fleet goes on live (each message when it falls due) while the monitor runs its loop."""
    seconds = (fleet.period.end_ms - cutoff_ms) / 1000
    every, safety = monitor.settings.interval_s, monitor.settings.safety_interval_s
    _say(f"live: the garments go on sending in real time for {seconds:.0f} s; the monitor runs its loop "
         f"(evaluation every {every:g} s, safety checks every {safety:g} s)")  # fmt: skip
    loop_task = asyncio.create_task(monitor.run())
    sender = asyncio.create_task(asyncio.to_thread(run_fleet, fleet, options, True, None, 120.0,
                                                   lambda m: m.publish_at_ms > cutoff_ms))  # fmt: skip
    # Until the period's end: the last message may fall due before it, the monitor keeps watching meanwhile.
    while not sender.done() or time.time() * 1000 < fleet.period.end_ms:
        pause = max(0.1, min(10.0, fleet.period.end_ms / 1000 - time.time()))
        if sender.done():
            await asyncio.sleep(pause)
        else:
            await asyncio.wait({sender}, timeout=pause)
        c = monitor.counters
        click.echo(f"    live: {c.evaluations} evaluations, {c.safety_checks} safety checks, {c.opened} episodes "
                   f"opened, {len(catcher.messages())} e-mails caught")  # fmt: skip
    report = sender.result()
    await asyncio.sleep(min(5.0, monitor.settings.interval_s))
    monitor.stop()
    await loop_task
    _say(f"live: {report.messages:,} messages ({report.samples:,} samples) sent as they fell due; "
         f"the broker acknowledged {report.acked:,}")  # fmt: skip
    return report


def _patient_line(patient: dict[str, Any], stored: int, wear_hours: float) -> str:
    days = [d for d in patient["days"] if d["complete"]]
    truth_hours = sum(d["wear_s"] for d in patient["days"]) / 3600 / max(len(patient["days"]), 1)
    flagged = sorted({f for d in days for f in (d["flags"] or []) if f != "compliant"})
    who = f"{patient['patient']:<10} {patient['device_id']:<10} {patient['scenario']:<21}"
    return (f"    {who} {stored:>7,} samples  worn {wear_hours:4.1f} h/day (truth {truth_hours:4.1f})  "
            f"expected flags: {', '.join(flagged) or '-'}")  # fmt: skip


def _summary(db: InfluxDB, ingester: Ingester, truth: dict[str, Any], truth_path: Path) -> int:
    expected = sum(p["transport"]["samples_stored"] for p in truth["patients"])
    stored = int(scalar(db.url, DATABASE, "SELECT count(worn) FROM sample"))
    per_device = rows(db.url, DATABASE, "SELECT count(worn) AS n FROM sample GROUP BY device")
    counts = {r["device"]: int(r["n"]) for r in per_device}
    q = (f"SELECT sum(worn_s) / 3600 AS h FROM sample WHERE time >= {truth['start_ms']}ms "
         f"AND time < {truth['end_ms']}ms GROUP BY device")  # fmt: skip
    wear = {r["device"]: float(r["h"] or 0) for r in rows(db.url, DATABASE, q)}
    rejected = rows(db.url, DATABASE, "SELECT count(raw_bytes) AS n FROM rejected GROUP BY reason")
    click.echo()
    _say(f"InfluxDB {db.url}, database {DATABASE!r}: {stored:,} samples stored of {expected:,} expected")
    click.echo("    patient    device     scenario              stored            average wear (all days)")
    for patient in truth["patients"]:
        device = patient["device_id"]
        per_day = wear.get(device, 0.0) / max(len(patient["days"]), 1)
        click.echo(_patient_line(patient, counts.get(device, 0), per_day))
    click.echo("    rejected by the ingester (dead letters in the 'rejected' measurement), by reason:")
    for r in sorted(rejected, key=lambda r: str(r["reason"])):
        click.echo(f"      {r['reason']:<24} {r['n']}")
    acked = ingester.metrics.value("compression_ingest_messages_acked_total")
    click.echo(f"    ingester: {int(acked):,} messages acknowledged, each only after its write")
    _say(f"ground truth of every patient and day: {truth_path} (docs/ground-truth.md)")
    tagged = {r["patient"]: int(r["n"]) for r in rows(db.url, DATABASE, "SELECT count(worn) AS n FROM sample "
                                                        "WHERE patient != '' GROUP BY patient")}  # fmt: skip
    untagged = stored - sum(tagged.values())
    _say(f"{sum(tagged.values()):,} samples tagged with the patient holding the garment at the time "
         f"({len(tagged)} patients); {untagged:,} without a patient")  # fmt: skip
    ok = stored == expected and untagged == 0
    _say("all readings stored" if ok else "MISSING READINGS: see the logs above")
    return 0 if ok else 1


def run_demo(days: int, data_dir: str, keep: bool, started: float, live_minutes: float = 0.0,
             port: int = WORKSPACE_PORT) -> int:  # fmt: skip
    """Local servers, a registered demo clinic, a backfill of one patient per scenario, then (``live_minutes``)
    the fleet live with the monitor running; a summary of what was stored, flagged and e-mailed. 0 on success.
    ``keep``: then the physios' workspace on ``port`` and the monitor's loop go on until Ctrl-C."""
    root = Path(data_dir)
    _forget_previous_runs(root)
    _say(f"starting Mosquitto (as deployed: accounts and ACL from the registry, a device and a services listener) "
         f"and InfluxDB on free loopback ports under {root}/")  # fmt: skip
    mq = start_platform_broker(root)
    db = start_influxdb(root)
    catcher = start_mailcatcher(root)
    try:
        _say(f"Mosquitto {mq.url} (garments) and {mq.service_url} (services), InfluxDB {db.url}, "
             f"SMTP catcher {catcher.url}")  # fmt: skip
        now_ms = int(time.time() * 1000)
        end = datetime.fromtimestamp((now_ms + int(live_minutes * 60_000)) / 1000, UTC)
        fleet = every_scenario(seed=1, days=days, end=end)
        reg = _register(root, mq, fleet, RunOptions(mq.url, connections=CONNECTIONS))
        options = RunOptions(mq.url, connections=CONNECTIONS, credentials=reg.registered.gateways)
        _registry_summary(reg)
        truth = fleet.ground_truth()
        truth_path = root / "ground-truth.json"
        fleet.write_ground_truth(truth_path)
        _say(f"simulating {len(fleet.devices)} patients, one per scenario: {days} days of history backfilled"
             + (f", then {live_minutes:g} min live" if live_minutes > 0 else ""))  # fmt: skip
        phases = asyncio.run(_run_phases(mq, db, fleet, reg, options, catcher, root, days, now_ms, port))
        code = _summary(db, phases.ingester, truth, truth_path)
        code = code or (0 if _monitor_summary(phases.monitor, truth, catcher) else 1)
        _push_dashboards(db)
        _look_at(db, reg, catcher, root, port)
        _say(f"demo finished in {time.monotonic() - started:.1f} s")
        if keep:
            _serve_workspace(reg, phases.monitor, port)
            _wait_forever()
        return code
    finally:
        catcher.stop()
        mq.close()
        db.close()


def _look_at(db: InfluxDB, reg: DemoRegistry, catcher: MailCatcher, root: Path, port: int) -> None:
    first = next(iter(reg.registered.physios))
    _say("what to look at:")
    click.echo(f"    e-mails (.eml, open in any mail client):  {catcher.folder}/")
    click.echo(f"    ground truth per patient and day:        {root / 'ground-truth.json'}")
    click.echo(f"    InfluxDB (--keep):   curl '{db.url}/query?db={DATABASE}&q=SELECT+*+FROM+flag_day+LIMIT+5'")
    click.echo(f"    the physios' workspace (--keep): http://127.0.0.1:{port}/ui/  sign in as {first} / "
               f"{reg.registered.physios[first]}")  # fmt: skip
    click.echo(f"    the registry from the shell: compression devices --database-url {reg.url} patient list")


def _push_dashboards(db: InfluxDB) -> None:
    """With GRAFANA_URL (and GRAFANA_TOKEN, or GRAFANA_USER and GRAFANA_PASSWORD) set: the demo's InfluxDB as the
    data source ``compression-influxdb`` and the dashboards, pushed to that Grafana."""
    import os

    url = os.environ.get("GRAFANA_URL")
    if not url:
        _say("dashboards: set GRAFANA_URL (+ GRAFANA_TOKEN or GRAFANA_USER/GRAFANA_PASSWORD) to push them to a "
             "Grafana; docs/dashboards.md")  # fmt: skip
        return
    token, user, password = (os.environ.get(k) for k in ("GRAFANA_TOKEN", "GRAFANA_USER", "GRAFANA_PASSWORD"))
    from dashboards import build
    from dashboards.push import PushError, apply, client, ensure_datasource, plan

    source = {"name": "Compression InfluxDB (demo)", "uid": "compression-influxdb", "type": "influxdb",
              "access": "proxy", "url": db.url, "jsonData": {"dbName": DATABASE, "httpMode": "POST"}}  # fmt: skip
    try:
        with client(url, token, user, password) as http:
            click.echo(f"    grafana: {ensure_datasource(http, source)}")
            for line in apply(http, plan({name: make() for name, make in build.DASHBOARDS.items()})):
                click.echo(f"    grafana: {line}")
        _say(f"dashboards pushed to {url} (folder Compression), data source -> {db.url} db {DATABASE}")
    except PushError as exc:
        _say(f"dashboards: could not push to {url}: {exc}")


def _serve_workspace(reg: DemoRegistry, monitor: Monitor, port: int) -> None:
    """The physios' web app (the registry's API and pages with the workspace) and the monitor's loop, in the
    background while the servers are kept (Ctrl-C stops): actions taken in the workspace reach the e-mails."""
    import threading

    import uvicorn

    from devices.registry.settings import RegistrySettings
    from workspace.app import create, open_state, reader_of

    settings = monitor.settings
    app = create(reg.registry, open_state(settings.state_database_url), reader_of(settings), settings.influx_database,
                 RegistrySettings(database_url=reg.url, port=port))  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, name="workspace", daemon=True).start()
    loop = Monitor(settings)  # a new replica: the first one's loop has stopped
    threading.Thread(target=lambda: asyncio.run(loop.run()), name="monitor", daemon=True).start()
    first = next(iter(reg.registered.physios))
    _say(f"servers still running; the monitor's loop goes on (Ctrl-C stops). The physios' workspace: "
         f"http://127.0.0.1:{port}/ui/")  # fmt: skip
    click.echo(f"    workspace: http://127.0.0.1:{port}/ui/  sign in as {first} / {reg.registered.physios[first]}")


def _registry_summary(reg: DemoRegistry) -> None:
    patients = reg.registry.list_patients(SYSTEM)
    _say(f"registry {reg.url}: clinic {DEMO_CLINIC!r}, {len(reg.registered.physios)} physios, {len(patients)} "
         f"patients, {len(reg.registered.devices)} garments relayed by {len(reg.registered.gateways)} gateways, "
         "one prescription each; the broker accepts only these accounts (each gateway its own status and its garments' "
         "topics)")  # fmt: skip


async def _first_round(root: Path, db: InfluxDB, reg: DemoRegistry, catcher: MailCatcher, days: int,
                       port: int = WORKSPACE_PORT) -> Monitor:  # fmt: skip
    """The monitor's first evaluation over the backfilled clinic: queue and send (the digest is due at once)."""
    await asyncio.to_thread(_remove, root, "monitor.db*")
    settings = MonitorSettings(influx_url=db.url, influx_database=DATABASE, registry_database_url=reg.url,
                               state_database_url=f"sqlite:///{root / 'monitor.db'}", smtp_host=catcher.host,
                               smtp_port=catcher.port, smtp_tls="off", digest_hour=0, days_back=max(8, days + 1),
                               interval_s=15.0, safety_interval_s=5.0, lease_s=60.0,
                               mail_from="Compression demo <monitor@demo-clinic.example>",
                               workspace_url=f"http://127.0.0.1:{port}")  # fmt: skip
    monitor = Monitor(settings)
    monitor.state.acquire_lease(monitor.replica, settings.lease_s)
    if not await monitor.evaluate_once():
        raise click.ClickException("the monitor could not read InfluxDB")
    await monitor.digest_if_due()
    deadline = time.monotonic() + 120
    while monitor.state.pending() and time.monotonic() < deadline:
        await monitor.send_due()
        await asyncio.sleep(0.2)
    _say(f"first evaluation: {monitor.counters.opened} episodes open, {len(catcher.messages())} e-mails sent "
         "(older episodes recorded without e-mail)")  # fmt: skip
    return monitor


def _monitor_summary(monitor: Monitor, truth: dict[str, Any], catcher: MailCatcher) -> bool:
    """The monitor's flags next to the ground truth's, day by day; where the e-mails went."""
    matched = total = 0
    misses: list[str] = []
    for patient in truth["patients"]:
        judged = {r.stats.day.isoformat(): r.flags for r in monitor._results.get(patient["patient"], [])}
        for day in patient["days"]:
            if not day["complete"] or day["date"] not in judged:
                continue
            total += 1
            got = list(judged[day["date"]] or ())
            if got == day["flags"]:
                matched += 1
            else:
                misses.append(f"{patient['patient']} {day['date']}: monitor {got}, truth {day['flags']}")
    _say(f"monitor: flags match the ground truth on {matched} of {total} patient-days; "
         f"{monitor.counters.opened} episodes open now (older ones recorded without e-mail)")  # fmt: skip
    for line in misses[:10]:
        click.echo(f"    differs: {line}")
    mails = catcher.messages()
    _say(f"{len(mails)} e-mails caught by the local SMTP catcher in {catcher.folder}/ (.eml files):")
    for mail in mails[:20]:
        click.echo(f"    to {', '.join(mail.recipients):<32} {mail.subject}")
    if len(mails) > 20:
        click.echo(f"    ... and {len(mails) - 20} more")
    return total > 0 and matched == total and monitor.state.pending() == 0


def _remove(root: Path, pattern: str) -> None:
    for stale in root.glob(pattern):
        stale.unlink()


def _forget_previous_runs(root: Path) -> None:
    """Remove the server folders of earlier demo runs (each run uses new ports, so new folders)."""
    for folder in [*root.glob("mosquitto-*"), *root.glob("influxdb-*")]:
        remove_server_folder(folder)


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
