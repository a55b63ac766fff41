"""The ingester: consume -> decode -> batch -> write -> ack, wired together.

Each MQTT message is acknowledged only after every line it produced (its
samples, or its dead letter) is durably written to InfluxDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from devices.files import open_private_append
from devices.protocol import TimeWindow
from ingest.batch import Batch, Batcher, Entry, OrderedAcker
from ingest.consume import MqttConsumer
from ingest.decode import DecodeConfig, Decoder
from ingest.encode import HEALTH_EVERY_S, attribute, health_line, receipt_lines, rejected_line
from ingest.enrich import Enrichment, source_for
from ingest.metrics import IngestMetrics
from ingest.settings import IngestSettings, redact_url
from ingest.write import InfluxWriter, RefusedLine, StoppedError

log = logging.getLogger(__name__)


class Ingester:
    """One ingester process: owns the consumer, the batcher and the writers."""

    def __init__(self, settings: IngestSettings, metrics: IngestMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or IngestMetrics()
        window = TimeWindow(settings.max_future_s * 1000, settings.max_age_s * 1000)
        self._decoder = Decoder(DecodeConfig(settings.mqtt_topic_root, window, settings.max_wear_gap_s))
        self._batcher = Batcher(settings.batch_size, settings.flush_interval_ms / 1000)
        self._stop = asyncio.Event()
        self._consumer: MqttConsumer | None = None
        self._acker: OrderedAcker | None = None
        self._received = {c: self.metrics.received.labels(c) for c in ("telemetry", "event", "status", "unknown")}
        self._metrics_runner: web.AppRunner | None = None
        self._busy = 0
        self._internal_errors: dict[tuple[str, str], int] = {}
        self.metrics_port: int | None = None
        self.enrichment: Enrichment | None = None
        if settings.registry_url:
            source = source_for(settings.registry_url, settings.registry_token)
            self.enrichment = Enrichment(source, settings.registry_refresh_s, self.metrics,
                                         settings.retry_initial_s, settings.retry_max_s)  # fmt: skip

    def stop(self) -> None:
        """Ask for a clean shutdown: flush, write, ack, disconnect."""
        self._stop.set()

    # -- the message path -------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, entry: Entry, retained: bool = False) -> None:
        enrichment = self.enrichment
        attributions = enrichment.attributions if enrichment is not None else None  # one cache for the message
        try:
            decoded = self._decoder.decode(topic, payload, time.time_ns(), retained, attributions)
        except Exception as exc:  # noqa: BLE001 (a bug: logged once per kind with its traceback, dead-lettered)
            self._log_internal_error("decoder", topic, exc)
            decoded = self._decoder.internal_error(topic, payload, time.time_ns(), exc)
        counter = self._received.get(topic.rsplit("/", 1)[-1]) or self._received["unknown"]
        counter.inc()
        if enrichment is not None and attributions is not None:
            try:
                unattributed = (decoded.unattributed if decoded.attributed
                                else attribute(decoded.lines, decoded.samples, attributions))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 (as above)
                self._log_internal_error("enrichment", topic, exc)
                decoded = self._decoder.internal_error(topic, payload, time.time_ns(), exc)
                unattributed = ()
            for measurement, device, reason, points in unattributed:
                enrichment.unattributed(measurement, device, reason, points)
            if not retained:  # a retained delivery is the broker's old copy, not data that just arrived
                decoded.lines.extend(receipt_lines(decoded.lines, decoded.samples, int(time.time() * 1000)))
        for reason in decoded.rejections:
            self.metrics.rejected.labels(reason).inc()
        self._batcher.add(entry, decoded.lines, decoded.samples, decoded.newest_ms)
        consumer = self._consumer
        if consumer is not None and consumer.unacked >= self.settings.inflight_max:
            # Nothing more arrives until acks go out: write now.
            self._batcher.cut()

    def _log_internal_error(self, stage: str, topic: str, exc: Exception) -> None:
        """A bug met on a message: the traceback once per stage and exception type, then a count (a sender that
        found the bug must not be able to fill the log with tracebacks)."""
        kind = (stage, type(exc).__name__)
        self._internal_errors[kind] = seen = self._internal_errors.get(kind, 0) + 1
        if seen == 1:
            log.error("%s failed on a message from %r (dead-lettered as internal_error; further %s in %s are "
                      "counted, not logged)", stage, topic[:200], kind[1], stage, exc_info=exc)  # fmt: skip
        elif seen in (10, 100) or seen % 1000 == 0:
            log.warning("%s failed %d times with %s (internal_error dead letters)", stage, seen, kind[1])

    async def _write_loop(self, writer: InfluxWriter) -> None:
        assert self._acker is not None
        while True:
            batch = await self._batcher.queue.get()
            self._busy += 1
            try:
                await self._write_batch(writer, batch)
            finally:
                self._busy -= 1

    async def _write_batch(self, writer: InfluxWriter, batch: Batch) -> None:
        assert self._acker is not None
        started = time.monotonic()
        refused = await writer.write(batch.lines)
        if refused:
            await self._dead_letter_refused(writer, refused)
        self.metrics.batch_latency.observe(time.monotonic() - started)
        self.metrics.batch_lines.observe(len(batch.lines))
        self.metrics.lines_written.inc(len(batch.lines) - len(refused))
        self.metrics.samples_written.inc(batch.samples - _refused_samples(refused))
        if batch.newest_sample_ms:
            self.metrics.lag.set(time.time() - batch.newest_sample_ms / 1000)
        self._acker.complete(batch)

    async def _dead_letter_refused(self, writer: InfluxWriter, refused: list[RefusedLine]) -> None:
        now = time.time_ns()
        letters = []
        for i, item in enumerate(refused):
            self.metrics.rejected.labels("influx_rejected").inc()
            letters.append(rejected_line(
                device=_device_of(item.line), channel="write", reason="influx_rejected",
                detail=item.error, raw=item.line.encode(), ts_ns=now + i))  # fmt: skip
        log.warning("InfluxDB refused %d line(s); dead-lettered: %s", len(refused), refused[0].error[:300])
        still = await writer.write(letters)
        if still:
            self._fallback_file(still)

    def _fallback_file(self, refused: list[RefusedLine]) -> None:
        path = Path(self.settings.dead_letter_file)
        # Raw device payloads: the owner's only (0600), like the monitor's state file.
        with os.fdopen(open_private_append(path), "a", encoding="utf-8") as fh:
            for item in refused:
                fh.write(json.dumps({"line": item.line, "error": item.error, "at_ns": time.time_ns()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.metrics.dead_letter_fallback.inc(len(refused))
        log.error("%d dead letter(s) refused by InfluxDB too; kept in %s", len(refused), path)

    # -- lifecycle ----------------------------------------------------------
    async def run(self) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT when installed by the CLI)."""
        s = self.settings
        log.info("ingest starting: mqtt=%s influx=%s db=%s batch=%d flush=%dms window=%d registry=%s",
                 redact_url(s.mqtt_url), s.influx_url, s.influx_database, s.batch_size,
                 s.flush_interval_ms, s.inflight_max,
                 self.enrichment.source.describe() if self.enrichment else "none")  # fmt: skip
        async with InfluxWriter(s, self.metrics) as writer:
            if (
                s.influx_create_database
                and not s.influx_token
                and not await self._unless_stopped(writer.ensure_database())
            ):
                log.info("stopped before InfluxDB answered")
                return
            await self._start_metrics(writer)
            try:
                if self.enrichment is not None and not await self._unless_stopped(self.enrichment.start()):
                    # Tags are written once and for all: no message is read before the first snapshot.
                    log.info("stopped before the registry answered")
                    return
                await self._consume(writer)
            finally:
                if self.enrichment is not None:
                    await self.enrichment.close()
                if self._metrics_runner is not None:
                    await self._metrics_runner.cleanup()
                    self._metrics_runner = None

    async def _consume(self, writer: InfluxWriter) -> None:
        s = self.settings
        consumer = MqttConsumer(s, self.metrics, self._on_message)
        self._consumer = consumer
        self._acker = OrderedAcker(consumer.ack)
        tasks = [asyncio.create_task(self._write_loop(writer)) for _ in range(s.write_concurrency)]
        tasks += [asyncio.create_task(consumer.run()), asyncio.create_task(self._batcher.run_timer())]
        tasks.append(asyncio.create_task(self._heartbeat(writer, consumer)))
        if self.enrichment is not None:
            tasks.append(asyncio.create_task(self.enrichment.run()))
        try:
            await self._supervise(tasks)
        finally:
            await self._shutdown(writer, consumer, tasks)

    async def _heartbeat(self, writer: InfluxWriter, consumer: MqttConsumer) -> None:
        """While connected to the broker, an ``ingest_health`` point every :data:`HEALTH_EVERY_S` (docs/schema.md):
        the monitor tells a pipeline outage (no heartbeat, no receipt) from patients who went quiet."""
        last = -HEALTH_EVERY_S
        while not self._stop.is_set():
            if consumer.is_connected and time.monotonic() - last >= HEALTH_EVERY_S:
                line = health_line(self.settings.mqtt_client_id, int(time.time() * 1000))
                with contextlib.suppress(StoppedError):
                    await writer.write([line])
                    last = time.monotonic()
            with contextlib.suppress(TimeoutError):  # look again each second: the first beat follows the connection
                await asyncio.wait_for(self._stop.wait(), 1.0)

    async def _unless_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` unless a stop comes first (start-up waits must honour SIGTERM)."""
        task = asyncio.create_task(work)
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
        task.result()
        return True

    async def _supervise(self, tasks: list[asyncio.Task[None]]) -> None:
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and task.exception() is not None:
                stop.cancel()
                raise task.exception()  # type: ignore[misc]
        stop.cancel()

    async def _shutdown(self, writer: InfluxWriter, consumer: MqttConsumer, tasks: list[asyncio.Task[None]]) -> None:
        log.info("shutting down: flushing what was received")
        consumer.pause_for_shutdown()
        self._batcher.cut()
        try:
            await asyncio.wait_for(self._drain(), timeout=15)
        except TimeoutError:
            log.warning("shutdown: writes still pending after 15 s; the broker will redeliver them")
        writer.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await consumer.close()
        log.info("ingest stopped: %d messages acked, %d samples written",
                 int(self.metrics.value("compression_ingest_messages_acked_total")),
                 int(self.metrics.value("compression_ingest_samples_written_total")))  # fmt: skip

    async def _drain(self) -> None:
        # Polled: three conditions, checked only during a bounded shutdown.
        while not self._batcher.queue.empty() or self._busy or (self._acker and self._acker.waiting):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def _start_metrics(self, writer: InfluxWriter) -> None:
        if not self.settings.metrics_enabled:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/healthz", self._health_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.metrics_host, self.settings.metrics_port)
        await site.start()
        self._metrics_runner = runner
        self.metrics_port = _bound_port(runner, self.settings.metrics_port)
        log.info("metrics on http://%s:%s/metrics", self.settings.metrics_host, self.metrics_port)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    async def _health_handler(self, request: web.Request) -> web.Response:
        ok = self._consumer is not None and self._consumer.is_connected
        return web.json_response({"broker_connected": ok}, status=200 if ok else 503)


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    """The port actually bound (differs from the setting when that is 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


def _device_of(line: str) -> str:
    start = line.find(",device=")
    if start < 0:
        return "_unknown"
    start += len(",device=")
    end = min((i for i in (line.find(",", start), line.find(" ", start)) if i >= 0), default=len(line))
    return line[start:end] or "_unknown"


def _refused_samples(refused: list[RefusedLine]) -> int:
    return sum(1 for r in refused if r.line.startswith("sample,"))


async def run_ingester(settings: IngestSettings) -> None:
    """Run one ingester with SIGTERM/SIGINT wired to a clean shutdown."""
    ingester = Ingester(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ingester.stop)
    await ingester.run()
