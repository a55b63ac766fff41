"""Mosquitto's password file and ACL file, written from the registry and reloaded with SIGHUP.

The registry is the only source of MQTT accounts. Whenever they change
(:attr:`Registry.on_credentials_changed`), :class:`BrokerSync` renders both
files from :meth:`Registry.broker_accounts`, replaces them atomically and sends
the broker SIGHUP so that it re-reads them.

Why a password file and an ACL file, not Mosquitto's dynamic-security plugin:
2.0.11's plugin does not substitute ``%u`` in its ACL topics, so every garment
would need a role of its own, while one ``pattern`` line covers them all here.

The ACL, checked against Mosquitto 2.0.11 (``tests/integration/test_broker_acl.py``):

- ``pattern write garments/v1/%u/#``: every account may publish under its own
  name. That is a garment's own topics and a gateway's status topic. Mosquitto
  applies patterns to every user, readers included; each reader block therefore
  also says ``topic deny garments/v1/<reader>/#`` so that a reader publishes nowhere.
- ``user <gateway>`` / ``topic write garments/v1/<garment>/#`` for each garment
  registered to the gateway (and not revoked).
- ``user <reader>`` / ``topic read garments/v1/#``: the ingester's service
  accounts; Mosquitto checks a shared subscription
  (``$share/<group>/garments/v1/#``) against the topic after the share prefix.
- No topic lines before the first ``user`` line: nothing for anonymous clients,
  who are refused anyway (``allow_anonymous false``).

A revoked account is simply absent from both files. At the SIGHUP, Mosquitto
2.0.11 re-checks every connected client against the new password file: it
closes the connection of a revoked account (and of one whose password was
rotated) without a DISCONNECT packet, and refuses its next CONNECT (reason code
135); everyone else stays connected, with the new ACL applied at once.

The files are 0640, and ``root:mosquitto`` when written as root: Mosquitto
started as root re-reads them at a reload as the ``mosquitto`` user, and a
password file it cannot read at a reload makes it drop and refuse every client.
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
from pathlib import Path
from typing import Final

from devices.registry.errors import RegistryError
from devices.registry.service import BrokerAccounts, Registry

log = logging.getLogger(__name__)

TOPIC_ROOT: Final = "garments/v1"
BROKER_GROUP: Final = "mosquitto"
FILE_MODE: Final = 0o640
# Names that are safe as a password-file user (no ":"), on an ACL line (no
# whitespace) and inside a topic (no "/", "+", "#", "%"). Device and gateway ids
# are narrower (schemas.Identifier); service accounts may contain ".".
_SAFE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# mosquitto_passwd's formats: $6$salt$hash (SHA-512) and $7$iterations$salt$hash (PBKDF2-SHA512).
_SAFE_HASH: Final = re.compile(r"^\$(6|7\$[0-9]+)\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")


class BrokerSyncError(RegistryError):
    """The broker's files could not be written, or the broker could not be told to reload them."""

    # The change is saved; the broker is out of step until the next sync (retry: `compression devices broker-sync`).
    status = 503


# --- rendering ----------------------------------------------------------------------------------------------------


def safe_name(name: str) -> bool:
    """Whether ``name`` can go into the password file, an ACL ``user`` line and a topic unchanged."""
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


def render_password_file(accounts: BrokerAccounts) -> str:
    """Mosquitto's ``password_file``: one ``name:$7$...`` line per live device, gateway and reader."""
    _check(_all_names(accounts))
    rows = [*accounts.devices, *((n, h) for n, h, _ in accounts.gateways), *accounts.readers]
    for name, hashed in rows:
        if _SAFE_HASH.fullmatch(hashed) is None:
            raise BrokerSyncError(f"the password hash of {name!r} is not a mosquitto $6$/$7$ hash")
    return "".join(f"{name}:{hashed}\n" for name, hashed in sorted(rows))


def render_acl_file(accounts: BrokerAccounts) -> str:
    """Mosquitto's ``acl_file``: own topics by pattern, gateways' garments, readers' read access."""
    _check(_all_names(accounts))
    out = [
        "# Written by devices.registry.broker from the registry: edits here are overwritten.",
        "# Every account publishes under garments/v1/<its name>/ (a garment's topics, a gateway's status).",
        f"pattern write {TOPIC_ROOT}/%u/#",
    ]
    for name, _hash, relayed in sorted(accounts.gateways):
        out += ["", f"# gateway {name}: its own status (pattern) and the garments registered to it", f"user {name}"]
        out += [f"topic write {TOPIC_ROOT}/{garment}/#" for garment in sorted(relayed)]
    for name, _hash in sorted(accounts.readers):
        out += ["", f"# service account {name}: reads every garment, publishes nothing", f"user {name}",
                f"topic read {TOPIC_ROOT}/#", f"topic deny {TOPIC_ROOT}/{name}/#"]  # fmt: skip
    return "\n".join(out) + "\n"


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


def write_broker_files(accounts: BrokerAccounts, password_file: Path, acl_file: Path) -> None:
    """Render and atomically replace both files (password file first: a new account can log in before it acts)."""
    passwords, acl = render_password_file(accounts), render_acl_file(accounts)
    write_atomically(password_file, passwords)
    write_atomically(acl_file, acl)


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

    def __init__(self, registry: Registry, password_file: Path, acl_file: Path, pid_file: Path | None = None):
        self.registry = registry
        self.password_file = password_file
        self.acl_file = acl_file
        self.pid_file = pid_file
        self.syncs = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        """Write both files and reload the broker; raises :class:`BrokerSyncError` if either step fails."""
        with self._lock:
            accounts, skipped = usable_accounts(self.registry.broker_accounts())
            for name in skipped:
                log.warning("broker account %s skipped: its name or hash cannot go in mosquitto's files", name)
            try:
                write_broker_files(accounts, self.password_file, self.acl_file)
                pid = reload_broker(self.pid_file) if self.pid_file is not None else None
            except BrokerSyncError as exc:
                log.error("broker sync failed (%s): %s", self.password_file, exc)
                raise BrokerSyncError(f"the registry saved the change, but the broker did not get it: {exc}") from exc
            self.syncs += 1
            log.info("broker files written: %d devices, %d gateways, %d readers; reloaded pid %s; sync #%d",
                     len(accounts.devices), len(accounts.gateways), len(accounts.readers), pid, self.syncs)  # fmt: skip
