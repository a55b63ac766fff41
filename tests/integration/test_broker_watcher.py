"""The mosquitto service's entry point and TLS certificates, run here against Debian's Mosquitto 2.0.11.

No Docker engine runs on the build machines, so the container's pieces are
run as plain processes: ``deploy/mosquitto/entrypoint.sh`` under busybox sh
(the eclipse-mosquitto image is Alpine, whose sh is busybox ash; dash when
busybox is missing) with the deployed ``mosquitto.conf``, only its paths and
ports rewritten to a folder and free loopback ports. The entry point makes the
static accounts (``make-passwd.sh``), installs the certificates made by
``make-certs.sh``, merges the registry's files, starts its watcher and execs
the broker, exactly as in the container; the registry side is a real registry
(SQLite) whose :class:`BrokerSync` writes its files into the folder the
watcher watches, with no pid file, as across containers.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from compression.localservers import BROKER_USER, MOSQUITTO_BIN, free_port, remove_server_folder, server_folder
from devices.registry import schemas as s
from devices.registry.broker import BrokerSync
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "mosquitto"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
MAKE_CERTS = DEPLOY / "make-certs.sh"
INGEST_PASSWORD = "ingest-password-1"
WATCH_INTERVAL_S = 1
# The watcher's round (interval + 1 s to let both files land) and a reload, with room to spare.
APPLIED_WITHIN_S = 8.0
SUCCESS = 0


def shell() -> list[str]:
    """busybox sh (ash, as in the Alpine image) when installed, else the system's sh."""
    busybox = shutil.which("busybox")
    return [busybox, "sh"] if busybox else ["sh"]


def until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.1)
    return True


