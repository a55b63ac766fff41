#!/usr/bin/env python3
"""Ingest benchmark: MQTT -> ``compression ingest`` -> InfluxDB on loopback, against the targets.

Everything runs on real servers started by :mod:`compression.localservers`
(Mosquitto and InfluxDB as plain processes on free loopback ports under
``--data-dir``); the ingester runs as its own process (``compression ingest``)
so that its CPU time and RSS can be measured with psutil.

Phases (``--skip`` leaves one out):

throughput
    200 devices x 100 messages x 10 samples (200,000 samples), pre-generated,
    published at QoS 1 as fast as possible. End to end = first publish until
    ``SELECT count(ankle_mmhg) FROM sample`` returns exactly the total.
    Done once with the project's paho ``Publisher`` (``--paho-publishers``
    processes) and once with a minimal raw-socket QoS 1 publisher that costs
    the shared CPUs almost nothing (so the second number is limited by the
    ingester, broker and database, not by the load generator).
raw
    The same 200,000 points (``ingest.encode.telemetry_lines``) POSTed straight
    to InfluxDB ``/write`` in 5000-line batches, 2 at a time (the ingester's
    defaults), into a fresh database: the ceiling the ingester is compared to.
latency
    A paced run (10,000 samples/s for 30 s by default) whose samples are
    stamped with their publish time. The last sample of each message is the
    only point carrying ``battery_pct``; every ~50 ms the bench asks InfluxDB
    which of those points are visible and stamps each newly seen message with
    the time that answer arrived. Latency = that time - the message's publish
    time (an upper bound; the previous poll gives the lower bound).
outage
    A paced stream; InfluxDB is stopped (SIGTERM) for 25 s while publishing
    goes on, then restarted on the same port and data. Reports the ingester's
    peak RSS during the outage, the catch-up time and that every sample is stored.
profile
    When a target is missed (``--profile auto``), one more throughput run with
    py-spy attached to the ingester; the summary groups samples by stage.

Run ``.venv/bin/python bench/ingest_bench.py --help`` for the knobs; results go
to ``--data-dir`` (``results.json``, ``results.md``, the py-spy profile).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import paho.mqtt
import psutil

from compression.influxql import QueryError, query
from compression.localservers import (
    INFLUXD_BIN,
    MOSQUITTO_BIN,
    InfluxDB,
    Mosquitto,
    free_port,
    start_influxdb,
    start_mosquitto,
)
from devices.protocol import TOPIC_ROOT, Status, Telemetry, encode, topic_for
from ingest.decode import Decoder
from ingest.encode import telemetry_lines
from simulators.publisher import LoadSpec, Outgoing, Publisher, generate

REPO = Path(__file__).resolve().parent.parent
COMPRESSION_BIN = Path(sys.executable).parent / "compression"
PY_SPY_BIN = Path(sys.executable).parent / "py-spy"
MB = 1024 * 1024

# The targets this benchmark reports against.
TARGET_SAMPLES_PER_S = 100_000
TARGET_CPU_US_PER_SAMPLE = 5.0
TARGET_P99_S = 1.0
TARGET_RSS_MB = 150.0

_T0 = time.monotonic()


def say(text: str) -> None:
    """Progress output (stderr), stamped with the time since the bench started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Load: what is published, and by whom (publisher processes)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Paced:
    """A paced load: ``rate`` samples/s for ``seconds``, samples stamped at publish time."""

    rate: float
    seconds: float
    devices: int
    samples: int

    @property
    def message_rate(self) -> float:
        """Messages per second."""
        return self.rate / self.samples

    @property
    def messages_per_device(self) -> int:
        """Messages each device sends over the run."""
        return max(1, round(self.seconds * self.message_rate / self.devices))

    @property
    def period_ms(self) -> int:
        """Time between two samples of one device (its messages follow back to back)."""
        period = self.devices * 1000 / self.rate
        if period < 1 or period != int(period):
            raise SystemExit(f"devices x 1000 / rate must be a whole number of ms (got {period})")
        return int(period)

    def spec(self, go_ms: int) -> LoadSpec:
        """The load, its first round's last samples stamped ``go_ms``: every sample is stamped
        at most ``devices / message_rate`` seconds before it is published."""
        lead = (self.samples - 1) * self.period_ms
        return LoadSpec(
            devices=self.devices,
            messages=self.messages_per_device,
            samples=self.samples,
            period_ms=self.period_ms,
            start_ms=go_ms - lead,
        )

    @property
    def total_samples(self) -> int:
        """Samples in the whole run."""
        return self.devices * self.messages_per_device * self.samples


def _paced(messages: Iterator[Outgoing], go: float, interval: float, times: list[float]) -> Iterator[Outgoing]:
    """Yield each message at its scheduled time and record when it went out."""
    for k, out in enumerate(messages):
        delay = go + k * interval - time.time()
        if delay > 0:
            time.sleep(delay)
        times.append(time.time())
        yield out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class RawPublisher:
    """A minimal MQTT 3.1.1 QoS 1 publisher on a plain socket: pre-encoded packets, sent in
    bursts, an in-flight window, every PUBACK checked in order. Costs about a microsecond of
    CPU per message, so it leaves the shared cores to the ingester, broker and database."""

    def __init__(self, host: str, port: int, client_id: str, window: int = 1000) -> None:
        if not 0 < window < 30_000:
            raise ValueError("window must stay well below the 65,535 packet ids")
        self.window = window
        self._sock = socket.create_connection((host, port), timeout=60)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        var = b"\x00\x04MQTT\x04\x02\x00\x00"  # protocol 4 (3.1.1), clean session, keepalive off
        body = var + struct.pack("!H", len(cid)) + cid
        self._sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused the connection: {connack!r}")
        self._buffer = b""

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    @staticmethod
    def packets(messages: Sequence[Outgoing]) -> list[bytes]:
        """PUBLISH packets (QoS 1), packet ids 1, 2, ... wrapping at 65,535."""
        out = []
        for i, msg in enumerate(messages):
            topic = msg.topic.encode()
            body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", i % 65_535 + 1) + msg.payload
            out.append(b"\x32" + _varint(len(body)) + body)
        return out

    def publish(self, packets: Sequence[bytes], burst: int = 64) -> None:
        """Send every packet, at most ``window`` unacknowledged; return when all are acknowledged."""
        sent = acked = 0
        n = len(packets)
        while acked < n:
            room = min(self.window - (sent - acked), n - sent)
            while room > 0:
                k = min(room, burst)
                self._sock.sendall(b"".join(packets[sent : sent + k]))
                sent += k
                room -= k
            acked = self._read_acks(acked)

    def _read_acks(self, acked: int) -> int:
        data = self._buffer + self._sock.recv(65_536)
        if len(data) == len(self._buffer):
            raise ConnectionError("broker closed the connection")
        whole = len(data) - len(data) % 4
        for pos in range(0, whole, 4):
            kind, length, mid = data[pos], data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
            if kind != 0x40 or length != 2 or mid != acked % 65_535 + 1:
                raise ConnectionError(f"unexpected packet {data[pos : pos + 4]!r} (expected PUBACK {acked + 1})")
            acked += 1
        self._buffer = data[whole:]
        return acked

    def close(self) -> None:
        """DISCONNECT and close."""
        with contextlib.suppress(OSError):
            self._sock.sendall(b"\xe0\x00")
        self._sock.close()


