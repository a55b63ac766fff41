"""The registry's account files on a real Mosquitto 2.0.11: who may log in where, publish where, and revocation.

Each test registers a clinic, garments A and B, a gateway G relaying garment C
and an ingester service account in a real registry (SQLite file), with
:class:`BrokerSync` as ``on_credentials_changed``, so every registry change
rewrites the broker's four files and SIGHUPs it. The broker is the platform's
(:func:`start_platform_broker`: the deployed listeners on loopback): garments and
the gateway on the device listener (topics ``garments/v1/...``), the ingester's
account on the services' listener (the same topics as ``fleet/garments/v1/...``).
The clients are paho 2.x. The attacks with valid credentials (client-id takeover,
share-group theft) are in ``test_broker_identity.py``.

"Never delivered" is shown without sleeping: after the denied publish has its
PUBACK, the same (or another) client publishes a marker it may publish; the
broker handles a connection's packets in order and delivers to each subscriber
in order, so once the marker has arrived, a delivery of the denied message
would have arrived before it.
"""

from __future__ import annotations

import grp
import os
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from compression.localservers import Mosquitto, start_platform_broker
from devices.registry import schemas as s
from devices.registry.broker import (
    DEVICE_ACL,
    DEVICE_PASSWD,
    SERVICE_ACL,
    SERVICE_PASSWD,
    SERVICE_TOPIC_ROOT,
    BrokerSync,
)
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from tests.integration.peers import NOT_AUTHORIZED, SUCCESS, WAIT_S, Peer, until

pytestmark = pytest.mark.integration


@dataclass
class World:
    """A broker fed by a registry, its accounts' passwords and every client opened in the test."""

    broker: Mosquitto
    registry: Registry
    sync: BrokerSync
    token: str
    passwords: dict[str, str] = field(default_factory=dict)
    peers: list[Peer] = field(default_factory=list)

    def name(self, role: str) -> str:
        return f"{role}-{self.token}"

    @property
    def a(self) -> str:
        return self.name("sockA")

    @property
    def b(self) -> str:
        return self.name("sockB")

    @property
    def c(self) -> str:
        return self.name("sockC")

    @property
    def g(self) -> str:
        return self.name("hubG")

    @property
    def reader(self) -> str:
        return f"svc.ingest-{self.token}"

    def port_for(self, username: str | None) -> int:
        """The services' listener for the ingester's account, the device listener for everyone else."""
        assert self.broker.service_port is not None
        return self.broker.service_port if username == self.reader else self.broker.port

    def peer(
        self, username: str | None, password: str | None = None, protocol: int = mqtt.MQTTv5, port: int | None = None,
        client_id: str | None = None, clean_start: bool = True,
    ) -> Peer:  # fmt: skip
        """A client logged in as ``username`` (its registered password unless given) on its listener."""
        if username is not None and password is None:
            password = self.passwords[username]
        peer = Peer.connect(port or self.port_for(username), username, password, protocol, client_id=client_id,
                            clean_start=clean_start)  # fmt: skip
        self.peers.append(peer)
        return peer

    def logged_in(
        self, username: str, protocol: int = mqtt.MQTTv5, client_id: str | None = None, clean_start: bool = True
    ) -> Peer:
        """A client of a live account, retried until the broker has reloaded the files that hold it."""
        deadline = time.monotonic() + WAIT_S
        while True:
            peer = self.peer(username, protocol=protocol, client_id=client_id, clean_start=clean_start)
            if peer.connack == SUCCESS or time.monotonic() > deadline:
                assert peer.connack == SUCCESS, f"{username} refused: {peer.connacks}"
                return peer
            peer.close()
            time.sleep(0.05)

    def readers(self) -> list[Peer]:
        """The ingester's account twice: on ``fleet/garments/v1/#`` and on the shared-subscription form."""
        plain, shared = self.logged_in(self.reader), self.logged_in(self.reader)
        assert plain.subscribe(f"{SERVICE_TOPIC_ROOT}/#") == [1]
        assert shared.subscribe(f"$share/ingest-{self.token}/{SERVICE_TOPIC_ROOT}/#") == [1]
        return [plain, shared]


def topic(device: str, channel: str = "telemetry") -> str:
    """A topic as garments and gateways publish it."""
    return f"garments/v1/{device}/{channel}"


def assert_not_delivered(readers: list[Peer], sender: Peer, own_topic: str, *denied: bytes) -> None:
    """``denied`` never reached a reader: a later marker from ``sender`` did, in order."""
    marker = f"marker-{uuid.uuid4().hex}".encode()
    assert sender.publish(own_topic, marker) == SUCCESS
    for reader in readers:
        assert until(partial(reader.got, marker)), "the marker was not delivered"
        assert not set(denied) & set(reader.payloads())


def assert_delivered(readers: list[Peer], payload: bytes) -> None:
    for reader in readers:
        assert until(partial(reader.got, payload)), f"{payload!r} not delivered"


