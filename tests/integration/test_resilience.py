"""Nothing is lost: ingester crash, database outage, broker restart, shared load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from compression.influxql import scalar
from compression.localservers import InfluxDB, Mosquitto, free_port
from simulators.publisher import LoadSpec, Publisher, PublishReport, generate
from tests.integration.conftest import IngestProcess, Names, running, settings_for, wait_for_count

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COUNT = "SELECT count(ankle_mmhg) FROM sample"


class Background:
    """A publisher running in a thread while the test breaks things."""

    def __init__(self, mq: Mosquitto, spec: LoadSpec, client_id: str, rate: float | None = None) -> None:
        self.report: PublishReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(mq, spec, client_id, rate), daemon=True)
        self._thread.start()

    def _run(self, mq: Mosquitto, spec: LoadSpec, client_id: str, rate: float | None) -> None:
        try:
            with Publisher(mq.url, client_id) as pub:
                self.report = pub.publish_all(list(generate(spec)), rate=rate, ack_timeout=240)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self, timeout: float = 300) -> PublishReport:
        self._thread.join(timeout)
        assert self.error is None, f"publisher failed: {self.error!r}"
        assert self.report is not None, "publisher did not finish"
        return self.report


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def spec_for(names: Names, devices: int, messages: int) -> LoadSpec:
    return LoadSpec(devices=devices, messages=messages, samples=10, prefix=names.prefix,
                    topic_root=names.topic_root, period_ms=1000)  # fmt: skip


def test_kill_9_midstream_then_restart_loses_nothing(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    spec = spec_for(names, devices=100, messages=40)
    ingester = IngestProcess(settings_for(mosquitto, influx, names), tmp_path / "ingest.log")
    ingester.start()
    publisher = Background(mosquitto, spec, f"pub-{names.client_id}", rate=20_000)
    wait_until(lambda: ingester.metric("compression_ingest_samples_written_total") >= spec.total_samples * 0.3,
               60, "ingester wrote too little before the kill")  # fmt: skip
    ingester.kill()
    written_before = scalar(influx.url, names.database, COUNT)
    assert 0 < written_before < spec.total_samples, "the kill must land mid-stream"
    time.sleep(1)
    ingester.start()  # same client id: the persistent session hands back what was not acked
    publisher.join()
    final = asyncio.run(wait_for_count(influx, names.database, COUNT, spec.total_samples, timeout=120))
    time.sleep(1)
    assert final == spec.total_samples
    assert scalar(influx.url, names.database, COUNT) == spec.total_samples  # stored once, not more
    assert ingester.terminate() == 0


def test_database_outage_of_30s_loses_nothing_and_memory_stays_bounded(
    mosquitto: Mosquitto, own_influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    window = 1000
    spec = spec_for(names, devices=50, messages=90)  # 45,000 samples over ~40 s
    ingester = IngestProcess(settings_for(mosquitto, own_influx, names, inflight_max=window), tmp_path / "in.log")
    ingester.start()
    proc = psutil.Process(ingester.proc.pid)  # type: ignore[union-attr]
    publisher = Background(mosquitto, spec, f"pub-{names.client_id}", rate=1_200)
    wait_until(lambda: ingester.metric("compression_ingest_samples_written_total") > 2000, 30, "no writes")
    baseline_rss = proc.memory_info().rss
    own_influx.stop()
    outage_end = time.monotonic() + 30
    peak_rss = peak_inflight = 0.0
    while time.monotonic() < outage_end:
        peak_rss = max(peak_rss, proc.memory_info().rss)
        peak_inflight = max(peak_inflight, ingester.metric("compression_ingest_inflight_messages"))
        time.sleep(0.2)
    written_during = ingester.metric("compression_ingest_samples_written_total")
    own_influx.start()
    publisher.join()
    final = asyncio.run(wait_for_count(own_influx, names.database, COUNT, spec.total_samples, timeout=120))
    assert final == spec.total_samples
    assert peak_inflight == window, "during the outage the window fills and reading then waits"
    assert peak_rss < 150 * 2**20, f"RSS {peak_rss / 2**20:.0f} MB during the outage"
    assert peak_rss - baseline_rss < 40 * 2**20, "memory grew during the outage"
    assert ingester.metric("compression_ingest_write_errors_total") > 0
    assert written_during < spec.total_samples
    assert ingester.terminate() == 0


async def test_broker_restart_midstream_loses_nothing(own_mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    spec = spec_for(names, devices=40, messages=50)
    async with running(settings_for(own_mosquitto, influx, names)) as ingester:
        publisher = Background(own_mosquitto, spec, f"pub-{names.client_id}", rate=8_000)
        while ingester.metrics.value("compression_ingest_samples_written_total") < spec.total_samples * 0.3:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(own_mosquitto.stop)  # SIGTERM: Mosquitto saves its persistence file
        assert (own_mosquitto.folder / "mosquitto.db").stat().st_size > 0, "persistence is on and writable"
        await asyncio.sleep(2)
        await asyncio.to_thread(own_mosquitto.start)
        await asyncio.to_thread(publisher.join)
        final = await wait_for_count(influx, names.database, COUNT, spec.total_samples, timeout=120)
        assert ingester.metrics.value("compression_ingest_broker_reconnects_total") >= 1
    assert final == spec.total_samples


async def test_two_ingesters_share_the_load_exactly_once(mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    spec = spec_for(names, devices=60, messages=40)
    group = f"g{names.client_id}"
    first = settings_for(mosquitto, influx, names, mqtt_share_group=group, mqtt_client_id=f"{names.client_id}-a")
    second = settings_for(mosquitto, influx, names, mqtt_share_group=group, mqtt_client_id=f"{names.client_id}-b")
    async with running(first) as a, running(second) as b:
        await asyncio.to_thread(Background(mosquitto, spec, f"pub-{names.client_id}").join)
        final = await wait_for_count(influx, names.database, COUNT, spec.total_samples)
        await asyncio.sleep(0.5)
    assert final == spec.total_samples
    got_a = a.metrics.value("compression_ingest_samples_written_total")
    got_b = b.metrics.value("compression_ingest_samples_written_total")
    assert got_a > 0 and got_b > 0, "both members of the group received messages"
    assert got_a + got_b == spec.total_samples, "no message was delivered to both"


def test_sigterm_flushes_and_acks(mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path) -> None:
    spec = spec_for(names, devices=5, messages=4)
    # A long flush interval: without the shutdown flush nothing would be written yet.
    settings = settings_for(mosquitto, influx, names, flush_interval_ms=60_000)
    ingester = IngestProcess(settings, tmp_path / "ingest.log")
    ingester.start()
    Background(mosquitto, spec, f"pub-{names.client_id}").join()
    wait_until(lambda: ingester.metric("compression_ingest_messages_received_total") == 20, 10, "not received")
    assert scalar(influx.url, names.database, COUNT) == 0
    assert ingester.terminate() == 0
    assert scalar(influx.url, names.database, COUNT) == spec.total_samples
    assert "20 messages acked" in (tmp_path / "ingest.log").read_text()


def test_sigterm_during_startup_wait_for_influxdb(mosquitto: Mosquitto, names: Names, tmp_path: Path) -> None:
    nowhere = InfluxDB("influxdb", tmp_path, free_port(), [])  # nothing listens there
    ingester = IngestProcess(settings_for(mosquitto, nowhere, names), tmp_path / "ingest.log")
    ingester.proc = subprocess.Popen([sys.executable, "-m", "compression", "ingest"], env=ingester.env(),
                                     stdout=(tmp_path / "ingest.log").open("ab"), stderr=subprocess.STDOUT)  # fmt: skip
    time.sleep(1.5)
    assert ingester.proc.poll() is None, "waits for InfluxDB instead of exiting"
    started = time.monotonic()
    assert ingester.terminate(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert "stopped before InfluxDB answered" in (tmp_path / "ingest.log").read_text()
