"""The ingester's own PUBLISH reader (ingest.consume.FastPathClient), with paho's decoder as the reference.

The fast path splits PUBLISH packets at QoS 0 and 1 out of 64 KiB reads and hands every other packet to
paho in order. These tests feed it packets through a real socket pair, cut at arbitrary places, and check
each delivery against what paho's own ``decode_publish`` makes of the same bytes. The same reader against
the real broker: tests/integration/test_fastpath_broker.py.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import hypothesis.strategies as st
import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.consume import FastPathClient, puback_packets

Delivered = tuple[str, bytes, int, int, bool]
# topic, payload, QoS, packet id, retain, dup, MQTT 5 properties (content type, expiry, user properties, correlation)
Message = tuple[str, bytes, int, int, bool, bool, tuple[str | None, int | None, list[tuple[str, str]], bytes | None]]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, *, qos: int = 1, mid: int = 1, retain: bool = False, dup: bool = False,
            properties: bytes | None = None) -> bytes:  # fmt: skip
    """A PUBLISH packet; ``properties`` (MQTT 5: paho's packed property block, length included) or None (3.1.1)."""
    name = topic.encode()
    body = struct.pack("!H", len(name)) + name + (struct.pack("!H", mid) if qos else b"")
    body += (properties if properties is not None else b"") + payload
    return bytes([0x30 | dup << 3 | qos << 1 | retain]) + varint(len(body)) + body


def mqtt5_properties(content_type: str | None, expiry: int | None, users: list[tuple[str, str]],
                     correlation: bytes | None) -> bytes:  # fmt: skip
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if content_type is not None:
        props.ContentType = content_type
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    if users:
        props.UserProperty = users
    if correlation is not None:
        props.CorrelationData = correlation
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return packed


class Wire:
    """A FastPathClient on one end of a socket pair; the test writes the broker's bytes on the other."""

    def __init__(self, v5: bool) -> None:
        self.client = FastPathClient(CallbackAPIVersion.VERSION2, client_id="t.fastpath",
                                     protocol=paho.MQTTv5 if v5 else paho.MQTTv311, manual_ack=True)  # fmt: skip
        self.ours, self.broker = socket.socketpair()
        self.ours.setblocking(False)
        self.client._sock = self.ours  # connected, as far as reading goes
        self.delivered: list[Delivered] = []
        self.disconnects = 0
        self.client.on_disconnect = lambda *_: self._disconnected()
        self.stop_after: int | None = None

    def _disconnected(self) -> None:
        self.disconnects += 1

    def deliver(self, topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> bool:
        self.delivered.append((topic, payload, mid, qos, retain))
        return self.stop_after is None or len(self.delivered) < self.stop_after

    def feed(self, data: bytes) -> bool:
        """The broker sends ``data``; the client reads and parses what arrived. False: reading stopped."""
        if data:
            self.broker.sendall(data)
        more = self.client.parse(self.deliver)
        while more and self.client.fill():
            more = self.client.parse(self.deliver)
        return more

    def close(self) -> None:
        self.broker.close()
        self.ours.close()


@pytest.fixture(params=[True, False], ids=["mqtt5", "mqtt311"])
def wire(request: pytest.FixtureRequest) -> Iterator[Wire]:
    w = Wire(request.param)
    yield w
    w.close()


def reference(packet: bytes, v5: bool) -> Delivered:
    """What paho makes of one PUBLISH packet."""
    at = 1
    while packet[at] & 0x80:
        at += 1
    protocol = paho.MQTTv5 if v5 else paho.MQTTv311
    got = _packet.decode_publish(packet[0], packet[at + 1 :], protocol)
    return got.topic.decode(), bytes(got.payload), got.mid, got.qos, bool(got.retain)


texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
packets = st.builds(
    lambda topic, payload, qos, mid, retain, dup, props: (topic, payload, qos, mid, retain, dup, props),
    st.text(st.characters(codec="utf-8", exclude_characters="+#\x00"), min_size=1, max_size=80),
    st.binary(max_size=3000),
    st.sampled_from([0, 1]),
    st.integers(1, 65_535),
    st.booleans(),
    st.booleans(),
    st.tuples(
        st.none() | texts,
        st.none() | st.integers(0, 2**32 - 1),
        st.lists(st.tuples(texts, texts), max_size=3),
        st.none() | st.binary(max_size=30),
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.booleans(), st.lists(packets, min_size=1, max_size=30), st.lists(st.integers(1, 5000), max_size=40))
def test_every_publish_is_delivered_as_paho_reads_it_however_the_bytes_are_cut(
    v5: bool, messages: list[Message], cuts: list[int]
) -> None:
    built = [
        publish(
            topic,
            payload,
            qos=qos,
            mid=mid,
            retain=retain,
            dup=dup,
            properties=mqtt5_properties(*props) if v5 else None,
        )
        for topic, payload, qos, mid, retain, dup, props in messages
    ]
    stream = b"".join(built)
    w = Wire(v5)
    try:
        at = 0
        for size in [*cuts, len(stream)]:
            assert w.feed(stream[at : at + size])
            at += size
        assert w.delivered == [(t, p, m if q else 0, q, r) for t, p, m, q, r in (reference(b, v5) for b in built)]
        assert not w.client.has_buffered() and w.disconnects == 0
    finally:
        w.close()


def test_other_packets_go_to_paho_in_their_place(wire: Wire) -> None:
    v5 = wire.client._protocol == paho.MQTTv5
    props = b"\x00" if v5 else None
    wire.client._ping_t = 1.0  # a PINGREQ is out
    seen: list[float] = []
    deliver = wire.deliver

    def deliver_and_look(topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> bool:
        seen.append(wire.client._ping_t)
        return deliver(topic, payload, mid, qos, retain)

    wire.deliver = deliver_and_look  # type: ignore[method-assign]
    pingresp = b"\xd0\x00"
    first, second = (publish("a/b", text, mid=mid, properties=props) for mid, text in ((1, b"1"), (2, b"2")))
    assert wire.feed(first + pingresp + second)
    assert [d[1] for d in wire.delivered] == [b"1", b"2"]
    assert seen == [1.0, 0]  # paho handled the PINGRESP between the two


def test_a_full_window_stops_reading_and_the_rest_waits_in_the_buffer(wire: Wire) -> None:
    props = b"\x00" if wire.client._protocol == paho.MQTTv5 else None
    wire.stop_after = 2
    assert not wire.feed(b"".join(publish("a/b", bytes([i]), mid=i + 1, properties=props) for i in range(5)))
    assert len(wire.delivered) == 2 and wire.client.has_buffered()
    wire.stop_after = None
    assert wire.client.parse(wire.deliver)
    assert [d[2] for d in wire.delivered] == [1, 2, 3, 4, 5]


def test_a_qos2_publish_is_left_to_paho(wire: Wire) -> None:
    props = b"\x00" if wire.client._protocol == paho.MQTTv5 else None
    assert wire.feed(publish("a/b", b"x", qos=2, mid=7, properties=props))
    assert wire.delivered == []
    assert wire.broker.recv(16) == b"\x50\x02\x00\x07"  # paho answered with its PUBREC


def test_a_malformed_remaining_length_is_a_lost_connection(wire: Wire) -> None:
    assert not wire.feed(b"\x32\xff\xff\xff\xff\x01")
    assert wire.disconnects == 1 and wire.client._sock is None and not wire.client.has_buffered()


def test_the_end_of_the_stream_is_a_lost_connection(wire: Wire) -> None:
    props = b"\x00" if wire.client._protocol == paho.MQTTv5 else None
    wire.broker.sendall(publish("a/b", b"x", properties=props)[:5])  # half a packet, then the broker is gone
    wire.broker.close()
    wire.feed(b"")
    assert wire.delivered == [] and wire.disconnects == 1 and wire.client._sock is None


def test_pubacks_are_the_packets_paho_sends() -> None:
    mids = [1, 2, 300, 65_535]
    assert puback_packets(mids) == b"".join(struct.pack("!BBH", 0x40, 2, mid) for mid in mids)
    assert puback_packets([]) == b""


def test_the_paho_internals_the_fast_path_relies_on_are_there() -> None:
    """A paho upgrade that renames these breaks the fast path: this says which (the lock pins paho-mqtt 2.2.0)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="t.internals", protocol=paho.MQTTv5)
    for name in ("_sock_recv", "_sock_close", "_packet_queue", "_packet_read", "loop_read"):
        assert callable(getattr(client, name)), name
    for name in ("_sock", "_protocol", "_msgtime_mutex", "_last_bytes_received", "_out_packet"):
        assert hasattr(client, name), name
    assert hasattr(paho.MQTTMessage(), "_topic")
