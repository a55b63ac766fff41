"""Mosquitto's configuration (``mosquitto.conf``): one renderer for the deployment, the demo and the tests.

``deploy/mosquitto/mosquitto.conf`` is :func:`render` of :func:`deployed` (committed;
``compression devices broker-config --check`` and ``tests/unit/test_deploy_files.py``
keep it in step), and :mod:`compression.localservers` renders :func:`local_platform`
(the same listeners on free loopback ports, in the server's own folder) for
``compression demo`` and the broker tests, and :func:`local_open` (one anonymous or
password-only listener with the same global settings) for the ingester's tests.

The platform's broker has two kinds of listener (``per_listener_settings true``), see
:mod:`devices.registry.broker` for the why:

- **devices** (1883 plain, 8883 TLS in the deployment): garments and gateways. Its own
  password file and ACL (``devices.passwd``, ``devices.acl``), ``use_username_as_clientid``
  (the broker replaces whatever client id a device sends with its user name, so no
  account can take over another one's session) and ``mount_point fleet/`` (every topic
  of these clients, subscriptions and wills included, is prefixed, so they cannot reach
  a shared subscription, ``$SYS`` or anything outside ``fleet/``);
- **services** (1884 in the deployment, never published outside the compose network):
  the ingester and the health check, with their own password file and ACL
  (``services.passwd``, ``services.acl``); no mount point, so they read
  ``fleet/garments/v1/...`` and may use ``$share/<group>/...``.

Every directive is written with the comment that says why it is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from devices.registry.broker import (
    DEVICE_ACL,
    DEVICE_PASSWD,
    MOUNT_POINT,
    SERVICE_ACL,
    SERVICE_PASSWD,
    render_services_acl,
)

Role = Literal["devices", "services", "open"]

# The deployment (docker-compose.yml): ports inside the container and the image's folders.
DEVICE_PORT: Final = 1883
DEVICE_TLS_PORT: Final = 8883
SERVICE_PORT: Final = 1884
CONTAINER_CONFIG_DIR: Final = "/mosquitto/config"
CONTAINER_DATA_DIR: Final = "/mosquitto/data/"
CONTAINER_CERTS_DIR: Final = "/mosquitto/config/certs"

# Limits (reasons in _GLOBAL's comments). Deployed and local brokers share them, except
# the autosave interval and the queue's byte cap, which are arguments.
MAX_QUEUED_MESSAGES: Final = 1_000_000
DEPLOYED_MAX_QUEUED_BYTES: Final = 1024**3
MAX_INFLIGHT_MESSAGES: Final = 1000
# Protocol v1's 64 KiB payload, twice, for the topic and headers.
MAX_PACKET_SIZE: Final = 131_072
PERSISTENT_CLIENT_EXPIRATION: Final = "14d"
DEPLOYED_AUTOSAVE_S: Final = 10
LOCAL_AUTOSAVE_S: Final = 1


@dataclass(frozen=True, slots=True)
class Tls:
    """A listener's server certificate and key, and the CA clients verify it with."""

    certfile: str
    keyfile: str
    cafile: str | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    """One listener: its role decides its security settings (``open`` takes its files from here)."""

    role: Role
    port: int
    bind: str | None = None
    tls: Tls | None = None
    password_file: str | None = None
    acl_file: str | None = None


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything :func:`render` needs: the listeners, where the account files and the data live, and logging."""

    listeners: tuple[Listener, ...]
    accounts_dir: str
    data_dir: str
    autosave_s: int
    max_queued_bytes: int
    pid_file: str | None = None
    log_file: str | None = None  # None: stdout, with connections and ISO timestamps (the container's log)


def deployed() -> BrokerConfig:
    """The container's configuration (docker-compose.yml mounts it as /deploy/mosquitto.conf)."""
    certs = Tls(f"{CONTAINER_CERTS_DIR}/server.crt", f"{CONTAINER_CERTS_DIR}/server.key",
                f"{CONTAINER_CERTS_DIR}/ca.crt")  # fmt: skip
    listeners = (Listener("devices", DEVICE_PORT), Listener("devices", DEVICE_TLS_PORT, tls=certs),
                 Listener("services", SERVICE_PORT))  # fmt: skip
    return BrokerConfig(listeners, CONTAINER_CONFIG_DIR, CONTAINER_DATA_DIR, DEPLOYED_AUTOSAVE_S,
                        DEPLOYED_MAX_QUEUED_BYTES)  # fmt: skip


def local_platform(folder: Path, device_port: int, service_port: int) -> BrokerConfig:
    """The deployed listeners on loopback (one plain device listener, the services' listener), files in ``folder``."""
    devices = Listener("devices", device_port, "127.0.0.1")
    return BrokerConfig((devices, Listener("services", service_port, "127.0.0.1")), str(folder), f"{folder}/",
                        LOCAL_AUTOSAVE_S, 0, f"{folder}/mosquitto.pid", f"{folder}/mosquitto.log")  # fmt: skip


