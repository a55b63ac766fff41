#!/usr/bin/env python3
"""Monitor benchmark: the two performance targets of ``compression monitor``, on real InfluxDB and SMTP.

Targets (2 shared cores):

1. Evaluating 1,000 patients' last 30 days takes under 30 s.
2. An over-pressure sample turns into a delivered e-mail in under 60 s.

Everything runs against a real InfluxDB 1.x started like the other benches
(:mod:`compression.localservers`: a plain process on a free loopback port,
its folder under ``--data-dir``), a registry in a SQLite file and a real SMTP
server (``tests.smtp.SmtpTestServer``, aiosmtpd on loopback, no TLS). The
monitor is the project's own :class:`monitor.app.Monitor`, in this process;
the bench only calls its public methods and :func:`monitor.compliance.day_stats`.

Phases (``--skip`` leaves one out):

generate
    ``--patients`` patients (default 1000, ``--boot-share`` of them boots)
    registered in the registry (one clinic in America/Edmonton, 2 physios,
    a handful of sock pressure bands, one boot prescription) and ``--days``
    local days of their data POSTed straight to InfluxDB ``/write`` in
    10,000-line batches, in the ingester's exact line format
    (``docs/schema.md``: tags clinic, device, kind, patient; ``worn_s`` as
    ``ingest.encode.wear_seconds`` computes it; ``battery_pct`` on each
    message's last sample; events and statuses; ``receipt`` points when the
    ingester writes them). Socks sample every ``--sample-every-s`` seconds all
    day (worn about 9 h), boots every 2 s during their sessions. Some
    patients deviate (under-use, too tight, rolled down, silent, missed
    sessions) so the evaluation opens real episodes and queues real e-mails.
    The data is kept under ``--data-dir`` and reused by the next run with the
    same sizes (``manifest.json``, up to ``--reuse-hours`` old); ``--fresh``
    regenerates. After writing, the bench lets InfluxDB compact (old shards
    are fully compacted after 1 minute without writes in this configuration,
    as they would be in production after 4 hours).
evaluate
    With InfluxDB restarted (so its caches are cold): the registry load, one
    raw aggregate pass over the whole range (``SELECT count(worn) FROM sample
    ... GROUP BY time(1d), patient tz(...)``, with and without the monitor's
    patient filter), ``compliance.day_stats`` for every patient over
    ``days_back`` (30) days (cold, then warm), each statement of the plan
    timed alone (the profile per statement kind), then ``--repeat`` rounds of
    a new ``Monitor`` on a fresh state database: its first
    ``evaluate_once()`` and, after a minute of new data for every patient,
    ``--steady`` more (the steady state; the same work unless the monitor
    evaluates incrementally). Last, one ``evaluate_once()`` under cProfile
    (with ``asyncio.to_thread`` run inline so the worker-thread code is seen).
latency
    ``Monitor.run()`` as deployed (``interval_s`` 60, ``safety_interval_s`` 10),
    in this process, sending to the SMTP server, against the same data. The
    outbox of the first evaluation is drained first (timed), then the loop
    is started and its first full evaluation awaited; then ``--trials``
    times, each for a different boot patient, one over-pressure sample stamped
    now is written to InfluxDB, and the time until the SMTP server has
    received the e-mail naming that patient is measured (trials spaced
    ``--trial-gap-s`` apart so they fall at different points of the loop).

Every wait is bounded (``--eval-timeout-s``, ``--trial-timeout-s``,
``--max-generate-s``). Results: ``results.json`` and ``results.md`` under
``--data-dir``, and a summary on stdout; progress on stderr.

    .venv/bin/python bench/monitor_bench.py                    # 1000 patients, about 30-40 minutes
    .venv/bin/python bench/monitor_bench.py --patients 50 --days 10 --repeat 1 --trials 2   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import email.policy
import io
import json
import logging
import os
import platform
import pstats
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psutil  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tests.smtp (the SMTP test server) lives in the checkout, not in the package
    sys.path.insert(0, str(REPO))

from compression.localservers import INFLUXD_BIN, InfluxDB, free_port, influxdb_config  # noqa: E402
from devices.registry import schemas as s  # noqa: E402
from devices.registry.db import make_engine, migrate, session_factory  # noqa: E402
from devices.registry.service import SYSTEM, Registry  # noqa: E402
from ingest import encode  # noqa: E402
from monitor import compliance  # noqa: E402
from monitor.app import Monitor  # noqa: E402
from monitor.compliance import InfluxReader, day_stats  # noqa: E402
from monitor.model import PatientContext  # noqa: E402
from monitor.registry import load_contexts  # noqa: E402
from monitor.settings import MonitorSettings  # noqa: E402
from tests.smtp import SmtpTestServer  # noqa: E402

CLINIC = "benchclinic"
TIMEZONE = "America/Edmonton"
DATABASE = "monitorbench"
PHYSIOS = ("physio1@benchclinic.example", "physio2@benchclinic.example")
# Sock prescriptions: (class system, class name, explicit low, explicit high, wear hours per day).
SOCK_RX: tuple[tuple[str, str | None, float | None, float | None, float], ...] = (
    ("us", "1", None, None, 8.0),
    ("us", "2", None, None, 8.0),
    ("ral", "2", None, None, 8.0),
    ("uk", "2", None, None, 6.0),
    ("explicit", None, 20.0, 30.0, 8.0),
)
BOOT_MAX_MMHG = 80.0
BATCH_LINES = 10_000
MESSAGE_SAMPLES = 5  # sock samples per message (battery_pct on the last); boots send 10 per message
TARGET_EVAL_S = 30.0
TARGET_ALERT_S = 60.0

_T0 = time.monotonic()


def say(text: str) -> None:
    """Progress output (stderr), stamped with the time since the bench started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of some timings (seconds)."""
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def fmt(stats: dict[str, float]) -> str:
    """``min / median / max`` as text."""
    if not stats:
        return "-"
    return f"{stats['min']:.2f} / {stats['median']:.2f} / {stats['max']:.2f} s (n={int(stats['n'])})"


# ---------------------------------------------------------------------------------------------------------------------
# InfluxDB: our own folder (kept between runs), restartable
# ---------------------------------------------------------------------------------------------------------------------


def start_influx(folder: Path) -> InfluxDB:
    """InfluxDB on a free port with its data in ``folder`` (reused if present); old shards compact after 1 min."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = influxdb_config(folder, port, free_port()).replace(
        "[data]\n", '[data]\n  compact-full-write-cold-duration = "1m"\n', 1)  # fmt: skip
    (folder / "influxdb.conf").write_text(conf)
    server = InfluxDB("influxdb", folder, port, [INFLUXD_BIN, "-config", str(folder / "influxdb.conf")])
    server.start(timeout=300)
    return server