def publisher_main(job: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    """A publisher process: prepare the load, wait for the go time, publish, report.

    ``job``: kind ("paho" or "raw"), url, spec (LoadSpec fields) or paced (Paced fields),
    index and count (this process publishes messages index, index+count, ...), window.
    """
    report: dict[str, Any] = {"index": job["index"]}
    try:
        url = job["url"]
        host, port = url.removeprefix("mqtt://").split(":")
        client_id = f"bench-pub-{job['index']}-{uuid.uuid4().hex[:6]}"
        times: list[float] = []
        if job.get("paced"):
            paced = Paced(**job["paced"])
            ready.put(job["index"])
            go_at: float = go.get()
            spec = paced.spec(int(go_at * 1000))
            messages: Iterator[Outgoing] = _paced(generate(spec), go_at, 1 / paced.message_rate, times)
            cpu0 = time.process_time()
            with Publisher(url, client_id, window=job["window"]) as pub:
                result = pub.publish_all(messages, ack_timeout=600)
            report.update(first=times[0], last=times[-1], messages=result.messages, samples=result.samples)
            report["times"] = times
        else:
            spec = LoadSpec(**job["spec"])
            mine = list(generate(spec))[job["index"] :: job["count"]]
            packets = RawPublisher.packets(mine) if job["kind"] == "raw" else []
            raw = RawPublisher(host, int(port), client_id, job["window"]) if job["kind"] == "raw" else None
            ready.put(job["index"])
            go_at = go.get()
            time.sleep(max(0.0, go_at - time.time()))
            cpu0 = time.process_time()
            report["first"] = time.time()
            if raw is not None:
                raw.publish(packets)
                raw.close()
            else:
                with Publisher(url, client_id, window=job["window"]) as pub:
                    pub.publish_all(mine, ack_timeout=600)
            report.update(messages=len(mine), samples=sum(m.samples for m in mine))
        report["acked"] = time.time()
        report["cpu_s"] = time.process_time() - cpu0
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the run
        report["error"] = traceback.format_exc()
    results.put(report)


class PublisherPool:
    """Publisher processes (spawned, so nothing of the parent's threads is inherited)."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        self._go = [ctx.Queue() for _ in jobs]
        self._results = ctx.Queue()
        self.procs = [
            ctx.Process(target=publisher_main, args=(job, self._ready, go, self._results), daemon=True)
            for job, go in zip(jobs, self._go, strict=True)
        ]
        for proc in self.procs:
            proc.start()

    def wait_ready(self, timeout: float = 300) -> None:
        """Wait until every process has its load ready."""
        for _ in self.procs:
            try:
                self._ready.get(timeout=timeout)
            except queue.Empty:
                self._raise_failures()
                raise TimeoutError("publisher processes did not get ready") from None

    def go(self, at: float) -> None:
        """Tell every process to start publishing at wall time ``at``."""
        for q in self._go:
            q.put(at)

    def results(self, timeout: float = 600) -> list[dict[str, Any]]:
        """Each process's report (raises if one failed)."""
        out = []
        for _ in self.procs:
            try:
                out.append(self._results.get(timeout=timeout))
            except queue.Empty:
                raise TimeoutError("publisher processes did not finish") from None
        for proc in self.procs:
            proc.join(timeout=10)
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise RuntimeError("publisher failed:\n" + errors[0])
        return sorted(out, key=lambda r: int(r["index"]))

    def _raise_failures(self) -> None:
        with contextlib.suppress(queue.Empty):
            report = self._results.get_nowait()
            if "error" in report:
                raise RuntimeError("publisher failed:\n" + report["error"])

    def terminate(self) -> None:
        """Stop whatever still runs."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


# ---------------------------------------------------------------------------
# Measurement helpers: RSS sampler, CPU accounting, the ingester process
# ---------------------------------------------------------------------------


class RssSampler:
    """Samples the RSS of named processes every ``interval`` seconds in a thread."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._procs: dict[str, psutil.Process] = {}
        self._samples: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int | None) -> None:
        """Sample ``pid`` under ``name`` (None stops sampling it)."""
        with self._lock:
            if pid is None:
                self._procs.pop(name, None)
            else:
                self._procs[name] = psutil.Process(pid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                procs = list(self._procs.items())
            now = time.time()
            for name, proc in procs:
                with contextlib.suppress(psutil.Error):
                    rss = proc.memory_info().rss
                    with self._lock:
                        self._samples.append((now, name, rss))

    def peak(self, name: str, since: float = 0.0, until: float = float("inf")) -> float:
        """Largest RSS in MB of ``name`` seen in [since, until]; 0 if none."""
        with self._lock:
            got = [rss for t, n, rss in self._samples if n == name and since <= t <= until]
        return max(got, default=0) / MB

    def count(self, name: str, since: float, until: float) -> int:
        """Number of samples of ``name`` in [since, until]."""
        with self._lock:
            return sum(1 for t, n, _ in self._samples if n == name and since <= t <= until)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._thread.join(2)


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU seconds of a live process (0 if gone)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process ((0, 0) if gone)."""
    if pid is None:
        return 0.0, 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0, 0.0
    return float(t.user), float(t.system)


def voluntary_switches(pid: int | None) -> int:
    """Voluntary context switches of a process so far: how often it went to sleep and was woken."""
    if pid is None:
        return 0
    try:
        return int(psutil.Process(pid).num_ctx_switches().voluntary)
    except psutil.Error:
        return 0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (not idle, not waiting for I/O)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0))


@dataclass
class CpuWindow:
    """CPU seconds used by each of our processes, and by everything else, over one window."""

    pids: dict[str, int | None]
    start: dict[str, float] = field(default_factory=dict)
    busy0: float = 0.0
    wall0: float = 0.0
    split0: tuple[float, float] = (0.0, 0.0)
    switches0: int = 0

    def begin(self) -> None:
        """Snapshot now."""
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.busy0 = machine_busy_seconds()
        self.wall0 = time.time()
        self.split0 = cpu_split(self.pids.get("ingester"))
        self.switches0 = voluntary_switches(self.pids.get("ingester"))

    def end(self, publishers_cpu: float) -> dict[str, float]:
        """CPU seconds per component since :meth:`begin`, plus ``other`` (other sessions, kernel)."""
        used = {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}
        if "ingester" in self.pids:
            user, system = cpu_split(self.pids["ingester"])
            used["ingester_user"], used["ingester_system"] = user - self.split0[0], system - self.split0[1]
            used["ingester_wakeups"] = voluntary_switches(self.pids["ingester"]) - self.switches0
        used["publishers"] = publishers_cpu
        busy = machine_busy_seconds() - self.busy0
        ours = sum(v for k, v in used.items() if k not in ("ingester_user", "ingester_system", "ingester_wakeups"))
        used["other"] = max(0.0, busy - ours)
        used["wall"] = time.time() - self.wall0
        used["machine_busy"] = busy
        return used


def influx_create(url: str, database: str) -> None:
    """CREATE DATABASE."""
    req = urllib.request.Request(f"{url}/query?q=CREATE+DATABASE+%22{database}%22", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def count_or_zero(url: str, database: str, q: str, timeout: float = 30.0) -> int:
    """A count query; 0 while the database or measurement does not exist, or the server is down."""
    try:
        return int(scalar_timeout(url, database, q, timeout))
    except (QueryError, urllib.error.URLError, OSError, TimeoutError):
        return 0


def scalar_timeout(url: str, database: str, q: str, timeout: float) -> float:
    """:func:`compression.influxql.scalar` with a request timeout."""
    series = query(url, database, q, timeout=timeout)
    if not series or not series[0]["values"]:
        return 0.0
    row = dict(zip(series[0]["columns"], series[0]["values"][0], strict=True))
    value = next(v for k, v in row.items() if k != "time")
    return float(value or 0)


class IngesterProcess:
    """``compression ingest`` as a child process with a unique database and client id."""

    def __init__(self, bench: Bench, label: str, consumer: str = "ingest") -> None:
        self.bench = bench
        self.consumer = consumer
        tag = uuid.uuid4().hex[:6]
        self.database = f"bench_{label}_{tag}"
        self.client_id = f"bench.{consumer}-{label}-{tag}"
        self.metrics_port = free_port()
        self.log_path = bench.run_dir / f"{consumer}-{label}-{tag}.log"
        argv = self._minimal_argv(bench) if consumer == "minimal" else self._ingest_argv(bench)
        self.argv = argv
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        bench.rss.watch("ingester", self.proc.pid)

    def _minimal_argv(self, bench: Bench) -> list[str]:
        """The bench's minimal consumer (bench/minimal_consumer.py): the comparison, never production."""
        return [
            sys.executable,
            str(REPO / "bench" / "minimal_consumer.py"),
            "--mqtt-url",
            bench.mq.url,
            "--influx-url",
            bench.db.url,
            "--influx-database",
            self.database,
            "--mqtt-client-id",
            self.client_id,
            "--mqtt-topic-root",
            TOPIC_ROOT,
        ]

    def _ingest_argv(self, bench: Bench) -> list[str]:
        """``compression ingest`` with the bench's servers and every other setting at its default."""
        return [
            str(COMPRESSION_BIN),
            "ingest",
            "--mqtt-url",
            bench.mq.url,
            "--influx-url",
            bench.db.url,
            "--influx-database",
            self.database,
            "--mqtt-client-id",
            self.client_id,
            # The open local broker: the publishers' topics as they send them (no mount point).
            "--mqtt-topic-root",
            TOPIC_ROOT,
            "--metrics-port",
            str(self.metrics_port),
            "--log-level",
            "INFO",
            "--dead-letter-file",
            str(bench.run_dir / f"dead-letter-{self.database}.jsonl"),
            *bench.args.ingest_arg,
        ]

    @property
    def pid(self) -> int:
        """The ingester's process id."""
        return self.proc.pid

    def wait_ready(self, timeout: float = 90) -> None:
        """Publish a status message until it is stored: proves subscription, decode and write."""
        deadline = time.monotonic() + timeout
        payload = encode(Status(v=1, state="online", t=int(time.time() * 1000)))
        probe = Outgoing(topic_for("bench-probe", "status"), payload, 0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingester exited with {self.proc.returncode}; see {self.log_path}")
            pub = RawPublisher("127.0.0.1", self.bench.mq.port, f"bench-probe-{uuid.uuid4().hex[:6]}", 10)
            pub.publish(RawPublisher.packets([probe]))
            pub.close()
            for _ in range(10):
                if count_or_zero(self.bench.db.url, self.database, "SELECT count(online) FROM status"):
                    return
                time.sleep(0.1)
        raise TimeoutError(f"ingester not ready within {timeout:.0f} s; see {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """The ingester's Prometheus metrics (unlabelled and labelled samples by full name)."""
        out: dict[str, float] = {}
        if self.consumer != "ingest":
            return out
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError):
            return out
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def stop(self) -> None:
        """SIGTERM (clean shutdown), SIGKILL after 30 s."""
        self.bench.rss.watch("ingester", None)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def summarize_metrics(m: dict[str, float]) -> dict[str, float]:
    """The few ingester metrics worth printing."""

    def get(name: str) -> float:
        return m.get(name, 0.0)

    batches = get("compression_ingest_batch_lines_count")
    return {
        "messages_acked": get("compression_ingest_messages_acked_total"),
        "batches": batches,
        "lines_per_batch": get("compression_ingest_batch_lines_sum") / batches if batches else 0.0,
        "write_s_per_batch": get("compression_ingest_batch_write_seconds_sum") / batches if batches else 0.0,
        "backpressure_pauses": get("compression_ingest_backpressure_pauses_total"),
        "write_errors": sum(v for k, v in m.items() if k.startswith("compression_ingest_write_errors_total")),
        "rejected": sum(v for k, v in m.items() if k.startswith("compression_ingest_rejected_total")),
    }


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Bench:
    """Servers, sampler and results of one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.data_dir = Path(args.data_dir)
        self.run_dir = self.data_dir / f"run-{stamp}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"phases": {}}
        self.rss = RssSampler(args.rss_interval)
        self.spec = LoadSpec(
            devices=args.devices,
            messages=args.messages,
            samples=args.samples,
            start_ms=int(time.time() * 1000) - args.messages * args.samples * 60_000,
        )
        say(f"starting Mosquitto and InfluxDB under {self.run_dir}/")
        self.mq: Mosquitto = start_mosquitto(self.run_dir)
        self.db: InfluxDB = start_influxdb(self.run_dir)
        self.rss.watch("mosquitto", self._pid(self.mq))
        self.rss.watch("influxd", self._pid(self.db))
        say(f"Mosquitto {self.mq.url}, InfluxDB {self.db.url}")

    @staticmethod
    def _pid(server: Mosquitto | InfluxDB) -> int | None:
        return server.process.pid if server.process is not None else None

    def cpu_window(self, ingester: IngesterProcess, with_influxd: bool = True) -> CpuWindow:
        """A CPU window over the ingester, broker, database (unless it gets restarted) and this process."""
        pids = {"ingester": ingester.pid, "mosquitto": self._pid(self.mq), "bench": os.getpid()}
        if with_influxd:
            pids["influxd"] = self._pid(self.db)
        return CpuWindow(pids)

    def wait_quiet(self) -> float:
        """Wait (up to ``--quiet-wait`` s) until the rest of the shared machine uses less than
        ``--quiet-cores`` CPUs; return what it used in the last second (in CPUs)."""
        ours = [self._pid(self.mq), self._pid(self.db), os.getpid()]
        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            busy0, ours0 = machine_busy_seconds(), sum(cpu_seconds(p) for p in ours)
            time.sleep(1.0)
            other = max(0.0, machine_busy_seconds() - busy0 - (sum(cpu_seconds(p) for p in ours) - ours0))
            if other <= self.args.quiet_cores:
                return other
            if time.monotonic() >= deadline:
                say(f"    the machine stays busy (other processes use {other:.2f} CPUs): measuring anyway")
                return other
            say(f"    other processes use {other:.2f} CPUs: waiting for a quieter moment")

    def close(self) -> None:
        """Stop the servers and the sampler."""
        self.rss.close()
        self.mq.stop()
        self.db.stop()

    # -- calibration ---------------------------------------------------------
    def calibrate(self) -> None:
        """CPU cost of the decode stage and of plain Python on this machine, for comparisons."""
        spec = LoadSpec(devices=200, messages=5, samples=self.args.samples)
        msgs = list(generate(spec))
        decoder = Decoder()
        now = time.time_ns()
        best = float("inf")
        for _ in range(5):
            c0 = time.process_time()
            for m in msgs:
                decoder.decode(m.topic, m.payload, now)
            best = min(best, (time.process_time() - c0) / len(msgs))
        loop = float("inf")
        for _ in range(5):
            c0 = time.process_time()
            for _ in range(200):
                sum(range(1000))
            loop = min(loop, (time.process_time() - c0) / 200)
        self.results["calibration"] = {"decode_encode_us_per_message": best * 1e6, "sum_range_1000_us": loop * 1e6}
        say(
            f"calibration: decode+encode of one {self.args.samples}-sample message {best * 1e6:.1f} us CPU; "
            f"sum(range(1000)) {loop * 1e6:.1f} us"
        )

    # -- throughput ------------------------------------------------------------
    def throughput(self, kind: str, label: str, profile: bool = False, consumer: str = "ingest") -> dict[str, Any]:
        """One fast run: publish the whole load, wait until InfluxDB holds every sample.

        ``consumer``: ``ingest`` (the ingester) or ``minimal`` (bench/minimal_consumer.py, the comparison).
        """
        args = self.args
        spec = self.spec
        total = spec.total_samples
        count = args.paho_publishers if kind == "paho" else 1
        say(
            f"throughput [{label}, {consumer}]: {spec.devices} devices x {spec.messages} messages x {spec.samples} "
            f"samples = {total:,} samples, {count} {kind} publisher process(es)"
        )
        ingester = IngesterProcess(self, label, consumer)
        pool: PublisherPool | None = None
        spy: subprocess.Popen[bytes] | None = None
        try:
            ingester.wait_ready()
            jobs = [
                {
                    "kind": kind,
                    "url": self.mq.url,
                    "spec": _spec_dict(spec),
                    "index": i,
                    "count": count,
                    "window": args.window,
                }
                for i in range(count)
            ]
            pool = PublisherPool(jobs)
            pool.wait_ready()
            profile_path = self.data_dir / f"profile-{label}.txt"
            if profile:
                spy = subprocess.Popen(
                    [
                        str(PY_SPY_BIN),
                        "record",
                        "--pid",
                        str(ingester.pid),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--output",
                        str(profile_path),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            other_before = self.wait_quiet()
            window = self.cpu_window(ingester)
            window.begin()
            go_at = time.time() + 0.2
            pool.go(go_at)
            last_round_ms = (spec.start_ms or 0) + (spec.messages - 1) * spec.samples * spec.period_ms
            done_at, _ = self._wait_complete(
                ingester, total, last_round_ms * 1_000_000, spec.devices * spec.samples, go_at
            )
            reports = pool.results()
            cpu = window.end(sum(float(r["cpu_s"]) for r in reports))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            time.sleep(0.5)
            final = count_or_zero(self.db.url, ingester.database, "SELECT count(ankle_mmhg) FROM sample")
            rejected = count_or_zero(self.db.url, ingester.database, "SELECT count(raw_bytes) FROM rejected")
            metrics = summarize_metrics(ingester.metrics())
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            if pool is not None:
                pool.terminate()
            ingester.stop()
        first = min(float(r["first"]) for r in reports)
        acked = max(float(r["acked"]) for r in reports)
        seconds = done_at - first
        result = {
            "label": label,
            "consumer": consumer,
            "publisher": kind,
            "publisher_processes": count,
            "samples": total,
            "stored": final,
            "rejected_points": rejected,
            "lost": total - final,
            "seconds": seconds,
            "samples_per_s": total / seconds,
            "publish_seconds": acked - first,
            "publish_samples_per_s": total / (acked - first),
            "ingester_cpu_s": cpu["ingester"],
            "ingester_user_s": cpu["ingester_user"],
            "ingester_system_s": cpu["ingester_system"],
            "ingester_core_share": cpu["ingester"] / cpu["wall"],
            "ingester_wakeups_per_message": cpu["ingester_wakeups"] / (total / spec.samples),
            "ingester_cpu_us_per_sample": cpu["ingester"] / total * 1e6,
            "ingester_peak_rss_mb": self.rss.peak("ingester", go_at - 1, done_at + 0.5),
            "cpu_seconds": cpu,
            "other_cpus_before": other_before,
            "ingester_metrics": metrics,
            "database": ingester.database,
            "ingester_argv": ingester.argv[1:],
        }
        if profile:
            result["profile"] = str(profile_path)
        say(
            f"  {label}: {result['samples_per_s']:,.0f} samples/s end to end ({seconds:.2f} s), stored "
            f"{final:,}/{total:,}, ingester {result['ingester_cpu_us_per_sample']:.1f} us CPU/sample, "
            f"peak RSS {result['ingester_peak_rss_mb']:.1f} MB; publishers done in {acked - first:.2f} s; "
            f"CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        )
        return result

    def _wait_complete(
        self, ingester: IngesterProcess, total: int, last_round_ns: int, last_round: int, go_at: float
    ) -> tuple[float, int]:
        """Poll InfluxDB until the count is ``total``; return (time it was seen, count).

        Every ``--poll-interval`` a cheap query counts the load's last round of
        samples; once that is complete, the full ``count(ankle_mmhg)`` is polled
        at the same interval (and once a second for progress throughout).
        """
        url, dbname = self.db.url, ingester.database
        full_q = "SELECT count(ankle_mmhg) FROM sample"
        tail_q = f"SELECT count(ankle_mmhg) FROM sample WHERE time >= {last_round_ns}"
        next_progress = time.time() + 1
        stored = 0
        changed = time.time()
        tail_complete = False
        while True:
            time.sleep(self.args.poll_interval)
            if not tail_complete:
                tail_complete = count_or_zero(url, dbname, tail_q) >= last_round
            now = time.time()
            if tail_complete or now >= next_progress:
                n = count_or_zero(url, dbname, full_q)
                seen = time.time()
                if n != stored:
                    stored, changed = n, seen
                if n >= total:
                    return seen, n
                if now >= next_progress:
                    say(f"    {now - go_at:6.1f} s: {n:>9,} / {total:,} samples queryable")
                    next_progress = now + 1
            if time.time() - changed > self.args.stall_timeout:
                raise RuntimeError(f"stalled at {stored:,} of {total:,} samples for {self.args.stall_timeout:.0f} s")

    # -- raw InfluxDB write --------------------------------------------------
    def raw_write(self, label: str) -> dict[str, Any]:
        """The same points POSTed straight to /write: InfluxDB's own rate on this machine."""
        args = self.args
        lines: list[str] = []
        for out in generate(self.spec):
            lines.extend(telemetry_lines(msgspec.json.decode(out.payload, type=Telemetry)))
        bodies = ["\n".join(lines[i : i + args.batch_lines]).encode() for i in range(0, len(lines), args.batch_lines)]
        database = f"bench_raw_{uuid.uuid4().hex[:6]}"
        influx_create(self.db.url, database)
        say(
            f"raw InfluxDB write [{label}]: {len(lines):,} lines in {len(bodies)} POSTs of {args.batch_lines} "
            f"lines, {args.write_concurrency} at a time"
        )
        pids = {"influxd": self._pid(self.db), "bench": os.getpid()}
        other_before = self.wait_quiet()
        window = CpuWindow(pids)
        window.begin()
        seconds, statuses = asyncio.run(_post_all(self.db.url, database, bodies, args.write_concurrency))
        cpu = window.end(0.0)
        stored = count_or_zero(self.db.url, database, "SELECT count(ankle_mmhg) FROM sample")
        bad = [s for s in statuses if s >= 300]
        result = {
            "label": label,
            "lines": len(lines),
            "posts": len(bodies),
            "seconds": seconds,
            "samples_per_s": len(lines) / seconds,
            "stored": stored,
            "http_errors": len(bad),
            "cpu_seconds": cpu,
            "other_cpus_before": other_before,
        }
        say(
            f"  {label}: {result['samples_per_s']:,.0f} points/s ({seconds:.2f} s), stored {stored:,}, "
            f"influxd CPU {cpu['influxd']:.2f} s, HTTP errors {len(bad)}"
        )
        return result

    # -- paced runs: latency and outage --------------------------------------
    def _paced_job(self, paced: Paced) -> list[dict[str, Any]]:
        return [
            {
                "kind": "paho",
                "url": self.mq.url,
                "index": 0,
                "count": 1,
                "window": self.args.window,
                "paced": {
                    "rate": paced.rate,
                    "seconds": paced.seconds,
                    "devices": paced.devices,
                    "samples": paced.samples,
                },
            }
        ]

    def latency(self) -> dict[str, Any]:
        """Paced run; per-message publish-to-queryable latency."""
        args = self.args
        paced = Paced(args.latency_rate, args.latency_seconds, args.devices, args.samples)
        n_msgs = paced.devices * paced.messages_per_device
        say(
            f"latency: {paced.rate:,.0f} samples/s for {paced.seconds:.0f} s ({paced.total_samples:,} samples, "
            f"{n_msgs:,} messages of {paced.samples}), poll every {args.poll_interval * 1000:.0f} ms"
        )
        ingester = IngesterProcess(self, "latency")
        pool: PublisherPool | None = None
        try:
            ingester.wait_ready()
            pool = PublisherPool(self._paced_job(paced))
            pool.wait_ready()
            other_before = self.wait_quiet()
            window = self.cpu_window(ingester)
            window.begin()
            go_at = time.time() + 0.5
            pool.go(go_at)
            spec = paced.spec(int(go_at * 1000))
            keys = _message_keys(spec)
            seen, lower, polls, query_s = self._track_visibility(ingester.database, keys, go_at, paced.seconds)
            reports = pool.results()
            cpu = window.end(sum(float(r["cpu_s"]) for r in reports))
            stored = count_or_zero(self.db.url, ingester.database, "SELECT count(ankle_mmhg) FROM sample")
            metrics = summarize_metrics(ingester.metrics())
            end = time.time()
        finally:
            if pool is not None:
                pool.terminate()
            ingester.stop()
        times: list[float] = reports[0]["times"]
        upper = [seen[k] - times[i] for i, k in enumerate(keys) if k in seen]
        low = [lower[k] - times[i] for i, k in enumerate(keys) if k in lower]
        lateness = [t - (go_at + i / paced.message_rate) for i, t in enumerate(times)]
        achieved = paced.total_samples / (times[-1] - times[0]) if len(times) > 1 else 0.0
        result: dict[str, Any] = {
            "rate": paced.rate,
            "achieved_rate": achieved,
            "seconds": paced.seconds,
            "samples": paced.total_samples,
            "messages": n_msgs,
            "stored": stored,
            "lost": paced.total_samples - stored,
            "messages_seen": len(upper),
            "polls": polls,
            "mean_query_ms": query_s / max(polls, 1) * 1000,
            "p50_s": percentile(upper, 50),
            "p90_s": percentile(upper, 90),
            "p99_s": percentile(upper, 99),
            "max_s": max(upper, default=float("nan")),
            "p50_lower_s": percentile(low, 50),
            "p99_lower_s": percentile(low, 99),
            "publish_lateness_p99_s": percentile(lateness, 99),
            "ingester_cpu_us_per_sample": cpu["ingester"] / paced.total_samples * 1e6,
            "ingester_wakeups_per_message": cpu["ingester_wakeups"] / n_msgs,
            "ingester_peak_rss_mb": self.rss.peak("ingester", go_at - 1, end),
            "cpu_seconds": cpu,
            "other_cpus_before": other_before,
            "ingester_metrics": metrics,
        }
        say(
            f"  latency: p50 {result['p50_s'] * 1000:.0f} ms, p90 {result['p90_s'] * 1000:.0f} ms, "
            f"p99 {result['p99_s'] * 1000:.0f} ms, max {result['max_s'] * 1000:.0f} ms (upper bounds; lower bounds "
            f"p50 {result['p50_lower_s'] * 1000:.0f} / p99 {result['p99_lower_s'] * 1000:.0f} ms); stored "
            f"{stored:,}/{paced.total_samples:,}; ingester {result['ingester_cpu_us_per_sample']:.1f} us/sample, "
            f"peak RSS {result['ingester_peak_rss_mb']:.1f} MB"
        )
        return result

    def _track_visibility(
        self, database: str, keys: list[tuple[str, int]], go_at: float, seconds: float
    ) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], float], int, float]:
        """Poll for the messages' last samples; return when each was first seen (upper and lower bound)."""
        url = self.db.url
        order = {k: i for i, k in enumerate(keys)}
        seen: dict[tuple[str, int], float] = {}
        lower: dict[tuple[str, int], float] = {}
        frontier = 0  # index of the oldest message not yet seen
        prev_sent = go_at
        polls = 0
        query_s = 0.0
        next_progress = time.time() + 2
        deadline = go_at + seconds + self.args.stall_timeout
        while frontier < len(keys) and time.time() < deadline:
            time.sleep(self.args.poll_interval)
            since_ns = keys[frontier][1] * 1_000_000
            sent = time.time()
            try:
                series = query(
                    url, database, f"SELECT battery_pct FROM sample WHERE time >= {since_ns} GROUP BY device"
                )
            except (QueryError, urllib.error.URLError, OSError):
                series = []
            got = time.time()
            polls += 1
            query_s += got - sent
            for s in series:
                device = s["tags"]["device"]
                for t, _ in s["values"]:
                    key = (device, int(t))
                    if key in order and key not in seen:
                        seen[key] = got
                        lower[key] = prev_sent
            prev_sent = sent
            while frontier < len(keys) and keys[frontier] in seen:
                frontier += 1
            if got >= next_progress:
                say(f"    {got - go_at:6.1f} s: {len(seen):>7,} / {len(keys):,} messages queryable")
                next_progress = got + 2
        return seen, lower, polls, query_s

    def outage(self) -> dict[str, Any]:
        """Paced stream with InfluxDB stopped in the middle; RSS, catch-up and zero loss."""
        args = self.args
        total_s = args.outage_before + args.outage_seconds + args.outage_after
        paced = Paced(args.outage_rate, total_s, args.devices, args.samples)
        say(
            f"outage: {paced.rate:,.0f} samples/s for {total_s:.0f} s ({paced.total_samples:,} samples); InfluxDB "
            f"stopped from {args.outage_before:.0f} s for {args.outage_seconds:.0f} s"
        )
        ingester = IngesterProcess(self, "outage")
        pool: PublisherPool | None = None
        try:
            ingester.wait_ready()
            pool = PublisherPool(self._paced_job(paced))
            pool.wait_ready()
            other_before = self.wait_quiet()
            window = self.cpu_window(ingester, with_influxd=False)
            window.begin()
            go_at = time.time() + 0.5
            pool.go(go_at)
            self._sleep_until(go_at + args.outage_before, ingester)
            before_stop = count_or_zero(self.db.url, ingester.database, "SELECT count(ankle_mmhg) FROM sample")
            say(f"    stopping InfluxDB ({before_stop:,} samples stored so far)")
            down_at = time.time()
            self.db.stop()
            self.rss.watch("influxd", None)
            self._sleep_until(down_at + args.outage_seconds, ingester, report_rss=True)
            say("    restarting InfluxDB on the same port")
            restart_at = time.time()
            self.db.start(timeout=120)
            up_at = time.time()
            self.rss.watch("influxd", self._pid(self.db))
            say(f"    InfluxDB serving again after {up_at - restart_at:.1f} s")
            publish_end = go_at + total_s
            # Samples stored before the stop, plus what was in flight then: growth beyond this is new writes.
            baseline = count_or_zero(self.db.url, ingester.database, "SELECT count(ankle_mmhg) FROM sample")
            done_at, resumed_at = self._wait_count(ingester.database, paced.total_samples, go_at, publish_end, baseline)
            reports = pool.results()
            cpu = window.end(sum(float(r["cpu_s"]) for r in reports))
            time.sleep(0.5)
            final = count_or_zero(self.db.url, ingester.database, "SELECT count(ankle_mmhg) FROM sample")
            metrics = summarize_metrics(ingester.metrics())
        finally:
            if pool is not None:
                pool.terminate()
            ingester.stop()
        published = int(reports[0]["samples"])
        result = {
            "rate": paced.rate,
            "outage_seconds": up_at - down_at,
            "samples": published,
            "stored": final,
            "lost": published - final,
            "stored_before_stop": before_stop,
            "catch_up_after_restart_s": done_at - max(up_at, publish_end),
            "first_write_after_restart_s": resumed_at - up_at,
            "stored_when_back": baseline,
            "ingester_peak_rss_outage_mb": self.rss.peak("ingester", down_at, up_at),
            "ingester_peak_rss_run_mb": self.rss.peak("ingester", go_at - 1, done_at + 0.5),
            "rss_samples_during_outage": self.rss.count("ingester", down_at, up_at),
            "mosquitto_peak_rss_mb": self.rss.peak("mosquitto", go_at, done_at),
            "cpu_seconds": cpu,
            "other_cpus_before": other_before,
            "ingester_metrics": metrics,
        }
        say(
            f"  outage: stored {final:,}/{published:,} (lost {published - final}); ingester peak RSS "
            f"{result['ingester_peak_rss_outage_mb']:.1f} MB during the outage, "
            f"{result['ingester_peak_rss_run_mb']:.1f} MB over the run; caught up "
            f"{result['catch_up_after_restart_s']:.1f} s after publishing and restart were both done; first new "
            f"write {result['first_write_after_restart_s']:.1f} s after InfluxDB was back"
        )
        return result

    def _sleep_until(self, when: float, ingester: IngesterProcess, report_rss: bool = False) -> None:
        while (left := when - time.time()) > 0:
            time.sleep(min(left, 2.0))
            if ingester.proc.poll() is not None:
                raise RuntimeError(f"ingester exited with {ingester.proc.returncode}; see {ingester.log_path}")
            if report_rss:
                rss = self.rss.peak("ingester", time.time() - 2.5)
                say(f"    InfluxDB down, ingester RSS {rss:.1f} MB")

    def _wait_count(
        self, database: str, total: int, go_at: float, publish_end: float, baseline: int
    ) -> tuple[float, float]:
        """Poll the full count until ``total``; return (when complete, when it first exceeded ``baseline``)."""
        stored = 0
        changed = time.time()
        resumed = 0.0
        next_progress = 0.0
        while True:
            # A full count over the backlog is not cheap: poll it less often than the latency probe.
            time.sleep(max(self.args.poll_interval, 0.25))
            n = count_or_zero(self.db.url, database, "SELECT count(ankle_mmhg) FROM sample")
            now = time.time()
            if n > baseline and not resumed:
                resumed = now
            if n >= total:
                return now, resumed or now
            if n != stored:
                stored, changed = n, now
            if now >= next_progress:
                say(f"    {now - go_at:6.1f} s: {n:>9,} / {total:,} samples queryable")
                next_progress = now + 2
            if now > publish_end and now - changed > self.args.stall_timeout:
                raise RuntimeError(f"stalled at {stored:,} of {total:,} samples for {self.args.stall_timeout:.0f} s")


