"""InfluxDB refusing lines (4xx) must not poison a batch; auth and database creation work."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from compression.influxql import rows, scalar
from compression.localservers import InfluxDB, Mosquitto, start_influxdb
from devices.protocol import Sample, Telemetry, encode, topic_for
from simulators.publisher import LoadSpec, Outgoing, Publisher, generate
from tests.integration.conftest import Names, eventually, running, settings_for, wait_for_count

pytestmark = pytest.mark.integration


def influx_admin(db: InfluxDB, q: str, auth: tuple[str, str] | None = None) -> None:
    params = {"q": q} if auth is None else {"q": q, "u": auth[0], "p": auth[1]}
    request = urllib.request.Request(f"{db.url}/query?{urllib.parse.urlencode(params)}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200


def mixed_message(device: str, root: str, seq: int, now: int) -> tuple[Outgoing, int, int]:
    """Recent samples and samples older than the database's 1 h retention, interleaved."""
    ages = [5, 150, 10, 180, 15, 20, 200, 25]  # minutes
    samples = [Sample(t=now - a * 60_000 - seq * 1000, worn=True, pressure_mmhg={"ankle": 20.0 + a / 10}) for a in ages]
    message = Telemetry(v=1, device_id=device, kind="sock", seq=seq, samples=samples)
    old = sum(1 for a in ages if a > 60)
    return Outgoing(topic_for(device, "telemetry", root), encode(message), len(ages)), len(ages) - old, old


async def test_lines_influx_refuses_are_dead_lettered_and_the_rest_kept(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names
) -> None:
    # A 1 h retention policy: InfluxDB answers 400 "partial write: points beyond
    # retention policy" for older points, and stores the others of the batch.
    influx_admin(influx, f'CREATE DATABASE "{names.database}" WITH DURATION 1h NAME "short"')
    now = int(time.time() * 1000)
    devices = [f"{names.prefix}-{i:03d}" for i in range(12)]
    built = [mixed_message(d, names.topic_root, s, now) for d in devices for s in range(3)]
    recent = sum(b[1] for b in built)
    old = sum(b[2] for b in built)
    async with running(settings_for(mosquitto, influx, names, batch_size=500)) as ingester:

        def publish() -> None:
            with Publisher(mosquitto.url, f"pub-{names.client_id}") as pub:
                pub.publish_all([b[0] for b in built])

        await asyncio.to_thread(publish)
        await wait_for_count(influx, names.database, "SELECT count(raw_bytes) FROM rejected", old)
        acked = ingester.metrics.value
        # The dead letters are written just before the batch's acks go out.
        assert await eventually(lambda: acked("compression_ingest_messages_acked_total") == len(built))
        assert ingester.metrics.value("compression_ingest_rejected_total", reason="influx_rejected") == old
        assert ingester.metrics.value("compression_ingest_samples_written_total") == recent
    assert scalar(influx.url, names.database, "SELECT count(ankle_mmhg) FROM sample") == recent
    letters = rows(influx.url, names.database, "SELECT * FROM rejected")
    assert len(letters) == old
    assert {x["reason"] for x in letters} == {"influx_rejected"}
    assert {x["channel"] for x in letters} == {"write"}
    assert set(devices) == {x["device"] for x in letters}
    assert all("retention policy" in x["detail"] for x in letters)
    assert all(str(x["raw"]).startswith("sample,device=") for x in letters)


async def test_auth_user_password_and_database_creation(mosquitto: Mosquitto, names: Names, tmp_path: Path) -> None:
    db = start_influxdb(tmp_path, auth=True)
    try:
        # With auth on, InfluxDB 1.x accepts only the creation of the first admin anonymously.
        influx_admin(db, "CREATE USER admin WITH PASSWORD 'pw-admin' WITH ALL PRIVILEGES")
        spec = LoadSpec(devices=3, messages=2, samples=4, prefix=names.prefix, topic_root=names.topic_root)
        settings = settings_for(mosquitto, db, names, influx_username="admin", influx_password="pw-admin")
        async with running(settings):
            await asyncio.to_thread(_publish_spec, mosquitto, spec, names)
            with pytest.raises(urllib.error.HTTPError) as refused:  # auth is really on
                scalar(db.url, names.database, "SELECT count(ankle_mmhg) FROM sample")
            assert refused.value.code == 401
            stored = await asyncio.to_thread(_authed_count, db, names.database)
            deadline = time.monotonic() + 30
            while stored < spec.total_samples and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                stored = await asyncio.to_thread(_authed_count, db, names.database)
        assert stored == spec.total_samples, "the ingester created the database and wrote with its credentials"
    finally:
        db.stop()


def _publish_spec(mq: Mosquitto, spec: LoadSpec, names: Names) -> None:
    with Publisher(mq.url, f"pub-{names.client_id}") as pub:
        pub.publish_all(list(generate(spec)))


def _authed_count(db: InfluxDB, database: str) -> int:
    params = urllib.parse.urlencode({"db": database, "q": "SELECT count(ankle_mmhg) FROM sample",
                                     "u": "admin", "p": "pw-admin"})  # fmt: skip
    with urllib.request.urlopen(f"{db.url}/query?{params}", timeout=10) as resp:
        body = resp.read().decode()
    series = json.loads(body)["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0
