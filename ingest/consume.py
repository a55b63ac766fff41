"""Consume stage: MQTT messages from the broker, acknowledged only when told.

paho-mqtt 2.x with ``manual_ack=True``, driven by the asyncio event loop
(paho's socket callbacks hook its socket into the loop), so every read and
every ack happens on the loop's thread: no lock, and no ack written from a
foreign thread (ingest-facts, trap 5). aiomqtt is not used because it
acknowledges QoS 1 messages inside paho before the application sees them.

Limits (ingest-facts, traps 1 and 4): the broker is told our window (MQTT 5
Receive Maximum); when it sends more than that anyway, which Mosquitto does
once acks flow, reading pauses until acks bring the count back under the
window. Reading does not pause while the broker respects the window, so the
keepalive replies keep being read during a long database outage.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest.batch import Entry
from ingest.metrics import IngestMetrics
from ingest.settings import IngestSettings, redact_url
from ingest.write import Backoff

log = logging.getLogger(__name__)

# (topic, payload, entry to acknowledge, retained): ``retained`` is the MQTT retain flag on delivery, set only when
# the broker hands over its stored retained message (a new subscription), never for a message published live.
MessageHandler = Callable[[str, bytes, Entry, bool], None]
# paho reads one packet per loop_read(); reading a bounded burst per wake-up
# saves an event-loop round trip per message.
READS_PER_WAKEUP = 64


class BrokerError(ConnectionError):
    """The broker could not be reached or refused us."""


class BufferedClient(paho.Client):
    """paho's client with buffered socket reads.

    paho reads each packet with three to four unbuffered ``recv`` calls (one
    byte of command, the length bytes one by one, the body). Measured in the
    benchmark, socket reads were a third of the ingester's CPU. This reads up
    to 64 KiB at a time and serves paho from the buffer; the buffer is dropped
    with its socket, so no byte of one connection reaches the next.
    """

    READ_SIZE = 65_536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            chunk = super()._sock_recv(self.READ_SIZE)
            if not chunk:
                return chunk  # connection closed: paho handles the empty read
            self._rbuf, self._rpos = chunk, 0
        out = self._rbuf[self._rpos : self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    def has_buffered(self) -> bool:
        """True if bytes already read from the socket wait to be parsed."""
        return self._rpos < len(self._rbuf)


class MqttConsumer:
    """Subscribes to the garment topics and hands each message to ``handler``."""

    def __init__(self, settings: IngestSettings, metrics: IngestMetrics, handler: MessageHandler) -> None:
        self._settings = settings
        self._metrics = metrics
        self._handler = handler
        self._window = settings.inflight_max
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.generation = 0
        self.unacked = 0
        self._paused = False
        self._shutting_down = False
        self._sock: socket.socket | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._stopping = False
        self._client = self._make_client()
        metrics.inflight_limit.set(self._window)
        metrics.inflight.set_function(lambda: self.unacked)

    # -- set-up ---------------------------------------------------------
    def _make_client(self) -> BufferedClient:
        s = self._settings
        v5 = s.mqtt_protocol == "5"
        client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=s.mqtt_client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        endpoint = s.mqtt
        if endpoint.username:
            client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            client.tls_set(ca_certs=s.mqtt_tls_ca_file, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(s.mqtt_tls_insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _connect_properties(self) -> Properties | None:
        if self._settings.mqtt_protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        props.ReceiveMaximum = self._window
        return props

    def topic_filters(self) -> list[str]:
        """The subscriptions: telemetry, event and status of every device."""
        root = self._settings.mqtt_topic_root
        share = self._settings.mqtt_share_group
        prefix = f"$share/{share}/" if share else ""
        return [f"{prefix}{root}/+/{channel}" for channel in ("telemetry", "event", "status")]

    # -- socket plumbing (paho calls these; possibly from the connect thread) --
    def _in_loop(self, func: Callable[..., None], *args: Any) -> None:
        # paho calls back on the thread that did the work: the loop's, or the
        # executor thread that ran connect(). Closing must act at once, while
        # the file descriptor is still valid.
        if threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            self._loop.call_soon_threadsafe(func, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._attach, sock)

    def _attach(self, sock: socket.socket) -> None:
        self._sock = sock
        if not self._paused:
            self._loop.add_reader(sock, self._read)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._detach, sock)

    def _detach(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._sock is sock:
            self._sock = None

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_write, sock)

    def _watch_write(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self._loop.add_writer(sock, self._client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_write, sock)

    def _unwatch_write(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_writer(sock)

    def _read(self) -> None:
        before = -1
        reads = 0
        while reads < READS_PER_WAKEUP and not self._paused and self._received != before:
            before = self._received
            self._client.loop_read()
            reads += 1
        if self._paused or self._sock is None:
            return
        # Bytes already read (into our buffer, or decrypted inside an SSL socket)
        # do not make the socket readable again: come back for them.
        sock = self._sock
        if self._client.has_buffered() or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            self._loop.call_soon(self._read)

    _received = 0

    # -- MQTT callbacks ---------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:  # fmt: skip
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self.generation += 1
        self.unacked = 0
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        if self._settings.mqtt_protocol == "5":
            client.subscribe([(f, options) for f in self.topic_filters()])
        else:
            client.subscribe([(f, 1) for f in self.topic_filters()])
        self._metrics.connected.set(1)
        log.info("connected to %s (session present: %s, generation %d)",
                 redact_url(self._settings.mqtt_url), flags.session_present, self.generation)  # fmt: skip
        self._connected.set()
        self._disconnected.clear()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:  # fmt: skip
        self._metrics.connected.set(0)
        self._connected.clear()
        self._set_paused(False)
        self.unacked = 0
        if not self._stopping:
            log.warning("disconnected from broker: %s", reason)
        self._disconnected.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._received += 1
        entry = Entry(message.mid, message.qos, self.generation)
        if message.qos > 0:
            self.unacked += 1
            if self.unacked > self._window:
                self._set_paused(True)
        self._handler(message.topic, bytes(message.payload), entry, bool(message.retain))

    # -- flow control -----------------------------------------------------
    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        if self._sock is None:
            return
        if paused:
            self._metrics.paused.inc()
            self._loop.remove_reader(self._sock)
        else:
            self._loop.add_reader(self._sock, self._read)
            self._loop.call_soon(self._read)  # what was buffered before the pause

    def pause_for_shutdown(self) -> None:
        """Stop reading new messages; acks still go out."""
        self._set_paused(True)
        self._shutting_down = True

    def ack(self, entries: list[Entry]) -> None:
        """Acknowledge written messages, in order; skip those of a lost connection."""
        current = self.generation if self._connected.is_set() else -1
        acked = skipped = 0
        for entry in entries:
            if entry.qos == 0:
                continue
            if entry.generation != current:
                skipped += 1
                continue
            self._client.ack(entry.mid, entry.qos)
            acked += 1
        self.unacked -= acked
        self._metrics.acked.inc(acked)
        self._metrics.ack_skipped.inc(skipped)
        if self._paused and self.unacked <= self._window and not self._shutting_down:
            self._set_paused(False)

    # -- lifecycle --------------------------------------------------------
    async def run(self) -> None:
        """Connect, and reconnect with backoff whenever the connection is lost."""
        backoff = Backoff(self._settings.retry_initial_s, self._settings.retry_max_s)
        misc = asyncio.create_task(self._misc_loop())
        attempt = 0
        try:
            while not self._stopping:
                try:
                    await self._connect_once()
                except BrokerError as exc:
                    attempt += 1
                    delay = backoff.delay(attempt)
                    log.warning("broker unreachable (attempt %d, retry in %.1fs): %s", attempt, delay, exc)
                    await asyncio.sleep(delay)
                    continue
                if attempt or self.generation > 1:
                    self._metrics.reconnects.inc()
                attempt = 0
                await self._disconnected.wait()
        finally:
            misc.cancel()

    async def _connect_once(self) -> None:
        self._disconnected.clear()
        endpoint = self._settings.mqtt
        props = self._connect_properties()
        try:
            rc = await self._loop.run_in_executor(None, lambda: self._client.connect(
                endpoint.host, endpoint.port, keepalive=self._settings.mqtt_keepalive_s,
                clean_start=False if props is not None else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props))  # fmt: skip
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"{type(exc).__name__}: {exc}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"connect failed: {rc}")
        try:
            await asyncio.wait_for(self._wait_connack(), timeout=15)
        except TimeoutError as exc:
            self._client.disconnect()
            raise BrokerError("no CONNACK within 15 s") from exc

    async def _wait_connack(self) -> None:
        connected = asyncio.create_task(self._connected.wait())
        lost = asyncio.create_task(self._disconnected.wait())
        done, pending = await asyncio.wait({connected, lost}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if lost in done and not self._connected.is_set():
            raise BrokerError("connection closed before CONNACK (refused?)")

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._sock is not None:
                self._client.loop_misc()

    @property
    def is_connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    async def close(self) -> None:
        """Send what acks are queued, then disconnect cleanly."""
        self._stopping = True
        if self._sock is None:
            return
        self._client.disconnect()
        try:
            await asyncio.wait_for(self._disconnected.wait(), timeout=5)
        except TimeoutError:
            log.warning("broker did not close the connection within 5 s")
