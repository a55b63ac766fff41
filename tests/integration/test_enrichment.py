"""Enrichment at ingest, end to end: registry (SQLite file or its API) -> ingester -> InfluxDB tags.

Each stored point carries the patient code that held its device at the
point's own timestamp, across a reassignment; unregistered and unassigned
devices are stored and flagged; a registry change made while the ingester
runs is picked up without a restart; and no patient name reaches InfluxDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from compression.influxql import query, rows
from compression.localservers import InfluxDB, Mosquitto, free_port
from devices.protocol import Event, Sample, Status, Telemetry, encode, topic_for
from devices.registry import schemas as s
from devices.registry.api import create_app
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from ingest.app import Ingester
from ingest.enrich import ApiSource, EnrichmentError
from simulators.publisher import Outgoing, Publisher
from tests.integration.conftest import Names, eventually, running, settings_for, wait_for_count

pytestmark = pytest.mark.integration

CLINIC = "bowvalley"
NAMES = ("Jane Example", "John Sample")
MINUTE = 60_000


@dataclass
class World:
    registry: Registry
    url: str
    moved: str  # assigned to patient 1, then to patient 2 from T
    idle: str  # registered, never assigned
    stranger: str  # not registered
    patients: tuple[str, str]
    reassigned_at: int  # T, epoch ms


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def make_world(tmp_path: Path, names: Names) -> World:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    engine = make_engine(url)
    migrate(engine)
    registry = Registry(session_factory(engine))
    registry.create_clinic(SYSTEM, s.ClinicIn(code=CLINIC, name="Bow Valley Physio", timezone="America/Edmonton"))
    token = names.prefix[4:]
    patients = (f"P-{token}-1", f"P-{token}-2")
    for code, display_name in zip(patients, NAMES, strict=True):
        registry.create_patient(SYSTEM, s.PatientIn(clinic=CLINIC, code=code, display_name=display_name))
    moved, idle, stranger = f"{names.prefix}-moved", f"{names.prefix}-idle", f"{names.prefix}-stranger"
    for device in (moved, idle):
        registry.create_device(SYSTEM, s.DeviceIn(device_id=device, clinic=CLINIC, kind="sock"))
    now = int(time.time() * 1000)
    reassigned_at = now - 2 * 3_600_000 - now % 1000
    first = registry.assign(SYSTEM, s.AssignmentIn(device_id=moved, patient=patients[0],
                                                   valid_from=at(reassigned_at - 3_600_000)))  # fmt: skip
    registry.end_assignment(SYSTEM, first.id, s.AssignmentEnd(valid_to=at(reassigned_at)))
    registry.assign(SYSTEM, s.AssignmentIn(device_id=moved, patient=patients[1], valid_from=at(reassigned_at)))
    return World(registry, url, moved, idle, stranger, patients, reassigned_at)


def telemetry(device: str, seq: int, times: list[int], root: str) -> Outgoing:
    samples = [Sample(t=t, pressure_mmhg={"ankle": 20.0 + i, "calf": 15.0}, worn=True) for i, t in enumerate(times)]
    message = Telemetry(v=1, device_id=device, seq=seq, kind="sock", samples=samples, battery_pct=90)
    return Outgoing(topic_for(device, "telemetry", root), encode(message), len(samples))


def publish(mq: Mosquitto, messages: list[Outgoing], client_id: str) -> None:
    with Publisher(mq.url, client_id) as pub:
        report = pub.publish_all(messages)
    assert report.acked == len(messages)


@contextlib.contextmanager
def serve_api(registry: Registry) -> Iterator[str]:
    """The registry's API on a free port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the registry API did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def registry_url(world: World, kind: str) -> Iterator[dict[str, Any]]:
    """Ingester settings for reading the registry ``kind`` way: the database file, or the API with a token."""
    if kind == "database":
        yield {"registry_url": world.url}
        return
    token = world.registry.create_token(SYSTEM, s.TokenIn(name="ingest", role="ingester")).token
    with serve_api(world.registry) as base:
        yield {"registry_url": base, "registry_token": token}