@pytest.fixture
def world(servers_root: Path, tmp_path: Path) -> Iterator[World]:
    token = uuid.uuid4().hex[:8]
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    registry = Registry(session_factory(engine))
    # The broker starts on empty files (it refuses to start without them); the registry then rewrites them.
    broker = start_platform_broker(servers_root)
    try:
        assert until(lambda: broker.pid_file.exists()), "mosquitto wrote no pid file"
        sync = BrokerSync(registry, broker.accounts_dir, broker.pid_file)
        registry.on_credentials_changed = sync
        w = World(broker, registry, sync, token)
        clinic = f"clinic-{token}"
        registry.create_clinic(SYSTEM, s.ClinicIn(code=clinic, name="Test clinic", timezone="Europe/Berlin"))
        for creds in (
            registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id=w.g, clinic=clinic)),
            registry.create_device(SYSTEM, s.DeviceIn(device_id=w.a, clinic=clinic, kind="sock")),
            registry.create_device(SYSTEM, s.DeviceIn(device_id=w.b, clinic=clinic, kind="sock")),
            registry.create_device(SYSTEM, s.DeviceIn(device_id=w.c, clinic=clinic, kind="boot", gateway=w.g)),
            registry.create_service_account(SYSTEM, w.reader),
        ):
            w.passwords[creds.username] = creds.password
        assert sync.syncs == 5
        yield w
        for peer in w.peers:
            peer.close()
    finally:
        broker.stop()
        engine.dispose()


def names_in(passwd: Path) -> list[str]:
    return sorted(line.split(":", 1)[0] for line in passwd.read_text().splitlines())


def test_files_are_written_for_the_broker_user(world: World) -> None:
    folder = world.broker.accounts_dir
    assert names_in(folder / DEVICE_PASSWD) == sorted([world.a, world.b, world.c, world.g])
    assert names_in(folder / SERVICE_PASSWD) == [world.reader]
    broker_group = {g.gr_name: g.gr_gid for g in grp.getgrall()}.get("mosquitto")
    for path in (folder / name for name in (DEVICE_PASSWD, DEVICE_ACL, SERVICE_PASSWD, SERVICE_ACL)):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o640
        if os.geteuid() == 0 and broker_group is not None:  # the broker dropped to user mosquitto and reads them
            assert (info.st_uid, info.st_gid) == (0, broker_group)
    world.logged_in(world.reader)  # so the broker could read them
    world.logged_in(world.a)


def test_each_listener_knows_only_its_own_accounts(world: World) -> None:
    world.logged_in(world.a)  # the files are loaded
    assert world.broker.service_port is not None
    for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
        # Device credentials are unknown to the services' listener, service credentials to the device listener.
        for device in (world.a, world.g):
            assert world.peer(device, protocol=protocol, port=world.broker.service_port).connack == NOT_AUTHORIZED
        assert world.peer(world.reader, protocol=protocol, port=world.broker.port).connack == NOT_AUTHORIZED


def test_a_device_keeps_its_persistent_session_under_its_own_id(world: World) -> None:
    # Whatever client id it sends, a device's session is the one of its own id: it finds it again.
    readers = world.readers()
    first = world.logged_in(world.a, client_id=world.a, clean_start=False)
    assert first.sessions_present == [False]
    first.close()
    again = world.logged_in(world.a, client_id="anything-else", clean_start=False)
    assert again.sessions_present == [True], "the persistent session of the device's own id was not resumed"
    assert again.publish(topic(world.a), b"A-again") == SUCCESS
    assert_delivered(readers, b"A-again")


def test_a_device_publishes_only_under_its_own_id(world: World) -> None:
    readers = world.readers()
    a = world.logged_in(world.a)
    assert a.publish(topic(world.a), b"A-own") == SUCCESS
    assert a.publish(topic(world.a, "status"), b"A-status") == SUCCESS
    assert_delivered(readers, b"A-own")
    assert_delivered(readers, b"A-status")
    assert a.publish(topic(world.b), b"A-as-B") == NOT_AUTHORIZED
    assert a.publish(topic(world.c, "event"), b"A-as-C") == NOT_AUTHORIZED
    assert a.publish("garments/v1", b"A-root") == NOT_AUTHORIZED
    assert_not_delivered(readers, a, topic(world.a), b"A-as-B", b"A-as-C", b"A-root")
    assert not a.disconnects, "a denied publish does not cost the connection (MQTT 5)"