def local_open(folder: Path, listener: Listener) -> BrokerConfig:
    """One ``open`` listener (anonymous unless it names a password file) for the ingester's tests and the bench."""
    return BrokerConfig((listener,), str(folder), f"{folder}/", LOCAL_AUTOSAVE_S, 0, f"{folder}/mosquitto.pid",
                        f"{folder}/mosquitto.log")  # fmt: skip


# --- rendering ------------------------------------------------------------------------------------------------------

Line = tuple[str, str]  # (comment, directive)

_HEADER: Final = """\
# Mosquitto 2.0 configuration of the compression-telemetry broker.
#
# Written by devices/registry/brokerconf.py (compression devices broker-config);
# edits here are overwritten. compression/localservers.py renders the same
# layout on free loopback ports for `make demo` and the tests.
#
# Garments publish QoS 1 telemetry; the ingester (`compression ingest`) holds a
# persistent session and acknowledges each message only after its samples are
# stored in InfluxDB, so a PUBACK to a garment must mean "the platform will not
# lose this". Garments and gateways reach only the device listeners; the
# services (ingester, health check) use a listener of their own that device
# credentials cannot reach. Checked with Debian's mosquitto 2.0.11.
"""


def _listener_lines(listener: Listener, accounts_dir: str) -> list[Line]:
    where = f"{listener.port} {listener.bind}" if listener.bind else str(listener.port)
    out: list[Line] = [(_LISTENER_COMMENT[listener.role], f"listener {where}"),
                       ("Plain MQTT (not websockets), explicit so that a future default cannot change it.",
                        "protocol mqtt")]  # fmt: skip
    if listener.role == "devices":
        out += [
            ("Every topic of these clients (publishes, subscriptions, wills) is prefixed with this, and the "
             "prefix is removed from what they receive: a device's garments/v1/... is fleet/garments/v1/... "
             "for the services, and a device's $share/..., # or $SYS/# becomes fleet/$share/..., fleet/# or "
             "fleet/$SYS/#, never a shared subscription and never the broker's $SYS.", f"mount_point {MOUNT_POINT}"),
            ("The client id is the user name, whatever the client sends: no garment or gateway can connect as "
             "another one (or as a service) and take over or wipe its session.", "use_username_as_clientid true"),
        ]  # fmt: skip
    out += _security_lines(listener, accounts_dir)
    if listener.tls is not None:
        out += _tls_lines(listener.tls)
    return out


_LISTENER_COMMENT: Final[dict[Role, str]] = {
    "devices": "Garments and gateways (device credentials): client id = user name, topics under the mount point.",
    "services": "The platform's services (ingester, health check): not published outside the compose network.",
    "open": "The only listener (a local test broker).",
}


def _security_lines(listener: Listener, accounts_dir: str) -> list[Line]:
    if listener.role == "open":
        out: list[Line] = [("Anonymous clients only when no password file is given.",
                            f"allow_anonymous {'false' if listener.password_file else 'true'}")]  # fmt: skip
        if listener.password_file:
            out.append(("Accounts (salted hashes).", f"password_file {listener.password_file}"))
        if listener.acl_file:
            out.append(("Who may read and write which topics.", f"acl_file {listener.acl_file}"))
        return out
    passwd, acl = (DEVICE_PASSWD, DEVICE_ACL) if listener.role == "devices" else (SERVICE_PASSWD, SERVICE_ACL)
    who = "garments and gateways" if listener.role == "devices" else "service accounts"
    return [
        ("Every client must log in.", "allow_anonymous false"),
        (f"Only {who}, written by the registry (and, in the container, merged with the static accounts by "
         "entrypoint.sh); re-read on SIGHUP, which also drops clients whose password no longer matches.",
         f"password_file {accounts_dir}/{passwd}"),
        (f"What {who} may publish and read: exact topics per account, nothing for an account without a "
         "block; re-read on SIGHUP.",
         f"acl_file {accounts_dir}/{acl}"),
    ]  # fmt: skip


def _tls_lines(tls: Tls) -> list[Line]:
    out: list[Line] = []
    if tls.cafile:
        out.append(("The CA that signed the server certificate (clients verify the server against it).",
                    f"cafile {tls.cafile}"))  # fmt: skip
    out += [("The server certificate.", f"certfile {tls.certfile}"),
            ("Its private key (0600, owned by the mosquitto user: it is loaded after dropping root).",
             f"keyfile {tls.keyfile}"),
            ("Refuse TLS 1.0 and 1.1, which current garment stacks do not need.", "tls_version tlsv1.2"),
            ("Clients log in with user name and password, not with client certificates.",
             "require_certificate false")]  # fmt: skip
    return out


