"""Real Mosquitto, InfluxDB and PostgreSQL as plain processes on loopback, for the demo, tests and bench.

Never system services and never on their default ports: each server gets free
ports and a folder of its own under the project's data folder (``var/``).
The binaries come from Debian's ``mosquitto``, ``influxdb`` and ``postgresql``
packages (``scripts/bootstrap`` installs them).

Two kinds of broker: :func:`start_platform_broker` runs the platform's
layout (``devices.registry.brokerconf``, as in ``deploy/mosquitto/mosquitto.conf``:
a device listener and a services listener, the registry's account files) for
``compression demo`` and the broker tests; :func:`start_mosquitto` runs one
open listener with the same global settings for the ingester's tests and the
bench.

Started as root, Mosquitto drops to the ``mosquitto`` user and PostgreSQL is run
as ``postgres``; when that user cannot enter the checkout (root's home is 0700),
the server's folder is made in the system's temporary directory instead, owned
by that user, and ``var/.../<server>-<port>`` is a link to it
(:func:`server_folder`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devices.registry.broker import write_broker_files
from devices.registry.brokerconf import Listener, Tls, local_open, local_platform, render
from devices.registry.service import BrokerAccounts

MOSQUITTO_BIN = os.environ.get("COMPRESSION_MOSQUITTO_BIN", "/usr/sbin/mosquitto")
INFLUXD_BIN = os.environ.get("COMPRESSION_INFLUXD_BIN", "/usr/bin/influxd")


class ServerError(RuntimeError):
    """A local server would not start or stop."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalServer:
    """A server process with a fixed port and data folder, restartable in place."""

    name: str
    folder: Path
    port: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until it serves."""
        if shutil.which(self.argv[0]) is None:
            raise ServerError(f"{self.argv[0]} not found: run scripts/bootstrap (installs {self.name})")
        with (self.folder / f"{self.name}.out").open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=self.folder)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.process.returncode} in {self.folder}: "
                                  f"{self.last_complaint()}")  # fmt: skip
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"{self.name} did not serve on port {self.port} within {timeout:.0f} s "
                          f"(folder {self.folder}): {self.last_complaint()}")  # fmt: skip

    def last_complaint(self) -> str:
        """The server's last error line from its output or log (the folder may be gone when someone reads it)."""
        lines: list[str] = []
        for log in sorted(self.folder.glob("*.out")) + sorted(self.folder.glob("*.log")):
            with contextlib.suppress(OSError):
                lines += [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        flagged = [line for line in lines if any(w in line.lower() for w in ("error", "fatal", "denied", "unable"))]
        return (flagged or lines or ["no output"])[-1][:300]

    def close(self) -> None:
        """Stop for good and remove the folder if it lives outside the project (see :func:`server_folder`)."""
        self.stop()
        remove_server_folder(self.folder)

    def ready(self) -> bool:
        """True once the server accepts connections."""
        return _port_open(self.port)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a clean shutdown, persistence saved), then SIGKILL if it hangs."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._wait_port_free()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._wait_port_free()

    def _wait_port_free(self) -> None:
        deadline = time.monotonic() + 10
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class Mosquitto(LocalServer):
    """Mosquitto with persistence and limits fit for an ack-after-write consumer.

    A platform broker (:func:`start_platform_broker`) has the deployed listeners:
    ``port`` for garments and gateways, ``service_port`` for the services, and the
    registry's four account files in its folder (:attr:`accounts_dir`). An open
    broker (:func:`start_mosquitto`) has one listener, ``port``, for everyone.
    """

    access: BrokerAccess | None = None
    service_port: int | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``: the device listener (or the only one)."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def service_url(self) -> str:
        """The services' listener (the only listener of an open broker)."""
        return f"mqtt://127.0.0.1:{self.service_port or self.port}"

    @property
    def accounts_dir(self) -> Path:
        """Where the registry writes the account files the broker reads (``BrokerSync``'s folder)."""
        return self.folder

    @property
    def pid_file(self) -> Path:
        """Where the broker writes its PID (``pid_file``; mosquitto 2.0.11 writes it in the foreground too).

        SIGHUP to that PID makes it re-read its password and ACL files; a clean
        stop removes the file, a kill leaves it behind.
        """
        return self.folder / "mosquitto.pid"

    def ready(self) -> bool:
        """True once every listener accepts connections."""
        return _port_open(self.port) and (self.service_port is None or _port_open(self.service_port))


