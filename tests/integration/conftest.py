"""Real Mosquitto, InfluxDB and PostgreSQL for the integration tests, started by the tests themselves.

Servers run as plain processes on free loopback ports under ``var/test-<pid>/``.
Each test gets its own database and its own topic root, so tests never see each
other's data; tests that stop or restart a server get a server of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compression.influxql import scalar
from compression.localservers import (
    InfluxDB,
    Mosquitto,
    PostgreSQL,
    free_port,
    postgres_bin_dir,
    remove_server_folder,
    start_influxdb,
    start_mosquitto,
    start_postgres,
)
from ingest.app import Ingester
from ingest.settings import IngestSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def servers_root() -> Iterator[Path]:
    root = ROOT / "var" / f"test-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mosquitto(servers_root: Path) -> Iterator[Mosquitto]:
    server = start_mosquitto(servers_root)
    yield server
    server.close()


@pytest.fixture(scope="session")
def influx(servers_root: Path) -> Iterator[InfluxDB]:
    server = start_influxdb(servers_root)
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres(servers_root: Path) -> Iterator[PostgreSQL]:
    """PostgreSQL from Debian's server binaries (skipped only when they are not installed)."""
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries not installed (/usr/lib/postgresql/*/bin): run scripts/bootstrap")
    server = start_postgres(servers_root)
    yield server
    server.close()


@pytest.fixture
def own_mosquitto(servers_root: Path) -> Iterator[Mosquitto]:
    server = start_mosquitto(servers_root)
    yield server
    server.kill()
    remove_server_folder(server.folder)


@pytest.fixture
def own_influx(servers_root: Path) -> Iterator[InfluxDB]:
    server = start_influxdb(servers_root)
    yield server
    server.kill()
    remove_server_folder(server.folder)


@dataclass(frozen=True)
class Names:
    """Per-test isolation: a database, a topic root, client ids and a device prefix."""

    database: str
    topic_root: str
    client_id: str
    prefix: str


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    token = uuid.uuid4().hex[:8]
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    return Names(
        database=f"t_{slug}_{token}",
        topic_root=f"test-{token}/garments/v1",
        client_id=f"ingest.{token}",
        prefix=f"sock{token[:4]}",
    )


def settings_for(mq: Mosquitto, db: InfluxDB, names: Names, **overrides: object) -> IngestSettings:
    """Ingester settings pointing at the test's servers, database and topics."""
    values: dict[str, object] = {
        "mqtt_url": mq.url,
        "influx_url": db.url,
        "influx_database": names.database,
        "mqtt_topic_root": names.topic_root,
        "mqtt_client_id": names.client_id,
        "metrics_port": 0,
        "flush_interval_ms": 50,
        "retry_initial_s": 0.05,
        "retry_max_s": 1.0,
        "dead_letter_file": str(ROOT / "var" / f"dead-{names.client_id}.jsonl"),
    }
    values.update(overrides)
    return IngestSettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(settings: IngestSettings) -> AsyncIterator[Ingester]:
    """An in-process ingester, stopped cleanly at the end of the block."""
    ingester = Ingester(settings)
    task = asyncio.create_task(ingester.run())
    deadline = time.monotonic() + 15
    while ingester.metrics.value("compression_ingest_broker_connected") < 1:
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            raise TimeoutError("ingester did not connect")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # let the SUBACK arrive before anyone publishes
    try:
        yield ingester
    finally:
        ingester.stop()
        await asyncio.wait_for(task, timeout=30)


async def wait_for_count(db: InfluxDB, database: str, query: str, expected: int, timeout: float = 60) -> int:
    """Poll a count query until it reaches ``expected`` (or time runs out); return the last value."""
    deadline = time.monotonic() + timeout
    value = -1
    while time.monotonic() < deadline:
        value = int(await asyncio.to_thread(scalar, db.url, database, query))
        if value >= expected:
            return value
        await asyncio.sleep(0.1)
    return value


async def eventually(predicate: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll ``predicate`` until it holds or time runs out; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class IngestProcess:
    """``compression ingest`` as a child process (for kill -9, SIGTERM and RSS)."""

    def __init__(self, settings: IngestSettings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSION_")}
        for name, value in self.settings.model_dump().items():
            if value is not None:
                env[f"COMPRESSION_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        env["COMPRESSION_METRICS_PORT"] = str(self.metrics_port)
        return env

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "compression", "ingest"], env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        deadline = time.monotonic() + 20
        while self.metric("compression_ingest_broker_connected") < 1:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingester exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingester did not connect: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.1)

    def metric(self, name: str) -> float:
        """A metric's value from /metrics, or -1 while the endpoint is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return -1.0
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        return total if found else 0.0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


# The simulated clinic with the workspace served (tests/integration/clinic.py), shared by the workspace's tests.
from tests.integration.clinic import clinic  # noqa: E402, F401
