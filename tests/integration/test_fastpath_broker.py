"""The ingester's own PUBLISH reader and batched PUBACKs (ingest.consume.FastPathClient) against real Mosquitto.

The hand-written part of the MQTT path meets the traps of ingest-facts here: more than 65,535 messages
on one connection, so that the broker's packet ids wrap while the window fills and acks flow (traps 1
and 2), with every message stored and the PUBACKs on the wire exactly in the order the broker numbered
the messages, across the wrap; MQTT 5 properties that the broker forwards and the reader must skip; a
PUBLISH larger than one socket read. Unit tests of the same reader against paho's decoder:
tests/unit/test_fastpath.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from compression.influxql import scalar
from compression.localservers import InfluxDB, Mosquitto
from devices.protocol import MAX_PAYLOAD_BYTES
from ingest.consume import FastPathClient
from simulators.publisher import LoadSpec, Outgoing, generate
from tests.integration.conftest import Names, eventually, running, settings_for, wait_for_count

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COUNT = "SELECT count(ankle_mmhg) FROM sample"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class RawPublisher:
    """MQTT 3.1.1 QoS 1 on a plain socket: packet ids 1..65,535 wrapping, a window of unacknowledged
    messages, every PUBACK checked in order. Cheap enough to send 70,000 messages in a test."""

    def __init__(self, port: int, window: int = 1000) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        cid = f"pub-{uuid.uuid4().hex[:8]}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid  # clean session, keepalive 60
        self._sock.sendall(b"\x10" + _varint(len(body)) + body)
        assert self._recv(4) == b"\x20\x02\x00\x00"
        self._window = window
        self._rest = b""

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            assert chunk, "the broker closed the connection"
            data += chunk
        return data

    def publish(self, messages: list[Outgoing]) -> None:
        packets = []
        for i, out in enumerate(messages):
            topic = out.topic.encode()
            body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", i % 65_535 + 1) + out.payload
            packets.append(b"\x32" + _varint(len(body)) + body)
        sent = acked = 0
        while acked < len(packets):
            room = min(self._window - (sent - acked), len(packets) - sent)
            if room > 0:
                self._sock.sendall(b"".join(packets[sent : sent + room]))
                sent += room
            data = self._rest + self._sock.recv(65_536)
            whole = len(data) - len(data) % 4
            for pos in range(0, whole, 4):
                assert data[pos : pos + 2] == b"\x40\x02"
                assert int.from_bytes(data[pos + 2 : pos + 4], "big") == acked % 65_535 + 1
                acked += 1
            self._rest = data[whole:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(b"\xe0\x00")
        self._sock.close()


def spec(names: Names, devices: int, messages: int, samples: int) -> LoadSpec:
    return LoadSpec(devices=devices, messages=messages, samples=samples, prefix=names.prefix,
                    topic_root=names.topic_root, period_ms=1000)  # fmt: skip


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_packet_ids_wrap_on_one_connection_and_nothing_is_lost(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    load = spec(names, devices=100, messages=700, samples=1)  # 70,000 messages: the 16-bit ids wrap once
    messages = list(generate(load))
    pubacks: list[int] = []
    queue = FastPathClient._packet_queue

    def record(self: FastPathClient, command: int, packet: bytes, *args: object, **kwargs: object) -> object:
        if command == 0x40:
            pubacks.extend(mid for (mid,) in struct.iter_unpack("!2xH", packet))
        return queue(self, command, packet, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(FastPathClient, "_packet_queue", record)

    async def scenario() -> tuple[int, dict[str, float]]:
        async with running(settings_for(mosquitto, influx, names, mqtt_protocol=protocol)) as ingester:
            publisher = RawPublisher(mosquitto.port)
            try:
                await asyncio.to_thread(publisher.publish, messages)
            finally:
                publisher.close()
            stored = await wait_for_count(influx, names.database, COUNT, load.total_samples, timeout=120)
            acked = "compression_ingest_messages_acked_total"
            await eventually(lambda: ingester.metrics.value(acked) >= len(messages))
            values = {name: ingester.metrics.value(name) for name in (
                acked, "compression_ingest_backpressure_pauses_total", "compression_ingest_acks_skipped_total",
                "compression_ingest_broker_reconnects_total")}  # fmt: skip
            return stored, values

    stored, values = asyncio.run(scenario())
    assert stored == load.total_samples
    assert values["compression_ingest_messages_acked_total"] == len(messages)
    assert values["compression_ingest_backpressure_pauses_total"] > 0  # the window filled while acks flowed
    assert values["compression_ingest_acks_skipped_total"] == 0
    assert values["compression_ingest_broker_reconnects_total"] == 0
    # Mosquitto numbers a session's messages 1, 2, ... 65,535, 1, ...: in order received is in that order.
    assert pubacks == [i % 65_535 + 1 for i in range(len(messages))]
    rejected = scalar(influx.url, names.database, "SELECT count(raw_bytes) FROM rejected")
    assert rejected == 0


def test_mqtt5_properties_from_the_publisher_are_skipped(mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    load = spec(names, devices=5, messages=20, samples=10)
    messages = list(generate(load))

    def publish_with_properties() -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                             protocol=paho.MQTTv5)  # fmt: skip
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        try:
            infos = []
            for i, out in enumerate(messages):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.UserProperty = [("gateway", f"gw-{i % 3}"), ("fw", "1.2.3" * (i % 40))]
                props.ContentType = "application/json"
                props.PayloadFormatIndicator = 1
                props.MessageExpiryInterval = 3600
                props.CorrelationData = bytes(range(i % 200))
                props.ResponseTopic = f"replies/{i}"
                infos.append(client.publish(out.topic, out.payload, qos=1, properties=props))
            for info in infos:
                info.wait_for_publish(30)
        finally:
            client.disconnect()
            client.loop_stop()

    async def scenario() -> int:
        async with running(settings_for(mosquitto, influx, names, mqtt_protocol="5")):
            await asyncio.to_thread(publish_with_properties)
            return await wait_for_count(influx, names.database, COUNT, load.total_samples)

    assert asyncio.run(scenario()) == load.total_samples
    assert scalar(influx.url, names.database, "SELECT count(raw_bytes) FROM rejected") == 0
    first = messages[0].payload
    t0 = int(first[first.index(b'"t":') + 4 : first.index(b",", first.index(b'"t":'))])
    got = scalar(influx.url, names.database, f"SELECT ankle_mmhg FROM sample WHERE time = {t0 * 1_000_000}")
    assert f'"ankle":{got}'.encode() in first  # the payload itself, not shifted by a property


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_publish_larger_than_one_read_is_a_dead_letter_and_the_next_ones_are_stored(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, protocol: str
) -> None:
    load = spec(names, devices=2, messages=5, samples=10)
    messages = list(generate(load))
    # Over the protocol's 64 KiB and the reader's 64 KiB read, under the broker's max_packet_size (128 KiB).
    huge = Outgoing(messages[0].topic, b'{"v":1,"pad":"' + b"x" * (MAX_PAYLOAD_BYTES + 30_000) + b'"}', 0)

    async def scenario() -> int:
        async with running(settings_for(mosquitto, influx, names, mqtt_protocol=protocol)):
            publisher = RawPublisher(mosquitto.port)
            try:
                await asyncio.to_thread(publisher.publish, [messages[0], huge, *messages[1:]])
            finally:
                publisher.close()
            await wait_for_count(influx, names.database, "SELECT count(raw_bytes) FROM rejected", 1)
            return await wait_for_count(influx, names.database, COUNT, load.total_samples)

    assert asyncio.run(scenario()) == load.total_samples
    reason = "SELECT count(raw_bytes) FROM rejected WHERE reason = 'payload_too_large'"
    assert scalar(influx.url, names.database, reason) == 1