@dataclass
class InfluxDB(LocalServer):
    """InfluxDB 1.x (Debian's 1.6.7) with its HTTP API on a free port."""

    def ready(self) -> bool:
        """True once ``/ping`` answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=0.5) as resp:
                return bool(resp.status < 300)
        except (urllib.error.URLError, OSError):
            return False

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class BrokerAccess:
    """Who may connect: anonymous, or the users of a password file; optionally an ACL file, TLS only.

    The broker uses copies in its own folder (:meth:`copied_into`); whoever
    maintains the accounts (the device registry) rewrites those copies in place
    (``Mosquitto.access``) and sends SIGHUP to ``Mosquitto.pid_file``.
    """

    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    acl_file: Path | None = None

    def copied_into(self, folder: Path) -> BrokerAccess:
        """The same access with its files copied into the broker's own folder (readable by the broker)."""

        def copy(path: Path | None) -> Path | None:
            if path is None:
                return None
            target = folder / path.name
            shutil.copyfile(path, target)
            return target

        return BrokerAccess(copy(self.password_file), copy(self.tls_ca), copy(self.tls_cert), copy(self.tls_key),
                            copy(self.acl_file))  # fmt: skip

    def listener(self, port: int) -> Listener:
        """The open broker's only listener with these files (anonymous without a password file)."""
        tls = Tls(str(self.tls_cert), str(self.tls_key), str(self.tls_ca) if self.tls_ca else None) \
            if self.tls_cert and self.tls_key else None  # fmt: skip
        return Listener("open", port, "127.0.0.1", tls, str(self.password_file) if self.password_file else None,
                        str(self.acl_file) if self.acl_file else None)  # fmt: skip


def mosquitto_config(folder: Path, port: int, extra: str = "", access: BrokerAccess | None = None) -> str:
    """An open broker's configuration: devices.registry.brokerconf's global settings, one loopback listener."""
    return render(local_open(folder, (access or BrokerAccess()).listener(port))) + extra


def start_mosquitto(
    root: Path, port: int | None = None, extra: str = "", access: BrokerAccess | None = None
) -> Mosquitto:
    """Start an open broker (one listener: anonymous, or ``access``'s files) with its own folder under ``root``."""
    port = port or free_port()
    folder = server_folder(root, f"mosquitto-{port}", BROKER_USER)
    conf = folder / "mosquitto.conf"
    access = access.copied_into(folder) if access else None
    conf.write_text(mosquitto_config(folder, port, extra=extra, access=access))
    hand_to(BROKER_USER, folder)
    server = Mosquitto("mosquitto", folder, port, [MOSQUITTO_BIN, "-c", str(conf)], access=access)
    server.start()
    return server


def start_platform_broker(root: Path, accounts: BrokerAccounts | None = None) -> Mosquitto:
    """Start the platform's broker as deployed (deploy/mosquitto/mosquitto.conf's listeners on free loopback ports).

    The device listener is ``port``, the services' listener ``service_port``; the
    four account files start from ``accounts`` (default: none, so nobody gets in)
    and are the files the registry's ``BrokerSync(registry, broker.accounts_dir,
    broker.pid_file)`` rewrites.
    """
    port, service_port = free_port(), free_port()
    folder = server_folder(root, f"mosquitto-{port}", BROKER_USER)
    write_broker_files(accounts or BrokerAccounts((), (), ()), folder)
    conf = folder / "mosquitto.conf"
    conf.write_text(render(local_platform(folder, port, service_port)))
    hand_to(BROKER_USER, folder)
    server = Mosquitto("mosquitto", folder, port, [MOSQUITTO_BIN, "-c", str(conf)], service_port=service_port)
    server.start()
    return server