def assert_no_names(influx: InfluxDB, database: str) -> None:
    """No patient display name in any tag value or string field value of any measurement."""
    seen: list[str] = []
    for series in query(influx.url, database, "SHOW TAG VALUES WITH KEY =~ /.*/"):
        seen.extend(str(value) for _key, value in series["values"])
    for series in query(influx.url, database, "SHOW SERIES"):
        seen.extend(str(value[0]) for value in series["values"])
    measurements = [v[0] for series in query(influx.url, database, "SHOW MEASUREMENTS") for v in series["values"]]
    assert {"sample", "event", "status"} <= set(measurements)
    for measurement in measurements:
        for point in rows(influx.url, database, f'SELECT * FROM "{measurement}"'):
            seen.extend(value for value in point.values() if isinstance(value, str))
    assert seen
    for name in NAMES:
        for part in (name, *name.split()):
            assert not [text for text in seen if part in text], f"{part!r} is stored in InfluxDB"


@pytest.mark.parametrize("kind", ["database", "api"])
async def test_points_carry_the_patient_valid_at_their_own_time(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path, kind: str
) -> None:
    world = make_world(tmp_path, names)
    t, root = world.reassigned_at, names.topic_root
    before = [t - 5 * MINUTE + i * MINUTE for i in range(4)]  # T-5 .. T-2 min
    across = [t - 2 * MINUTE + 1, t - 1, t, t + 1, t + MINUTE]  # the boundary falls inside one message
    after = [t + 2 * MINUTE + i * MINUTE for i in range(3)]
    lonely = [t - 90 * MINUTE, t + 30 * MINUTE]
    messages = [
        telemetry(world.moved, 1, before, root),
        telemetry(world.moved, 2, across, root),
        telemetry(world.moved, 3, after, root),
        telemetry(world.idle, 1, lonely, root),
        telemetry(world.stranger, 1, lonely, root),
        Outgoing(topic_for(world.moved, "event", root),
                 encode(Event(v=1, device_id=world.moved, t=t - 1, type="donned")), 0),
        Outgoing(topic_for(world.moved, "event", root),
                 encode(Event(v=1, device_id=world.moved, t=t, type="doffed")), 0),
        Outgoing(topic_for(world.moved, "status", root), encode(Status(v=1, state="online", t=t + 5)), 0),
        Outgoing(topic_for(world.stranger, "status", root), encode(Status(v=1, state="online", t=t)), 0),
    ]  # fmt: skip
    total = len(before) + len(across) + len(after) + 2 * len(lonely)
    with registry_url(world, kind) as registry:
        settings = settings_for(mosquitto, influx, names, registry_refresh_s=0.5, **registry)
        async with running(settings) as ingester:
            await asyncio.to_thread(publish, mosquitto, messages, f"pub-{names.client_id}")
            stored = await wait_for_count(influx, names.database, "SELECT count(ankle_mmhg) FROM sample", total)
            assert stored == total
            assert await wait_for_count(influx, names.database, "SELECT count(count) FROM event", 2) == 2
            assert await wait_for_count(influx, names.database, "SELECT count(state) FROM status", 2) == 2

    samples = rows(influx.url, names.database, "SELECT * FROM sample")
    holder = {p["time"]: p for p in samples if p["device"] == world.moved}
    assert len(holder) == len(before) + len(across) + len(after)
    for ts, point in holder.items():
        expected = world.patients[0] if ts < t else world.patients[1]
        assert (point["patient"], point["clinic"], point.get("attribution")) == (expected, CLINIC, None), ts
    assert holder[t - 1]["patient"] == world.patients[0] and holder[t]["patient"] == world.patients[1]
    for device, reason in ((world.idle, "unassigned"), (world.stranger, "unregistered")):
        kept = [p for p in samples if p["device"] == device]
        assert len(kept) == len(lonely)
        assert all(p["attribution"] == reason and p.get("patient") is None and p.get("clinic") is None for p in kept)
    # The filters docs/schema.md shows.
    attributed = len(before) + len(across) + len(after)
    count = "SELECT count(ankle_mmhg) FROM sample WHERE "
    assert rows(influx.url, names.database, count + "patient != ''")[0]["count"] == attributed
    assert rows(influx.url, names.database, count + "attribution = 'unassigned'")[0]["count"] == len(lonely)
    assert rows(influx.url, names.database, count + "attribution != ''")[0]["count"] == 2 * len(lonely)
    events = {p["type"]: p for p in rows(influx.url, names.database, "SELECT * FROM event")}
    assert events["donned"]["patient"] == world.patients[0] and events["doffed"]["patient"] == world.patients[1]
    status = {p["device"]: p for p in rows(influx.url, names.database, "SELECT * FROM status")}
    assert status[world.moved]["patient"] == world.patients[1]
    assert status[world.stranger]["attribution"] == "unregistered"

    metric = ingester.metrics.value
    unattributed = "compression_ingest_unattributed_points_total"
    assert metric(unattributed, measurement="sample", reason="unassigned") == len(lonely)
    assert metric(unattributed, measurement="sample", reason="unregistered") == len(lonely)
    assert metric(unattributed, measurement="status", reason="unregistered") == 1
    assert metric("compression_ingest_registry_version") == world.registry.version()
    assert_no_names(influx, names.database)


