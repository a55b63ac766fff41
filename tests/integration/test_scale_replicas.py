"""Past one machine, on this one: 3 ingesters and 2 monitor replicas against one broker, one InfluxDB and one state
database (docs/scaling.md).

The ingesters share the broker's load through an MQTT shared subscription (``$share/<group>/...``); the monitor
replicas share the clinics through a lease per shard of clinics in the state database
(``COMPRESSION_MONITOR_SHARDS``). Every boot of six clinics sends an over-pressure: every sample is stored once
(the ingesters' counts add up to what was published, each of them did part of it), every e-mail is sent once
(one per boot, none twice), both replicas worked; then one replica is killed (kill -9) and a second round of
over-pressures, one per clinic, is e-mailed within a minute: the survivor took the dead replica's shards over
(after ``lease_s``, 6 s here; 30 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from compression.influxql import rows
from compression.localservers import InfluxDB, Mosquitto
from devices.protocol import topic_for
from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from monitor.settings import MonitorSettings
from monitor.state import shard_of
from tests.integration.conftest import Names, running, settings_for
from tests.integration.test_monitor_e2e import MonitorProcess
from tests.smtp import SmtpTestServer

pytestmark = pytest.mark.integration

CLINICS = ("north", "south", "east", "west", "lake", "hill")
SHARDS = 4
TAKEOVER_S = 60.0  # the bound for a dead replica's clinics to be taken over
SAMPLES = 10  # per message
MESSAGES = 20  # per device, before the over-pressure


def registry(path: Path) -> str:
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrate(engine)
    reg = Registry(session_factory(engine))
    since = datetime.now(UTC) - timedelta(days=3)
    for clinic in CLINICS:
        reg.create_clinic(SYSTEM, s.ClinicIn(code=clinic, name=clinic.title(), timezone="America/Edmonton"))
        reg.create_physio(SYSTEM, s.PhysioIn(clinic=clinic, name=f"Physio {clinic}", email=f"pt@{clinic}.example"))
        for n in (1, 2):
            code, device = f"B-{clinic}-{n}", f"boot-{clinic}-{n}"
            reg.create_patient(SYSTEM, s.PatientIn(clinic=clinic, code=code, physio=f"pt@{clinic}.example"))
            reg.create_device(SYSTEM, s.DeviceIn(device_id=device, clinic=clinic, kind="boot"))
            reg.assign(SYSTEM, s.AssignmentIn(device_id=device, patient=code, valid_from=since))
            reg.prescribe(SYSTEM, s.PrescriptionIn(patient=code, garment_kind="boot", valid_from=since.date(),
                                                   sessions_per_week=3, session_min_minutes=20,
                                                   session_max_minutes=40, max_chamber_mmhg=80))  # fmt: skip
    engine.dispose()
    return url


def telemetry(device: str, seq: int, t0: int, foot: float) -> bytes:
    samples = [{"t": t0 + 2000 * i, "worn": True, "pressure_mmhg": {"foot": foot, "ankle": foot - 5.0}}
               for i in range(SAMPLES)]  # fmt: skip
    return json.dumps({"v": 1, "device_id": device, "kind": "boot", "seq": seq, "samples": samples}).encode()


def publisher(mq: Mosquitto) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"scale-pub-{time.monotonic_ns()}",
                         protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
    host, port = mq.url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    return client


def publish(client: mqtt.Client, root: str, device: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        client.publish(topic_for(device, "telemetry", root), payload, qos=1).wait_for_publish(10)


def opened(smtp: SmtpTestServer) -> list[str]:
    """The patient code of each "opened" e-mail received (subjects name the patient)."""
    found = []
    for mail in smtp.received():
        subject = str(mail.message["Subject"])
        found += [f"B-{c}-{n}" for c in CLINICS for n in (1, 2) if f"B-{c}-{n}" in subject and "URGENT" in subject]
    return found


def shard_holders(state: Path) -> dict[str, str]:
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    with contextlib.closing(sqlite3.connect(state)) as db:
        return {name: holder for name, holder, until in db.execute("SELECT name, holder, expires_at FROM leases")
                if name.startswith("monitor:") and str(until) > now}  # fmt: skip


async def wait_for(predicate: object, timeout: float, what: str, procs: list[MonitorProcess]) -> float:
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        for p in procs:
            assert p.proc.poll() is None, f"monitor exited: {p.log()}"
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}: " + "\n".join(
            p.log() for p in procs)  # fmt: skip
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_three_ingesters_two_monitors_store_once_mail_once_and_take_over(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    url = registry(tmp_path / "registry.db")
    state = tmp_path / "monitor.db"
    devices = [f"boot-{c}-{n}" for c in CLINICS for n in (1, 2)]
    with SmtpTestServer() as smtp:
        values = MonitorSettings(
            influx_url=influx.url, influx_database=names.database, registry_database_url=url,
            state_database_url=f"sqlite:///{state}", interval_s=5.0, safety_interval_s=1.0, lease_s=6.0,
            shards=SHARDS, days_back=8, smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_tls="off",
            digest_hour=23, _env_file=None)  # fmt: skip
        async with AsyncExitStack() as stack:
            ingesters = [await stack.enter_async_context(running(settings_for(
                mosquitto, influx, names, mqtt_client_id=f"{names.client_id}-{i}", mqtt_share_group="scale",
                registry_url=url))) for i in range(3)]  # fmt: skip
            monitors = [MonitorProcess(values, tmp_path / f"{r}.log", r) for r in ("rep-a", "rep-b")]
            try:
                client = publisher(mosquitto)
                now = int(time.time() * 1000)
                # Normal readings first, then one over-pressure per boot of the first patient of each clinic and
                # the second patient of half of them.
                for device in devices:
                    publish(client, names.topic_root, device,
                            [telemetry(device, seq, now - 600_000 + seq * 20_000, 60.0) for seq in range(MESSAGES)])
                first = [d for d in devices if d.endswith("-1")]
                for device in first:
                    publish(client, names.topic_root, device, [telemetry(device, MESSAGES, now, 120.0)])
                published = len(devices) * MESSAGES + len(first)
                await wait_for(lambda: sum(i.metrics.value("compression_ingest_messages_acked_total")
                                           for i in ingesters) >= published, 60, "the ingesters", monitors)  # fmt: skip
                acked = [i.metrics.value("compression_ingest_messages_acked_total") for i in ingesters]
                assert sum(acked) == published and all(n > 0 for n in acked), acked  # shared, each message once
                stored = rows(influx.url, names.database, "SELECT count(worn) AS n FROM sample GROUP BY device")
                assert {r["device"]: r["n"] for r in stored} == {
                    d: SAMPLES * (MESSAGES + (d in first)) for d in devices}
                wanted = sorted(d.replace("boot-", "B-") for d in first)
                await wait_for(lambda: len(opened(smtp)) >= len(wanted), 90, "the first e-mails", monitors)
                await wait_for(lambda: set(shard_holders(state).values()) == {"rep-a", "rep-b"}
                               and len(shard_holders(state)) == SHARDS, 30, "both replicas at work", monitors)
                await asyncio.sleep(3)  # a few more rounds of both: nothing sent twice
                assert sorted(opened(smtp)) == wanted

                # kill -9 one replica; the other takes its shards over, and the next over-pressures get out.
                dead = {int(name.split(":")[1]) for name, holder in shard_holders(state).items() if holder == "rep-a"}
                assert any(shard_of(c, SHARDS) in dead for c in CLINICS), "the killed replica had clinics"
                monitors[0].kill()
                killed_at = time.monotonic()
                second = [d for d in devices if d.endswith("-2")]
                later = int(time.time() * 1000)
                for device in second:
                    publish(client, names.topic_root, device, [telemetry(device, MESSAGES + 1, later, 130.0)])
                everyone = sorted(wanted + [d.replace("boot-", "B-") for d in second])
                await wait_for(lambda: len(opened(smtp)) >= len(everyone), TAKEOVER_S, "the take-over",
                               monitors[1:])  # fmt: skip
                took = time.monotonic() - killed_at
                await wait_for(lambda: set(shard_holders(state).values()) == {"rep-b"}
                               and len(shard_holders(state)) == SHARDS, 10, "every shard held by the survivor",
                               monitors[1:])  # fmt: skip
                await asyncio.sleep(3)
                assert sorted(opened(smtp)) == everyone, "every e-mail once"
                print(f"3 ingesters acked {acked}; killed replica's clinics e-mailed {took:.1f} s after the kill")
                client.loop_stop()
                client.disconnect()
            finally:
                for p in monitors:
                    if p.proc.poll() is None:
                        p.kill()