# --- where a server's files go ---------------------------------------------------------------------------------------

BROKER_USER = "mosquitto"
"""The account Mosquitto started as root drops to (its package's default ``user``)."""

_OUTSIDE_FOLDERS: dict[Path, Path] = {}
"""Server folders made in the temporary directory -> their link under the project's data folder."""


def _server_user(user: str | None) -> pwd.struct_passwd | None:
    """The account a server started by us runs as, if it is not us (only when we are root)."""
    if user is None or os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def can_enter(user: str, folder: Path) -> bool:
    """True if ``user`` can reach and enter ``folder`` (every folder above it searchable), asked as that user."""
    argv = ["runuser", "-u", user, "--", "test", "-x", str(folder.resolve())]
    return subprocess.run(argv, capture_output=True, check=False, cwd="/").returncode == 0


def server_folder(root: Path, name: str, user: str | None = None) -> Path:
    """A new folder for one server: ``root/name``, made and returned.

    ``user`` is the account the server runs as when we are root (``mosquitto``
    drops to it, ``postgres`` is run as it). If that account cannot enter
    ``root`` (a checkout in root's 0700 home), the folder is made in the
    system's temporary directory instead, owned by that account, ``root/name``
    becomes a link to it, and it is removed by :meth:`LocalServer.close` or at exit.
    """
    root = root.resolve()  # asked as an absolute path: a relative one would start from our own folder
    root.mkdir(parents=True, exist_ok=True)
    link = root / name
    account = _server_user(user)
    if account is None or can_enter(account.pw_name, root):
        link.mkdir(parents=True, exist_ok=True)
        return link
    folder = Path(tempfile.mkdtemp(prefix=f"compression-{name}-"))
    os.chown(folder, account.pw_uid, account.pw_gid)
    remove_server_folder(link)
    link.symlink_to(folder, target_is_directory=True)
    _OUTSIDE_FOLDERS[folder] = link
    return folder


def hand_to(user: str, folder: Path) -> None:
    """When we are root: give ``folder`` and everything in it to ``user``, the account its server runs as."""
    account = _server_user(user)
    if account is None:
        return
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid)


def remove_server_folder(path: Path) -> None:
    """Remove a server folder: a link's target in the temporary directory with the link, or the folder itself."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        path = target
    link = _OUTSIDE_FOLDERS.pop(path, None)
    if link is not None and link.is_symlink():
        link.unlink()
    shutil.rmtree(path, ignore_errors=True)


@atexit.register
def _remove_outside_folders() -> None:
    """The folders made in the temporary directory do not outlive the process that made them."""
    for folder in list(_OUTSIDE_FOLDERS):
        remove_server_folder(folder)


def influxdb_config(folder: Path, http_port: int, rpc_port: int, auth: bool = False) -> str:
    """InfluxDB 1.x configuration: loopback only, quiet, no phoning home."""
    return f"""# written by compression.localservers
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{folder}/meta"
  logging-enabled = false
[data]
  dir = "{folder}/data"
  wal-dir = "{folder}/wal"
  query-log-enabled = false
  trace-logging-enabled = false
[coordinator]
  log-queries-after = "0s"
[retention]
  enabled = true
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = {"true" if auth else "false"}
  log-enabled = false
  max-body-size = 0
[logging]
  level = "warn"
[continuous_queries]
  log-enabled = false
[subscriber]
  enabled = false
