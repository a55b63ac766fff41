"""A paho 2.x client for broker tests that records everything the broker tells it (CONNACKs, PUBACKs, SUBACKs,
messages, disconnects), with the client id, clean start, will and protocol a test asks for."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

WAIT_S = 10.0
SUCCESS = 0
NOT_AUTHORIZED = 135
# Session expiry (MQTT 5) of a peer that asks for a persistent session.
PERSISTENT_SESSION_S = 3600


def until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


@dataclass
class Peer:
    """One paho client on its loop thread, with everything the broker told it."""

    client: mqtt.Client
    connacks: list[ReasonCode] = field(default_factory=list)
    sessions_present: list[bool] = field(default_factory=list)
    acks: dict[int, ReasonCode] = field(default_factory=dict)
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    disconnects: list[tuple[mqtt.DisconnectFlags, ReasonCode]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(
        cls,
        port: int,
        username: str | None,
        password: str | None,
        protocol: int = mqtt.MQTTv5,
        *,
        client_id: str | None = None,
        clean_start: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> Peer:
        """Connect (and wait for the CONNACK). ``clean_start=False`` asks for a persistent session."""
        v5 = protocol == mqtt.MQTTv5
        client = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"{username or 'anonymous'}-{uuid.uuid4().hex[:6]}",
                             protocol=MQTTProtocolVersion(protocol),
                             clean_session=None if v5 else clean_start)  # fmt: skip
        peer = cls(client)
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = peer._on_connect
        client.on_publish = peer._on_publish
        client.on_subscribe = peer._on_subscribe
        client.on_message = peer._on_message
        client.on_disconnect = peer._on_disconnect
        properties = None
        if v5 and not clean_start:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = PERSISTENT_SESSION_S
        if v5:
            client.connect("127.0.0.1", port, clean_start=clean_start, properties=properties)
        else:
            client.connect("127.0.0.1", port)
        client.loop_start()
        assert until(lambda: bool(peer.connacks)), f"no CONNACK for {username}"
        return peer

    # paho calls these on its loop thread.
    def _on_connect(self, _c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object) -> None:
        with self.lock:
            self.sessions_present.append(flags.session_present)
            self.connacks.append(rc)

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self.lock:
            self.acks[mid] = rc

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, rcs: list[ReasonCode], _p: object) -> None:
        with self.lock:
            self.subacks[mid] = rcs

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, flags: mqtt.DisconnectFlags, rc: ReasonCode, _p: object
    ) -> None:
        with self.lock:
            self.disconnects.append((flags, rc))

    @property
    def connack(self) -> int:
        """The first CONNACK's reason code."""
        return int(self.connacks[0].value)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert until(lambda: info.mid in self.acks), f"no PUBACK for {topic}"
        return int(self.acks[info.mid].value)

    def subscribe(self, topic_filter: str) -> list[int]:
        """Subscribe at QoS 1 and return the SUBACK's reason codes."""
        _rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        assert until(lambda: mid in self.subacks), f"no SUBACK for {topic_filter}"
        return [int(rc.value) for rc in self.subacks[mid]]

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [payload for _topic, payload in self.messages]

    def got(self, payload: bytes) -> bool:
        return payload in self.payloads()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
