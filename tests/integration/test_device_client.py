"""The reference device client against real Mosquitto, the real ingester and InfluxDB.

Store-and-forward end to end: round trip, a broker restart, a kill -9 of the
client (its SQLite outbox is resent by the next process), days offline then
backfill in order with the original timestamps, retained status and last will,
TLS with credentials.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from compression.influxql import rows
from compression.localservers import BrokerAccess, InfluxDB, Mosquitto, start_mosquitto
from devices.client import DeviceClient
from devices.outbox import SqliteOutbox
from devices.protocol import Sample, Status, Telemetry, decode_status, topic_for
from tests.integration.conftest import ROOT, Names, eventually, running, settings_for, wait_for_count
from tests.integration.test_transport import make_certificates

pytestmark = pytest.mark.integration

SAMPLES = 10
PERIOD_MS = 60_000
COUNT = "SELECT count(ankle_mmhg) FROM sample"


def make_telemetry(device: str, seq: int, start_ms: int) -> Telemetry:
    """Message ``seq`` of a device: SAMPLES readings a minute apart, after those of ``seq - 1``."""
    first = start_ms + seq * SAMPLES * PERIOD_MS
    samples = [
        Sample(t=first + i * PERIOD_MS, worn=True, pressure_mmhg={"ankle": 20.0 + seq % 10, "calf": 15.0})
        for i in range(SAMPLES)
    ]
    return Telemetry(v=1, device_id=device, kind="sock", seq=seq, samples=samples)


def expected_times(device: str, messages: int, start_ms: int) -> set[tuple[str, int]]:
    return {(device, s.t) for m in range(messages) for s in make_telemetry(device, m, start_ms).samples}


def stored_times(influx: InfluxDB, database: str) -> list[tuple[str, int]]:
    return [(r["device"], r["time"]) for r in rows(influx.url, database, "SELECT * FROM sample")]


def minutes_ago(minutes: int) -> int:
    return int(time.time() * 1000) - minutes * PERIOD_MS


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """A plain paho subscriber that records what it receives (optionally with a persistent session)."""

    def __init__(self, port: int, topic: str, client_id: str | None = None) -> None:
        self.topic = topic
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        persistent = client_id is not None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311, clean_session=not persistent)  # fmt: skip
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, m, r, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.port = port

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def __enter__(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(10), "no SUBACK"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# A client process to kill -9: argv = url device queue root messages start_ms pace_s.
CHILD = """
import sys, time
from devices.client import DeviceClient
from tests.integration.test_device_client import make_telemetry
url, device, queue, root, messages, start_ms, pace = sys.argv[1:8]
client = DeviceClient(url, device, queue, topic_root=root, reconnect_min_s=1, reconnect_max_s=1)
client.start()
if int(messages) == 0:
    while not client.connected:
        time.sleep(0.02)
    time.sleep(0.5)  # the online status gets its PUBACK
    print("connected", flush=True)
for seq in range(int(messages)):
    client.publish_telemetry(device, make_telemetry(device, seq, int(start_ms)))
    if float(pace):
        time.sleep(float(pace))
    if seq % 20 == 0:
        print("acked", client.stats().acked, flush=True)
print("queued", flush=True)
time.sleep(120)
"""


@pytest.fixture
def child_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def spawn(procs: list[subprocess.Popen[str]], *args: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    procs.append(proc)
    return proc


def read_until(proc: subprocess.Popen[str], done: str, timeout: float = 30) -> str:
    """Read the child's lines until one starts with ``done``; return it."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited with {proc.wait()}")
        if line.startswith(done):
            return line
    raise TimeoutError(f"child never said {done!r}")


