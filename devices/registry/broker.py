"""Mosquitto's accounts and ACLs, written from the registry and reloaded with SIGHUP.

The registry is the only source of MQTT accounts. Whenever they change
(:attr:`Registry.on_credentials_changed`), :class:`BrokerSync` renders four files
from :meth:`Registry.broker_accounts` into one folder, replaces them atomically and
sends the broker SIGHUP so that it re-reads them:

- ``devices.passwd`` / ``devices.acl``: garments and gateways, read by the device
  listeners (1883, 8883);
- ``services.passwd`` / ``services.acl``: the registry's service accounts (readers),
  read by the services' listener (1884), which device credentials cannot log in to.

:mod:`devices.registry.brokerconf` renders the ``mosquitto.conf`` that names them.

Threat: a garment or a gateway, with its own valid credentials, attacking others.
What Mosquitto 2.0.11 does and does not do, checked in its source and against the
broker (``tests/integration/test_broker_identity.py``):

- Client ids are global to the broker and a new connection with a client id in use
  takes the old one over (and a clean start wipes its session and queue). So the
  device listeners set ``use_username_as_clientid``: the broker replaces whatever
  client id a device sends with its user name (its device or gateway id). The
  services' client ids contain a ``.``, which no device id can (``^[A-Za-z0-9]
  [A-Za-z0-9_-]{2,63}$``), and the ingester refuses a client id that is a valid
  device id.
- ``acl_file`` never checks SUBSCRIBE (``security_default.c``: "FIXME - implement ACL
  subscription strings"); read access is checked only when a message is delivered, so
  a denied member of a shared subscription silently swallows its share. Therefore the
  device listeners have ``mount_point fleet/``: the broker prefixes every topic of those
  clients, subscriptions and wills included, *before* it parses ``$share/`` (the
  tokeniser looks for ``$share`` as the first level of the mounted string), so a
  device's ``$share/ingest/garments/v1/#`` becomes the plain filter
  ``fleet/$share/ingest/garments/v1/#``, its ``#`` is ``fleet/#`` and its ``$SYS/#`` is
  ``fleet/$SYS/#``. The SUBACK still grants them (the ACL cannot refuse), but they never
  join a share group and, with no read access in the ACL, deliver nothing. Devices keep
  publishing on ``garments/v1/{id}/...`` (the mount is invisible to them); the services
  read ``fleet/garments/v1/...`` on a listener without mount point, where ``$share``
  works.
- Retained messages cannot be limited by topic in 2.0.11 without a plugin (the retain
  flag reaches only auth plugins; ``retain_available`` is global and the protocol needs
  a retained status). The ACL therefore lists exact topics: a garment may write its
  ``telemetry``, ``event`` and ``status`` and nothing else; a gateway its own ``status``
  and the three topics of each garment registered to it (no telemetry or events under
  its own id). A retained message replaces the previous one of its topic, so the broker
  holds at most three retained messages per garment and one per gateway, each within
  ``max_packet_size``.

Why not the dynamic-security plugin: it can bind a client id per account and deny
SUBSCRIBE by default, but 2.0.11's plugin keeps its accounts in its own JSON file
that it does not re-read on SIGHUP; every account change would go over
``$CONTROL/dynamic-security/v1`` from an admin MQTT client in the registry's
container, the watcher and the file-based revocation would be replaced, and its ACLs
do not substitute ``%u``, so every garment needs a role of its own anyway. The mount
point and ``use_username_as_clientid`` keep the registry's files, the SIGHUP and the
watcher as they were.

The ACLs name exact topics per account (``user`` blocks, no ``pattern`` lines), so an
account without a block publishes nowhere. Lines before the first ``user`` line would
apply to anonymous clients, who are refused anyway (``allow_anonymous false``).

A revoked account is simply absent from the files. At the SIGHUP, Mosquitto 2.0.11
re-checks every connected client against its listener's new password file: it closes
the connection of a revoked account (and of one whose password was rotated) without a
DISCONNECT packet, and refuses its next CONNECT (reason code 135); everyone else stays
connected, with the new ACL applied at once.

The files are 0640, and ``root:mosquitto`` when written as root: Mosquitto started as
root re-reads them at a reload as the ``mosquitto`` user, and a password file it cannot
read at a reload makes it drop and refuse every client.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from devices.protocol import CHANNELS, TOPIC_ROOT
from devices.registry.errors import RegistryError
from devices.registry.service import BrokerAccounts, Registry, may_publish

log = logging.getLogger(__name__)

# The device listeners' mount point: device topics garments/v1/... are fleet/garments/v1/... for the services.
MOUNT_POINT: Final = "fleet/"
SERVICE_TOPIC_ROOT: Final = f"{MOUNT_POINT}{TOPIC_ROOT}"
DEVICE_PASSWD: Final = "devices.passwd"
DEVICE_ACL: Final = "devices.acl"
SERVICE_PASSWD: Final = "services.passwd"
SERVICE_ACL: Final = "services.acl"
BROKER_GROUP: Final = "mosquitto"
FILE_MODE: Final = 0o640
# What the broker's health check reads: the broker's own retained version message.
HEALTH_TOPIC: Final = "$SYS/broker/version"
# Names that are safe as a password-file user (no ":"), on an ACL line (no
# whitespace) and inside a topic (no "/", "+", "#", "%"). Device and gateway ids
# are narrower (schemas.Identifier); service accounts may contain ".".
_SAFE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# mosquitto_passwd's formats: $6$salt$hash (SHA-512) and $7$iterations$salt$hash (PBKDF2-SHA512).
_SAFE_HASH: Final = re.compile(r"^\$(6|7\$[0-9]+)\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")
_HEADER: Final = "# Written by devices.registry.broker from the registry: edits here are overwritten."


class BrokerSyncError(RegistryError):
    """The broker's files could not be written, or the broker could not be told to reload them."""

    # The change is saved; the broker is out of step until the next sync (retry: `compression devices broker-sync`).
    status = 503


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """The four account files in one folder (the registry's output, or the broker's merged copies)."""

    folder: Path

    @property
    def devices_passwd(self) -> Path:
        return self.folder / DEVICE_PASSWD

    @property
    def devices_acl(self) -> Path:
        return self.folder / DEVICE_ACL

    @property
    def services_passwd(self) -> Path:
        return self.folder / SERVICE_PASSWD

    @property
    def services_acl(self) -> Path:
        return self.folder / SERVICE_ACL


