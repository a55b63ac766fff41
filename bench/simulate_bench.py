#!/usr/bin/env python3
"""Simulator benchmark: the issue-3 performance targets of ``compression simulate``.

Real servers on loopback (Mosquitto and InfluxDB started by
:mod:`compression.localservers` under ``--data-dir``); the load generator and
the ingester each run as their own process (``compression simulate``,
``compression ingest``) so their CPU time can be read exactly (``os.wait4``
for the generator, psutil for the servers and the ingester). Helpers (CPU
accounting, InfluxDB counts, environment) come from ``bench/ingest_bench.py``.

Before every measurement the bench waits (up to ``--bench-wait`` s) until no
``ingest_bench.py`` runs (the machine's 2 cores are shared), then up to
``--quiet-wait`` s for the rest of the machine to use less than
``--quiet-cores`` CPUs; what other processes used during each run is reported.

Phases (``--skip`` leaves one out):

load
    ``compression simulate --load --devices 10000 --connections 4 ...`` (no
    ingester): the broker-acknowledged publish rate the command reports (first
    publish to last PUBACK) and the generator's CPU per sample (whole process,
    and with the start-up cost of a 1-message run subtracted). Target: >= 20,000
    samples/s. ``--repeat`` runs.
load-e2e
    The same command with ``compression ingest`` running: first publish until
    ``count(ankle_mmhg)`` in InfluxDB equals the total. Informational.
backfill
    ``compression simulate --socks 100 --boots 0 --days 14 --ground-truth F``
    with the ingester running. Timed from the command's start until
    ``SELECT count(worn) FROM sample`` equals the ground truth's sum of
    ``transport.samples_stored`` (read from F, written by the same command
    before it publishes). The command's stderr lines give the phases (fleet
    built, ground truth written, publishing done). Also timed alone, in this
    process: generating the fleet's messages without publishing them. Target:
    under 120 s end to end.
profile
    When the backfill target is missed (``--profile auto``), or always: one more
    backfill with py-spy attached to the simulate process and to the ingester;
    the summary gives the share of samples per stage.

Results go to ``--data-dir`` (``sim-results.json``, profiles).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import (
    COMPRESSION_BIN,
    PY_SPY_BIN,
    REPO,
    count_or_zero,
    cpu_seconds,
    environment,
    machine_busy_seconds,
    say,
)

from compression.localservers import InfluxDB, Mosquitto, free_port, start_influxdb, start_mosquitto
from devices.protocol import TOPIC_ROOT, Status, encode, topic_for
from simulators.publisher import Outgoing, Publisher
from simulators.scenarios import build_fleet

TARGET_LOAD_SAMPLES_PER_S = 20_000
TARGET_BACKFILL_S = 120.0

# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@dataclass
class Child:
    """A ``compression`` child process whose stderr/stdout lines are stamped as they arrive."""

    argv: list[str]
    log_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    rusage: Any = None
    returncode: int | None = None

    def start(self) -> None:
        """Start it; a thread reads its merged output."""
        self.started = time.time()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w") as log:
            buf = b""
            while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
                buf += chunk
                *done, buf = re.split(rb"[\r\n]", buf)
                now = time.time()
                for raw in done:
                    if raw.strip():
                        text = raw.decode(errors="replace")
                        self.lines.append((now, text))
                        log.write(f"{now - self.started:8.2f} {text}\n")

    def wait(self) -> int:
        """Reap it with its resource usage (exact CPU seconds of the whole process); once."""
        if self.returncode is not None:
            return self.returncode
        _, status, self.rusage = os.wait4(self.proc.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode
        self._reader.join(10)
        return self.returncode

    def running(self) -> bool:
        """True while it runs; does not reap it (:meth:`wait` needs its resource usage)."""
        if self.returncode is not None:
            return False
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    @property
    def cpu(self) -> float:
        """User + system CPU seconds (after :meth:`wait`)."""
        return float(self.rusage.ru_utime + self.rusage.ru_stime) if self.rusage else 0.0

    def first(self, prefix: str) -> tuple[float, str] | None:
        """The first output line starting with ``prefix`` and when it arrived."""
        return next(((t, s) for t, s in self.lines if s.startswith(prefix)), None)


class Ingester:
    """``compression ingest`` as a child process, with a fresh database."""

    def __init__(self, mq: Mosquitto, db: InfluxDB, run_dir: Path, label: str) -> None:
        tag = uuid.uuid4().hex[:6]
        self.db = db
        self.mq = mq
        self.database = f"sim_{label}_{tag}".replace("-", "_")
        self.log_path = run_dir / f"ingest-{label}-{tag}.log"
        argv = [str(COMPRESSION_BIN), "ingest", "--mqtt-url", mq.url, "--influx-url", db.url,
                "--influx-database", self.database, "--mqtt-client-id", f"simbench.ingest-{tag}",
                "--mqtt-topic-root", TOPIC_ROOT,
                "--metrics-port", str(free_port()), "--log-level", "INFO",
                "--dead-letter-file", str(run_dir / f"dead-letter-{tag}.jsonl")]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = 90) -> None:
        """Publish a status message until it is stored: subscription, decode and write all work."""
        deadline = time.monotonic() + timeout
        probe = Outgoing(topic_for("simbench-probe", "status"), encode(Status(v=1, state="online")), 0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingester exited with {self.proc.returncode}; see {self.log_path}")
            with Publisher(self.mq.url, f"simbench-probe-{uuid.uuid4().hex[:6]}") as pub:
                pub.publish_all([probe], ack_timeout=10)
            for _ in range(20):
                if count_or_zero(self.db.url, self.database, "SELECT count(online) FROM status"):
                    return
                time.sleep(0.1)
        raise TimeoutError(f"ingester not ready within {timeout:.0f} s; see {self.log_path}")

    def count(self, q: str) -> int:
        """A count query on the ingester's database (0 while nothing is there)."""
        return count_or_zero(self.db.url, self.database, q, timeout=60)

    def stop(self) -> None:
        """SIGTERM (clean shutdown), SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Window:
    """CPU seconds of named processes, and of the rest of the machine, over one window."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = {n: cpu_seconds(p) for n, p in pids.items()}
        self.busy0 = machine_busy_seconds()
        self.wall0 = time.time()

    def end(self, extra: dict[str, float]) -> dict[str, float]:
        """Per process CPU s since the start, plus ``extra`` (processes already reaped) and ``other``."""
        used = {n: cpu_seconds(p) - self.start[n] for n, p in self.pids.items()}
        used.update(extra)
        busy = machine_busy_seconds() - self.busy0
        used["other"] = max(0.0, busy - sum(used.values()))
        used["machine_busy"] = busy
        used["wall"] = time.time() - self.wall0
        return used


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