async def _post_all(url: str, database: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[int]]:
    """POST every body to /write, ``concurrency`` at a time; (seconds, statuses)."""
    statuses: list[int] = []
    todo = collections.deque(bodies)
    params = {"db": database, "precision": "ns"}
    async with aiohttp.ClientSession(base_url=url + "/") as session:

        async def worker() -> None:
            while todo:
                body = todo.popleft()
                async with session.post("write", params=params, data=body) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, statuses


def _spec_dict(spec: LoadSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in LoadSpec.__dataclass_fields__}


def _message_keys(spec: LoadSpec) -> list[tuple[str, int]]:
    """(device, time of its last sample) of every message, in publish order (as ``generate`` yields them)."""
    start = spec.start_ms or 0
    devices = spec.device_ids()
    span = spec.samples * spec.period_ms
    last = (spec.samples - 1) * spec.period_ms
    return [(d, start + m * span + last) for m in range(spec.messages) for d in devices]


# ---------------------------------------------------------------------------
# Profile summary (py-spy raw output: "frame;frame;... count" per line)
# ---------------------------------------------------------------------------

_STAGES: list[tuple[str, Callable[[str], bool]]] = [
    ("start-up imports", lambda s: "importlib" in s),
    (
        "handler: line-protocol encode (ingest/encode.py)",
        lambda s: "Ingester._on_message" in s and "ingest/encode.py" in s,
    ),
    (
        "handler: msgspec decode + validation (devices/protocol.py)",
        lambda s: "Ingester._on_message" in s and "devices/protocol.py" in s,
    ),
    (
        "handler: metrics counters (prometheus_client)",
        lambda s: "Ingester._on_message" in s and "prometheus_client" in s,
    ),
    ("handler: decode/batch glue (ingest/decode.py, app.py, batch.py)", lambda s: "Ingester._on_message" in s),
    (
        "paho: MQTT 5 properties of each PUBLISH (paho/mqtt/properties.py)",
        lambda s: "Client.loop_read" in s and "properties.py" in s,
    ),
    ("paho: socket reads + packet parsing (loop_read, excluding the handler)", lambda s: "Client.loop_read" in s),
    (
        "MQTT receive: socket reads + PUBLISH parsing (FastPathClient, MqttConsumer._read, excluding the handler)",
        lambda s: "MqttConsumer._read" in s,
    ),
    ("acks: MqttConsumer.ack + paho PUBACK writes", lambda s: "MqttConsumer.ack" in s or "Client.loop_write" in s),
    ("InfluxDB writes (ingest/write.py, aiohttp)", lambda s: "aiohttp" in s or "ingest/write.py" in s),
    ("metrics endpoint", lambda s: "_metrics_handler" in s),
]