# --- topics ---------------------------------------------------------------------------------------------------------


def broker_topic(device_view: str) -> str:
    """A topic as the broker and the services see it: under the device listeners' mount point."""
    return f"{MOUNT_POINT}{device_view}"


def garment_topics(device_id: str) -> list[str]:
    """What a garment may publish (as it publishes it): its telemetry, events and status, nothing else."""
    return may_publish("device", device_id)


def gateway_topics(gateway_id: str, relayed: Iterable[str]) -> list[str]:
    """What a gateway may publish: its own status, and the three topics of each garment registered to it."""
    return [*may_publish("gateway", gateway_id), *(t for garment in sorted(relayed) for t in garment_topics(garment))]


# --- rendering ----------------------------------------------------------------------------------------------------


def safe_name(name: str) -> bool:
    """Whether ``name`` can go into a password file, an ACL ``user`` line and a topic unchanged."""
    return _SAFE_NAME.fullmatch(name) is not None


def usable_accounts(accounts: BrokerAccounts) -> tuple[BrokerAccounts, list[str]]:
    """The accounts whose names and hashes can be written safely, and the names left out.

    A garment relayed by a gateway is left out of that gateway's grant if its id is unsafe.
    """
    skipped: list[str] = []

    def keep(name: str, hashed: str) -> bool:
        ok = safe_name(name) and _SAFE_HASH.fullmatch(hashed) is not None
        if not ok:
            skipped.append(name)
        return ok

    devices = tuple((n, h) for n, h in accounts.devices if keep(n, h))
    gateways = tuple((n, h, tuple(d for d in relayed if safe_name(d))) for n, h, relayed in accounts.gateways
                     if keep(n, h))  # fmt: skip
    readers = tuple((n, h) for n, h in accounts.readers if keep(n, h))
    return BrokerAccounts(devices, gateways, readers), skipped


