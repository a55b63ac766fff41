"""Files the monitor and the ingester create are readable by their owner only (issue 10, finding 8c).

``monitor.db`` holds physio e-mail addresses and names (in the outbox), patient codes and their flags; the
ingester's dead-letter fallback file holds raw payloads. Created under the usual umask (022), they were
world-readable (0644).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.app import Ingester
from ingest.settings import IngestSettings
from ingest.write import RefusedLine
from monitor.state import State


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_monitor_state_database_is_private(tmp_path: Path, usual_umask: None) -> None:
    path = tmp_path / "var" / "monitor.db"
    state = State(f"sqlite:///{path}")
    try:
        with state.transaction() as session:
            state.enqueue(session, "digest:ann@bow.example:2025-11-14", "digest", "ann@bow.example", {"mail": {}})
        files = [p for p in path.parent.iterdir() if p.name.startswith("monitor.db")]
        assert path in files
        assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o600) for p in files}, (
            "the state database (and its -wal/-shm files) are the owner's only"
        )
    finally:
        state.close()


def test_an_existing_world_readable_state_database_is_tightened(tmp_path: Path, usual_umask: None) -> None:
    path = tmp_path / "monitor.db"
    State(f"sqlite:///{path}").close()
    path.chmod(0o644)  # as an older monitor left it
    State(f"sqlite:///{path}").close()
    assert mode(path) == 0o600


def test_ingest_dead_letter_fallback_file_is_private(tmp_path: Path, usual_umask: None) -> None:
    path = tmp_path / "var" / "dead.jsonl"
    ingester = Ingester(IngestSettings(dead_letter_file=str(path), metrics_enabled=False))
    ingester._fallback_file([RefusedLine('status,device=x state="online" 1', "refused")])
    assert mode(path) == 0o600


def test_a_gateways_outbox_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    from devices.outbox import SqliteOutbox

    path = tmp_path / "queue" / "outbox.db"
    outbox = SqliteOutbox(path)
    try:
        outbox.put("garments/v1/sock-0001/telemetry", b"{}", "telemetry")
    finally:
        outbox.close()
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        if (path.parent / name).exists():
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