_MINIMAL_STAGES: list[tuple[str, Callable[[str], bool]]] = [
    ("start-up imports", lambda s: "importlib" in s),
    ("on_message: msgspec decode (no schema)", lambda s: "on_message" in s and "msgspec" in s),
    ("on_message: line formatting (sample_lines)", lambda s: "sample_lines" in s),
    ("on_message: batching (Sink.add)", lambda s: "Sink.add" in s),
    ("on_message: other", lambda s: "main.<locals>.on_message" in s),
    ("paho: PUBACK writes", lambda s: "_send_puback" in s or "loop_write" in s),
    ("paho: socket reads + packet parsing (loop_read, excluding on_message)", lambda s: "Client.loop_read" in s),
    ("paho: select() and loop_forever", lambda s: "loop_forever" in s),
    ("InfluxDB writes (writer threads, http.client)", lambda s: "Sink._writer" in s),
    ("flush timer thread", lambda s: "Sink._timer" in s),
]


def summarize_profile(path: Path, top: int = 15, consumer: str = "ingest") -> dict[str, Any]:
    """Share of samples per stage and the hottest frames (self time) of a py-spy raw profile."""
    stage_list = _STAGES if consumer == "ingest" else _MINIMAL_STAGES
    stages: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        stage = next((name for name, match in stage_list if match(stack)), "event loop, timers, other")
        stages[stage] += n
        self_time[_short_frame(stack.split(";")[-1])] += n
    return {
        "samples": total,
        "stages": [(name, n / total) for name, n in stages.most_common()] if total else [],
        "self": [(name, n / total) for name, n in self_time.most_common(top)] if total else [],
    }


