"""A small built-in publisher of protocol-v1 readings: demo, tests and benchmark load.

Publishes at QoS 1 through the same wire models the ingester parses, keeps its
own in-flight window (paho loses QoS 1 messages when more than 65,535 wait
inside it: ingest-facts, trap 6) and only counts a message as sent once the
broker acknowledged it. Across a broker restart paho resends what was not
acknowledged (persistent session), so nothing is lost in between.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.mqtturl import parse_mqtt_url
from devices.protocol import Sample, Telemetry, encode, topic_for


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to publish: ``devices`` x ``messages`` telemetry messages of ``samples`` readings."""

    devices: int = 10
    messages: int = 10
    samples: int = 10
    prefix: str = "sock"
    period_ms: int = 60_000
    start_ms: int | None = None
    seed: int = 1
    topic_root: str = "garments/v1"

    @property
    def total_samples(self) -> int:
        """Samples in the whole load."""
        return self.devices * self.messages * self.samples

    def device_ids(self) -> list[str]:
        """The device ids, ``{prefix}-0000`` onwards."""
        return [f"{self.prefix}-{i:04d}" for i in range(self.devices)]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish."""

    topic: str
    payload: bytes
    samples: int


def _reading(rng: random.Random, t: int, base: float) -> Sample:
    walk = 2.0 * math.sin(t / 7_000.0)
    ankle = round(base + walk + rng.gauss(0, 0.6), 2)
    return Sample(
        t=t,
        worn=True,
        pressure_mmhg={"ankle": ankle, "calf": round(ankle * 0.75, 2), "thigh": round(ankle * 0.45, 2)},
        skin_temp_c=round(32.0 + rng.gauss(0, 0.3), 2),
    )


def generate(spec: LoadSpec) -> Iterator[Outgoing]:
    """Telemetry messages of the spec, device-interleaved, oldest first per device.

    Timestamps end at ``start_ms`` plus the span, which by default ends now.
    """
    rng = random.Random(spec.seed)
    span = spec.messages * spec.samples * spec.period_ms
    start = spec.start_ms if spec.start_ms is not None else int(time.time() * 1000) - span
    devices = spec.device_ids()
    bases = [rng.uniform(23.0, 30.0) for _ in devices]
    for m in range(spec.messages):
        for d, device in enumerate(devices):
            first = start + m * spec.samples * spec.period_ms
            samples = [_reading(rng, first + s * spec.period_ms, bases[d]) for s in range(spec.samples)]
            message = Telemetry(v=1, device_id=device, kind="sock", seq=m, samples=samples,
                                battery_pct=max(0, 100 - m % 100))  # fmt: skip
            yield Outgoing(topic_for(device, "telemetry", spec.topic_root), encode(message), spec.samples)


@dataclass
class PublishReport:
    """What a publish run achieved."""

    messages: int = 0
    samples: int = 0
    acked: int = 0
    seconds: float = 0.0


class Publisher:
    """A QoS 1 publisher with its own in-flight window and a persistent session."""

    def __init__(
        self,
        mqtt_url: str,
        client_id: str,
        window: int = 1000,
        protocol: str = "3.1.1",
        tls_ca_file: str | None = None,
    ) -> None:
        endpoint = parse_mqtt_url(mqtt_url)
        v5 = protocol == "5"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                                   clean_session=None if v5 else False)  # fmt: skip
        if endpoint.username:
            self._client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            self._client.tls_set(ca_certs=tls_ca_file)
        self._client.max_inflight_messages_set(window)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_publish = self._on_publish
        self._window = threading.BoundedSemaphore(window)
        self._lock = threading.Lock()
        self._acked = 0
        self._endpoint = endpoint

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        with self._lock:
            self._acked += 1
        self._window.release()

    def __enter__(self) -> Publisher:
        self._client.connect(self._endpoint.host, self._endpoint.port, keepalive=30)
        self._client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def acked(self) -> int:
        """Messages the broker has acknowledged."""
        with self._lock:
            return self._acked

    def publish_all(
        self,
        messages: Iterable[Outgoing],
        rate: float | None = None,
        progress: Callable[[PublishReport], None] | None = None,
        ack_timeout: float = 300.0,
    ) -> PublishReport:
        """Publish every message (at ``rate`` samples/s if given); wait for every PUBACK."""
        return publish_spread([self], messages, rate, progress, ack_timeout)

    def _send(self, out: Outgoing) -> None:
        self._window.acquire()
        self._client.publish(out.topic, out.payload, qos=1)

    def _wait_acked(self, expected: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.acked} of {expected} messages acknowledged by the broker")
            time.sleep(0.01)


def publish_spread(
    publishers: Sequence[Publisher],
    messages: Iterable[Outgoing],
    rate: float | None = None,
    progress: Callable[[PublishReport], None] | None = None,
    ack_timeout: float = 300.0,
) -> PublishReport:
    """Like :meth:`Publisher.publish_all`, over several connections (gateways relaying many garments).

    Each topic (so each device) sticks to one connection, assigned round-robin
    in order of first appearance, so a device's messages keep their order.
    Returns once the broker acknowledged every message on every connection.
    """
    if not publishers:
        raise ValueError("publish_spread needs at least one publisher")
    report = PublishReport()
    route: dict[str, Publisher] = {}
    sent = [p.acked for p in publishers]  # acks owed: what was acked before, plus what this call sends
    index = {id(p): i for i, p in enumerate(publishers)}
    started = time.monotonic()
    for out in messages:
        pub = route.get(out.topic)
        if pub is None:
            pub = route[out.topic] = publishers[len(route) % len(publishers)]
        pub._send(out)
        sent[index[id(pub)]] += 1
        report.messages += 1
        report.samples += out.samples
        if rate:
            ahead = report.samples / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        if progress is not None and report.messages % 500 == 0:
            report.acked = sum(p.acked for p in publishers)
            progress(report)
    deadline = time.monotonic() + ack_timeout
    for pub, expected in zip(publishers, sent, strict=True):
        pub._wait_acked(expected, max(0.0, deadline - time.monotonic()))
    report.acked = sum(p.acked for p in publishers)
    report.seconds = time.monotonic() - started
    return report