def test_a_gateway_publishes_for_its_garments_and_its_own_status_only(world: World) -> None:
    readers = world.readers()
    g = world.logged_in(world.g)
    assert g.publish(topic(world.c), b"G-for-C") == SUCCESS
    assert g.publish(topic(world.c, "status"), b"G-C-status") == SUCCESS
    assert g.publish(topic(world.g, "status"), b"G-status") == SUCCESS
    for payload in (b"G-for-C", b"G-C-status", b"G-status"):
        assert_delivered(readers, payload)
    assert g.publish(topic(world.a), b"G-for-A") == NOT_AUTHORIZED
    assert_not_delivered(readers, g, topic(world.g, "status"), b"G-for-A")

    # Garment C leaves the gateway: at the reload the still-connected gateway loses C's topics.
    world.registry.update_device(SYSTEM, world.c, s.DeviceUpdate(detach_gateway=True))
    assert world.sync.syncs == 6
    sent: list[bytes] = []

    def refused_for_c() -> bool:
        sent.append(f"G-for-C-{len(sent)}".encode())
        return g.publish(topic(world.c), sent[-1]) == NOT_AUTHORIZED

    assert until(refused_for_c), "the gateway kept C's topics after the reload"
    assert_not_delivered(readers, g, topic(world.g, "status"), sent[-1])
    assert not g.disconnects, "an ACL change alone keeps the gateway connected"


def test_wrong_password_and_anonymous_are_refused_at_connect(world: World) -> None:
    world.logged_in(world.a)  # the files are loaded
    for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
        assert world.peer(world.a, "wrong-password", protocol).connack == NOT_AUTHORIZED
        assert world.peer(None, None, protocol).connack == NOT_AUTHORIZED
        assert world.peer("nobody-registered", "whatever", protocol).connack == NOT_AUTHORIZED
        # another account's password is no good either
        assert world.peer(world.a, world.passwords[world.b], protocol).connack == NOT_AUTHORIZED


def test_the_reader_publishes_nowhere(world: World) -> None:
    readers = world.readers()
    plain = readers[0]
    # On the services' listener (no mount point), as a device's topic and as the broker's.
    assert plain.publish(topic(world.a), b"R-as-A") == NOT_AUTHORIZED
    assert plain.publish(f"fleet/{topic(world.a)}", b"R-as-A-mounted") == NOT_AUTHORIZED
    assert plain.publish(f"fleet/{topic(world.reader)}", b"R-own") == NOT_AUTHORIZED
    assert plain.publish("elsewhere", b"R-elsewhere") == NOT_AUTHORIZED
    a = world.logged_in(world.a)
    assert_not_delivered(readers, a, topic(world.a), b"R-as-A", b"R-as-A-mounted", b"R-own", b"R-elsewhere")


def test_mqtt_311_denied_publish_is_acknowledged_but_not_delivered(world: World) -> None:
    readers = world.readers()
    a = world.logged_in(world.a, protocol=mqtt.MQTTv311)
    # MQTT 3.1.1 has no reason codes: Mosquitto acknowledges the denied publish as if it went through ...
    assert a.publish(topic(world.b), b"A311-as-B") == SUCCESS
    # ... and drops it.
    assert_not_delivered(readers, a, topic(world.a), b"A311-as-B")
    assert not a.disconnects


def test_revoking_a_device_cuts_it_off(world: World) -> None:
    readers = world.readers()
    a, b, g = world.logged_in(world.a), world.logged_in(world.b), world.logged_in(world.g)
    assert a.publish(topic(world.a), b"A-before") == SUCCESS
    assert_delivered(readers, b"A-before")

    world.registry.revoke(SYSTEM, "device", world.a)
    assert world.sync.syncs == 6
    assert world.a not in (world.broker.accounts_dir / DEVICE_PASSWD).read_text()

    # At the reload Mosquitto 2.0.11 re-checks every connected client against the new password file and
    # closes A's connection, without a DISCONNECT packet (paho reports the lost connection).
    assert until(lambda: bool(a.disconnects)), "the revoked device stayed connected"
    flags, _reason = a.disconnects[0]
    assert not flags.is_disconnect_packet_from_server
    # What A publishes now stays in its client; its automatic reconnect (paho, after 1 s) is refused ...
    a.client.publish(topic(world.a), b"A-after", qos=1)
    assert until(lambda: len(a.connacks) > 1, timeout=5), "paho did not try to reconnect"
    assert [int(rc.value) for rc in a.connacks[1:]] == [NOT_AUTHORIZED] * (len(a.connacks) - 1)
    # ... and so is a new connection with A's credentials.
    assert world.peer(world.a).connack == NOT_AUTHORIZED
    assert_not_delivered(readers, b, topic(world.b), b"A-after")

    # Everyone else keeps their connection through the reload.
    assert not b.disconnects and not g.disconnects and not any(r.disconnects for r in readers)


def test_rotating_a_password_drops_the_old_session(world: World) -> None:
    readers = world.readers()
    a = world.logged_in(world.a)
    creds = world.registry.rotate_credentials(SYSTEM, "device", world.a)
    # The connection made with the old password does not survive the reload either.
    assert until(lambda: bool(a.disconnects)), "the old password's session stayed connected"
    old = world.passwords[world.a]
    world.passwords[world.a] = creds.password
    assert world.peer(world.a, old).connack == NOT_AUTHORIZED
    fresh = world.logged_in(world.a)
    assert fresh.publish(topic(world.a), b"A-new-password") == SUCCESS
    assert_delivered(readers, b"A-new-password")