def _check(names: Iterable[str]) -> None:
    for name in names:
        if not safe_name(name):
            raise BrokerSyncError(f"{name!r} cannot be written to the broker's files (use usable_accounts first)")


def _all_names(accounts: BrokerAccounts) -> list[str]:
    names = [n for n, _ in accounts.devices] + [n for n, _ in accounts.readers]
    for name, _hash, relayed in accounts.gateways:
        names += [name, *relayed]
    return names


def _password_lines(rows: Iterable[tuple[str, str]]) -> str:
    rows = sorted(rows)
    _check(name for name, _ in rows)
    for name, hashed in rows:
        if _SAFE_HASH.fullmatch(hashed) is None:
            raise BrokerSyncError(f"the password hash of {name!r} is not a mosquitto $6$/$7$ hash")
    return "".join(f"{name}:{hashed}\n" for name, hashed in rows)


def render_devices_passwd(accounts: BrokerAccounts) -> str:
    """The device listeners' ``password_file``: one ``name:$7$...`` line per live garment and gateway."""
    _check(_all_names(accounts))
    return _password_lines([*accounts.devices, *((n, h) for n, h, _ in accounts.gateways)])


def render_services_passwd(accounts: BrokerAccounts) -> str:
    """The services' listener's ``password_file``: the registry's service accounts only."""
    _check(_all_names(accounts))
    return _password_lines(accounts.readers)


def _block(user: str, why: str, rules: Iterable[str]) -> list[str]:
    return ["", f"# {why}", f"user {user}", *rules]


def device_block(device_id: str) -> list[str]:
    """A garment's ACL block: write its three topics (under the mount point), read nothing."""
    return _block(device_id, f"garment {device_id}: its telemetry, events and status",
                  (f"topic write {broker_topic(t)}" for t in garment_topics(device_id)))  # fmt: skip


def render_devices_acl(accounts: BrokerAccounts) -> str:
    """The device listeners' ``acl_file``: for each garment and gateway exactly the topics it may publish."""
    _check(_all_names(accounts))
    out = [_HEADER, "# Device listeners (mount point fleet/): exact topics per account, no patterns, no reading."]
    for name, _hash in sorted(accounts.devices):
        out += device_block(name)
    for name, _hash, relayed in sorted(accounts.gateways):
        out += _block(name, f"gateway {name}: its own status and the garments registered to it",
                      (f"topic write {broker_topic(t)}" for t in gateway_topics(name, relayed)))  # fmt: skip
    return "\n".join(out) + "\n"


def reader_block(name: str) -> list[str]:
    """A service account that reads every garment's three topics and publishes nothing."""
    return _block(name, f"service account {name}: reads every garment, publishes nothing",
                  (f"topic read {SERVICE_TOPIC_ROOT}/+/{channel}" for channel in CHANNELS))  # fmt: skip


def health_block(name: str) -> list[str]:
    """The broker's health check: reads the broker's retained version message and nothing else."""
    return _block(name, f"health check {name}: the broker's version message only", [f"topic read {HEALTH_TOPIC}"])


def render_services_acl(readers: Iterable[str], health: Iterable[str] = (), header: str = _HEADER) -> str:
    """The services' listener's ``acl_file``: readers (``$share/<group>/...`` is checked at delivery, against the
    message's topic) and health checks."""
    readers, health = sorted(readers), sorted(health)
    _check([*readers, *health])
    out = [header, "# The services' listener (no mount point): device topics are under fleet/garments/v1/."]
    for name in readers:
        out += reader_block(name)
    for name in health:
        out += health_block(name)
    return "\n".join(out) + "\n"


def render_files(accounts: BrokerAccounts) -> dict[str, str]:
    """File name -> contents of the four files."""
    return {DEVICE_PASSWD: render_devices_passwd(accounts), DEVICE_ACL: render_devices_acl(accounts),
            SERVICE_PASSWD: render_services_passwd(accounts),
            SERVICE_ACL: render_services_acl(n for n, _ in accounts.readers)}  # fmt: skip


# --- writing and reloading ----------------------------------------------------------------------------------------