"""


def start_influxdb(root: Path, port: int | None = None, auth: bool = False) -> InfluxDB:
    """Start InfluxDB with its own folder under ``root``."""
    port = port or free_port()
    folder = server_folder(root, f"influxdb-{port}")
    conf = folder / "influxdb.conf"
    conf.write_text(influxdb_config(folder, port, free_port(), auth))
    server = InfluxDB("influxdb", folder, port, [INFLUXD_BIN, "-config", str(conf)])
    server.start(timeout=60)
    return server


# --- PostgreSQL (the registry's migrations and behaviour are tested on it too) ----------------------------------------

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
POSTGRES_USER = "postgres"


def postgres_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL binaries folder (or ``COMPRESSION_POSTGRES_BIN_DIR``), None if not installed."""
    override = os.environ.get("COMPRESSION_POSTGRES_BIN_DIR")
    if override:
        return Path(override) if (Path(override) / "initdb").exists() else None
    found = [p for p in Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")) if (p / "initdb").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


def _as_postgres_user(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: as root, run them as the `postgres` user.
    return ["runuser", "-u", POSTGRES_USER, "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class PostgreSQL(LocalServer):
    """PostgreSQL on 127.0.0.1 with trust authentication, its unix socket in its own folder."""

    bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    database: str = "compression_test"

    @property
    def data_dir(self) -> Path:
        """The cluster's data folder (``PGDATA``)."""
        return self.folder / "data"

    @property
    def url(self) -> str:
        """SQLAlchemy/libpq URL of the test database."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """URL of another database on this server (user ``postgres``, no password: trust on loopback)."""
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    def ready(self) -> bool:
        """True once ``pg_isready`` says the server accepts connections (not merely that the port is open)."""
        if not _port_open(self.port):
            return False
        argv = [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(argv, check=False, timeout=10).returncode == 0

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its URL."""
        argv = [str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", POSTGRES_USER, name]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            raise ServerError(f"createdb {name} failed: {done.stderr.strip()}")
        return self.url_for(name)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT to the postmaster: sessions are ended, not waited for), then SIGKILL if it hangs."""
        self._signal_postmaster(signal.SIGINT)
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._wait_port_free()

    def kill(self) -> None:
        """SIGKILL the postmaster itself (under runuser, killing runuser alone would orphan it)."""
        self._signal_postmaster(signal.SIGKILL)
        super().kill()

    def _signal_postmaster(self, sig: signal.Signals) -> None:
        pid = self._postmaster_pid()
        if pid is None or self.process is None or self.process.poll() is not None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return  # already gone


def _initdb(bin_dir: Path, folder: Path) -> None:
    data = folder / "data"
    if (data / "PG_VERSION").exists():
        return
    argv = [str(bin_dir / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "--auth=trust", "-E", "UTF8",
            "--no-locale", "--no-sync"]  # fmt: skip
    done = subprocess.run(_as_postgres_user(argv), capture_output=True, text=True, check=False, timeout=120,
                          cwd=folder)  # fmt: skip
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ServerError(f"initdb failed in {folder}: {reason}")
    # Only TCP from 127.0.0.1 and the socket in the server's own folder; trust, as for the other local servers.
    (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")


def start_postgres(root: Path, port: int | None = None, database: str = "compression_test") -> PostgreSQL:
    """Start PostgreSQL with its own folder under ``root`` and create ``database`` (Debian's server binaries).

    Runs as the ``postgres`` user when started as root (initdb refuses root).
    Listens on 127.0.0.1 only, trust authentication, unix socket in the folder.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise ServerError(f"no PostgreSQL server binaries in {POSTGRES_BIN_GLOB}: run scripts/bootstrap (postgresql)")
    port = port or free_port()
    folder = server_folder(root, f"postgres-{port}", POSTGRES_USER)
    hand_to(POSTGRES_USER, folder)
    _initdb(bin_dir, folder)
    hand_to(POSTGRES_USER, folder)
    argv = [str(bin_dir / "postgres"), "-D", str(folder / "data"), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={folder}", "-c", "logging_collector=off"]  # fmt: skip
    server = PostgreSQL("postgres", folder, port, _as_postgres_user(argv), bin_dir=bin_dir, database=database)
    server.start(timeout=60)
    try:
        server.create_database(database)
    except ServerError:
        server.stop()
        raise
    return server
