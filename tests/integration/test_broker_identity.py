"""Attacks of a garment or a gateway on the broker, with their own valid credentials (issue 10, findings 1, 2, 8).

The platform is set up as ``compression demo`` sets it up: a real Mosquitto 2.0.11
whose accounts and ACL the registry writes (:class:`BrokerSync`), two clinics with a
garment and a gateway each (each gateway relays a garment of its clinic), and the real
ingester (:class:`ingest.app.Ingester`, its default client id and topic root) storing
into a real InfluxDB. Every garment and gateway then tries, with its own password:

- to connect with the ingester's client id, with a clean session, and to subscribe to
  ``$share/<group>/...``, ``#`` and ``$SYS/#``: the ingester must lose nothing, neither
  the messages queued in its session while it was away nor any message of a live run;
- to connect with another garment's client id: that garment must stay connected and its
  last will must not fire;
- to join the ingester's share group: the ingester must still store every message;
- to publish (retained or not) outside its own three topics, and a gateway under its own
  id other than its status: the broker must refuse it (PUBACK 135) and deliver nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from compression.localservers import InfluxDB, Mosquitto, start_platform_broker
from devices.client import OFFLINE_PAYLOAD
from devices.protocol import Sample, Status, Telemetry, encode
from devices.registry import schemas as s
from devices.registry.broker import BrokerSync
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from ingest.settings import IngestSettings
from tests.integration.conftest import Names, running, settings_for, wait_for_count
from tests.integration.peers import NOT_AUTHORIZED, SUCCESS, Peer, until

pytestmark = pytest.mark.integration

# What a garment sees: the protocol's topics (docs/protocol.md).
DEVICE_ROOT = "garments/v1"
INGEST_CLIENT_ID = str(IngestSettings.model_fields["mqtt_client_id"].default)
INGEST_ROOT = str(IngestSettings.model_fields["mqtt_topic_root"].default)
QUEUED = 20
LIVE_RUN = 300
# PUBACK reason codes from here on are failures; below it the publisher has handed the message over.
ACK_FAILED = 128


@dataclass
class Platform:
    """The broker as the demo runs it, the registry writing its files, and every account's password."""

    broker: Mosquitto
    registry: Registry
    token: str
    device_port: int
    service_port: int
    passwords: dict[str, str] = field(default_factory=dict)
    peers: list[Peer] = field(default_factory=list)

    def name(self, role: str) -> str:
        return f"{role}-{self.token}"

    @property
    def garments(self) -> list[str]:
        """Garments that log in themselves: clinic A's, clinic B's."""
        return [self.name("sockA"), self.name("sockB")]

    @property
    def gateways(self) -> list[str]:
        """Gateways: clinic A's (relays bootA), clinic B's (relays bootB)."""
        return [self.name("hubA"), self.name("hubB")]

    @property
    def attackers(self) -> list[str]:
        return self.garments + self.gateways

    @property
    def reader(self) -> str:
        return f"svc.ingest-{self.token}"

    def device(
        self, username: str, protocol: int = mqtt.MQTTv5, *, client_id: str, clean_start: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> Peer:  # fmt: skip
        """A client on the listener garments and gateways reach, with ``username``'s password and the client id,
        session and will it asks for."""
        peer = Peer.connect(self.device_port, username, self.passwords[username], protocol, client_id=client_id,
                            clean_start=clean_start, will=will)  # fmt: skip
        self.peers.append(peer)
        return peer

    def service(self) -> Peer:
        """A client of the ingester's account on the services' listener."""
        peer = Peer.connect(self.service_port, self.reader, self.passwords[self.reader],
                            client_id=f"reader.{uuid.uuid4().hex[:8]}")  # fmt: skip
        self.peers.append(peer)
        return peer

    def ingest_settings(self, influx: InfluxDB, names: Names, **overrides: object) -> IngestSettings:
        """The real ingester with its own default client id and topic root, logged in as the service account."""
        url = f"mqtt://{self.reader}:{self.passwords[self.reader]}@127.0.0.1:{self.service_port}"
        values: dict[str, object] = {"mqtt_url": url, "mqtt_client_id": INGEST_CLIENT_ID,
                                     "mqtt_topic_root": INGEST_ROOT, **overrides}  # fmt: skip
        return settings_for(self.broker, influx, names, **values)


@pytest.fixture
def platform(servers_root: Path, tmp_path: Path) -> Iterator[Platform]:
    token = uuid.uuid4().hex[:8]
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    registry = Registry(session_factory(engine))
    broker = start_platform_broker(servers_root)
    assert broker.service_port is not None
    try:
        assert until(lambda: broker.pid_file.exists()), "mosquitto wrote no pid file"
        registry.on_credentials_changed = BrokerSync(registry, broker.accounts_dir, broker.pid_file)
        p = Platform(broker, registry, token, broker.port, broker.service_port)
        for clinic in ("A", "B"):
            code = f"clinic{clinic.lower()}-{token}"
            registry.create_clinic(SYSTEM, s.ClinicIn(code=code, name=f"Clinic {clinic}", timezone="Europe/Berlin"))
            hub = p.name(f"hub{clinic}")
            sock = s.DeviceIn(device_id=p.name(f"sock{clinic}"), clinic=code, kind="sock")
            boot = s.DeviceIn(device_id=p.name(f"boot{clinic}"), clinic=code, kind="boot", gateway=hub)
            for creds in (
                registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id=hub, clinic=code)),
                registry.create_device(SYSTEM, sock),
                registry.create_device(SYSTEM, boot),
            ):
                p.passwords[creds.username] = creds.password
        p.passwords[p.reader] = registry.create_service_account(SYSTEM, p.reader).password
        # The broker has reloaded the last change once the reader gets in.
        assert until(lambda: Peer.connect(p.service_port, p.reader, p.passwords[p.reader]).connack == SUCCESS)
        yield p
        for peer in p.peers:
            peer.close()
    finally:
        broker.stop()
        engine.dispose()