class Bench:
    """Servers and results of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir = Path(args.data_dir)
        self.run_dir = self.data_dir / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        say(f"starting Mosquitto and InfluxDB under {self.run_dir}/")
        self.mq = start_mosquitto(self.run_dir)
        self.db = start_influxdb(self.run_dir)
        say(f"Mosquitto {self.mq.url}, InfluxDB {self.db.url}")

    def close(self) -> None:
        """Stop the servers."""
        self.mq.stop()
        self.db.stop()

    def pid(self, server: Mosquitto | InfluxDB) -> int | None:
        """A server's process id."""
        return server.process.pid if server.process is not None else None

    def wait_turn(self) -> dict[str, float]:
        """Wait until no ingest_bench.py runs, then for a quiet moment; return what was waited and seen."""
        waited0 = time.monotonic()
        deadline = waited0 + self.args.bench_wait
        announced = False
        while subprocess.run(["pgrep", "-f", "ingest_bench.py"], capture_output=True).returncode == 0:
            if time.monotonic() >= deadline:
                say("    ingest_bench.py is still running after --bench-wait: measuring anyway (noted)")
                break
            if not announced:
                say("    ingest_bench.py is running: waiting for it to finish")
                announced = True
            time.sleep(5)
        bench_wait = time.monotonic() - waited0
        ours = [self.pid(self.mq), self.pid(self.db), os.getpid()]
        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            busy0, ours0 = machine_busy_seconds(), sum(cpu_seconds(p) for p in ours)
            time.sleep(1.0)
            other = max(0.0, machine_busy_seconds() - busy0 - (sum(cpu_seconds(p) for p in ours) - ours0))
            if other <= self.args.quiet_cores or time.monotonic() >= deadline:
                break
            say(f"    other processes use {other:.2f} CPUs: waiting for a quieter moment")
        if other > self.args.quiet_cores:
            say(f"    the machine stays busy (other processes use {other:.2f} CPUs): measuring anyway")
        running = subprocess.run(["pgrep", "-f", "ingest_bench.py"], capture_output=True).returncode == 0
        return {"waited_for_ingest_bench_s": bench_wait, "other_cpus_before": other, "ingest_bench_running": running}

    def simulate(self, label: str, *extra: str) -> Child:
        """A ``compression simulate`` child against the bench's broker (not started yet)."""
        argv = [str(COMPRESSION_BIN), "simulate", "--mqtt-url", self.mq.url, *extra]
        return Child(argv, self.run_dir / f"simulate-{label}.log")

    # -- load -------------------------------------------------------------------
    def load_argv(self) -> list[str]:
        """The --load arguments of the measured runs."""
        a = self.args
        return ["--load", "--devices", str(a.devices), "--messages", str(a.messages), "--samples", str(a.samples),
                "--connections", str(a.connections)]  # fmt: skip

    def startup_cpu(self) -> float:
        """CPU s of a ``simulate --load`` run of a single message: start-up, imports, connections."""
        child = self.simulate("startup", "--load", "--devices", "1", "--messages", "1", "--samples",
                              str(self.args.samples), "--connections", str(self.args.connections))  # fmt: skip
        child.start()
        if child.wait():
            raise RuntimeError(f"start-up run failed; see {child.log_path}")
        return child.cpu

    def load(self, label: str, startup: float, ingest: bool = False) -> dict[str, Any]:
        """One ``simulate --load`` run; with ``ingest``, until InfluxDB holds every sample."""
        a = self.args
        total = a.devices * a.messages * a.samples
        say(f"{label}: simulate --load, {a.devices:,} devices x {a.messages} messages x {a.samples} samples = "
            f"{total:,} samples over {a.connections} connections" + (" through the ingester" * ingest))  # fmt: skip
        ingester = Ingester(self.mq, self.db, self.run_dir, label) if ingest else None
        try:
            if ingester:
                ingester.wait_ready()
            turn = self.wait_turn()
            pids = {"mosquitto": self.pid(self.mq), "influxd": self.pid(self.db), "bench": os.getpid()}
            if ingester:
                pids["ingester"] = ingester.proc.pid
            window = Window(pids)
            child = self.simulate(label, *self.load_argv())
            child.start()
            stored, queryable = 0, 0.0
            if ingester:
                stored, queryable = self._wait_count(ingester, "SELECT count(ankle_mmhg) FROM sample", total,
                                                     child, child.started)  # fmt: skip
            if child.wait():
                raise RuntimeError(f"simulate --load exited with {child.returncode}; see {child.log_path}")
            cpu = window.end({"simulate": child.cpu})
        finally:
            if ingester:
                ingester.stop()
        done = child.first("done:")
        if done is None:
            raise RuntimeError(f"no result line; see {child.log_path}")
        m = re.search(r"\(([\d,]+) samples\) acknowledged in ([\d.]+) s", done[1])
        assert m, done[1]
        samples, seconds = int(m.group(1).replace(",", "")), float(m.group(2))
        result = {
            "label": label, "command": "compression simulate --mqtt-url URL " + " ".join(self.load_argv()),
            "samples": samples, "publish_s": seconds, "acked_samples_per_s": samples / seconds,
            "process_wall_s": (done[0] - child.started), "simulate_cpu_s": child.cpu,
            "simulate_cpu_us_per_sample": child.cpu / samples * 1e6,
            "simulate_cpu_us_per_sample_without_startup": (child.cpu - startup) / samples * 1e6,
            "cpu": cpu, "turn": turn,
        }  # fmt: skip
        say(f"  {label}: {result['acked_samples_per_s']:,.0f} samples/s acknowledged by the broker "
            f"({samples:,} in {seconds:.2f} s); generator {result['simulate_cpu_us_per_sample']:.1f} us CPU/sample "
            f"({result['simulate_cpu_us_per_sample_without_startup']:.1f} without start-up)")  # fmt: skip
        if ingester:
            result["stored"] = stored
            result["end_to_end_s"] = queryable - child.started
            result["end_to_end_samples_per_s"] = stored / (queryable - child.started)
            say(f"  {label}: all {stored:,} samples queryable {result['end_to_end_s']:.1f} s after the command "
                f"started: {result['end_to_end_samples_per_s']:,.0f} samples/s end to end")  # fmt: skip
        say("  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
        return result

    def _wait_count(self, ingester: Ingester, q: str, total: int | Callable[[], int | None], child: Child,
                    go: float) -> tuple[int, float]:  # fmt: skip
        """Poll ``q`` until it reaches the total (known now, or once ``total()`` returns it)."""
        stored, changed, next_progress = 0, time.time(), 0.0
        while True:
            publishing = child.running()
            time.sleep(self.args.poll_interval if not publishing else max(1.0, self.args.poll_interval))
            expected = total() if callable(total) else total
            n = ingester.count(q)
            now = time.time()
            if expected is not None and n >= expected:
                return n, now
            if n != stored:
                stored, changed = n, now
            if now >= next_progress:
                say(f"    {now - go:6.1f} s: {n:>10,} / {f'{expected:,}' if expected else '?'} samples queryable"
                    + (" (still publishing)" if publishing else ""))  # fmt: skip
                next_progress = now + 5
            if not publishing and child.wait():
                raise RuntimeError(f"simulate failed; see {child.log_path}")
            if now - changed > self.args.stall_timeout:
                raise RuntimeError(f"stalled at {stored:,} samples for {self.args.stall_timeout:.0f} s")

    # -- backfill -----------------------------------------------------------------
    def generation_only(self) -> dict[str, Any]:
        """Build the backfill fleet and iterate its messages without publishing: generation cost alone."""
        a = self.args
        say(f"generation only: {a.socks} socks, {a.days} days, seed {a.seed}, iterated in this process")
        self.wait_turn()
        c0, w0 = time.process_time(), time.time()
        fleet = build_fleet(socks=a.socks, boots=0, seed=a.seed, days=a.days, end=datetime.now(UTC))
        messages = samples = 0
        for message in fleet.messages():
            messages += 1
            samples += message.samples
        result = {"messages": messages, "samples_sent": samples, "cpu_s": time.process_time() - c0,
                  "wall_s": time.time() - w0}  # fmt: skip
        c0 = time.process_time()
        truth = fleet.ground_truth()
        result["ground_truth_cpu_s"] = time.process_time() - c0
        result["samples_stored"] = sum(p["transport"]["samples_stored"] for p in truth["patients"])
        say(f"  {messages:,} messages, {samples:,} samples generated in {result['cpu_s']:.1f} s CPU "
            f"({result['cpu_s'] / samples * 1e6:.1f} us/sample, {result['cpu_s'] / messages * 1e6:.0f} us/message); "
            f"ground truth {result['ground_truth_cpu_s']:.1f} s CPU")  # fmt: skip
        return result

    def backfill_argv(self, truth: Path) -> list[str]:
        """The backfill command's arguments."""
        a = self.args
        return ["--socks", str(a.socks), "--boots", "0", "--days", str(a.days), "--seed", str(a.seed),
                "--connections", str(a.connections), "--ground-truth", str(truth)]  # fmt: skip

    def backfill(self, label: str, profile: bool = False) -> dict[str, Any]:
        """One backfill through the ingester, timed until the last sample is queryable."""
        truth = self.run_dir / f"truth-{label}.json"
        argv = self.backfill_argv(truth)
        say(f"{label}: compression simulate {' '.join(argv)}, through the ingester")
        ingester = Ingester(self.mq, self.db, self.run_dir, label)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            ingester.wait_ready()
            turn = self.wait_turn()
            window = Window({"ingester": ingester.proc.pid, "mosquitto": self.pid(self.mq),
                             "influxd": self.pid(self.db), "bench": os.getpid()})  # fmt: skip
            child = self.simulate(label, *argv)
            child.start()
            if profile:
                for name, pid in (("simulate", child.proc.pid), ("ingester", ingester.proc.pid)):
                    out = self.run_dir / f"profile-{name}.txt"
                    spies.append(subprocess.Popen([str(PY_SPY_BIN), "record", "--pid", str(pid), "--rate", "50",
                                                   "--format", "raw", "--output", str(out), "--nonblocking"],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            expected: dict[str, int] = {}

            def expected_total() -> int | None:
                if "n" not in expected and child.first("ground truth:") is not None:
                    data = json.loads(truth.read_text())
                    expected["n"] = sum(p["transport"]["samples_stored"] for p in data["patients"])
                    expected["sent"] = sum(p["transport"]["samples_sent"] for p in data["patients"])
                return expected.get("n")

            stored, queryable = self._wait_count(ingester, "SELECT count(worn) FROM sample", expected_total,
                                                 child, child.started)  # fmt: skip
            if child.wait():
                raise RuntimeError(f"simulate exited with {child.returncode}; see {child.log_path}")
            cpu = window.end({"simulate": child.cpu})
            rejected = ingester.count("SELECT count(raw_bytes) FROM rejected")
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            ingester.stop()
        t0 = child.started
        phases = {name: (hit[0] - t0 if (hit := child.first(prefix)) else None)
                  for name, prefix in (("fleet_built", "fleet:"), ("ground_truth_written", "ground truth:"),
                                       ("publishing_done", "done:"))}  # fmt: skip
        done = child.first("done:")
        m = re.search(r"done: ([\d,]+) messages \(([\d,]+) samples.* in ([\d.]+) s", done[1] if done else "")
        result: dict[str, Any] = {
            "label": label, "command": "compression simulate --mqtt-url URL " + " ".join(argv),
            "expected_stored": expected.get("n"), "samples_sent": expected.get("sent"), "stored": stored,
            "rejected_rows": rejected, "end_to_end_s": queryable - t0, "phases_s": phases,
            "run_fleet_s": float(m.group(3)) if m else None,
            "messages": int(m.group(1).replace(",", "")) if m else None,
            "simulate_cpu_s": child.cpu, "cpu": cpu, "turn": turn, "profiled": profile,
        }  # fmt: skip
        if m and result["run_fleet_s"]:
            result["publish_samples_per_s"] = int(m.group(2).replace(",", "")) / result["run_fleet_s"]
        written, built = phases["ground_truth_written"], phases["fleet_built"]
        truth_s = written - built if written is not None and built is not None else 0.0
        result["end_to_end_without_ground_truth_s"] = float(result["end_to_end_s"]) - truth_s
        say(f"  {label}: {stored:,} samples queryable {result['end_to_end_s']:.1f} s after the start "
            f"(target < {TARGET_BACKFILL_S:.0f} s); phases at " + ", ".join(
                f"{k} {v:.1f} s" for k, v in phases.items() if v is not None))  # fmt: skip
        say("  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
        return result


# ---------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------

_SIM_STAGES: list[tuple[str, Callable[[str], bool]]] = [
    ("ground truth (--ground-truth file)", lambda s: "ground_truth" in s or "groundtruth.py" in s),
    ("JSON encoding of messages (devices/protocol.py encode)", lambda s: "protocol.py" in s and "encode" in s),
    (
        "reading generation (simulators/garments, physiology, badfirmware)",
        lambda s: any(f"simulators/{m}.py" in s for m in ("garments", "physiology", "badfirmware")),
    ),
    ("outbox (devices/outbox.py)", lambda s: "outbox.py" in s),
    ("paho network (loop, socket writes, PUBACK reads)", lambda s: "paho" in s),
    ("device client sender / locks (devices/client.py)", lambda s: "devices/client.py" in s),
    (
        "message ordering, fleet, run loop (scenarios.py, run.py)",
        lambda s: "scenarios.py" in s or "simulators/run.py" in s,
    ),
    ("start-up, imports", lambda s: "<module>" in s and "_find_and_load" in s),
]

_INGEST_STAGES: list[tuple[str, Callable[[str], bool]]] = [
    (
        "decode + line protocol (ingest/decode.py, encode.py)",
        lambda s: "ingest/decode.py" in s or "ingest/encode.py" in s,
    ),
    ("paho: socket reads + packet parsing", lambda s: "Client.loop_read" in s),
    ("acks + PUBACK writes", lambda s: "MqttConsumer.ack" in s or "Client.loop_write" in s),
    ("InfluxDB writes (ingest/write.py, aiohttp)", lambda s: "aiohttp" in s or "ingest/write.py" in s),
]


def summarize_profile(path: Path, stages: list[tuple[str, Callable[[str], bool]]], top: int = 12) -> dict[str, Any]:
    """Share of (non-idle) py-spy samples per stage (first match wins) and the hottest frames by self time."""
    by_stage: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {"samples": 0, "stages": [], "self": []}
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        by_stage[next((name for name, match in stages if match(stack)), "other")] += n
        leaf = stack.split(";")[-1]
        for marker in ("site-packages/", f"{REPO}/", f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/"):
            leaf = leaf.replace(marker, "")
        self_time[leaf] += n
    return {
        "samples": total,
        "stages": [(k, v / total) for k, v in by_stage.most_common()] if total else [],
        "self": [(k, v / total) for k, v in self_time.most_common(top)] if total else [],
    }


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="var/simbench", help="servers' data, logs, results (%(default)s)")
    p.add_argument("--devices", type=int, default=10_000, help="load: simulated devices (%(default)s)")
    p.add_argument("--messages", type=int, default=5, help="load: telemetry messages per device (%(default)s)")
    p.add_argument("--samples", type=int, default=10, help="load: samples per message (%(default)s)")
    p.add_argument("--connections", type=int, default=4, help="gateway connections, both phases (%(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="load runs without the ingester (%(default)s)")
    p.add_argument("--e2e-messages", type=int, default=3, help="load-e2e: messages per device (%(default)s)")
    p.add_argument("--socks", type=int, default=100, help="backfill: patients (socks) (%(default)s)")
    p.add_argument("--days", type=int, default=14, help="backfill: days of history (%(default)s)")
    p.add_argument("--seed", type=int, default=1, help="backfill: fleet seed (%(default)s)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="InfluxDB count poll interval, s (%(default)s)")
    p.add_argument("--stall-timeout", type=float, default=120, help="fail after no progress this long (%(default)s)")
    p.add_argument("--bench-wait", type=float, default=600,
                   help="before each run, wait up to this long for ingest_bench.py to end (%(default)s)")  # fmt: skip
    p.add_argument("--quiet-cores", type=float, default=0.25,
                   help="then wait until other processes use fewer CPUs than this (%(default)s)")  # fmt: skip
    p.add_argument("--quiet-wait", type=float, default=20, help="...for at most this many s (%(default)s)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="py-spy of a backfill: if its target is missed, always, never (%(default)s)")  # fmt: skip
    p.add_argument("--skip", action="append", default=[], choices=("load", "load-e2e", "generation", "backfill"),
                   help="leave out a phase (repeatable)")  # fmt: skip
    p.add_argument("--keep-data", action="store_true", help="keep the servers' data folders")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets met or not)."""
    args = parse_args(argv)
    os.chdir(REPO)
    r: dict[str, Any] = {"command": " ".join([".venv/bin/python", "bench/simulate_bench.py", *sys.argv[1:]]),
                         "args": vars(args), "env": environment(), "phases": {}}  # fmt: skip
    bench = Bench(args)
    phases = r["phases"]
    completed = False
    try:
        if "load" not in args.skip or "load-e2e" not in args.skip:
            phases["startup_cpu_s"] = bench.startup_cpu()
            say(f"start-up of simulate --load (1 message): {phases['startup_cpu_s']:.2f} s CPU")
        if "load" not in args.skip:
            phases["load"] = [bench.load(f"load-{i + 1}", phases["startup_cpu_s"]) for i in range(args.repeat)]
        if "load-e2e" not in args.skip:
            full = args.messages
            args.messages = args.e2e_messages
            try:
                phases["load_e2e"] = bench.load("load-e2e", phases["startup_cpu_s"], ingest=True)
            finally:
                args.messages = full
        if "generation" not in args.skip:
            phases["generation"] = bench.generation_only()
        if "backfill" not in args.skip:
            phases["backfill"] = bench.backfill("backfill")
            missed = phases["backfill"]["end_to_end_s"] >= TARGET_BACKFILL_S
            if args.profile == "always" or (args.profile == "auto" and missed):
                if not PY_SPY_BIN.exists():
                    say("py-spy not in the venv: no profile")
                else:
                    say("profiling one more backfill with py-spy (simulate and ingester)")
                    run = bench.backfill("backfill-profiled", profile=True)
                    phases["backfill_profiled"] = run
                    r["profile"] = {
                        "simulate": summarize_profile(bench.run_dir / "profile-simulate.txt", _SIM_STAGES),
                        "ingester": summarize_profile(bench.run_dir / "profile-ingester.txt", _INGEST_STAGES),
                    }
                    for who, summary in r["profile"].items():
                        say(f"  {who}: {summary['samples']} samples")
                        for name, share in summary["stages"]:
                            say(f"    {share * 100:5.1f} %  {name}")
                    keep = bench.data_dir / "profiles"
                    keep.mkdir(parents=True, exist_ok=True)
                    for who in ("simulate", "ingester"):
                        src = bench.run_dir / f"profile-{who}.txt"
                        if src.exists():
                            shutil.copy(src, keep / src.name)
        completed = True
    finally:
        bench.close()
        if completed and not args.keep_data:
            shutil.rmtree(bench.run_dir, ignore_errors=True)
        elif not completed:
            say(f"the run failed; data and logs kept in {bench.run_dir}/")
    r["env"]["loadavg_at_end"] = os.getloadavg()
    out = bench.data_dir / "sim-results.json"
    out.write_text(json.dumps(r, indent=2, default=str))
    print(json.dumps({k: v for k, v in r.items() if k != "args"}, indent=1, default=str))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    psutil.cpu_percent()
    sys.exit(main())