def _short_frame(frame: str) -> str:
    for marker in ("site-packages/", f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/", f"{REPO}/"):
        frame = frame.replace(marker, "")
    return frame


# ---------------------------------------------------------------------------
# Environment, report
# ---------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Machine and versions."""
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return ((out.stdout or out.stderr).strip().splitlines() or ["?"])[0]

    git = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if git.startswith("fatal"):
        git = f"none ({REPO} is not a git checkout)"
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "ingest", "compression", "simulators", "devices"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "mosquitto": first_line([MOSQUITTO_BIN, "-h"]),
        "influxd": first_line([INFLUXD_BIN, "version"]),
        "python": platform.python_version(),
        "paho_mqtt": paho.mqtt.__version__,
        "msgspec": msgspec.__version__,
        "aiohttp": aiohttp.__version__,
        "psutil": psutil.__version__,
        "git": git,
        "uncommitted_source_files": dirty[1::2] if dirty else [],
    }


def _ok(passed: bool) -> str:
    return "yes" if passed else "**NO**"


def results_table(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, measured, target, met) rows."""
    phases = r["phases"]
    rows: list[tuple[str, str, str, str]] = []
    for name, label in (("throughput_paho", "paho Publisher"), ("throughput_raw", "raw-socket publisher")):
        runs = phases.get(name) or []
        if not runs:
            continue
        rates = [x["samples_per_s"] for x in runs]
        lost = sum(abs(x["lost"]) for x in runs)
        cpu = [x["ingester_cpu_us_per_sample"] for x in runs]
        rss = max(x["ingester_peak_rss_mb"] for x in runs)
        each = " / ".join(f"{v:,.0f}" for v in rates)
        rows.append(
            (
                f"End to end, {runs[0]['samples']:,} samples, {label} (median of {len(runs)}: {each})",
                f"{statistics.median(rates):,.0f} samples/s",
                f">= {TARGET_SAMPLES_PER_S:,}",
                _ok(statistics.median(rates) >= TARGET_SAMPLES_PER_S),
            )
        )
        rows.append((f"Loss, {label}", f"{lost} of {sum(x['samples'] for x in runs):,}", "0", _ok(lost == 0)))
        rows.append(
            (
                f"Ingester CPU per sample, {label}",
                f"{statistics.median(cpu):.1f} us ({' / '.join(f'{v:.1f}' for v in cpu)})",
                f"<= {TARGET_CPU_US_PER_SAMPLE:g} us",
                _ok(statistics.median(cpu) <= TARGET_CPU_US_PER_SAMPLE),
            )
        )
        rows.append(
            (f"Ingester peak RSS, {label}", f"{rss:.1f} MB", f"< {TARGET_RSS_MB:g} MB", _ok(rss < TARGET_RSS_MB))
        )
    rows += _minimal_rows(phases)
    raw = phases.get("raw") or []
    if raw:
        raw_rate = statistics.median(x["samples_per_s"] for x in raw)
        rows.append((f"Raw InfluxDB write, same points (median of {len(raw)})", f"{raw_rate:,.0f} points/s", "-", "-"))
        for name, label in (("throughput_paho", "paho Publisher"), ("throughput_raw", "raw-socket publisher")):
            if phases.get(name):
                ours = statistics.median(x["samples_per_s"] for x in phases[name])
                rows.append((f"End to end / raw write, {label}", f"{ours / raw_rate:.2f}", "-", "-"))
    lat = phases.get("latency")
    if lat:
        rows.append(
            (f"Publish-to-queryable p50 at {lat['rate']:,.0f} samples/s", f"{lat['p50_s'] * 1000:.0f} ms", "-", "-")
        )
        rows.append(
            (
                f"Publish-to-queryable p99 at {lat['rate']:,.0f} samples/s",
                f"{lat['p99_s'] * 1000:.0f} ms",
                f"< {TARGET_P99_S * 1000:.0f} ms",
                _ok(lat["p99_s"] < TARGET_P99_S),
            )
        )
        rows.append(("Loss, latency run", f"{lat['lost']} of {lat['samples']:,}", "0", _ok(lat["lost"] == 0)))
        rows.append(
            (
                f"Ingester CPU per sample at {lat['rate']:,.0f} samples/s",
                f"{lat['ingester_cpu_us_per_sample']:.1f} us",
                "-",
                "-",
            )
        )
        rows.append(
            (
                "Ingester peak RSS, latency run",
                f"{lat['ingester_peak_rss_mb']:.1f} MB",
                f"< {TARGET_RSS_MB:g} MB",
                _ok(lat["ingester_peak_rss_mb"] < TARGET_RSS_MB),
            )
        )
    out = phases.get("outage")
    if out:
        rows.append(
            (
                f"Ingester peak RSS during a {out['outage_seconds']:.0f} s InfluxDB outage",
                f"{out['ingester_peak_rss_outage_mb']:.1f} MB",
                f"< {TARGET_RSS_MB:g} MB",
                _ok(out["ingester_peak_rss_outage_mb"] < TARGET_RSS_MB),
            )
        )
        rows.append(("Loss across the outage", f"{out['lost']} of {out['samples']:,}", "0", _ok(out["lost"] == 0)))
    return rows


def _minimal_rows(phases: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The minimal consumer's runs and the ingester's ratios to them (same invocation, rounds back to back)."""
    mine, theirs = phases.get("throughput_raw") or [], phases.get("throughput_minimal") or []
    if not mine or not theirs:
        return []
    rates = [x["samples_per_s"] for x in theirs]
    cpu = [x["ingester_cpu_us_per_sample"] for x in theirs]
    lost = sum(abs(x["lost"]) for x in theirs)
    pairs = list(zip(mine, theirs, strict=False))
    cpu_ratio = statistics.median(x["ingester_cpu_us_per_sample"] for x in mine) / statistics.median(cpu)
    rate_ratio = statistics.median(x["samples_per_s"] for x in mine) / statistics.median(rates)
    each_cpu = " / ".join(f"{a['ingester_cpu_us_per_sample'] / b['ingester_cpu_us_per_sample']:.2f}" for a, b in pairs)
    each_rate = " / ".join(f"{a['samples_per_s'] / b['samples_per_s']:.2f}" for a, b in pairs)
    return [
        (
            f"Minimal consumer, end to end, raw-socket publisher (median of {len(theirs)}: "
            f"{' / '.join(f'{v:,.0f}' for v in rates)})",
            f"{statistics.median(rates):,.0f} samples/s",
            "-",
            "-",
        ),
        (
            "Minimal consumer CPU per sample",
            f"{statistics.median(cpu):.1f} us ({' / '.join(f'{v:.1f}' for v in cpu)})",
            "-",
            "-",
        ),
        ("Loss, minimal consumer (acks before writing)", f"{lost} of {sum(x['samples'] for x in theirs):,}", "-", "-"),
        (
            f"Ingester / minimal consumer, CPU per sample (medians; per round {each_cpu})",
            f"{cpu_ratio:.2f}",
            "<= 1",
            _ok(cpu_ratio <= 1.0),
        ),
        (
            f"Ingester / minimal consumer, end-to-end samples/s (medians; per round {each_rate})",
            f"{rate_ratio:.2f}",
            "-",
            "-",
        ),
    ]