def connect_rc(port: int, user: str, password: str, ca_file: Path | None = None, host: str = "127.0.0.1") -> int:
    """The CONNACK reason code (MQTT 5) a login gets; -1 if the TLS handshake or the connection failed."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"check-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)  # fmt: skip
    client.username_pw_set(user, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    answer: list[int] = []
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        answer.append(reason.value)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except (OSError, ssl.SSLError):
        return -1
    client.loop_start()
    try:
        done.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return answer[0] if answer else -1


def make_certs(out: Path, hostname: str = "mqtt.example.org", **env: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MQTT_TLS_HOSTNAME": hostname, **env}
    argv = [*shell(), str(MAKE_CERTS), str(out)]
    return subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=120, check=False)


@dataclass
class Broker:
    """The entry point's process (the broker after its exec), its folder, ports and the registry writing its files."""

    process: subprocess.Popen[bytes]
    folder: Path
    port: int
    tls_port: int
    service_port: int
    registry: Registry
    log: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "tls" / "broker" / "ca.crt"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def deployed_config(folder: Path, port: int, tls_port: int, service_port: int) -> str:
    """deploy/mosquitto/mosquitto.conf with only its paths and listeners moved to ``folder`` and loopback ports."""
    text = (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8")
    for deployed, local in ((1883, port), (8883, tls_port), (1884, service_port)):
        assert text.count(f"\nlistener {deployed}\n") == 1
        text = text.replace(f"\nlistener {deployed}\n", f"\nlistener {local} 127.0.0.1\n")
    text = text.replace("/mosquitto/config/", f"{folder}/config/").replace("/mosquitto/data/", f"{folder}/data/")
    assert "/mosquitto/" not in text
    return text


def give_to_broker_user(*paths: Path) -> None:
    """The broker started as root drops to the mosquitto user; let it write its data folder."""
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


@pytest.fixture
def broker(servers_root: Path) -> Iterator[Broker]:
    if not Path(MOSQUITTO_BIN).exists():
        pytest.skip(f"{MOSQUITTO_BIN} is not installed (Debian package mosquitto)")
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (Debian package mosquitto)")
    # Root's 0700 home: the folder goes to the temporary directory where the broker's user can enter it.
    folder = server_folder(servers_root, f"watcher-{uuid.uuid4().hex[:8]}", BROKER_USER)
    for sub in ("config", "data", "registry"):
        (folder / sub).mkdir(parents=True)
    done = make_certs(folder / "tls")
    assert done.returncode == 0, done.stderr
    port, tls_port, service_port = free_port(), free_port(), free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(deployed_config(folder, port, tls_port, service_port), encoding="utf-8")
    give_to_broker_user(folder, folder / "data")

    engine = make_engine(f"sqlite:///{folder / 'registry.db'}")
    migrate(engine)
    registry = Registry(session_factory(engine))
    # As the registry service: the four files into the shared folder, no pid file (another container's broker).
    registry.on_credentials_changed = BrokerSync(registry, folder / "registry")
    registry.create_clinic(SYSTEM, s.ClinicIn(code="watch-clinic", name="Watcher clinic", timezone="Europe/Berlin"))

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MQTT_INGEST_PASSWORD": INGEST_PASSWORD,
        "MOSQUITTO_CONFIG_DIR": str(folder / "config"),
        "MOSQUITTO_REGISTRY_DIR": str(folder / "registry"),
        "MOSQUITTO_CERTS_IN": str(folder / "tls" / "broker"),
        "MOSQUITTO_WATCH_INTERVAL_S": str(WATCH_INTERVAL_S),
    }
    log = folder / "entrypoint.out"
    with log.open("wb") as out:
        process = subprocess.Popen([*shell(), str(ENTRYPOINT), MOSQUITTO_BIN, "-c", str(conf)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    server = Broker(process, folder, port, tls_port, service_port, registry, log)
    try:
        assert until(lambda: process.poll() is not None or connect_rc(service_port, "svc.ingest", INGEST_PASSWORD) == 0,
                     15), server.output()  # fmt: skip
        assert process.poll() is None, server.output()
        yield server
    finally:
        # The broker is the entry point's own PID (exec); the watcher is in its process group.
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the watcher, if it has not noticed yet
        engine.dispose()
        remove_server_folder(folder)


def test_a_registered_device_gets_in_within_seconds_and_a_revoked_one_is_refused(broker: Broker) -> None:
    device = "sock-watch-01"
    # Before the registry knows it: refused (MQTT 5 reason 134 bad user name or password, or 135).
    assert connect_rc(broker.port, device, "not-yet") in (134, 135)

    creds = broker.registry.create_device(SYSTEM, s.DeviceIn(device_id=device, clinic="watch-clinic", kind="sock"))
    started = time.monotonic()
    assert until(lambda: connect_rc(broker.port, device, creds.password) == SUCCESS, APPLIED_WITHIN_S), broker.output()
    took = time.monotonic() - started
    assert took < APPLIED_WITHIN_S

    # The merged ACL applies: the ingester's static account (services' listener) reads what the new garment publishes.
    received: list[str] = []
    reader = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watch.reader", protocol=mqtt.MQTTv5)
    reader.username_pw_set("svc.ingest", INGEST_PASSWORD)
    subscribed = threading.Event()
    reader.on_message = lambda _c, _u, msg: received.append(msg.topic)
    reader.on_subscribe = lambda *_a: subscribed.set()
    reader.connect("127.0.0.1", broker.service_port)
    reader.loop_start()
    try:
        reader.subscribe("fleet/garments/v1/+/telemetry", qos=1)
        assert subscribed.wait(5)
        writer = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
        writer.username_pw_set(device, creds.password)
        writer.connect("127.0.0.1", broker.port)
        writer.loop_start()
        try:
            writer.publish(f"garments/v1/{device}/telemetry", b"{}", qos=1).wait_for_publish(5)
            writer.publish("garments/v1/sock-someone-else/telemetry", b"{}", qos=1).wait_for_publish(5)
            writer.publish(f"garments/v1/{device}/event", b"{}", qos=1).wait_for_publish(5)
        finally:
            writer.disconnect()
            writer.loop_stop()
        assert until(lambda: bool(received), 5)
        time.sleep(0.5)
        assert received == [f"fleet/garments/v1/{device}/telemetry"], "the garment wrote outside its own topics"
    finally:
        reader.disconnect()
        reader.loop_stop()

    broker.registry.revoke(SYSTEM, "device", device)
    assert until(lambda: connect_rc(broker.port, device, creds.password) in (134, 135), APPLIED_WITHIN_S), \
        broker.output()  # fmt: skip

    # Reloaded (SIGHUP), never restarted; the static accounts survived every merge, on the services' listener only.
    assert broker.process.poll() is None
    assert connect_rc(broker.service_port, "svc.ingest", INGEST_PASSWORD) == SUCCESS
    assert connect_rc(broker.port, "svc.ingest", INGEST_PASSWORD) in (134, 135)
    health = (broker.folder / "config" / "healthcheck-password").read_text().strip()
    assert connect_rc(broker.service_port, "svc.healthcheck", health) == SUCCESS
    output = broker.output()
    assert "sent SIGHUP to the broker" in output
    for name in ("devices.passwd", "devices.acl", "services.passwd", "services.acl"):
        mode = (broker.folder / "config" / name).stat().st_mode
        assert mode & 0o077 == 0, f"{name} is readable by others"


def test_the_registry_cannot_take_over_a_static_account(broker: Broker) -> None:
    # A service account of the same name in the registry (random password): the static one wins.
    taken = broker.registry.create_service_account(SYSTEM, "svc.ingest")
    device = broker.registry.create_device(SYSTEM, s.DeviceIn(device_id="sock-watch-02", clinic="watch-clinic",
                                                              kind="sock"))  # fmt: skip
    assert until(lambda: connect_rc(broker.port, "sock-watch-02", device.password) == SUCCESS, APPLIED_WITHIN_S)
    assert connect_rc(broker.service_port, "svc.ingest", taken.password) in (134, 135)
    assert connect_rc(broker.service_port, "svc.ingest", INGEST_PASSWORD) == SUCCESS
    passwd = (broker.folder / "config" / "services.passwd").read_text()
    assert len(re.findall(r"^svc\.ingest:", passwd, re.M)) == 1
    acl = (broker.folder / "config" / "services.acl").read_text()
    assert acl.count("user svc.ingest\n") == 1, acl
    # A registry account never reaches the other kind of listener's files.
    assert "svc.ingest" not in (broker.folder / "config" / "devices.passwd").read_text()
    assert "sock-watch-02" not in passwd


def test_the_tls_listener_serves_the_certificate_made_by_make_certs(broker: Broker) -> None:
    # The TLS listener is a device listener: a garment logs in there (the ingester's account does not).
    creds = broker.registry.create_device(SYSTEM, s.DeviceIn(device_id="sock-watch-03", clinic="watch-clinic",
                                                             kind="sock"))  # fmt: skip
    device, password = creds.username, creds.password
    # localhost and 127.0.0.1 are among the SANs; the client checks the name and the chain.
    assert until(lambda: connect_rc(broker.tls_port, device, password, broker.ca_file, host="localhost") == SUCCESS,
                 APPLIED_WITHIN_S), broker.output()  # fmt: skip
    assert "sent SIGHUP" in broker.output(), "the garment got in without a reload?"
    assert connect_rc(broker.tls_port, device, password, broker.ca_file) == SUCCESS
    assert connect_rc(broker.tls_port, device, "wrong", broker.ca_file) in (134, 135)
    assert connect_rc(broker.tls_port, "svc.ingest", INGEST_PASSWORD, broker.ca_file) in (134, 135)
    # Another CA's client refuses the server: the chain is really checked.
    other = broker.folder / "other-ca"
    assert make_certs(other, "elsewhere.example").returncode == 0
    assert connect_rc(broker.tls_port, device, password, other / "broker" / "ca.crt") == -1
    installed = broker.folder / "config" / "certs" / "server.key"
    assert installed.stat().st_mode & 0o077 == 0


def test_make_certs_is_idempotent_and_keeps_keys_private(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    first = make_certs(out, MQTT_TLS_EXTRA_SANS="DNS:mqtt.local,IP:192.168.1.20")
    assert first.returncode == 0, first.stderr
    files = ("ca/ca.key", "ca/ca.crt", "broker/ca.crt", "broker/server.crt", "broker/server.key")
    before = {name: (out / name).read_bytes() for name in files}
    for key in ("ca/ca.key", "broker/server.key"):
        assert (out / key).stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    assert (out / "ca").stat().st_mode & 0o077 == 0
    text = subprocess.run(["openssl", "x509", "-in", str(out / "broker/server.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    for san in ("DNS:mqtt.example.org", "DNS:mosquitto", "DNS:localhost", "IP Address:127.0.0.1",
                "DNS:mqtt.local", "IP Address:192.168.1.20"):  # fmt: skip
        assert san in text
    assert "TLS Web Server Authentication" in text and "CA:FALSE" in text
    verify = ["openssl", "verify", "-CAfile", str(out / "broker/ca.crt"), str(out / "broker/server.crt")]
    assert subprocess.run(verify, capture_output=True, check=False).returncode == 0

    again = make_certs(out, MQTT_TLS_EXTRA_SANS="DNS:mqtt.local,IP:192.168.1.20")
    assert again.returncode == 0, again.stderr
    assert {name: (out / name).read_bytes() for name in files} == before, "a rerun changed the certificates"

    # A new host name: a new server certificate from the same CA and key.
    moved = make_certs(out, "mqtt2.example.org")
    assert moved.returncode == 0, moved.stderr
    assert (out / "ca/ca.crt").read_bytes() == before["ca/ca.crt"]
    assert (out / "broker/server.key").read_bytes() == before["broker/server.key"]
    assert (out / "broker/server.crt").read_bytes() != before["broker/server.crt"]
    assert subprocess.run(verify, capture_output=True, check=False).returncode == 0

    refused = make_certs(tmp_path / "bad", "bad host/name")
    assert refused.returncode != 0 and "MQTT_TLS_HOSTNAME" in refused.stderr


def test_the_demo_profile_seed_lets_the_simulated_gateways_publish(broker: Broker) -> None:
    """registry-seed then simulator, as in the demo profile: the seeded gateways get in and every message is acked."""
    credentials = broker.folder / "demo" / "gateways.csv"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(broker.folder),
        "COMPRESSION_REGISTRY_DATABASE_URL": f"sqlite:///{broker.folder / 'seeded.db'}",
        "COMPRESSION_REGISTRY_BROKER_DIR": str(broker.folder / "registry"),
    }
    fleet = ["--seed", "7", "--days", "1", "--connections", "2"]
    seed = [sys.executable, str(ROOT / "deploy" / "demo" / "seed_registry.py"), "--credentials-out", str(credentials),
            *fleet, "--wait-broker", f"mqtt://127.0.0.1:{broker.port}"]  # fmt: skip
    done = subprocess.run(seed, env=env, cwd=broker.folder, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr + broker.output()
    assert "accepts gateway sim-gw-7-0" in done.stdout
    assert credentials.stat().st_mode & 0o077 == 0
    again = subprocess.run(seed, env=env, cwd=broker.folder, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr

    simulate = [str(Path(sys.executable).parent / "compression"), "simulate", "--every-scenario", *fleet,
                "--mqtt-url", f"mqtt://127.0.0.1:{broker.port}", "--credentials", str(credentials)]  # fmt: skip
    run = subprocess.run(simulate, env=env, cwd=broker.folder, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "broker acknowledged" in run.stdout