# --- helpers --------------------------------------------------------------------------------------------------------


def telemetry(device: str, seq: int, base_ms: int) -> bytes:
    """One valid telemetry message with one worn sample at its own time (so no two overwrite each other)."""
    sample = Sample(t=base_ms + seq * 1000, worn=True, pressure_mmhg={"ankle": 24.0})
    return encode(Telemetry(v=1, device_id=device, kind="sock", seq=seq, samples=[sample]))


def count_query(device: str) -> str:
    return f"SELECT count(worn) FROM sample WHERE device = '{device}'"


def an_hour_ago_ms() -> int:
    return int(time.time() * 1000) - 3_600_000


def share_filters(group: str) -> list[str]:
    """What a garment tries in order to join the ingester's share group (seen from its side and from the broker's)."""
    return [f"$share/{group}/{DEVICE_ROOT}/+/telemetry", f"$share/{group}/{INGEST_ROOT}/+/telemetry",
            f"$share/{group}/#", f"$share/{group}/{DEVICE_ROOT}/#"]  # fmt: skip


def impersonate_ingester(p: Platform, group: str) -> list[Peer]:
    """Every garment and gateway, MQTT 5 and 3.1.1, connects with the ingester's client id and a clean session,
    and subscribes to the share group, ``#`` and ``$SYS/#``."""
    peers = []
    for account in p.attackers:
        for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
            peer = p.device(account, protocol, client_id=INGEST_CLIENT_ID, clean_start=True)
            assert peer.connack == SUCCESS, f"{account} refused: {peer.connacks}"
            for topic_filter in [*share_filters(group), "#", "$SYS/#"]:
                peer.subscribe(topic_filter)
            peers.append(peer)
    return peers


# --- finding 1: client-id takeover ----------------------------------------------------------------------------------


async def test_no_garment_or_gateway_wipes_the_ingesters_queued_session(
    platform: Platform, influx: InfluxDB, names: Names
) -> None:
    settings = platform.ingest_settings(influx, names)
    async with running(settings):
        pass  # the ingester subscribed with its persistent session, and went away
    sender = platform.garments[1]
    b = platform.device(sender, client_id=sender)
    base = an_hour_ago_ms()
    for seq in range(QUEUED):
        assert b.publish(f"{DEVICE_ROOT}/{sender}/telemetry", telemetry(sender, seq, base)) == SUCCESS
    for peer in await asyncio.to_thread(impersonate_ingester, platform, "ingest"):
        peer.close()
    async with running(settings):
        got = await wait_for_count(influx, names.database, count_query(sender), QUEUED, timeout=15)
    assert got == QUEUED, f"{QUEUED - got} of {QUEUED} queued messages lost"


async def test_no_garment_or_gateway_disturbs_the_ingester_during_live_traffic(
    platform: Platform, influx: InfluxDB, names: Names
) -> None:
    sender = platform.garments[1]
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            for peer in impersonate_ingester(platform, "ingest"):
                peer.close()

    async with running(platform.ingest_settings(influx, names)) as ingester:
        b = platform.device(sender, client_id=sender)
        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        base = an_hour_ago_ms()
        try:
            for seq in range(LIVE_RUN):
                topic = f"{DEVICE_ROOT}/{sender}/telemetry"
                # Below 128 is an acknowledgement: the garment deletes its copy (16: nobody was subscribed).
                assert await asyncio.to_thread(b.publish, topic, telemetry(sender, seq, base)) < ACK_FAILED
        finally:
            stop.set()
            await asyncio.to_thread(attacker.join, 60)
        got = await wait_for_count(influx, names.database, count_query(sender), LIVE_RUN, timeout=15)
        reconnects = ingester.metrics.value("compression_ingest_broker_reconnects_total")
    lost = f"{LIVE_RUN - got} of {LIVE_RUN} messages of a live run lost"
    assert (got, reconnects) == (LIVE_RUN, 0), f"{lost}; the ingester was thrown off {reconnects:.0f} times"


