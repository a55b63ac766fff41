"""The reference device client: protocol-v1 telemetry, events and status over MQTT, store-and-forward.

Usable by a garment that connects itself (client id = its device id) and by a
phone/hub gateway relaying several garments (client id = the gateway id; each
publish names the garment). See ``docs/device-client.md``.

How a message travels:

1. ``publish_*`` validates it, encodes it and writes it to the outbox
   (:mod:`devices.outbox`; on disk, committed before the call returns). It
   never waits for the network.
2. A sender thread of the client hands the oldest unsent messages to paho, at
   most ``window`` unacknowledged at a time (paho loses QoS 1 messages beyond
   65,535 waiting inside it: ingest-facts, trap 6).
3. paho's network thread receives the PUBACK; its callback only queues the
   message id for the sender thread, which deletes the message from the
   outbox. Nothing is deleted before the broker acknowledged it, so messages
   not acknowledged when the process dies are sent again by the next process
   (the platform stores a resent reading once: same series, same timestamp).
"""

from __future__ import annotations

import logging
import queue as stdqueue
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.mqtturl import SettingsError, parse_mqtt_url
from devices.outbox import DEFAULT_MAX_MESSAGES, MemoryOutbox, Outbox, SqliteOutbox
from devices.protocol import (
    MAX_PAYLOAD_BYTES,
    TOPIC_ROOT,
    Channel,
    Event,
    ProtocolError,
    Status,
    Telemetry,
    encode,
    topic_for,
)

log = logging.getLogger(__name__)

DEFAULT_WINDOW: Final = 100
MAX_WINDOW: Final = 10_000
MEMORY: Final = ":memory:"
OFFLINE_PAYLOAD: Final = encode(Status(v=1, state="offline"))