def missed_targets(r: dict[str, Any]) -> bool:
    """True if any row failed its target."""
    return any(met == "**NO**" for *_, met in results_table(r))


def markdown(r: dict[str, Any], command: str) -> str:
    """The results as Markdown (the numbers part of docs/benchmarks.md)."""
    env = r["env"]
    lines = [
        f"Command: `{command}`",
        "",
        f"- Date: {env['date']}; git {env['git']}"
        + (
            f" (uncommitted changes in {', '.join(env['uncommitted_source_files'])})"
            if env["uncommitted_source_files"]
            else ""
        ),
        f"- Machine: {env['nproc']} CPUs ({env['cpu_model']}), {env['memory_gb']} GB, Linux {env['kernel']}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}",
        f"- Versions: {env['mosquitto']}; {env['influxd']}; Python {env['python']}; paho-mqtt {env['paho_mqtt']}; "
        f"msgspec {env['msgspec']}; aiohttp {env['aiohttp']}",
    ]
    cal = r.get("calibration")
    if cal:
        lines.append(
            f"- Calibration on this machine: `Decoder.decode` of one {r['args']['samples']}-sample message "
            f"{cal['decode_encode_us_per_message']:.1f} us CPU; `sum(range(1000))` "
            f"{cal['sum_range_1000_us']:.1f} us"
        )
    lines += ["", "| Metric | Measured | Target | Met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in results_table(r)]
    cpu_rows = []
    for name in ("throughput_paho", "throughput_raw", "throughput_minimal"):
        for x in r["phases"].get(name) or []:
            c = x["cpu_seconds"]
            cpu_rows.append(
                f"| {x['label']} | {c['wall']:.2f} | {c['ingester']:.2f} ({c['ingester_user']:.2f} + "
                f"{c['ingester_system']:.2f}; {c['ingester'] / max(c['wall'], 1e-9) * 100:.0f} % of a core; "
                f"{c['ingester_wakeups']:.0f} wakeups) | "
                f"{c['publishers']:.2f} | {c['mosquitto']:.2f} | {c['influxd']:.2f} | {c['bench']:.2f} | "
                f"{c['other']:.2f} | {c['machine_busy'] / max(c['wall'], 1e-9) / (env['nproc'] or 1) * 100:.0f} % |"
            )
    if cpu_rows:
        lines += [
            "",
            "CPU seconds per process over each throughput run (first publish to all samples queryable; "
            "`other` = the rest of the shared machine, kernel included):",
            "",
            "| Run | Wall s | Ingester or minimal consumer (user + system) | Publishers | Mosquitto | influxd "
            "| Bench poller | Other "
            "| Machine busy |",
            "|---|---|---|---|---|---|---|---|---|",
            *cpu_rows,
        ]
    details = []
    for name in ("throughput_paho", "throughput_raw"):
        for x in r["phases"].get(name) or []:
            m = x["ingester_metrics"]
            details.append(
                f"| {x['label']} | {x['publish_seconds']:.2f} ({x['publish_samples_per_s']:,.0f}/s) | "
                f"{m['batches']:.0f} | {m['lines_per_batch']:.0f} | {m['write_s_per_batch'] * 1000:.0f} | "
                f"{m['backpressure_pauses']:.0f} | {m['write_errors']:.0f} |"
            )
    if details:
        lines += [
            "",
            "| Run | Publishing took s (rate) | Batches | Lines/batch | Write ms/batch | Pauses | Write errors |",
            "|---|---|---|---|---|---|---|",
            *details,
        ]
    lat = r["phases"].get("latency")
    if lat:
        lines += [
            "",
            f"Latency run: {lat['samples']:,} samples in {lat['messages']:,} messages at "
            f"{lat['achieved_rate']:,.0f} samples/s achieved; {lat['messages_seen']:,} messages seen by "
            f"{lat['polls']} polls (mean query {lat['mean_query_ms']:.0f} ms). Upper bounds: p50 "
            f"{lat['p50_s'] * 1000:.0f} ms, p90 {lat['p90_s'] * 1000:.0f} ms, p99 {lat['p99_s'] * 1000:.0f} ms, "
            f"max {lat['max_s'] * 1000:.0f} ms; lower bounds: p50 {lat['p50_lower_s'] * 1000:.0f} ms, "
            f"p99 {lat['p99_lower_s'] * 1000:.0f} ms. Publisher lateness p99 "
            f"{lat['publish_lateness_p99_s'] * 1000:.1f} ms. Ingester {lat['ingester_metrics']['batches']:.0f} "
            f"batches of {lat['ingester_metrics']['lines_per_batch']:.0f} lines on average, "
            f"{lat['ingester_metrics']['write_s_per_batch'] * 1000:.0f} ms per write; "
            f"{lat['ingester_wakeups_per_message']:.2f} ingester wakeups (voluntary context switches) per message. "
            f"Other processes used "
            f"{lat['cpu_seconds']['other'] / max(lat['cpu_seconds']['wall'], 1e-9):.2f} CPUs during the run.",
        ]
    out = r["phases"].get("outage")
    if out:
        lines += [
            "",
            f"Outage run: {out['samples']:,} samples at {out['rate']:,.0f}/s; InfluxDB down "
            f"{out['outage_seconds']:.1f} s ({out['rss_samples_during_outage']} RSS samples); stored "
            f"{out['stored']:,} (lost {out['lost']}); ingester peak RSS {out['ingester_peak_rss_outage_mb']:.1f} MB "
            f"during the outage, {out['ingester_peak_rss_run_mb']:.1f} MB over the run; Mosquitto peak RSS "
            f"{out['mosquitto_peak_rss_mb']:.1f} MB; all stored {out['catch_up_after_restart_s']:.1f} s after "
            f"publishing had ended and InfluxDB was back; the first new write landed "
            f"{out['first_write_after_restart_s']:.1f} s after InfluxDB was back "
            f"({out['ingester_metrics']['write_errors']:.0f} failed write "
            f"attempts retried). Everything but the ingester, broker, publisher and bench (InfluxDB included: "
            f"it is restarted mid-run) used "
            f"{out['cpu_seconds']['other'] / max(out['cpu_seconds']['wall'], 1e-9):.2f} CPUs during the run.",
        ]
    for key, who in (("profile", "ingester"), ("profile_minimal", "minimal consumer")):
        prof = r.get(key)
        if not prof:
            continue
        lines += [
            "",
            f"Profile of the {who} (py-spy, 200 Hz, {prof['samples']} samples during a throughput run "
            f"with the {prof['publisher']} publisher: {prof['samples_per_s']:,.0f} samples/s, "
            f"{prof['cpu_us_per_sample']:.1f} us/sample; raw data in `{prof['path']}`):",
            "",
            f"| Stage | Share of the {who}'s CPU samples |",
            "|---|---|",
        ]
        lines += [f"| {name} | {share * 100:.1f} % |" for name, share in prof["stages"]]
        lines += ["", "| Hottest frames (self) | Share |", "|---|---|"]
        lines += [f"| `{name}` | {share * 100:.1f} % |" for name, share in prof["self"]]
    return "\n".join(lines) + "\n"


def print_table(r: dict[str, Any]) -> None:
    """The results table on stdout."""
    rows = [("Metric", "Measured", "Target", "Met"), *results_table(r)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for i, row in enumerate(rows):
        print("  ".join(cell.replace("**", "").ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="var/bench", help="folder for servers' data, logs and results (%(default)s)")
    p.add_argument("--devices", type=int, default=200, help="simulated devices (%(default)s)")
    p.add_argument("--messages", type=int, default=100, help="throughput load: messages per device (%(default)s)")
    p.add_argument("--samples", type=int, default=10, help="samples per message (%(default)s)")
    p.add_argument(
        "--publisher",
        choices=("paho", "raw", "both"),
        default="both",
        help="throughput load generator: the project's paho Publisher, the bench's raw-socket "
        "publisher, or both (%(default)s)",
    )
    p.add_argument(
        "--paho-publishers", type=int, default=2, help="paho Publisher processes in the throughput run (%(default)s)"
    )
    p.add_argument("--window", type=int, default=1000, help="publisher in-flight window, messages (%(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="throughput and raw-write runs of each kind (%(default)s)")
    p.add_argument("--batch-lines", type=int, default=5000, help="raw write: lines per POST (%(default)s)")
    p.add_argument("--write-concurrency", type=int, default=2, help="raw write: POSTs in flight (%(default)s)")
    p.add_argument("--latency-rate", type=float, default=10_000, help="latency run: samples/s (%(default)s)")
    p.add_argument("--latency-seconds", type=float, default=30, help="latency run: duration (%(default)s)")
    p.add_argument("--outage-rate", type=float, default=10_000, help="outage run: samples/s (%(default)s)")
    p.add_argument("--outage-before", type=float, default=5, help="outage run: seconds before the stop (%(default)s)")
    p.add_argument("--outage-seconds", type=float, default=25, help="outage run: InfluxDB down this long (%(default)s)")
    p.add_argument(
        "--outage-after",
        type=float,
        default=10,
        help="outage run: seconds of publishing after the restart (%(default)s)",
    )
    p.add_argument("--poll-interval", type=float, default=0.05, help="InfluxDB poll interval, s (%(default)s)")
    p.add_argument("--rss-interval", type=float, default=0.05, help="RSS sampling interval, s (%(default)s)")
    p.add_argument("--stall-timeout", type=float, default=60, help="fail when no progress for this long (%(default)s)")
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.25,
        help="before each run, wait until other processes use fewer CPUs than this (%(default)s)",
    )
    p.add_argument(
        "--quiet-wait", type=float, default=10, help="...but wait at most this many seconds per run (%(default)s)"
    )
    p.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy profile of the ingester: when a target is missed, always, never (%(default)s)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("throughput", "raw", "latency", "outage"),
        help="leave out a phase (repeatable)",
    )
    p.add_argument(
        "--ingest-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `compression ingest` (repeatable), e.g. --ingest-arg=--mqtt-protocol "
        "--ingest-arg=3.1.1",
    )
    p.add_argument(
        "--minimal",
        choices=("on", "off"),
        default="on",
        help="run bench/minimal_consumer.py beside the ingester in every raw-publisher throughput round, "
        "alternating which goes first, and report the ratios (%(default)s)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the servers' data folders")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets met or not), 1 on a failure of the run itself."""
    args = parse_args(argv)
    os.chdir(REPO)
    command = " ".join([".venv/bin/python", "bench/ingest_bench.py", *sys.argv[1:]])
    bench = Bench(args)
    r = bench.results
    r["args"] = vars(args)
    r["command"] = command
    r["env"] = environment()
    phases = r["phases"]
    completed = False
    try:
        bench.calibrate()
        kinds = ["paho", "raw"] if args.publisher == "both" else [args.publisher]
        for i in range(args.repeat):
            if "throughput" not in args.skip:
                for kind in kinds:
                    if kind == "raw" and args.minimal == "on":
                        # The ingester and the minimal consumer back to back, the order alternating per round.
                        pair = [("ingest", "throughput_raw", "raw"), ("minimal", "throughput_minimal", "minimal")]
                        for consumer, phase, name in pair if i % 2 == 0 else pair[::-1]:
                            run = bench.throughput(kind, f"{name}-{i + 1}", consumer=consumer)
                            phases.setdefault(phase, []).append(run)
                        continue
                    phases.setdefault(f"throughput_{kind}", []).append(bench.throughput(kind, f"{kind}-{i + 1}"))
            if "raw" not in args.skip:
                phases.setdefault("raw", []).append(bench.raw_write(f"raw-write-{i + 1}"))
        if "latency" not in args.skip:
            phases["latency"] = bench.latency()
        if "outage" not in args.skip:
            phases["outage"] = bench.outage()
        want_profile = args.profile == "always" or (args.profile == "auto" and missed_targets(r))
        if want_profile and "throughput" not in args.skip:
            if not PY_SPY_BIN.exists():
                say("py-spy not installed in the venv (.venv/bin/pip install py-spy): no profile")
            else:
                kind = kinds[-1]
                say("profiling the ingester with py-spy during one more throughput run")
                consumers = [("profile", "ingest")]
                if kind == "raw" and args.minimal == "on":
                    consumers.append(("profile_minimal", "minimal"))
                for key, consumer in consumers:
                    run = bench.throughput(kind, f"{key.replace('_', '-')}-{kind}", profile=True, consumer=consumer)
                    summary = summarize_profile(Path(run["profile"]), consumer=consumer)
                    r[key] = {
                        **summary,
                        "path": run["profile"],
                        "publisher": kind,
                        "consumer": consumer,
                        "samples_per_s": run["samples_per_s"],
                        "cpu_us_per_sample": run["ingester_cpu_us_per_sample"],
                    }
                    say(f"  profile of the {consumer} consumer:")
                    for name, share in summary["stages"]:
                        say(f"    {share * 100:5.1f} %  {name}")
        completed = True
    finally:
        bench.close()
        if completed and not args.keep_data:
            shutil.rmtree(bench.run_dir, ignore_errors=True)
        elif not completed:
            say(f"the run failed; servers' data and ingester logs kept in {bench.run_dir}/")
    r["env"]["loadavg_at_end"] = os.getloadavg()
    (bench.data_dir / "results.json").write_text(json.dumps(r, indent=2, default=str))
    (bench.data_dir / "results.md").write_text(markdown(r, command))
    print_table(r)
    print(f"\nresults: {bench.data_dir / 'results.json'}, {bench.data_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