def _global_lines(config: BrokerConfig) -> list[Line]:
    out: list[Line] = [
        ("Each listener has its own password file and ACL: device credentials are unknown to the services' "
         "listener and service credentials to the device listeners.", "per_listener_settings true"),
        ("Keep retained messages, subscriptions and the queued messages of persistent sessions (the "
         "ingester's backlog) across restarts.", "persistence true"),
        ("Where (the trailing slash matters).", f"persistence_location {config.data_dir}"),
        ("Save every this many seconds: a killed broker loses what arrived since the last save although "
         "it was PUBACKed (stock: 1800 s).", f"autosave_interval {config.autosave_s}"),
        ("Count the interval in seconds, not in changes.", "autosave_on_changes false"),
        ("Messages held per client beyond those in flight; the stock 1000 drops a slow or absent "
         "ingester's messages silently after their PUBACK.", f"max_queued_messages {MAX_QUEUED_MESSAGES}"),
        ("...or at most this many bytes per client (0: no cap); the queue lives in the broker's memory.",
         f"max_queued_bytes {config.max_queued_bytes}"),
        ("Unacknowledged messages in flight to one subscriber (stock 20): the ingester acknowledges after "
         "a batch is written, so this is its window with MQTT 3.1.1.",
         f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}"),
        ("Send small packets (PUBACKs) at once.", "set_tcp_nodelay true"),
        ("A garment message is at most 64 KiB (protocol v1); twice that for the topic and headers.",
         f"max_packet_size {MAX_PACKET_SIZE}"),
        ("Forget persistent sessions that have not reconnected for this long (MQTT 5 clients ask for "
         "less: the ingester 7 days).", f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}"),
    ]  # fmt: skip
    if config.pid_file:
        out.append(("The PID the registry sends SIGHUP to after rewriting the account files.",
                    f"pid_file {config.pid_file}"))  # fmt: skip
    return out + _log_lines(config)


def _log_lines(config: BrokerConfig) -> list[Line]:
    if config.log_file:
        return [("The server's folder.", f"log_dest file {config.log_file}"),
                ("Errors: a broker that cannot save or bind.", "log_type error"),
                ("Warnings: refused files, dropped messages.", "log_type warning"),
                ("Notices: start, stop, reloads.", "log_type notice")]  # fmt: skip
    return [
        ("To stdout, where `docker compose logs mosquitto` shows it.", "log_dest stdout"),
        ("Errors: a broker that cannot save or bind.", "log_type error"),
        ("Warnings: refused files, dropped messages, oversize packets.", "log_type warning"),
        ("Notices: start, stop, reloads, persistence saves.", "log_type notice"),
        ("Information: client connections and disconnections (with their reason).", "log_type information"),
        ("Log each connect and disconnect with client id and user name: who was online.",
         "connection_messages true"),
        ("Timestamps in the log lines...", "log_timestamp true"),
        ("...in ISO 8601, to line them up with the ingester's logs.", "log_timestamp_format %Y-%m-%dT%H:%M:%S"),
    ]  # fmt: skip


def _wrap(comment: str, width: int = 78) -> list[str]:
    lines: list[str] = []
    current = "#"
    for word in comment.split():
        if len(current) + 1 + len(word) > width and current != "#":
            lines.append(current)
            current = "#"
        current += " " + word
    return [*lines, current]


def render(config: BrokerConfig) -> str:
    """``mosquitto.conf``: global settings, then each listener with its security settings, each line explained."""
    sections = [("Global settings", _global_lines(config))]
    for listener in config.listeners:
        sections.append((f"Listener {listener.port} ({listener.role})", _listener_lines(listener, config.accounts_dir)))
    out = [_HEADER]
    for title, lines in sections:
        out.append(f"# --- {title} " + "-" * max(3, 72 - len(title)) + "\n")
        for comment, directive in lines:
            out.append("\n".join(_wrap(comment)) + "\n" + directive + "\n")
        out.append("")
    return "\n".join(out)


# --- the committed deployment files ---------------------------------------------------------------------------------

DEPLOY_DIR: Final = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
# The static service accounts of the container (deploy/mosquitto/make-passwd.sh gives them their passwords).
STATIC_INGEST: Final = "svc.ingest"
STATIC_HEALTH: Final = "svc.healthcheck"


def deployed_files() -> dict[str, str]:
    """File name -> contents of the generated files in deploy/mosquitto: the configuration and the static ACL of
    the services' listener (entrypoint.sh appends it to the registry's)."""
    header = (
        "# Generated by `compression devices broker-config` (devices/registry/brokerconf.py): the static\n"
        "# service accounts (make-passwd.sh). entrypoint.sh appends this to the registry's services.acl."
    )
    return {"mosquitto.conf": render(deployed()),
            "services.acl": render_services_acl([STATIC_INGEST], [STATIC_HEALTH], header)}  # fmt: skip


def stale(folder: Path = DEPLOY_DIR) -> list[str]:
    """The generated files in ``folder`` that differ from (or are missing next to) the renderer's output."""
    out = []
    for name, text in deployed_files().items():
        path = folder / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(name)
    return out


def write(folder: Path = DEPLOY_DIR) -> list[Path]:
    """Write the generated files into ``folder``; their paths."""
    written = []
    for name, text in deployed_files().items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