def restart_influx(server: InfluxDB) -> float:
    """Stop and start InfluxDB on the same port and data (cold caches); returns the seconds it took."""
    t = time.monotonic()
    server.stop(timeout=120)
    server.start(timeout=300)
    return time.monotonic() - t


def influx_query(url: str, q: str, database: str | None = DATABASE, timeout: float = 600) -> dict[str, Any]:
    """One /query request (POST), the parsed JSON."""
    form = {"q": q, "epoch": "ms"}
    if database:
        form["db"] = database
    request = urllib.request.Request(f"{url}/query", data=urllib.parse.urlencode(form).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    for result in body.get("results", []):
        if "error" in result:
            raise RuntimeError(f"InfluxDB: {result['error']} in {q[:200]}")
    return body


def influx_write(url: str, lines: Sequence[str], timeout: float = 300) -> None:
    """POST lines to /write (ns precision), retried while InfluxDB is busy (e.g. its cache is full)."""
    body = "\n".join(lines).encode()
    for attempt in range(30):
        request = urllib.request.Request(f"{url}/write?db={DATABASE}&precision=ns", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                if resp.status == 204:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise RuntimeError(f"InfluxDB refused a batch: {exc.code} {exc.read()[:300]!r}") from exc
        except (urllib.error.URLError, TimeoutError):
            pass
        time.sleep(min(10.0, 0.5 * 2**attempt))
    raise RuntimeError("InfluxDB did not take a batch after 30 attempts")


def count_samples(url: str) -> int:
    body = influx_query(url, "SELECT count(worn) FROM sample")
    series = body["results"][0].get("series") or [{"values": [[0, 0]]}]
    return int(series[0]["values"][0][1])


def wait_compacted(server: InfluxDB, limit_s: float) -> float:
    """Wait until influxd has been nearly idle for 15 s (compactions done), at most ``limit_s``; returns seconds."""
    assert server.process is not None
    proc = psutil.Process(server.process.pid)
    t = time.monotonic()
    idle_since = None
    proc.cpu_percent(None)
    while time.monotonic() - t < limit_s:
        time.sleep(3)
        busy = proc.cpu_percent(None)
        if busy < 8:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= 15:
                break
        else:
            idle_since = None
    return time.monotonic() - t


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic clinic: registry and data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    """One synthetic patient, their garment and how they behave."""

    index: int
    code: str
    device: str
    kind: str  # sock / boot
    physio: str
    rx: int  # index into SOCK_RX (socks)
    profile: str  # compliant, under_use, too_tight, rolled_down, silent, missed_sessions


def fleet(patients: int, boot_share: float) -> list[Patient]:
    """The patients: boots spread evenly, sock bands round-robin, a few deviating profiles (deterministic)."""
    out = []
    boots = round(patients * boot_share)
    boot_every = patients / boots if boots else 0.0
    boot_at = {int(i * boot_every) for i in range(boots)}
    for i in range(patients):
        kind = "boot" if i in boot_at else "sock"
        r = random.Random(i * 7919 + 1)
        roll = r.random()
        if kind == "sock":
            profile = ("under_use" if roll < 0.08 else "too_tight" if roll < 0.12 else "rolled_down" if roll < 0.15
                       else "silent" if roll < 0.17 else "compliant")  # fmt: skip
        else:
            profile = "missed_sessions" if roll < 0.15 else "compliant"
        out.append(Patient(i, f"PB-{i:04d}", f"{kind}-b{i:04d}", kind, PHYSIOS[i % 2], i % len(SOCK_RX), profile))
    return out


def register(path: Path, patients: Sequence[Patient], valid_from: date) -> str:
    """A fresh registry: the clinic, 2 physios, each patient with a garment assigned and a prescription."""
    if path.exists():
        path.unlink()
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrate(engine)
    reg = Registry(session_factory(engine))
    since = datetime(valid_from.year, valid_from.month, valid_from.day, tzinfo=UTC) - timedelta(days=2)
    with reg.unit_of_work():
        reg.create_clinic(SYSTEM, s.ClinicIn(code=CLINIC, name="Bench Clinic", timezone=TIMEZONE))
        for n, email in enumerate(PHYSIOS, 1):
            reg.create_physio(SYSTEM, s.PhysioIn(clinic=CLINIC, name=f"Bench Physio {n}", email=email))
        for p in patients:
            reg.create_patient(SYSTEM, s.PatientIn(clinic=CLINIC, code=p.code, physio=p.physio))
            reg.create_device(SYSTEM, s.DeviceIn(device_id=p.device, clinic=CLINIC, kind=p.kind))
            reg.assign(SYSTEM, s.AssignmentIn(device_id=p.device, patient=p.code, valid_from=since))
            if p.kind == "sock":
                system, name, low, high, hours = SOCK_RX[p.rx]
                reg.prescribe(SYSTEM, s.PrescriptionIn(
                    patient=p.code, garment_kind="sock", valid_from=since.date(), class_system=system,
                    class_name=name, ankle_min_mmhg=low, ankle_max_mmhg=high, wear_hours_per_day=hours))  # fmt: skip
            else:
                reg.prescribe(SYSTEM, s.PrescriptionIn(
                    patient=p.code, garment_kind="boot", valid_from=since.date(), sessions_per_week=5,
                    session_min_minutes=15, session_max_minutes=40, max_chamber_mmhg=BOOT_MAX_MMHG))  # fmt: skip
    engine.dispose()
    return url


def sock_band(p: Patient) -> tuple[float, float]:
    """The ankle band of a sock patient's prescription (as the registry derives it)."""
    from devices.registry.classes import band_for

    system, name, low, high, _ = SOCK_RX[p.rx]
    band = band_for(system, name, low, high)  # type: ignore[arg-type]
    return band.low_mmhg, band.high_mmhg


def _values(r: random.Random, centre: float, spread: float, n: int = 37) -> list[str]:
    return [repr(round(centre + r.uniform(-spread, spread), 1)) for _ in range(n)]


class Receipts:
    """``receipt`` points as the ingester writes them (one per patient-hour), if this version of the ingester does."""

    def __init__(self, received_ms: int) -> None:
        self.fn: Callable[..., list[str]] | None = getattr(encode, "receipt_lines", None)
        self.received_ms = received_ms

    def for_hours(self, head: str, hours_ns: Iterator[int]) -> list[str]:
        if self.fn is None:
            return []
        out: list[str] = []
        for hour in hours_ns:
            out += self.fn([f"{head}x=1 {hour}"], 1, self.received_ms)
        return out


def sock_day(p: Patient, day_start_ms: int, end_ms: int, every_s: int, r: random.Random, seq0: int,
             day_index: int, days: int, receipts: Receipts) -> tuple[list[str], int]:  # fmt: skip
    """One local day of a sock's samples (every ``every_s`` s, all day), its status point and receipts."""
    low, high = sock_band(p)
    wear_h = r.uniform(8.6, 9.8)
    if p.profile == "under_use" and r.random() < 0.5:
        wear_h = r.uniform(3.0, 5.5)
    if p.profile == "silent" and day_index >= days - 3:
        return [], seq0
    mid = (low + high) / 2
    ankle = _values(r, high + 4 if p.profile == "too_tight" else mid, (high - low) / 4)
    calf = _values(r, mid * 0.8, 1.5)
    reversed_calf = _values(r, mid + 5, 1.0)
    off = _values(r, 1.5, 1.0)
    temps = _values(r, 32.5, 0.6)
    cold = _values(r, 24.0, 1.0)
    on_ms = day_start_ms + int(r.uniform(6.5, 8.0) * 3_600_000)
    off_ms = on_ms + int(wear_h * 3_600_000)
    roll_from = on_ms + 3_600_000 if p.profile == "rolled_down" and r.random() < 0.5 else -1
    roll_to = roll_from + 5_400_000
    head = f"sample,clinic={CLINIC},device={p.device},kind=sock,patient={p.code} "
    span = repr(float(min(every_s, encode.DEFAULT_MAX_WEAR_GAP_S)))
    step = every_s * 1000
    battery = 100 - (day_index * 3) % 60
    lines: list[str] = []
    seq = seq0
    t = day_start_ms
    k = 0
    while t < end_ms:
        j = k % 37
        if on_ms <= t < off_ms:
            c = reversed_calf[j] if roll_from <= t < roll_to else calf[j]
            text = (
                f"{head}ankle_mmhg={ankle[j]},calf_mmhg={c},worn=true,worn_s={span},skin_temp_c={temps[j]},seq={seq}i"
            )
        else:
            text = f"{head}ankle_mmhg={off[j]},calf_mmhg={off[(j + 5) % 37]},worn=false,worn_s=0.0,skin_temp_c={cold[j]},seq={seq}i"  # noqa: E501
        k += 1
        if k % MESSAGE_SAMPLES == 0:
            text += f",battery_pct={battery}i"
            seq += 1
        lines.append(f"{text} {t}000000")
        t += step
    if k % MESSAGE_SAMPLES:
        seq += 1
    status_ms = day_start_ms + 6 * 3_600_000
    if status_ms < end_ms:
        lines.append(f'status,clinic={CLINIC},device={p.device},patient={p.code} state="online",online=true,'
                     f'fw="sim-1.0",battery_pct={battery}i,rssi_dbm=-61i {status_ms}000000')  # fmt: skip
    hours = range(day_start_ms // 3_600_000 * 3_600_000, end_ms, 3_600_000)
    lines += receipts.for_hours(f"sample,clinic={CLINIC},device={p.device},kind=sock,patient={p.code} ",
                                (h * 1_000_000 for h in hours))  # fmt: skip
    return lines, seq


def boot_day(p: Patient, day_start_ms: int, end_ms: int, r: random.Random, seq0: int, day_index: int,
             receipts: Receipts) -> tuple[list[str], int]:  # fmt: skip
    """One local day of a boot: a session most days (2 s samples, start/end events), a status point."""
    lines: list[str] = []
    seq = seq0
    status_ms = day_start_ms + 6 * 3_600_000
    if status_ms < end_ms:
        lines.append(f'status,clinic={CLINIC},device={p.device},patient={p.code} state="online",online=true,'
                     f'fw="sim-1.0",battery_pct=90i,rssi_dbm=-58i {status_ms}000000')  # fmt: skip
    chance = 0.35 if p.profile == "missed_sessions" else 0.8
    start_ms = day_start_ms + int(r.uniform(17.5, 20.0) * 3_600_000)
    if r.random() >= chance or start_ms >= end_ms:
        return lines, seq
    minutes = r.randint(18, 35)
    tags = f"clinic={CLINIC},device={p.device},patient={p.code}"
    lines.append(f'event,{tags},type=session_start count=1i,program="standard",target_mmhg=50.0,planned_s=1800i '
                 f"{start_ms}000000")  # fmt: skip
    head = f"sample,clinic={CLINIC},device={p.device},kind=boot,patient={p.code} "
    zones = [_values(r, centre, 6.0) for centre in (55.0, 50.0, 45.0, 38.0)]
    n = minutes * 30
    for k in range(n):
        t = start_ms + 2000 * k
        if t >= end_ms:
            break
        j = k % 37
        text = (f"{head}foot_mmhg={zones[0][j]},ankle_mmhg={zones[1][j]},calf_mmhg={zones[2][j]},"
                f"thigh_mmhg={zones[3][j]},worn=true,worn_s=2.0,skin_temp_c=33.1,seq={seq}i")  # fmt: skip
        if (k + 1) % 10 == 0:
            text += ",battery_pct=90i"
            seq += 1
        lines.append(f"{text} {t}000000")
    seq += 1
    end = start_ms + minutes * 60_000
    if end < end_ms:
        lines.append(f'event,{tags},type=session_end count=1i,duration_s={minutes * 60}i,reason="completed" '
                     f"{end}000000")  # fmt: skip
    hours = range(start_ms // 3_600_000 * 3_600_000, min(end, end_ms), 3_600_000)
    lines += receipts.for_hours(head, (h * 1_000_000 for h in hours))
    return lines, seq


def local_days(days: int, now_ms: int) -> list[tuple[int, int]]:
    """(start_ms, end_ms) of the last ``days`` local days of the clinic, today (cut at ``now_ms``) last."""
    zone = ZoneInfo(TIMEZONE)
    today = datetime.fromtimestamp(now_ms / 1000, zone).date()
    out = []
    for back in range(days - 1, -1, -1):
        d = today - timedelta(days=back)
        start = int(datetime(d.year, d.month, d.day, tzinfo=zone).timestamp() * 1000)
        nd = d + timedelta(days=1)
        end = int(datetime(nd.year, nd.month, nd.day, tzinfo=zone).timestamp() * 1000)
        out.append((start, min(end, now_ms)))
    return out


class Writer:
    """Batches of lines POSTed by ``threads`` threads while the main thread generates the next ones."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.queue: queue.Queue[list[str] | None] = queue.Queue(maxsize=threads * 2)
        self.lines = 0
        self.errors: list[str] = []
        self._buffer: list[str] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while (batch := self.queue.get()) is not None:
            try:
                influx_write(self.url, batch)
            except Exception as exc:  # noqa: BLE001 - reported by close()
                self.errors.append(repr(exc))

    def add(self, lines: list[str]) -> None:
        self._buffer += lines
        self.lines += len(lines)
        while len(self._buffer) >= BATCH_LINES:
            self.queue.put(self._buffer[:BATCH_LINES])
            del self._buffer[:BATCH_LINES]
        if self.errors:
            raise RuntimeError(f"writing to InfluxDB failed: {self.errors[0]}")

    def close(self) -> None:
        if self._buffer:
            self.queue.put(self._buffer)
            self._buffer = []
        for _ in self._threads:
            self.queue.put(None)
        for thread in self._threads:
            thread.join()
        if self.errors:
            raise RuntimeError(f"writing to InfluxDB failed: {self.errors[0]}")


def generate(args: argparse.Namespace, url: str, patients: Sequence[Patient], now_ms: int) -> dict[str, Any]:
    """Write every patient's days; abort early if the projected time exceeds ``--max-generate-s``."""
    influx_query(url, f'CREATE DATABASE "{DATABASE}"', database=None)
    days = local_days(args.days, now_ms)
    receipts = Receipts(now_ms)
    writer = Writer(url)
    t0 = time.monotonic()
    cpu0 = time.process_time()
    checked = False
    next_report = t0 + 30
    samples_by_kind: dict[str, int] = defaultdict(int)
    for done, p in enumerate(patients, 1):
        r = random.Random(p.index * 104729 + 17)
        seq = 0
        for i, (start, end) in enumerate(days):
            if p.kind == "sock":
                lines, seq = sock_day(p, start, end, args.sample_every_s, r, seq, i, len(days), receipts)
            else:
                lines, seq = boot_day(p, start, end, r, seq, i, receipts)
            samples_by_kind[p.kind] += sum(1 for x in lines if x.startswith("sample,"))
            writer.add(lines)
        now = time.monotonic()
        share = done / len(patients)
        if not checked and (share >= 0.03 or now - t0 > 60) and done >= 5:
            checked = True
            projected = (now - t0) / share
            say(f"  write rate after {done} patients: {writer.lines / (now - t0):,.0f} lines/s; "
                f"projected {projected:.0f} s for all")  # fmt: skip
            if projected > args.max_generate_s:
                writer.close()
                suggest = args.sample_every_s * projected / args.max_generate_s
                raise SystemExit(f"generation would take about {projected:.0f} s (> --max-generate-s "
                                 f"{args.max_generate_s:.0f}); use a larger --sample-every-s (e.g. "
                                 f"{suggest:.0f}) or fewer --patients")  # fmt: skip
        if now >= next_report:
            next_report = now + 30
            say(f"  {done}/{len(patients)} patients, {writer.lines:,} lines, "
                f"{writer.lines / (now - t0):,.0f} lines/s")  # fmt: skip
    writer.close()
    wall = time.monotonic() - t0
    return {"lines": writer.lines, "samples": dict(samples_by_kind), "seconds": wall,
            "lines_per_s": writer.lines / wall, "generator_cpu_s": time.process_time() - cpu0,
            "receipts": receipts.fn is not None}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


class CpuWatch:
    """CPU seconds of this process, of influxd and of everything else, between start() and stop()."""

    def __init__(self, influx: InfluxDB) -> None:
        assert influx.process is not None
        self.influx = psutil.Process(influx.process.pid)
        self.me = psutil.Process()

    def __enter__(self) -> CpuWatch:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        self.result = {k: round(end[k] - self._start[k], 2) for k in end}
        self.result["other"] = round(self.result.pop("machine") - self.result["bench"] - self.result["influxd"], 2)

    def _read(self) -> dict[str, float]:
        def cpu(p: psutil.Process) -> float:
            t = p.cpu_times()
            return float(t.user + t.system)

        total = psutil.cpu_times()
        return {"bench": cpu(self.me), "influxd": cpu(self.influx),
                "machine": float(total.user + total.system + getattr(total, "nice", 0.0))}  # fmt: skip


def other_load(influx: InfluxDB, seconds: float = 3.0) -> float:
    """CPUs used by processes other than this bench and influxd over a few seconds."""
    with CpuWatch(influx) as watch:
        time.sleep(seconds)
    return round(watch.result["other"] / seconds, 2)


def wait_quiet(influx: InfluxDB, limit_s: float, cores: float = 0.3) -> float:
    """Wait (at most ``limit_s``) until others use under ``cores`` CPUs; returns what they used last."""
    deadline = time.monotonic() + limit_s
    while True:
        used = other_load(influx)
        if used <= cores or time.monotonic() >= deadline:
            return used
        say(f"    other processes use {used:.2f} CPUs: waiting for a quieter moment")


def settings_for(args: argparse.Namespace, url: str, registry_url: str, state: Path, smtp_port: int,
                 **extra: Any) -> MonitorSettings:  # fmt: skip
    values: dict[str, Any] = {
        "influx_url": url, "influx_database": DATABASE, "registry_database_url": registry_url,
        "state_database_url": f"sqlite:///{state}", "smtp_host": "127.0.0.1", "smtp_port": smtp_port,
        "smtp_tls": "off", "smtp_timeout_s": 10.0, "mail_from": "Compression monitor <monitor@benchclinic.example>",
        "digest_hour": 23, "interval_s": 60.0, "safety_interval_s": 10.0, "lease_s": 30.0, "log_level": "WARNING",
    }  # fmt: skip
    values.update(extra)
    return MonitorSettings(**values)


def fresh_state(data_dir: Path, name: str) -> Path:
    path = data_dir / f"state-{name}.db"
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


async def timed(coro: Any, limit_s: float) -> tuple[float, Any]:
    t = time.perf_counter()
    result = await asyncio.wait_for(coro, limit_s)
    return time.perf_counter() - t, result


async def profile_statements(url: str, contexts: Sequence[PatientContext], days_back: int,
                             now_ms: int) -> dict[str, Any]:  # fmt: skip
    """Each statement of ``day_stats``'s plan run alone, one at a time: seconds and rows per statement kind."""
    plan_zone = getattr(compliance, "plan_zone", None)
    days_fn = getattr(compliance, "local_days", None)
    if plan_zone is None or days_fn is None:
        return {"error": "monitor.compliance has no plan_zone/local_days any more"}
    reader = InfluxReader(url, timeout_s=3600, concurrency=1)
    by_zone: dict[str, list[PatientContext]] = defaultdict(list)
    for c in contexts:
        by_zone[c.timezone].append(c)
    rows: list[dict[str, Any]] = []
    for tz, members in sorted(by_zone.items()):
        zone = plan_zone(tz, members, days_fn(tz, days_back, now_ms, compliance.WINDOW_DAYS - 1), now_ms)
        for statement, kind in zip(zone.statements, zone.readers, strict=True):
            t = time.perf_counter()
            [series] = await reader.run(DATABASE, [statement])
            n = sum(len(x.get("values", [])) for x in series)
            rows.append({"kind": kind, "seconds": time.perf_counter() - t, "rows": n, "statement": statement[:160]})
    by_kind: dict[str, dict[str, float]] = {}
    for row in rows:
        k = by_kind.setdefault(row["kind"], {"statements": 0, "seconds": 0.0, "rows": 0})
        k["statements"] += 1
        k["seconds"] += row["seconds"]
        k["rows"] += row["rows"]
    return {"statements": rows, "by_kind": by_kind, "total_s": sum(r["seconds"] for r in rows)}


def cprofile_evaluation(mon: Monitor, timeout: float) -> dict[str, Any]:
    """One ``evaluate_once()`` under cProfile, ``asyncio.to_thread`` run inline so the thread work is profiled."""
    original = asyncio.to_thread

    async def inline(func: Callable[..., Any], /, *a: Any, **k: Any) -> Any:
        return func(*a, **k)

    profiler = cProfile.Profile()
    asyncio.to_thread = inline
    try:
        t = time.perf_counter()
        cpu = time.process_time()
        profiler.enable()
        ok = asyncio.run(asyncio.wait_for(mon.evaluate_once(), timeout))
        profiler.disable()
        wall, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    finally:
        asyncio.to_thread = original
    stats = pstats.Stats(profiler)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(35)
    tottime: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, tt, _, _) in raw.items():
        tottime[_area(filename)] += tt
    total = sum(tottime.values())
    return {"ok": ok, "wall_s": wall, "process_cpu_s": cpu_s, "profiled_s": total,
            "by_area": dict(sorted(tottime.items(), key=lambda kv: -kv[1])), "top": text.getvalue()}  # fmt: skip


def _area(filename: str) -> str:
    """Which part of the code a profiled function belongs to."""
    f = filename.replace("\\", "/")
    for needle, area in (("/monitor/", "monitor"), ("/devices/registry/", "registry service"),
                         ("sqlalchemy", "sqlalchemy"), ("pydantic", "pydantic"), ("aiohttp", "aiohttp"),
                         ("/json/", "json"), ("asyncio", "asyncio"), ("selectors", "asyncio"),
                         ("zoneinfo", "zoneinfo"), ("msgspec", "msgspec"), ("matplotlib", "matplotlib"),
                         ("sqlite3", "sqlite3")):  # fmt: skip
        if needle in f:
            return area
    if f.startswith("{") or f == "~":
        return "builtins (C)"
    return "other"


def new_minute(url: str, patients: Sequence[Patient], receipts_ms: int) -> None:
    """A minute of new data for every sock patient (as a live fleet would deliver between two evaluations)."""
    now_ms = int(time.time() * 1000) - 1000
    receipts = Receipts(receipts_ms)
    lines = []
    for p in patients:
        if p.kind != "sock" or p.profile == "silent":
            continue
        head = f"sample,clinic={CLINIC},device={p.device},kind=sock,patient={p.code} "
        lines.append(f"{head}ankle_mmhg=22.5,calf_mmhg=18.0,worn=true,worn_s=60.0,skin_temp_c=32.4,seq=900000i,"
                     f"battery_pct=70i {now_ms}000000")  # fmt: skip
        lines += receipts.for_hours(head, iter([now_ms // 3_600_000 * 3_600_000 * 1_000_000]))
    for i in range(0, len(lines), BATCH_LINES):
        influx_write(url, lines[i : i + BATCH_LINES])


def incremental_hints() -> list[str]:
    """Names in the monitor's code that suggest an incremental mode (reported, for the reader)."""
    found = [
        f"MonitorSettings.{n}"
        for n in MonitorSettings.model_fields
        if any(w in n for w in ("increment", "full", "receipt"))
    ]
    found += [f"Monitor.{n}" for n in dir(Monitor) if any(w in n for w in ("increment", "receipt", "dirty"))]
    found += [f"compliance.{n}" for n in dir(compliance) if any(w in n for w in ("increment", "receipt", "dirty"))]
    return found


async def evaluate_phase(args: argparse.Namespace, influx: InfluxDB, registry_url: str, patients: Sequence[Patient],
                         smtp: SmtpTestServer, results: dict[str, Any]) -> None:  # fmt: skip
    out: dict[str, Any] = results.setdefault("evaluate", {})
    url = influx.url
    out["incremental_hints"] = incremental_hints()
    out["influx_restart_s"] = restart_influx(influx)
    out["others_cpus_before"] = wait_quiet(influx, args.quiet_wait)
    say(f"evaluate: InfluxDB restarted ({out['influx_restart_s']:.1f} s); others use "
        f"{out['others_cpus_before']:.2f} CPUs")  # fmt: skip
    settings = settings_for(args, url, registry_url, fresh_state(args.data_dir, "probe"), smtp.port)
    probe = Monitor(settings)
    t = time.perf_counter()
    contexts = load_contexts(probe.registry)
    out["registry_load_s"] = time.perf_counter() - t
    judged = [c for c in contexts if c.rx is not None]
    out["patients_judged"] = len(judged)
    say(f"  registry: {len(contexts)} patients ({len(judged)} judged) loaded in {out['registry_load_s']:.2f} s")
    now_ms = int(time.time() * 1000)
    fetched = compliance.local_days(TIMEZONE, settings.days_back, now_ms, compliance.WINDOW_DAYS - 1)
    start, end = fetched[0][1], fetched[-1][2]
    out["range"] = {"days": len(fetched), "start_ms": start, "end_ms": end}
    reader = InfluxReader(url, timeout_s=args.eval_timeout_s)

    # day_stats first, on cold caches (right after the restart), then warm.
    cold: list[float] = []
    for i in range(args.repeat):
        with CpuWatch(influx) as cpu:
            seconds, stats = await timed(day_stats(reader, DATABASE, judged, settings.days_back), args.eval_timeout_s)
        cold.append(seconds)
        which = "cold" if i == 0 else "warm"
        say(f"  day_stats #{i + 1} ({which}): {seconds:.2f} s, {len(stats)} patients; cpu {cpu.result}")
        out.setdefault("day_stats_cpu", []).append(cpu.result)
    out["day_stats_s"] = cold
    out["day_stats_cold_s"] = cold[0]
    out["day_stats_warm"] = summary(cold[1:])

    # The raw cost of one aggregate pass over the same range: with and without the monitor's patient filter.
    bare = (f"SELECT count(worn) FROM sample WHERE time >= {start}ms AND time < {end}ms "
            f"GROUP BY time(1d), patient fill(none) tz('{TIMEZONE}')")  # fmt: skip
    from monitor import queries as q

    filtered = q.daily_samples([c.patient for c in judged], TIMEZONE, start, end)
    count_only = (f"SELECT count(worn) FROM sample WHERE {q.patient_filter([c.patient for c in judged])} AND "
                  f"{q.time_range(start, end)} GROUP BY time(1d), patient fill(none) tz('{TIMEZONE}')")  # fmt: skip
    raw: dict[str, list[float]] = {"count(worn), no patient filter": [], "count(worn), monitor's patient filter": [],
                                   "daily_samples (count+sum+min, filter)": []}  # fmt: skip
    one = InfluxReader(url, timeout_s=args.eval_timeout_s, concurrency=1)
    for _ in range(args.repeat):
        for name, statement in zip(raw, (bare, count_only, filtered), strict=True):
            seconds, _ = await timed(one.run(DATABASE, [statement]), args.eval_timeout_s)
            raw[name].append(seconds)
    out["raw_aggregate"] = {k: summary(v) for k, v in raw.items()}
    out["raw_statement"] = bare
    for k, v in out["raw_aggregate"].items():
        say(f"  raw {k}: {fmt(v)}")
    say("  each statement of the plan alone, one at a time ...")
    out["statements"] = await asyncio.wait_for(profile_statements(url, judged, settings.days_back, now_ms),
                                               args.eval_timeout_s * 3)  # fmt: skip
    for kind, row in out["statements"].get("by_kind", {}).items():
        say(f"    {kind:10s} {int(row['statements']):3d} statements {row['seconds']:7.2f} s {int(row['rows']):7d} rows")

    # evaluate_once: a new monitor on a fresh state (its first evaluation), then the steady state.
    firsts: list[float] = []
    steadies: list[float] = []
    mon = probe
    for r in range(args.repeat):
        mon = Monitor(settings_for(args, url, registry_url, fresh_state(args.data_dir, f"eval{r}"), smtp.port))
        with CpuWatch(influx) as cpu:
            seconds, ok = await timed(mon.evaluate_once(), args.eval_timeout_s)
        firsts.append(seconds)
        say(f"  evaluate_once #{r + 1} first (fresh state): {seconds:.2f} s ok={ok} opened={mon.counters.opened} "
            f"cpu {cpu.result}")  # fmt: skip
        out.setdefault("first_detail", []).append({"s": seconds, "ok": ok, "opened": mon.counters.opened,
                                                   "cpu": cpu.result,
                                                   "read": getattr(mon.counters, "last_read_days", None)})  # fmt: skip
        for k in range(args.steady):
            new_minute(url, patients, int(time.time() * 1000))
            with CpuWatch(influx) as cpu:
                seconds, ok = await timed(mon.evaluate_once(), args.eval_timeout_s)
            steadies.append(seconds)
            say(f"  evaluate_once #{r + 1}.{k + 1} steady: {seconds:.2f} s ok={ok} cpu {cpu.result}")
            read = getattr(mon.counters, "last_read_days", None)  # incremental mode: {days read back: patients}
            say(f"    days read back -> patients: {read}")
            out.setdefault("steady_detail", []).append({"s": seconds, "ok": ok, "cpu": cpu.result, "read": read})
    out["evaluate_first"] = summary(firsts)
    out["evaluate_steady"] = summary(steadies)
    out["pending_mails"] = mon.state.pending()
    raw_median = out["raw_aggregate"]["count(worn), no patient filter"]["median"]
    out["ratio_first_to_raw"] = out["evaluate_first"]["median"] / raw_median
    if steadies:
        out["ratio_steady_to_raw"] = out["evaluate_steady"]["median"] / raw_median
    out["state_for_latency"] = mon.settings.state_database_url

    if not args.no_cprofile:
        say("  evaluate_once under cProfile ...")
        new_minute(url, patients, int(time.time() * 1000))
        out["cprofile"] = await asyncio.to_thread(cprofile_evaluation, mon, args.eval_timeout_s)
        prof = out["cprofile"]
        say(f"    wall {prof['wall_s']:.2f} s, this process's CPU {prof['process_cpu_s']:.2f} s; by area: "
            + ", ".join(f"{k} {v:.2f}" for k, v in list(prof["by_area"].items())[:8]))  # fmt: skip


async def latency_phase(args: argparse.Namespace, influx: InfluxDB, registry_url: str, patients: Sequence[Patient],
                        smtp: SmtpTestServer, results: dict[str, Any]) -> None:  # fmt: skip
    out: dict[str, Any] = results.setdefault("latency", {})
    state_url = results.get("evaluate", {}).get("state_for_latency")
    state = Path(state_url.removeprefix("sqlite:///")) if state_url else fresh_state(args.data_dir, "latency")
    settings = settings_for(args, influx.url, registry_url, state, smtp.port)
    out["settings"] = {"interval_s": settings.interval_s, "safety_interval_s": settings.safety_interval_s,
                       "days_back": settings.days_back, "state": str(state)}  # fmt: skip
    mon = Monitor(settings)
    if not state_url:  # no evaluate phase in this run: a first evaluation queues what it finds, drained below
        seconds, ok = await timed(mon.evaluate_once(), args.eval_timeout_s)
        say(f"latency: first evaluation on a fresh state: {seconds:.1f} s (ok={ok})")
        mon = Monitor(settings)  # a new process's monitor: its first run() evaluation is a full one
    before = len(smtp.received())
    say(f"latency: draining the outbox ({mon.state.pending()} e-mails queued by the evaluations) ...")
    t = time.perf_counter()
    try:
        sent = await asyncio.wait_for(mon.send_due(), args.trial_timeout_s * 3)
    except TimeoutError:
        sent = -1  # the loop sends the rest
    seconds = time.perf_counter() - t
    out["drain"] = {"sent": sent, "seconds": round(seconds, 2), "received": len(smtp.received()) - before}
    say(f"  {out['drain']['received']} e-mails received in {seconds:.1f} s")
    out["others_cpus_before"] = wait_quiet(influx, args.quiet_wait)
    task = asyncio.create_task(mon.run())
    t = time.monotonic()
    while mon.counters.evaluations < 1:
        if task.done() or time.monotonic() - t > args.eval_timeout_s:
            mon.stop()
            raise RuntimeError("the monitor's first evaluation did not finish")
        await asyncio.sleep(0.2)
    out["loop_first_evaluation_s"] = mon.counters.last_evaluation_s
    say(f"  Monitor.run(): first full evaluation done in {mon.counters.last_evaluation_s:.1f} s")
    # Boots without an over-pressure in the last 2 days (an earlier run's trial may have left one: its episode is
    # open, so a new sample would send nothing).
    peaks = influx_query(influx.url, f"SELECT max(foot_mmhg) FROM sample WHERE kind = 'boot' AND foot_mmhg > "
                         f"{BOOT_MAX_MMHG} AND time >= now() - 2d GROUP BY patient")  # fmt: skip
    taken = {(x.get("tags") or {}).get("patient") for x in peaks["results"][0].get("series", [])}
    boots = [p for p in patients if p.kind == "boot" and p.profile == "compliant" and p.code not in taken]
    trials: list[dict[str, Any]] = []
    try:
        for i, p in enumerate(boots[: args.trials]):
            await asyncio.sleep(args.trial_gap_s)
            evals_before = mon.counters.evaluations
            now_ns = time.time_ns()
            line = (f"sample,clinic={CLINIC},device={p.device},kind=boot,patient={p.code} foot_mmhg=121.5,"
                    f"ankle_mmhg=104.0,calf_mmhg=96.0,thigh_mmhg=80.0,worn=true,worn_s=2.0,skin_temp_c=33.0,"
                    f"seq=999999i,battery_pct=88i {now_ns}")  # fmt: skip
            hour_ns = now_ns // 3_600_000_000_000 * 3_600_000_000_000
            head = f"sample,clinic={CLINIC},device={p.device},kind=boot,patient={p.code} "
            extra = Receipts(now_ns // 1_000_000).for_hours(head, iter([hour_ns]))
            written_at = time.time()
            await asyncio.to_thread(influx_write, influx.url, [line, *extra])
            stored_at = time.time()
            got = None
            seen = len(smtp.received())
            while time.time() - written_at < args.trial_timeout_s:
                # Only the messages that arrived since, headers only: this loop shares the monitor's event loop.
                fresh = smtp.received()[seen:]
                seen += len(fresh)
                got = next((m for m in fresh if p.code in _subject(m.raw)), None)
                if got:
                    break
                await asyncio.sleep(0.1)
            trial = {"patient": p.code, "write_s": stored_at - written_at,
                     "latency_s": (got.received_at - written_at) if got else None,
                     "subject": _subject(got.raw) if got else None,
                     "evaluations_meanwhile": mon.counters.evaluations - evals_before}  # fmt: skip
            trials.append(trial)
            lat = f"{trial['latency_s']:.2f} s" if got else f"none within {args.trial_timeout_s:.0f} s"
            say(f"  trial {i + 1}: {p.code} over-pressure -> e-mail {lat} ({trial['evaluations_meanwhile']} "
                f"evaluation(s) meanwhile; {trial['subject']})")  # fmt: skip
    finally:
        mon.stop()
        await asyncio.wait_for(task, args.eval_timeout_s)
    out["trials"] = trials
    values = [t["latency_s"] for t in trials if t["latency_s"] is not None]
    out["latency"] = summary(values)
    out["missing"] = sum(1 for t in trials if t["latency_s"] is None)
    out["counters"] = {"evaluations": mon.counters.evaluations, "safety_checks": mon.counters.safety_checks,
                       "last_evaluation_s": mon.counters.last_evaluation_s}  # fmt: skip


def _subject(raw: bytes) -> str:
    return str(BytesHeaderParser(policy=email.policy.default).parsebytes(raw).get("Subject", ""))


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "git": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--porcelain", "--untracked-files=no").splitlines(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "mem_gb": round(psutil.virtual_memory().total / 2**30, 1), "machine": platform.platform()}  # fmt: skip


def write_markdown(path: Path, results: dict[str, Any]) -> str:
    lines = [f"# Monitor bench {results['env']['date']} (git {results['env']['git']})", ""]
    lines.append(f"command: `{results['command']}`")
    gen = results.get("data", {})
    lines.append(
        f"data: {json.dumps({k: gen.get(k) for k in ('patients', 'days', 'sample_every_s', 'samples', 'lines')})}"
    )
    ev = results.get("evaluate")
    if ev:
        lines += [
            f"- registry load: {ev['registry_load_s']:.2f} s",
            f"- day_stats cold: {ev['day_stats_cold_s']:.2f} s; warm {fmt(ev['day_stats_warm'])}",
            *(f"- raw {k}: {fmt(v)}" for k, v in ev["raw_aggregate"].items()),
            f"- evaluate_once first: {fmt(ev['evaluate_first'])}; steady: {fmt(ev['evaluate_steady'])}",
            f"- ratio first/raw {ev['ratio_first_to_raw']:.1f}" + (f", steady/raw {ev['ratio_steady_to_raw']:.1f}"
                                                                    if "ratio_steady_to_raw" in ev else ""),
        ]  # fmt: skip
        for kind, row in ev["statements"].get("by_kind", {}).items():
            lines.append(
                f"  - {kind}: {int(row['statements'])} statements, {row['seconds']:.2f} s, {int(row['rows'])} rows"
            )
        if "cprofile" in ev:
            prof = ev["cprofile"]
            lines.append(f"- cProfile: wall {prof['wall_s']:.2f} s, CPU {prof['process_cpu_s']:.2f} s, "
                         + ", ".join(f"{k} {v:.2f}" for k, v in prof["by_area"].items()))  # fmt: skip
    la = results.get("latency")
    if la:
        lines.append(f"- drain: {la['drain']}")
        lines.append(f"- over-pressure -> e-mail: {fmt(la['latency'])}, missing {la['missing']}")
        lines += [f"  - {t}" for t in la["trials"]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=1000)
    p.add_argument("--boot-share", type=float, default=0.15)
    p.add_argument("--days", type=int, default=31, help="local days of data, today included (%(default)s)")
    p.add_argument("--sample-every-s", type=int, default=60, help="sock sample period (%(default)s s)")
    p.add_argument("--data-dir", type=Path, default=REPO / "var" / "monitorbench")
    p.add_argument("--fresh", action="store_true", help="regenerate the data even if a matching set exists")
    p.add_argument("--reuse-hours", type=float, default=6.0)
    p.add_argument("--max-generate-s", type=float, default=1200.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steady", type=int, default=1, help="steady-state evaluations after each first one")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--trial-gap-s", type=float, default=13.0)
    p.add_argument("--trial-timeout-s", type=float, default=300.0)
    p.add_argument("--eval-timeout-s", type=float, default=900.0)
    p.add_argument("--quiet-wait", type=float, default=30.0)
    p.add_argument("--no-cprofile", action="store_true")
    p.add_argument("--skip", action="append", default=[], choices=["evaluate", "latency"])
    args = p.parse_args()
    # SIGTERM (e.g. timeout) ends like Ctrl-C, so InfluxDB is stopped and the results written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.data_dir = args.data_dir.resolve()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results: dict[str, Any] = {"env": environment(), "command": " ".join([".venv/bin/python", *sys.argv]),
                               "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    say(f"git {results['env']['git']} ({len(results['env']['dirty'])} files modified in the checkout); "
        f"load average {results['env']['load_avg']}")  # fmt: skip
    sizes = {"patients": args.patients, "boot_share": args.boot_share, "days": args.days,
             "sample_every_s": args.sample_every_s, "receipts": hasattr(encode, "receipt_lines")}  # fmt: skip
    manifest_path = args.data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    reuse = (not args.fresh and manifest.get("sizes") == sizes
             and time.time() - manifest.get("generated_at_ms", 0) / 1000 < args.reuse_hours * 3600)  # fmt: skip
    influx_dir = args.data_dir / "influxdb"
    if not reuse and influx_dir.exists():
        shutil.rmtree(influx_dir)
    patients = fleet(args.patients, args.boot_share)
    influx = start_influx(influx_dir)
    say(f"InfluxDB {influx.url} ({influx_dir})")
    try:
        if reuse:
            results["data"] = manifest
            say(f"reusing the data of {datetime.fromtimestamp(manifest['generated_at_ms'] / 1000, UTC):%H:%M} UTC: "
                f"{manifest['samples']} samples")  # fmt: skip
            registry_url = manifest["registry_url"]
        else:
            now_ms = int(time.time() * 1000) - 60_000
            today = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(TIMEZONE)).date()
            t = time.monotonic()
            registry_url = register(args.data_dir / "registry.db", patients, today - timedelta(days=args.days + 7))
            say(f"registry: {len(patients)} patients registered in {time.monotonic() - t:.1f} s")
            say(f"generating {args.days} days of {args.patients} patients (socks every {args.sample_every_s} s) ...")
            gen = generate(args, influx.url, patients, now_ms)
            say(f"  {gen['lines']:,} lines in {gen['seconds']:.0f} s ({gen['lines_per_s']:,.0f}/s; generator CPU "
                f"{gen['generator_cpu_s']:.0f} s); compacting ...")  # fmt: skip
            gen["compaction_wait_s"] = wait_compacted(influx, 900)
            stored = count_samples(influx.url)
            say(f"  stored {stored:,} samples; InfluxDB settled after {gen['compaction_wait_s']:.0f} s")
            manifest = {"sizes": sizes, "generated_at_ms": now_ms, "registry_url": registry_url,
                        "stored_samples": stored, **sizes, **gen}  # fmt: skip
            manifest_path.write_text(json.dumps(manifest, indent=1))
            results["data"] = manifest
        with SmtpTestServer() as smtp:
            if "evaluate" not in args.skip:
                asyncio.run(evaluate_phase(args, influx, registry_url, patients, smtp, results))
            if "latency" not in args.skip:
                asyncio.run(latency_phase(args, influx, registry_url, patients, smtp, results))
    finally:
        influx.stop(timeout=120)
        (args.data_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = write_markdown(args.data_dir / "results.md", results)
    print(text)
    ev, la = results.get("evaluate"), results.get("latency")
    if ev:
        met = ev["evaluate_first"]["median"] < TARGET_EVAL_S
        print(f"target 1 (evaluate {args.patients} patients < {TARGET_EVAL_S:.0f} s): first evaluation median "
              f"{ev['evaluate_first']['median']:.1f} s -> {'met' if met else 'MISSED'}")  # fmt: skip
    if la and la.get("latency"):
        met = la["latency"]["max"] < TARGET_ALERT_S and not la["missing"]
        print(f"target 2 (over-pressure -> e-mail < {TARGET_ALERT_S:.0f} s): max {la['latency']['max']:.1f} s -> "
              f"{'met' if met else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