async def test_a_registry_change_is_picked_up_while_running(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    world = make_world(tmp_path, names)
    root, refresh_s = names.topic_root, 0.3
    now = int(time.time() * 1000)
    settings = settings_for(mosquitto, influx, names, registry_url=world.url, registry_refresh_s=refresh_s)
    async with running(settings) as ingester:
        await asyncio.to_thread(publish, mosquitto, [telemetry(world.idle, 1, [now - 2 * MINUTE], root)],
                                f"pub-{names.client_id}")  # fmt: skip
        assert await wait_for_count(influx, names.database, "SELECT count(ankle_mmhg) FROM sample", 1) == 1
        # A physio hands the idle garment to patient 1 from a minute ago.
        world.registry.assign(SYSTEM, s.AssignmentIn(device_id=world.idle, patient=world.patients[0],
                                                     valid_from=at(now - MINUTE)))  # fmt: skip
        changed = time.monotonic()
        version = world.registry.version()
        enrichment = ingester.enrichment
        assert enrichment is not None
        assert await eventually(lambda: enrichment.attributions is not None
                                and enrichment.attributions.version == version, timeout=10)  # fmt: skip
        assert time.monotonic() - changed < 4 * refresh_s + 1
        await asyncio.to_thread(publish, mosquitto, [telemetry(world.idle, 2, [now - 30_000, now], root)],
                                f"pub-{names.client_id}")  # fmt: skip
        assert await wait_for_count(influx, names.database, "SELECT count(ankle_mmhg) FROM sample", 3) == 3
    points = {p["time"]: p for p in rows(influx.url, names.database, "SELECT * FROM sample")}
    assert points[now - 2 * MINUTE]["attribution"] == "unassigned"  # written before: a tag is fixed when written
    assert points[now - 30_000]["patient"] == world.patients[0]
    assert points[now]["patient"] == world.patients[0]


async def test_api_source_answers_unchanged_with_304_and_refuses_a_bad_token(tmp_path: Path, names: Names) -> None:
    world = make_world(tmp_path, names)
    token = world.registry.create_token(SYSTEM, s.TokenIn(name="ingest", role="ingester")).token
    assert token is not None
    with serve_api(world.registry) as base:
        source = ApiSource(base, token)
        try:
            first = await source.load(None)
            assert first is not None and first.version == world.registry.version()
            assert world.moved in first.devices and world.stranger not in first.devices
            assert await source.load(first.version) is None  # 304: unchanged
            world.registry.assign(SYSTEM, s.AssignmentIn(device_id=world.idle, patient=world.patients[0]))
            second = await source.load(first.version)
            assert second is not None and second.version > first.version
            assert any(a.device_id == world.idle for a in second.assignments)
            assert "Jane" not in second.model_dump_json()
        finally:
            await source.close()
        wrong = ApiSource(base, "not-a-token")
        try:
            with pytest.raises(EnrichmentError, match="401"):
                await wrong.load(None)
        finally:
            await wrong.close()


async def test_nothing_is_read_before_the_first_snapshot(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    """Tags are permanent: while the registry cannot be read, the ingester waits (and still stops on request)."""
    path = tmp_path / "later" / "registry.db"
    settings = settings_for(mosquitto, influx, names, registry_url=f"sqlite:///{path}", retry_max_s=0.2)
    ingester = Ingester(settings)
    task = asyncio.create_task(ingester.run())
    failed = "compression_ingest_registry_refresh_failures_total"
    assert await eventually(lambda: ingester.metrics.value(failed) >= 3, timeout=10)
    assert ingester.metrics.value("compression_ingest_broker_connected") == 0 and not task.done()
    assert not path.parent.exists()  # the ingester only reads: it creates no database
    ingester.stop()
    await asyncio.wait_for(task, timeout=10)

    world = make_world(tmp_path, names)  # the registry appears: the next ingester starts with it
    async with running(settings_for(mosquitto, influx, names, registry_url=world.url)) as started:
        assert started.enrichment is not None and started.enrichment.attributions is not None