def test_a_garment_cannot_kick_another_clinics_garment_off(platform: Platform) -> None:
    a, b = platform.garments
    watcher = platform.service()
    assert watcher.subscribe(f"{INGEST_ROOT}/+/status") == [1]
    status_topic = f"{DEVICE_ROOT}/{b}/status"
    victim = platform.device(b, client_id=b, clean_start=False, will=(status_topic, OFFLINE_PAYLOAD))
    online = encode(Status(v=1, state="online"))
    assert victim.publish(status_topic, online, retain=True) == SUCCESS
    assert until(lambda: watcher.got(online))
    for account in [a, *platform.gateways]:
        for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
            intruder = platform.device(account, protocol, client_id=b, clean_start=True)
            assert intruder.connack == SUCCESS
            intruder.close()
    # The victim still holds its connection and publishes; its will never fired.
    marker = encode(Status(v=1, state="online", fw="still-here"))
    assert victim.publish(status_topic, marker, retain=True) == SUCCESS
    assert until(lambda: watcher.got(marker)), "the victim's status after the attempts never arrived"
    kicked = [int(reason.value) for _flags, reason in victim.disconnects]
    wills = watcher.payloads().count(OFFLINE_PAYLOAD)
    assert (kicked, wills) == ([], 0), f"garment B was thrown off {kicked}; its will fired {wills} times"


# --- finding 2: shared-subscription theft ---------------------------------------------------------------------------


async def test_a_garment_in_the_ingesters_share_group_steals_nothing(
    platform: Platform, influx: InfluxDB, names: Names
) -> None:
    group = f"ingest{platform.token}"
    sender = platform.garments[1]
    async with running(platform.ingest_settings(influx, names, mqtt_share_group=group)):
        thieves = []
        for account in platform.attackers:
            thief = platform.device(account, client_id=account)
            for topic_filter in [*share_filters(group), "#", "$SYS/#"]:
                thief.subscribe(topic_filter)
            thieves.append(thief)
        b = platform.device(sender, client_id=sender)
        base = an_hour_ago_ms()
        for seq in range(40):
            assert b.publish(f"{DEVICE_ROOT}/{sender}/telemetry", telemetry(sender, seq, base)) == SUCCESS
        got = await wait_for_count(influx, names.database, count_query(sender), 40, timeout=15)
    assert got == 40, f"the ingester's share group stored {got} of 40 messages"
    assert all(not thief.messages for thief in thieves), [t.messages[:3] for t in thieves if t.messages]


# --- finding 8 (part): publishing and retaining outside one's own topics --------------------------------------------


def test_a_garment_publishes_and_retains_only_on_its_own_three_topics(platform: Platform) -> None:
    a, b = platform.garments
    reader = platform.service()
    assert reader.subscribe(f"{INGEST_ROOT}/#") == [1]
    garment = platform.device(a, client_id=a)
    outside = [f"{DEVICE_ROOT}/{a}/config", f"{DEVICE_ROOT}/{a}/telemetry/extra", f"{DEVICE_ROOT}/{a}",
               f"{DEVICE_ROOT}/{b}/status", f"{DEVICE_ROOT}/{platform.name('bootA')}/telemetry", "elsewhere/x",
               f"{DEVICE_ROOT}/{a}/status/x"]  # fmt: skip
    denied = []
    for n, topic in enumerate(outside):
        for retain in (True, False):
            payload = f"outside-{n}-{retain}".encode()
            denied.append(payload)
            assert garment.publish(topic, payload, retain=retain) == NOT_AUTHORIZED, (topic, retain)
    own = encode(Status(v=1, state="online"))
    assert garment.publish(f"{DEVICE_ROOT}/{a}/status", own, retain=True) == SUCCESS
    assert until(lambda: reader.got(own)), "the garment's own status was not delivered"
    assert not set(denied) & set(reader.payloads())


def test_a_gateway_publishes_no_telemetry_or_events_under_its_own_id(platform: Platform) -> None:
    hub_a = platform.gateways[0]
    reader = platform.service()
    assert reader.subscribe(f"{INGEST_ROOT}/#") == [1]
    gateway = platform.device(hub_a, client_id=hub_a)
    refused = [(f"{DEVICE_ROOT}/{hub_a}/telemetry", b"gw-telemetry"), (f"{DEVICE_ROOT}/{hub_a}/event", b"gw-event"),
               (f"{DEVICE_ROOT}/{hub_a}/config", b"gw-config"),
               (f"{DEVICE_ROOT}/{platform.name('bootB')}/telemetry", b"other-clinic")]  # fmt: skip
    for topic, payload in refused:
        assert gateway.publish(topic, payload) == NOT_AUTHORIZED, topic
    relayed = platform.name("bootA")
    allowed = [(f"{DEVICE_ROOT}/{hub_a}/status", b"gw-status"), (f"{DEVICE_ROOT}/{relayed}/telemetry", b"relayed"),
               (f"{DEVICE_ROOT}/{relayed}/status", b"relayed-status")]  # fmt: skip
    for topic, payload in allowed:
        assert gateway.publish(topic, payload) == SUCCESS, topic
    assert until(lambda: all(reader.got(payload) for _t, payload in allowed))
    assert not {payload for _t, payload in refused} & set(reader.payloads())
