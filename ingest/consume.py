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
import struct
import threading
import time
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
# Socket reads (64 KiB each, about 50 telemetry messages) per wake-up of the reader, at most: a burst is read
# without an event-loop round trip per read, and the writers and timers still get their turn.
READS_PER_WAKEUP = 8


class BrokerError(ConnectionError):
    """The broker could not be reached or refused us."""


# What the fast path hands on per PUBLISH: topic, payload, packet id (0 for QoS 0), QoS, retain flag; it
# returns False to stop reading (the window is full).
Deliver = Callable[[str, bytes, int, int, bool], bool]

_PUBACK_HEAD = 0x4002_0000  # PUBACK, remaining length 2: with the packet id, one big-endian 32-bit word


def puback_packets(mids: list[int]) -> bytes:
    """PUBACKs for ``mids`` (QoS 1 packet ids), in order, as one write.

    Four bytes each, the same for MQTT 3.1.1 and 5: MQTT 5 allows a PUBACK
    without reason code and properties when the reason is Success (0x00),
    which is also what paho sends.
    """
    return struct.pack(f"!{len(mids)}I", *[_PUBACK_HEAD | mid for mid in mids])


class FastPathClient(paho.Client):
    """paho's client with our own read path for the packets that are the load: PUBLISH at QoS 0 and 1.

    paho's receive path cost about half of the ingester's CPU (docs/benchmarks.md):
    three or four ``recv`` calls per packet, its read state machine, an
    ``MQTTMessage``, topic matching against callbacks, and with MQTT 5 a
    ``Properties`` object per PUBLISH. Here the socket is read 64 KiB at a
    time, whole PUBLISH packets are split out of that buffer and handed on as
    (topic, payload, packet id, QoS, retain): the fixed header, the topic, the
    packet id, the MQTT 5 property block skipped by its length (the ingester
    uses no PUBLISH property; it announces no Topic Alias Maximum, so the
    broker sends no topic alias), the payload.

    Every other packet (CONNACK, SUBACK, PINGRESP, a broker's DISCONNECT, a
    QoS 2 PUBLISH) and anything this parser does not fully understand goes
    to paho unchanged and in order: paho reads it through ``_sock_recv``,
    which serves only those bytes, so paho keeps the connection's state, the
    keepalive, reconnection and its error handling. A read error or the end
    of the stream is passed to paho the same way. The buffer belongs to one
    socket and is dropped with it: no byte of one connection reaches the next.
    """

    READ_SIZE = 65_536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drop_buffers()

    def _drop_buffers(self) -> None:
        self._rbuf = b""  # read from the socket, parsed up to _rpos
        self._rpos = 0
        self._to_paho = b""  # one whole packet for paho's own reader
        self._read_failure: OSError | EOFError | None = None  # a read error, or the end of the stream, for paho

    def _sock_close(self) -> None:
        self._drop_buffers()
        super()._sock_close()

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho's reads: only the bytes handed to it, then the failure met by :meth:`fill`, if any."""
        data = self._to_paho
        if data:
            self._to_paho = data[bufsize:]
            return data[:bufsize]
        failure = self._read_failure
        if failure is None:
            raise BlockingIOError
        if isinstance(failure, EOFError):
            return b""  # the broker closed the connection: paho's "connection lost"
        raise failure

    def fill(self) -> bool:
        """Read what the socket holds (up to 64 KiB) behind the unparsed rest; False when nothing came.

        A read error or the end of the stream is handed to paho, which closes
        the connection and calls ``on_disconnect``; then this returns False too.
        """
        if self._sock is None:
            return False
        try:
            chunk = super()._sock_recv(self.READ_SIZE)  # paho's: maps SSL want-read/write to BlockingIOError
        except BlockingIOError:
            return False
        except OSError as exc:
            self._fail(exc)
            return False
        if not chunk:
            self._fail(EOFError())
            return False
        rest = self._rbuf[self._rpos :] if self._rpos < len(self._rbuf) else b""
        self._rbuf = rest + chunk if rest else chunk
        self._rpos = 0
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()  # paho's keepalive: the broker is alive
        return True

    def _fail(self, failure: OSError | EOFError) -> None:
        self._read_failure = failure
        super().loop_read()  # paho meets it in _packet_read: MQTT_ERR_CONN_LOST, close, on_disconnect

    def has_buffered(self) -> bool:
        """True if bytes already read from the socket wait to be parsed."""
        return self._rpos < len(self._rbuf)

    def _to_paho_now(self, packet: bytes) -> None:
        """Let paho read and handle one packet (it may call back, disconnect, close the socket)."""
        self._to_paho = packet
        while self._to_paho and self._sock is not None:
            super().loop_read()
        self._to_paho = b""

    def parse(self, deliver: Deliver) -> bool:
        """Hand on every whole packet in the buffer, in order; False when reading must stop.

        It stops when ``deliver`` says so (the window is full; the rest stays
        buffered for the next call) or when the connection is gone.
        """
        buf, pos = self._rbuf, self._rpos
        end = len(buf)
        v5 = self._protocol == paho.MQTTv5
        while pos < end:
            first = buf[pos]
            at, length, shift = pos + 1, 0, 0
            while at < end:  # remaining length: 1-4 bytes, 7 bits each, little end first
                byte = buf[at]
                length |= (byte & 0x7F) << shift
                at += 1
                if byte < 0x80 or shift == 21:
                    break
                shift += 7
            else:
                break  # the fixed header is not complete yet
            if buf[at - 1] >= 0x80:  # a fifth length byte: malformed; paho's way, a lost connection
                self._fail(ConnectionError("malformed packet from the broker (remaining length over 4 bytes)"))
                return False
            stop = at + length
            if stop > end:
                break  # the packet is not complete yet
            self._rpos = stop
            if (first & 0xF6) in (0x30, 0x32) and length >= 2:  # PUBLISH at QoS 0 or 1 (any dup, retain)
                topic_end = at + 2 + (buf[at] << 8 | buf[at + 1])
                body = topic_end + 2 if first & 0x02 else topic_end
                if v5 and body < stop:
                    props, shift = 0, 0
                    while body < stop:
                        byte = buf[body]
                        props |= (byte & 0x7F) << shift
                        body += 1
                        if byte < 0x80 or shift == 21:
                            break
                        shift += 7
                    body = body + props if byte < 0x80 else stop + 1
                elif v5:
                    body = stop + 1  # no property length: malformed
                if body <= stop and (v5 or topic_end > at + 2):
                    topic = buf[at + 2 : topic_end].decode("utf-8", "replace")
                    mid = buf[topic_end] << 8 | buf[topic_end + 1] if first & 0x02 else 0
                    if not deliver(topic, buf[body:stop], mid, first >> 1 & 3, bool(first & 1)):
                        return False
                    pos = stop
                    continue
            self._to_paho_now(buf[pos:stop])  # any other packet, or one we do not fully understand
            if self._sock is None:
                return False
            pos = stop
        self._rpos = pos
        return True


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
    def _make_client(self) -> FastPathClient:
        s = self._settings
        v5 = s.mqtt_protocol == "5"
        client = FastPathClient(
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
        if self._paused:
            return  # a call scheduled before the pause (or the shutdown) began
        client = self._client
        reads = 0
        while client.parse(self._deliver):
            if reads == READS_PER_WAKEUP or not client.fill():
                break
            reads += 1
        else:
            return  # paused at the window, or the connection is gone
        # Bytes decrypted inside an SSL socket do not make it readable again: come back for them.
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending() and not self._paused:
            self._loop.call_soon(self._read)

    def _deliver(self, topic: str, payload: bytes, mid: int, qos: int, retained: bool) -> bool:
        """One PUBLISH from the fast path: count it against the window, hand it on; False: stop reading."""
        if qos:
            self.unacked += 1
            if self.unacked > self._window:
                self._set_paused(True)
        self._handler(topic, payload, Entry(mid, qos, self.generation), retained)
        return not self._paused

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
        # Only what the fast path leaves to paho: a QoS 2 PUBLISH (we subscribe at QoS 1, so none is expected).
        topic = message._topic.decode("utf-8", "replace")  # message.topic raises on invalid UTF-8
        self._deliver(topic, bytes(message.payload), message.mid, message.qos, bool(message.retain))

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
        mids: list[int] = []
        acked = skipped = 0
        for entry in entries:
            if entry.qos == 1 and entry.generation == current:
                mids.append(entry.mid)
            elif entry.qos == 0:
                continue
            elif entry.generation != current:
                skipped += 1
            else:  # QoS 2, left to paho (PUBCOMP), in its place among the PUBACKs
                acked += self._send_pubacks(mids) + 1
                mids = []
                self._client.ack(entry.mid, entry.qos)
        acked += self._send_pubacks(mids)
        self.unacked -= acked
        self._metrics.acked.inc(acked)
        self._metrics.ack_skipped.inc(skipped)
        if self._paused and self.unacked <= self._window and not self._shutting_down:
            self._set_paused(False)

    def _send_pubacks(self, mids: list[int]) -> int:
        """Queue the PUBACKs of ``mids`` as one packet write behind what paho already queued; how many."""
        if mids:
            self._client._packet_queue(PacketTypes.PUBACK << 4, puback_packets(mids), 0, 0)
        return len(mids)

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
