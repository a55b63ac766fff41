"""The registry's schema and behaviour on both databases it supports: SQLite (default) and PostgreSQL.

The Alembic migrations must build exactly what the models describe (autogenerate
finds nothing to do), go down to nothing and up again; the service behaves the
same on either database. Each PostgreSQL test gets a database of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from compression.localservers import PostgreSQL
from devices.registry import schemas as s
from devices.registry.db import downgrade, make_engine, migrate, session_factory
from devices.registry.errors import ConflictError
from devices.registry.models import Base
from devices.registry.service import SYSTEM, Registry

pytestmark = pytest.mark.integration

TABLES = {
    "clinics", "physios", "patients", "gateways", "devices", "assignments", "prescriptions", "contraindications",
    "service_accounts", "api_tokens", "audit", "reattributions",
}  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database (no schema) of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        server: PostgreSQL = request.getfixturevalue("postgres")
        url = server.create_database(f"registry_{uuid.uuid4().hex[:12]}")
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_migrations_match_models_and_round_trip(engine: Engine) -> None:
    migrate(engine)
    assert _tables(engine) == TABLES
    assert _schema_diff(engine) == []
    migrate(engine)  # idempotent: the CLI runs it before every command
    downgrade(engine, "base")
    assert _tables(engine) == set()
    migrate(engine)
    assert _tables(engine) == TABLES
    assert _schema_diff(engine) == []


def _populate(registry: Registry) -> None:
    registry.create_clinic(SYSTEM, s.ClinicIn(code="bowvalley", name="Bow Valley", timezone="America/Edmonton"))
    registry.create_physio(SYSTEM, s.PhysioIn(clinic="bowvalley", name="Ana Physio", email="ana@bowvalley.example"))
    registry.create_patient(SYSTEM, s.PatientIn(clinic="bowvalley", code="P-0001", physio="ana@bowvalley.example"))
    credentials = registry.create_device(SYSTEM, s.DeviceIn(device_id="sock-0001", clinic="bowvalley", kind="sock"))
    assert credentials.username == "sock-0001" and len(credentials.password) >= 40


def test_service_behaves_the_same(engine: Engine) -> None:
    migrate(engine)
    registry = Registry(session_factory(engine))
    _populate(registry)
    start = datetime(2026, 11, 1, 8, tzinfo=UTC)
    first = registry.assign(SYSTEM, s.AssignmentIn(device_id="sock-0001", patient="P-0001", valid_from=start))
    assert first.valid_from == start and first.valid_to is None

    registry.create_patient(SYSTEM, s.PatientIn(clinic="bowvalley", code="P-0002"))
    later = datetime(2026, 11, 10, tzinfo=UTC)
    with pytest.raises(ConflictError, match="sock-0001 is assigned to P-0001"):
        registry.assign(SYSTEM, s.AssignmentIn(device_id="sock-0001", patient="P-0002", valid_from=later))

    rx_in = s.PrescriptionIn(patient="P-0001", garment_kind="sock", valid_from=date(2026, 11, 1), class_system="ral",
                             class_name="2", wear_hours_per_day=10)  # fmt: skip
    rx = registry.prescribe(SYSTEM, rx_in)
    assert (rx.ankle_min_mmhg, rx.ankle_max_mmhg, rx.zones) == (23.0, 32.0, ["ankle", "calf"])
    assert registry.get_device(SYSTEM, "sock-0001").patient == "P-0001"

    entries = registry.audit(SYSTEM)
    assert {(e.action, e.entity) for e in entries} >= {
        ("create", "clinic"), ("create", "physio"), ("create", "patient"), ("create", "device"),
        ("create", "assignment"), ("create", "prescription"),
    }  # fmt: skip
    assert all(e.actor == "system" for e in entries)


def test_unit_of_work_rolls_back_everything(engine: Engine) -> None:
    migrate(engine)
    registry = Registry(session_factory(engine))
    _populate(registry)
    version = registry.version()
    with pytest.raises(ConflictError, match="already exists"), registry.unit_of_work():
        registry.create_clinic(SYSTEM, s.ClinicIn(code="canmore", name="Canmore", timezone="America/Edmonton"))
        registry.create_patient(SYSTEM, s.PatientIn(clinic="canmore", code="P-0100"))
        registry.create_device(SYSTEM, s.DeviceIn(device_id="sock-0100", clinic="canmore", kind="sock"))
        registry.create_clinic(SYSTEM, s.ClinicIn(code="bowvalley", name="Again", timezone="America/Edmonton"))
    assert [c.code for c in registry.list_clinics(SYSTEM)] == ["bowvalley"]
    assert [p.code for p in registry.list_patients(SYSTEM)] == ["P-0001"]
    assert [d.device_id for d in registry.list_devices(SYSTEM)] == ["sock-0001"]
    assert registry.version() == version
