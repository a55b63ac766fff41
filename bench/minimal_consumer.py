#!/usr/bin/env python3
"""The bench's minimal consumer: MQTT -> InfluxDB with no guarantees, the floor the ingester is compared to.

What a person writes in an afternoon with the usual library and nothing else:

- paho-mqtt with its defaults (MQTT 3.1.1, the cheapest protocol for paho: no
  ``Properties`` per PUBLISH), ``loop_forever()`` on the main thread, QoS 1,
  acknowledged by paho as soon as ``on_message`` returns (before the write:
  nothing survives a crash or a database outage);
- JSON decoded by msgspec into plain dicts and lists, validated against nothing
  (no schema, no ranges, no time window, no dead letters, no registry tags);
- one ``sample`` line per sample with the fields the payload has (the
  pressures, ``worn``, ``skin_temp_c``, ``seq``, the message's ``battery_pct``
  on its last sample; no ``worn_s``, which needs the next sample), a
  ``status`` line (``online``) per status message, so that the bench's
  readiness probe works unchanged; events are ignored;
- batches of 5,000 lines or 200 ms, whichever first, POSTed by 2 writer
  threads over keep-alive ``http.client`` connections; a failed POST is
  retried after 0.2 s.

It stores the same ``sample`` points as the ingester, minus the derived
``worn_s`` field, so the database and the broker do about the same work for
both. Run by ``bench/ingest_bench.py`` (``--minimal``), not by anything in
production. SIGTERM: flush what is held, then exit.
"""

from __future__ import annotations

import argparse
import http.client
import queue
import signal
import threading
import time
import urllib.parse
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

BATCH_LINES = 5000
FLUSH_S = 0.2
WRITERS = 2


class Sink:
    """Lines in, batches out to InfluxDB (size or age, whichever first)."""

    def __init__(self, influx_url: str, database: str) -> None:
        url = urllib.parse.urlsplit(influx_url)
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 8086
        self._path = f"/write?db={urllib.parse.quote(database)}&precision=ns"
        self._lines: list[str] = []
        self._first = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue[list[str] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._writer, daemon=True) for _ in range(WRITERS)]
        self._threads.append(threading.Thread(target=self._timer, daemon=True))
        for thread in self._threads:
            thread.start()

    def create_database(self, database: str) -> None:
        """CREATE DATABASE (idempotent)."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        conn.request("POST", "/query?q=" + urllib.parse.quote(f'CREATE DATABASE "{database}"'))
        conn.getresponse().read()
        conn.close()

    def add(self, lines: list[str]) -> None:
        """Hold ``lines``; hand the batch to the writers once it is full."""
        with self._lock:
            if not self._lines:
                self._first = time.monotonic()
            self._lines.extend(lines)
            if len(self._lines) >= BATCH_LINES:
                self._cut()

    def _cut(self) -> None:
        if self._lines:
            self._queue.put(self._lines)
            self._lines = []

    def _timer(self) -> None:
        while not self._stop.wait(FLUSH_S / 4):
            with self._lock:
                if self._lines and time.monotonic() - self._first >= FLUSH_S:
                    self._cut()

    def _writer(self) -> None:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            body = "\n".join(batch).encode()
            while True:
                try:
                    conn.request("POST", self._path, body)
                    response = conn.getresponse()
                    response.read()
                    if response.status < 300:
                        break
                except (OSError, http.client.HTTPException):
                    conn.close()
                time.sleep(0.2)

    def close(self) -> None:
        """Write what is held, wait for the writers."""
        self._stop.set()
        with self._lock:
            self._cut()
        for _ in range(WRITERS):
            self._queue.put(None)
        for thread in self._threads:
            thread.join(30)


def sample_lines(message: dict[str, Any]) -> list[str]:
    """One line per sample, the payload's fields as they come (nothing checked)."""
    head = f"sample,device={message['device_id']},kind={message['kind']} "
    tail = f"seq={message['seq']}i "
    lines = []
    for sample in message["samples"]:
        fields = [f"{zone}_mmhg={value}" for zone, value in sample["pressure_mmhg"].items()]
        fields.append("worn=true" if sample["worn"] else "worn=false")
        if "skin_temp_c" in sample:
            fields.append(f"skin_temp_c={sample['skin_temp_c']}")
        lines.append(f"{head}{','.join(fields)},{tail}{sample['t']}000000")
    if "battery_pct" in message:
        last = lines[-1]
        cut = last.rindex(" ")
        lines[-1] = f"{last[:cut]},battery_pct={message['battery_pct']}i{last[cut:]}"
    return lines


def main() -> None:
    """Consume until SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mqtt-url", required=True)
    p.add_argument("--influx-url", required=True)
    p.add_argument("--influx-database", required=True)
    p.add_argument("--mqtt-client-id", required=True)
    p.add_argument("--mqtt-topic-root", required=True)
    args = p.parse_args()
    sink = Sink(args.influx_url, args.influx_database)
    sink.create_database(args.influx_database)
    decode = msgspec.json.decode

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(f"{args.mqtt_topic_root}/+/+", qos=1)

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        channel = message.topic.rsplit("/", 1)[-1]
        if channel == "telemetry":
            sink.add(sample_lines(decode(message.payload)))
        elif channel == "status":
            device = message.topic.rsplit("/", 2)[-2]
            online = decode(message.payload).get("state") == "online"
            sink.add([f"status,device={device} online={'true' if online else 'false'} {time.time_ns()}"])

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.mqtt_client_id)
    client.on_connect = on_connect
    client.on_message = on_message
    url = urllib.parse.urlsplit(args.mqtt_url)
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30)
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.loop_forever()
    sink.close()


if __name__ == "__main__":
    main()