async def test_round_trip_through_the_ingester_as_a_gateway(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    gateway = f"hub-{names.prefix}"
    devices = [f"{names.prefix}-a", f"{names.prefix}-b"]
    start_ms = minutes_ago(2 * 40 * SAMPLES)
    async with running(settings_for(mosquitto, influx, names)):
        with DeviceClient(mosquitto.url, gateway, tmp_path / "outbox.db", topic_root=names.topic_root) as client:
            for seq in range(40):
                for device in devices:
                    assert client.publish_telemetry(device, make_telemetry(device, seq, start_ms))
            assert await asyncio.to_thread(client.flush, 30)
            stats = client.stats()
        total = 2 * 40 * SAMPLES
        assert await wait_for_count(influx, names.database, COUNT, total) == total
    assert (stats.queued, stats.sent, stats.acked, stats.dropped_overflow, stats.queue_depth) == (80, 80, 80, 0, 0)
    stored = stored_times(influx, names.database)
    assert sorted(stored) == sorted(expected_times(devices[0], 40, start_ms) | expected_times(devices[1], 40, start_ms))


def test_never_more_than_the_window_in_flight(mosquitto: Mosquitto, names: Names) -> None:
    device = f"{names.prefix}-w"
    seen: list[int] = []
    with DeviceClient(mosquitto.url, device, ":memory:", topic_root=names.topic_root, window=5) as client:
        assert eventually_sync(lambda: client.connected)
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(client.stats().inflight)
                # paho's own store of unacknowledged messages (private, but it is what trap 6 is about)
                seen.append(len(client._client._out_messages))
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        for seq in range(2000):
            client.publish_telemetry(device, make_telemetry(device, seq, minutes_ago(100_000)))
        assert client.flush(30)
        done.set()
        watcher.join()
        assert client.stats().acked == 2000
    assert max(seen) <= 5 + 1, "our window (plus at most the online status)"
    assert max(seen) >= 2, "the window was used"


async def test_broker_restart_midstream_loses_nothing(
    own_mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    device = f"{names.prefix}-r"
    messages = 300
    start_ms = minutes_ago(messages * SAMPLES)
    async with running(settings_for(own_mosquitto, influx, names)):
        client = DeviceClient(
            own_mosquitto.url,
            device,
            tmp_path / "outbox.db",
            topic_root=names.topic_root,
            reconnect_min_s=1,
            reconnect_max_s=1,
        )
        with client:

            def sensor_loop() -> None:
                for seq in range(messages):
                    client.publish_telemetry(device, make_telemetry(device, seq, start_ms))
                    time.sleep(0.005)

            sensor = threading.Thread(target=sensor_loop)
            sensor.start()
            await eventually(lambda: client.stats().acked >= 50)
            await asyncio.to_thread(own_mosquitto.stop)
            assert client.queue_depth > 0 or sensor.is_alive()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_mosquitto.start)
            await asyncio.to_thread(sensor.join)
            assert await asyncio.to_thread(client.flush, 30)
            stats = client.stats()
        total = messages * SAMPLES
        assert await wait_for_count(influx, names.database, COUNT, total) == total
    assert stats.connects >= 2, "the client reconnected"
    assert stats.acked == messages and stats.dropped_overflow == 0
    assert sorted(stored_times(influx, names.database)) == sorted(expected_times(device, messages, start_ms))


async def test_kill_9_with_the_broker_down_then_a_new_process_sends_everything(
    own_mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path, child_procs: list[subprocess.Popen[str]]
) -> None:
    device = f"{names.prefix}-k"
    db = tmp_path / "outbox.db"
    messages = 60
    start_ms = minutes_ago(messages * SAMPLES + 5)
    await asyncio.to_thread(own_mosquitto.stop)
    child = spawn(child_procs, own_mosquitto.url, device, db, names.topic_root, messages, start_ms, 0)
    await asyncio.to_thread(read_until, child, "queued")
    child.kill()  # -9: no clean shutdown, nothing flushed by the process
    child.wait()
    left = SqliteOutbox(db)
    assert left.depth() == messages, "every message was on disk before publish_* returned"
    left.close()

    await asyncio.to_thread(own_mosquitto.start)
    async with running(settings_for(own_mosquitto, influx, names)):
        with DeviceClient(own_mosquitto.url, device, db, topic_root=names.topic_root) as client:
            assert await asyncio.to_thread(client.flush, 30)
            assert client.stats().acked == messages
        total = messages * SAMPLES
        assert await wait_for_count(influx, names.database, COUNT, total) == total
    stored = stored_times(influx, names.database)
    assert len(stored) == len(set(stored)) == total, "each sample stored exactly once"
    assert set(stored) == expected_times(device, messages, start_ms), "with its original timestamp"


async def test_kill_9_midstream_loses_and_duplicates_nothing(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path, child_procs: list[subprocess.Popen[str]]
) -> None:
    device = f"{names.prefix}-m"
    db = tmp_path / "outbox.db"
    messages = 2000  # the sensor loop must still be queueing when the kill lands, even on a loaded machine
    start_ms = minutes_ago(messages * SAMPLES + 5)
    async with running(settings_for(mosquitto, influx, names)):
        child = spawn(child_procs, mosquitto.url, device, db, names.topic_root, messages, start_ms, 0.005)
        # Kill it once the broker acknowledged some, while the sensor loop is still queueing.
        while int((await asyncio.to_thread(read_until, child, "acked")).split()[1]) < 60:
            pass
        child.kill()
        child.wait()
        left = SqliteOutbox(db)
        depth = left.depth()
        left.close()
        with sqlite3.connect(db) as raw:  # ids start at 1 and are never reused: the last one = messages queued
            (queued,) = raw.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        # Whether anything is still unacknowledged at the kill depends on timing (acks often keep
        # up); the resend path itself is proven by the broker-down test above.
        assert 60 <= queued < messages and depth <= queued - 60

        with DeviceClient(mosquitto.url, device, db, topic_root=names.topic_root) as client:
            assert await asyncio.to_thread(client.flush, 30)
            assert client.stats().acked == depth
        total = queued * SAMPLES
        assert await wait_for_count(influx, names.database, COUNT, total) == total
    stored = stored_times(influx, names.database)
    assert len(stored) == len(set(stored)) == total, "each sample stored once, resent ones included"
    assert set(stored) == expected_times(device, queued, start_ms), "everything the killed process queued"


async def test_offline_for_days_then_backfill_oldest_first(
    own_mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path
) -> None:
    device = f"{names.prefix}-o"
    messages = 30
    start_ms = minutes_ago(3 * 24 * 60)  # three days ago
    topic = topic_for(device, "telemetry", names.topic_root)
    async with running(settings_for(own_mosquitto, influx, names)):
        # A persistent subscriber: it gets what arrives while it reconnects after the broker restart.
        with Subscriber(own_mosquitto.port, topic, client_id=f"order-{names.client_id}") as sub:
            await asyncio.to_thread(own_mosquitto.stop)
            client = DeviceClient(own_mosquitto.url, device, tmp_path / "outbox.db", topic_root=names.topic_root,
                                  reconnect_min_s=1, reconnect_max_s=1)  # fmt: skip
            with client:
                for seq in range(messages):
                    client.publish_telemetry(device, make_telemetry(device, seq, start_ms))
                await asyncio.sleep(1.0)
                assert not client.connected and client.queue_depth == messages
                await asyncio.to_thread(own_mosquitto.start)
                assert await asyncio.to_thread(client.flush, 30)
            assert await eventually(lambda: len(sub.received()) >= messages)
            seqs = [msgspec.json.decode(m.payload, type=Telemetry).seq for m in sub.received()]
        total = messages * SAMPLES
        assert await wait_for_count(influx, names.database, COUNT, total) == total
    assert seqs == list(range(messages)), "published oldest first, each once"
    stored = stored_times(influx, names.database)
    assert set(stored) == expected_times(device, messages, start_ms)
    assert min(t for _, t in stored) == start_ms, "stored with the original timestamps, days old"


def test_retained_status_and_last_will(
    mosquitto: Mosquitto, names: Names, tmp_path: Path, child_procs: list[subprocess.Popen[str]]
) -> None:
    device = f"{names.prefix}-s"
    status_topic = topic_for(device, "status", names.topic_root)
    child = spawn(child_procs, mosquitto.url, device, tmp_path / "outbox.db", names.topic_root, 0, 0, 0)
    read_until(child, "connected")
    with Subscriber(mosquitto.port, status_topic) as before:
        assert eventually_sync(lambda: bool(before.received()))
        first = before.received()[0]
        assert first.retain and decode_status(first.payload).state == "online"
        child.kill()  # -9: the broker sees the socket close and publishes the will
        child.wait()
        assert eventually_sync(lambda: len(before.received()) >= 2)
        assert decode_status(before.received()[1].payload).state == "offline"
    with Subscriber(mosquitto.port, status_topic) as after:
        assert eventually_sync(lambda: bool(after.received()))
        (retained,) = after.received()
        assert retained.retain and retained.payload == b'{"v":1,"state":"offline"}'


def test_clean_stop_publishes_offline_and_gateway_garment_status(mosquitto: Mosquitto, names: Names) -> None:
    gateway = f"hub-{names.prefix}"
    garment = f"{names.prefix}-g"
    with DeviceClient(mosquitto.url, gateway, ":memory:", topic_root=names.topic_root, firmware="2.0.1") as client:
        client.publish_status(garment, Status(v=1, state="online", battery_pct=77))
        assert client.flush(10)
    with Subscriber(mosquitto.port, f"{names.topic_root}/+/status") as sub:
        assert eventually_sync(lambda: len(sub.received()) >= 2)
        states = {m.topic: decode_status(m.payload) for m in sub.received() if m.retain}
    assert states[topic_for(gateway, "status", names.topic_root)].state == "offline"
    assert states[topic_for(garment, "status", names.topic_root)] == Status(v=1, state="online", battery_pct=77)


def test_tls_and_credentials(mosquitto: Mosquitto, names: Names, tmp_path: Path, servers_root: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    passwd = tmp_path / "passwd"
    device = f"{names.prefix}-t"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), device, "pw-1"], check=True)
    broker = start_mosquitto(servers_root, access=BrokerAccess(password_file=passwd, tls_cert=cert, tls_key=key,
                                                               tls_ca=ca))  # fmt: skip
    try:
        url = f"mqtts://{device}:pw-1@127.0.0.1:{broker.port}"
        with DeviceClient(url, device, ":memory:", topic_root=names.topic_root, tls_ca_file=str(ca)) as client:
            for seq in range(10):
                client.publish_telemetry(device, make_telemetry(device, seq, minutes_ago(200)))
            assert client.flush(15)
            assert client.stats().acked == 10
        # A wrong password: refused, retried, never a crash; the queue keeps the message.
        bad = f"mqtts://{device}:wrong@127.0.0.1:{broker.port}"
        with DeviceClient(
            bad,
            device,
            ":memory:",
            topic_root=names.topic_root,
            tls_ca_file=str(ca),
            reconnect_min_s=1,
            reconnect_max_s=1,
        ) as client:
            client.publish_telemetry(device, make_telemetry(device, 0, minutes_ago(200)))
            assert not client.flush(2)
            assert client.queue_depth == 1 and not client.connected
    finally:
        broker.stop()


def eventually_sync(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
