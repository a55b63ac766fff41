"""``compression demo``: the whole path on this machine, ending with what was stored."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path

import click

from compression.influxql import rows, scalar
from compression.localservers import InfluxDB, Mosquitto, start_influxdb, start_mosquitto
from devices.protocol import topic_for
from ingest.app import Ingester
from ingest.settings import IngestSettings
from simulators.publisher import LoadSpec, Outgoing, Publisher, generate

DATABASE = "compression_demo"


def _bad_messages() -> list[Outgoing]:
    now = int(time.time() * 1000)

    def sample(t: int, ankle: str) -> str:
        return f'{{"t":{t},"worn":true,"pressure_mmhg":{{"ankle":{ankle}}}}}'

    good = sample(now, "24.0")
    partly_bad = f"[{good},{sample(now, '400')},{sample(now + 3_600_000, '24')}]"

    return [
        Outgoing(topic_for("sock-bad1", "telemetry"), b"this is not json", 0),
        Outgoing(topic_for("sock-bad2", "telemetry"),
                 f'{{"v":1,"device_id":"someone-else","kind":"sock","seq":1,"samples":[{good}]}}'.encode(), 0),
        Outgoing(topic_for("sock-bad3", "telemetry"),
                 f'{{"v":1,"device_id":"sock-bad3","kind":"sock","seq":1,"samples":{partly_bad}}}'.encode(), 1),
    ]  # fmt: skip


def _say(text: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + text)


async def _ingest_and_publish(mq: Mosquitto, db: InfluxDB, spec: LoadSpec) -> Ingester:
    settings = IngestSettings(mqtt_url=mq.url, influx_url=db.url, influx_database=DATABASE, metrics_port=0,
                              mqtt_client_id=f"demo-ingest-{uuid.uuid4().hex[:6]}")  # fmt: skip
    ingester = Ingester(settings)
    task = asyncio.create_task(ingester.run())
    await asyncio.sleep(0.5)
    _say(f"ingester running (metrics: http://127.0.0.1:{ingester.metrics_port}/metrics)")
    messages = [*generate(spec), *_bad_messages()]

    def publish() -> None:
        with Publisher(mq.url, "demo-publisher") as pub:
            report = pub.publish_all(messages)
        _say(f"published {report.messages} messages ({report.samples} samples) in {report.seconds:.2f} s")

    await asyncio.to_thread(publish)
    expected = spec.total_samples + 1
    deadline = time.monotonic() + 60
    while ingester.metrics.value("compression_ingest_samples_written_total") < expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    ingester.stop()
    await task
    return ingester


def _summary(db: InfluxDB, ingester: Ingester, spec: LoadSpec) -> int:
    stored = scalar(db.url, DATABASE, "SELECT count(ankle_mmhg) FROM sample")
    per_device = rows(db.url, DATABASE, "SELECT count(ankle_mmhg) AS n, last(battery_pct) AS battery "
                                         "FROM sample GROUP BY device")  # fmt: skip
    wear = rows(db.url, DATABASE, "SELECT sum(worn_s) / 3600 AS hours FROM sample GROUP BY device")
    rejected = rows(db.url, DATABASE, "SELECT count(raw_bytes) AS n FROM rejected GROUP BY reason")
    click.echo()
    _say(f"InfluxDB {db.url} database {DATABASE!r}:")
    click.echo(f"    samples stored: {int(stored):,} (expected {spec.total_samples + 1:,}: "
               f"{spec.total_samples:,} simulated + 1 good sample in a partly bad message)")  # fmt: skip
    click.echo(f"    devices: {len(per_device)}; first three:")
    hours = {r["device"]: r["hours"] for r in wear}
    for r in sorted(per_device, key=lambda r: r["device"])[:3]:
        click.echo(f"      {r['device']:<12} {r['n']:>6} samples, battery {r['battery']} %, "
                   f"worn {hours.get(r['device'], 0):.1f} h")  # fmt: skip
    click.echo("    rejected (dead letters, by reason):")
    for r in rejected:
        click.echo(f"      {r['reason']:<22} {r['n']}")
    acked = ingester.metrics.value("compression_ingest_messages_acked_total")
    click.echo(f"    ingester: {int(acked):,} messages acknowledged after their write")
    ok = int(stored) == spec.total_samples + 1
    _say("all readings stored" if ok else "MISSING READINGS: see the logs above")
    return 0 if ok else 1


def run_demo(devices: int, messages: int, data_dir: str, keep: bool, started: float) -> int:
    """Start local servers, ingest a simulated fleet, print a summary; 0 on success."""
    root = Path(data_dir)
    _forget_previous_runs(root)
    _say(f"starting Mosquitto and InfluxDB on free loopback ports under {root}/")
    mq = start_mosquitto(root)
    db = start_influxdb(root)
    try:
        _say(f"Mosquitto {mq.url}, InfluxDB {db.url}")
        spec = LoadSpec(devices=devices, messages=messages, samples=10)
        ingester = asyncio.run(_ingest_and_publish(mq, db, spec))
        code = _summary(db, ingester, spec)
        _say(f"demo finished in {time.monotonic() - started:.1f} s")
        if keep:
            _say(f"servers still running; try: curl '{db.url}/query?db={DATABASE}&q=SHOW+MEASUREMENTS' (Ctrl-C stops)")
            _wait_forever()
        return code
    finally:
        mq.stop()
        db.stop()


def _forget_previous_runs(root: Path) -> None:
    """Remove the server folders of earlier demo runs (each run uses new ports, so new folders)."""
    for folder in [*root.glob("mosquitto-*"), *root.glob("influxdb-*")]:
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