def _broker_gid() -> int | None:
    """The ``mosquitto`` group when running as root (the broker drops to that user), else ``None``."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(BROKER_GROUP).gr_gid
    except KeyError:
        return None


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file in the same folder, fsync, rename, fsync the folder.

    The file gets mode 0640; as root it is chowned to ``root:mosquitto`` so the
    broker (which drops to the ``mosquitto`` user) can read it and nobody else can.
    """
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BrokerSyncError(f"cannot write in {folder}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            gid = _broker_gid()
            if gid is not None:
                os.fchown(handle.fileno(), 0, gid)
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BrokerSyncError(f"cannot write {path}: {exc.strerror or exc}") from exc
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_broker_files(accounts: BrokerAccounts, folder: Path) -> BrokerFiles:
    """Render and atomically replace the four files in ``folder`` (password files first: a new account can log in
    before the ACL lets it act, never the other way round)."""
    files = render_files(accounts)
    for name in (DEVICE_PASSWD, SERVICE_PASSWD, DEVICE_ACL, SERVICE_ACL):
        write_atomically(folder / name, files[name])
    return BrokerFiles(folder)


def read_pid(pid_file: Path) -> int:
    """The PID in Mosquitto's ``pid_file``."""
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise BrokerSyncError(f"cannot read the broker's pid file {pid_file}: {exc.strerror}") from exc
    try:
        pid = int(text)
    except ValueError as exc:
        raise BrokerSyncError(f"the broker's pid file {pid_file} holds {text!r}, not a process id") from exc
    if pid <= 1:
        raise BrokerSyncError(f"the broker's pid file {pid_file} holds {pid}, not a broker process id")
    return pid


def _check_is_mosquitto(pid: int, pid_file: Path) -> None:
    # A pid file left behind by a killed broker may name an unrelated process by now.
    comm = Path(f"/proc/{pid}/comm")
    try:
        name = comm.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        if Path("/proc/self/comm").exists():
            raise BrokerSyncError(f"no process {pid} (stale pid file {pid_file}?): is the broker running?") from None
        return  # no procfs: nothing to check against
    except OSError:
        return
    if not name.startswith("mosquitto"):
        raise BrokerSyncError(f"process {pid} of {pid_file} is {name!r}, not mosquitto (stale pid file?)")


def reload_broker(pid_file: Path) -> int:
    """Send SIGHUP to the broker named by ``pid_file`` so that it re-reads its files; return its PID."""
    pid = read_pid(pid_file)
    _check_is_mosquitto(pid, pid_file)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise BrokerSyncError(f"no process {pid} (stale pid file {pid_file}?): is the broker running?") from exc
    except PermissionError as exc:
        raise BrokerSyncError(f"not allowed to signal the broker (pid {pid}): run as its user or root") from exc
    return pid


class BrokerSync:
    """``Registry.on_credentials_changed``: rewrite the broker's files from the registry, then SIGHUP the broker.

    Calls are serialised (a lock), so two commits never interleave their writes;
    each call renders what is committed by then, so the last one wins with the
    latest state. ``pid_file=None`` writes the files without a reload.
    """

    def __init__(self, registry: Registry, folder: Path, pid_file: Path | None = None):
        self.registry = registry
        self.files = BrokerFiles(folder)
        self.pid_file = pid_file
        self.syncs = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        """Write the four files and reload the broker; raises :class:`BrokerSyncError` if either step fails."""
        with self._lock:
            accounts, skipped = usable_accounts(self.registry.broker_accounts())
            for name in skipped:
                log.warning("broker account %s skipped: its name or hash cannot go in mosquitto's files", name)
            try:
                write_broker_files(accounts, self.files.folder)
                pid = reload_broker(self.pid_file) if self.pid_file is not None else None
            except BrokerSyncError as exc:
                log.error("broker sync failed (%s): %s", self.files.folder, exc)
                raise BrokerSyncError(f"the registry saved the change, but the broker did not get it: {exc}") from exc
            self.syncs += 1
            log.info("broker files written: %d devices, %d gateways, %d readers; reloaded pid %s; sync #%d",
                     len(accounts.devices), len(accounts.gateways), len(accounts.readers), pid, self.syncs)  # fmt: skip