class DeviceClientError(RuntimeError):
    """The client cannot be set up or started (bad URL, TLS files, broker address)."""


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters since this client object was created, and the current state."""

    queued: int
    """Messages written to the outbox."""
    sent: int
    """Messages handed to the broker (each outbox entry once per process; paho's resends not counted)."""
    acked: int
    """Outbox entries the broker acknowledged (deleted from the outbox)."""
    dropped_overflow: int
    """Telemetry messages dropped because the outbox was full (the oldest first)."""
    rejected: int
    """Messages the broker refused with an MQTT 5 error reason (deleted, logged as errors)."""
    queue_depth: int
    """Messages in the outbox now (not yet acknowledged)."""
    inflight: int
    """Messages handed to the broker and not yet acknowledged."""
    connected: bool
    connects: int
    """Successful connections (the first one and every reconnection)."""


class DeviceClient:
    """A QoS 1 store-and-forward MQTT client for one garment or one gateway.

    ``queue`` is the outbox: a file path (a durable :class:`SqliteOutbox`),
    ``":memory:"`` (a :class:`MemoryOutbox`: fast, lost with the process) or
    an :class:`Outbox` object (the caller keeps ownership of it).

    The public methods are thread-safe. Start with :meth:`start` (or ``with``);
    ``start`` returns at once and the client connects, and reconnects with
    backoff, in the background, so a garment that boots offline just queues.
    """

    def __init__(
        self,
        mqtt_url: str,
        client_id: str,
        queue: str | Path | Outbox,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        window: int = DEFAULT_WINDOW,
        topic_root: str = TOPIC_ROOT,
        protocol: Literal["5", "3.1.1"] = "5",
        session_expiry_s: int = 7 * 24 * 3600,
        keepalive_s: int = 30,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 60,
        firmware: str | None = None,
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise DeviceClientError(f"window must be within 1..{MAX_WINDOW}, got {window}")
        try:
            self._endpoint = parse_mqtt_url(mqtt_url)
            self._status_topic = topic_for(client_id, "status", topic_root)
        except (SettingsError, ProtocolError) as exc:
            raise DeviceClientError(str(exc)) from exc
        self.client_id = client_id
        self.topic_root = topic_root
        self._window = window
        self._keepalive_s = keepalive_s
        self._firmware = firmware
        self._v5 = protocol == "5"
        self._session_expiry_s = session_expiry_s
        self._outbox, self._owns_outbox = _open_outbox(queue, max_messages)
        self._client = self._make_paho(tls_ca_file, tls_cert_file, tls_key_file, reconnect_min_s, reconnect_max_s)

        self._lock = threading.Lock()  # guards the counters below
        self._queued = self._sent = self._acked = self._dropped = self._rejected = self._connects = 0
        self._acks: stdqueue.SimpleQueue[tuple[int, bool]] = stdqueue.SimpleQueue()  # from paho's thread
        self._wake = threading.Event()
        self._settled = threading.Condition()
        self._connected = threading.Event()
        self._announce = threading.Event()  # set on connect: publish "online" before the backlog
        self._stopping = threading.Event()
        # Owned by the sender thread only: paho message id -> outbox id, and the last outbox id handed over.
        self._inflight: dict[int, int] = {}
        self._inflight_count = 0  # a copy readable from other threads
        self._last_sent_id = 0
        self._sender: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def _make_paho(
        self, ca: str | None, cert: str | None, key: str | None, reconnect_min_s: int, reconnect_max_s: int
    ) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            # MQTT 3.1.1: a persistent session; MQTT 5 sets clean_start/expiry at connect instead.
            clean_session=None if self._v5 else False,
        )
        if self._endpoint.username:
            client.username_pw_set(self._endpoint.username, self._endpoint.password)
        if self._endpoint.tls:
            try:
                client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise DeviceClientError(f"TLS set-up failed: {exc}") from exc
        client.will_set(self._status_topic, OFFLINE_PAYLOAD, qos=1, retain=True)
        # paho's own limits: room for our window plus the online/offline announcements; no queue
        # limit, because what we hand over is already bounded by our window.
        client.max_inflight_messages_set(self._window + 2)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)
        # An exception escaping a callback would kill paho's network thread silently.
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def start(self) -> None:
        """Start connecting in the background (with reconnects) and start the sender thread."""
        if self._sender is not None:
            raise DeviceClientError("client already started")
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry_s
        try:
            self._client.connect_async(
                self._endpoint.host,
                self._endpoint.port,
                keepalive=self._keepalive_s,
                clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        except (OSError, ValueError) as exc:
            raise DeviceClientError(f"cannot connect to {self._endpoint.host}:{self._endpoint.port}: {exc}") from exc
        self._client.loop_start()
        self._sender = threading.Thread(target=self._run_sender, name=f"outbox-{self.client_id}", daemon=True)
        self._sender.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` status (if connected), stop the threads, disconnect, close the outbox.

        Does not wait for the queue: call :meth:`flush` first for that. What is
        left in an on-disk outbox is sent by the next client on the same file.
        """
        if self._sender is None:
            return
        if self._connected.is_set():
            self._announce_state(OFFLINE_PAYLOAD, timeout)
        self._stopping.set()
        self._wake.set()
        self._sender.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._sender = None
        if self._owns_outbox:
            self._outbox.close()

    def __enter__(self) -> DeviceClient:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- publishing -----------------------------------------------------------------------------

    def publish_telemetry(self, device_id: str, message: Telemetry) -> bool:
        """Queue a telemetry batch of ``device_id``; False if the full outbox dropped it (counted)."""
        if message.device_id != device_id:
            raise ProtocolError("device_id_mismatch", f"telemetry of {message.device_id!r} for {device_id!r}")
        return self._put(device_id, "telemetry", encode(message), retain=False)

    def publish_event(self, device_id: str, event: Event) -> bool:
        """Queue an event of ``device_id``; raises :class:`~devices.outbox.OutboxFullError`, never drops it."""
        if event.device_id != device_id:
            raise ProtocolError("device_id_mismatch", f"event of {event.device_id!r} for {device_id!r}")
        return self._put(device_id, "event", encode(event), retain=False)

    def publish_status(self, device_id: str, status: Status) -> bool:
        """Queue a retained status of ``device_id``; raises :class:`~devices.outbox.OutboxFullError`, never drops it."""
        return self._put(device_id, "status", encode(status), retain=True)

    def publish_raw(self, device_id: str, channel: Channel, payload: bytes, retain: bool = False) -> bool:
        """Queue ``payload`` exactly as given, unchecked: for simulating faulty firmware and for test tools.

        Only the topic is checked (``device_id`` must be a valid id); the bytes
        may be anything, too large included, so that the platform's rejections
        can be exercised end to end.
        """
        return self._enqueue(topic_for(device_id, channel, self.topic_root), payload, channel, retain)

    def _put(self, device_id: str, channel: Channel, payload: bytes, retain: bool) -> bool:
        topic = topic_for(device_id, channel, self.topic_root)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ProtocolError("payload_too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
        return self._enqueue(topic, payload, channel, retain)

    def _enqueue(self, topic: str, payload: bytes, channel: Channel, retain: bool) -> bool:
        result = self._outbox.put(topic, payload, channel, retain)
        with self._lock:
            self._queued += result.id is not None
            self._dropped += result.evicted
        self._wake.set()
        return result.id is not None

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (everything acknowledged); False if ``timeout`` s passed first."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._outbox.depth() > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._settled.wait(min(left, 0.1))
        return True

    @property
    def queue_depth(self) -> int:
        """Messages in the outbox (queued or in flight, not yet acknowledged)."""
        return self._outbox.depth()

    @property
    def connected(self) -> bool:
        """True while connected to the broker."""
        return self._connected.is_set()

    def stats(self) -> ClientStats:
        """The counters and current state."""
        with self._lock:
            return ClientStats(self._queued, self._sent, self._acked, self._dropped, self._rejected,
                               self._outbox.depth(), self._inflight_count, self._connected.is_set(),
                               self._connects)  # fmt: skip

    # -- the sender thread ----------------------------------------------------------------------

    def _run_sender(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._settle_acks()
                if self._connected.is_set() and not self._stopping.is_set():
                    if self._announce.is_set():
                        self._announce.clear()
                        self._publish_online()
                    self._fill_window()
            except Exception:  # a dead sender would stall the device silently; log, retry
                log.exception("device client sender failed; retrying in 1 s")
                self._stopping.wait(1.0)
        try:
            self._settle_acks()
        except Exception:  # stopping anyway; unsettled messages are resent next time
            log.exception("device client could not record the last acknowledgements")

    def _settle_acks(self) -> None:
        done: list[int] = []
        rejected = 0
        while True:
            try:
                mid, failed = self._acks.get_nowait()
            except stdqueue.Empty:
                break
            entry_id = self._inflight.pop(mid, None)
            if entry_id is None:
                continue  # an online/offline announcement, not an outbox entry
            done.append(entry_id)
            rejected += failed
        if not done:
            return
        # Refused messages are deleted too: the broker would refuse them again forever.
        self._outbox.ack_many(done)
        with self._lock:
            self._acked += len(done) - rejected
            self._rejected += rejected
            self._inflight_count = len(self._inflight)
        with self._settled:
            self._settled.notify_all()

    def _fill_window(self) -> None:
        room = self._window - len(self._inflight)
        if room <= 0:
            return
        handed = 0
        for entry in self._outbox.peek(self._last_sent_id, room):
            info = self._client.publish(entry.topic, entry.payload, qos=1, retain=entry.retain)
            # NO_CONN: paho keeps the message and sends it after reconnecting (same session).
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("paho refused a publish (%s); retrying later", paho.error_string(info.rc))
                break
            self._inflight[info.mid] = entry.id
            self._last_sent_id = entry.id
            handed += 1
        with self._lock:
            self._sent += handed
            self._inflight_count = len(self._inflight)

    def _publish_online(self) -> None:
        online = Status(v=1, state="online", fw=self._firmware, t=int(time.time() * 1000))
        self._client.publish(self._status_topic, encode(online), qos=1, retain=True)

    def _announce_state(self, payload: bytes, timeout: float) -> None:
        info = self._client.publish(self._status_topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            log.warning("status %s not acknowledged: %s", payload.decode(), exc)

    # -- paho callbacks (paho's network thread: hand over, never raise) ---------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection of %s: %s", self.client_id, reason)
            return
        with self._lock:
            self._connects += 1
        log.info("%s connected (session present: %s)", self.client_id, flags.session_present)
        self._connected.set()
        self._announce.set()
        self._wake.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected.is_set() and not self._stopping.is_set():
            log.warning("%s disconnected: %s; reconnecting with backoff", self.client_id, reason)
        self._connected.clear()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        failed = bool(getattr(reason, "is_failure", False))
        if failed:
            log.error("broker refused message %d of %s: %s", mid, self.client_id, reason)
        self._acks.put((mid, failed))
        self._wake.set()


def _open_outbox(queue: str | Path | Outbox, max_messages: int) -> tuple[Outbox, bool]:
    """The outbox and whether the client owns it (closes it on stop)."""
    if isinstance(queue, (str, Path)):
        if str(queue) == MEMORY:
            return MemoryOutbox(max_messages), True
        return SqliteOutbox(queue, max_messages), True
    return queue, False
