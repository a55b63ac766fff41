#!/usr/bin/env python3
"""In-process CPU per 10-sample message of the ingester's stages, for the code on ``PYTHONPATH``.

Best of 9 passes over 1,000 generated 10-sample messages (1.2 KB): receiving a PUBLISH (MQTT 5 and 3.1.1, through
a socket pair up to the handler call: ``FastPathClient`` or, in code before it, paho's ``loop_read``), acknowledging
(batches of 150), the message handler with and without an in-memory registry snapshot, ``Decoder.decode``, the
encoder alone, and ``sum(range(1000))`` as a yardstick. Prints one JSON line. Compare two code versions by running
it alternately with each on ``PYTHONPATH``, from outside both trees (docs/benchmarks.md, *Ingester CPU against a
minimal consumer*):

    PYTHONPATH=/path/to/tree .venv/bin/python bench/ingest_stages.py
"""

import asyncio
import json
import socket
import struct
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

import ingest.consume as consume
from devices.protocol import _TELEMETRY_DECODER
from devices.registry.schemas import Snapshot, SnapshotEntry
from ingest.app import Ingester
from ingest.batch import Entry
from ingest.decode import Decoder
from ingest.encode import telemetry_lines
from ingest.enrich import Attributions, Enrichment
from ingest.settings import IngestSettings
from simulators.publisher import LoadSpec, generate

spec = LoadSpec(200, 5, 10)
msgs = list(generate(spec))
N = len(msgs)
FAST = hasattr(consume, "FastPathClient")


def best(fn, rounds=9):
    b = float("inf")
    for _ in range(rounds):
        c0 = time.process_time()
        fn()
        b = min(b, time.process_time() - c0)
    return b / N * 1e6


def varint(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def receive(v5):
    data = b"".join(
        b"\x32" + varint(len(body)) + body
        for body in (
            struct.pack("!H", len(m.topic))
            + m.topic.encode()
            + struct.pack("!H", i % 65535 + 1)
            + (b"\x00" if v5 else b"")
            + m.payload
            for i, m in enumerate(msgs)
        )
    )

    def run():
        a, b = socket.socketpair()
        a.setblocking(False)
        cls = consume.FastPathClient if FAST else consume.BufferedClient
        c = cls(
            CallbackAPIVersion.VERSION2, client_id="x", protocol=paho.MQTTv5 if v5 else paho.MQTTv311, manual_ack=True
        )
        c._sock = a
        got = [0]

        def deliver(topic, payload, mid, qos, retain):
            got[0] += 1
            return True

        def on_message(cl, ud, m):
            got[0] += 1
            _ = m.topic
            bytes(m.payload)

        c.on_message = on_message
        t = threading.Thread(target=b.sendall, args=(data,))
        t.start()
        while got[0] < N:
            if FAST:
                c.parse(deliver)
                c.fill()
            else:
                c.loop_read()
        t.join()
        a.close()
        b.close()

    return best(run)


def acks():
    mids = list(range(1, 151))

    def one_round():
        a, b = socket.socketpair()
        a.setblocking(False)
        c = (consume.FastPathClient if FAST else consume.BufferedClient)(
            CallbackAPIVersion.VERSION2, client_id="x", protocol=paho.MQTTv5, manual_ack=True
        )
        c._sock = a
        c.on_socket_register_write = lambda *x: None
        t0 = time.process_time()
        if FAST:
            c._packet_queue(0x40, consume.puback_packets(mids), 0, 0)
        else:
            for m in mids:
                c.ack(m, 1)
        while c.want_write():
            c.loop_write()
        used = time.process_time() - t0
        a.close()
        b.close()
        return used

    return min(one_round() for _ in range(9)) / len(mids) * 1e6


async def handlers():
    s = IngestSettings(
        mqtt_url="mqtt://127.0.0.1:1",
        influx_url="http://127.0.0.1:1",
        influx_database="x",
        mqtt_client_id="bench.x",
        batch_size=5000,
        mqtt_topic_root="garments/v1",
    )
    plain, enriched = Ingester(s), Ingester(s)

    class NoSource:
        def describe(self):
            return "memory"

        async def load(self, known):
            return None

        async def close(self):
            pass

    enriched.enrichment = Enrichment(NoSource(), 5, enriched.metrics)
    enriched.enrichment.attributions = Attributions(
        Snapshot(
            version=1,
            devices=spec.device_ids(),
            assignments=[
                SnapshotEntry(device_id=d, patient=f"P{i:04d}", clinic="bowvalley", from_ms=0, to_ms=None)
                for i, d in enumerate(spec.device_ids())
            ],
        )
    )

    def run(ing):
        def f():
            ing._batcher.queue = asyncio.Queue()
            for i, m in enumerate(msgs):
                ing._on_message(m.topic, m.payload, Entry(i % 65535 + 1, 1, 1), False)

        return f

    return best(run(plain)), best(run(enriched))


d = Decoder()
now = time.time_ns()
decoded = [_TELEMETRY_DECODER.decode(m.payload) for m in msgs]
out = {"receive_v5": receive(True), "receive_v311": receive(False), "ack": acks()}
out["handler"], out["handler_enriched"] = asyncio.run(handlers())
out["decode_encode"] = best(lambda: [d.decode(m.topic, m.payload, now) for m in msgs])
out["telemetry_lines"] = best(lambda: [telemetry_lines(t) for t in decoded])
out["sum_range_1000"] = best(lambda: [sum(range(1000)) for _ in range(N)])
print(json.dumps({k: round(v, 2) for k, v in out.items()}))
