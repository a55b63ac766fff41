"""Service-level rules that keep every database alike (PostgreSQL is stricter than SQLite)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from devices.registry import schemas as s
from devices.registry.classes import band_for, conflicts
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.errors import InvalidError
from devices.registry.service import SYSTEM, Registry


@pytest.fixture
def registry() -> Registry:
    engine = make_engine("sqlite://")
    migrate(engine)
    reg = Registry(session_factory(engine))
    reg.create_clinic(SYSTEM, s.ClinicIn(code="bow", name="Bow", timezone="America/Edmonton"))
    reg.create_patient(SYSTEM, s.PatientIn(clinic="bow", code="PT-0001"))
    reg.create_device(SYSTEM, s.DeviceIn(device_id="sock-0001", clinic="bow", kind="sock"))
    return reg


def test_nul_characters_are_refused_in_any_text() -> None:
    with pytest.raises(ValidationError, match="NUL"):
        s.ClinicIn(code="bow", name="Bow\x00Valley", timezone="UTC")
    with pytest.raises(ValidationError, match="NUL"):
        s.DeviceIn(device_id="sock-0002", clinic="bow", kind="sock", firmware="1.0\x00")


def test_token_names_fit_the_column() -> None:
    s.TokenIn(name="x" * 100, role="admin")
    with pytest.raises(ValidationError):
        s.TokenIn(name="x" * 101, role="admin")


def test_service_accounts_may_use_a_dot_but_nothing_unsafe(registry: Registry) -> None:
    assert registry.create_service_account(SYSTEM, "svc.ingest").username == "svc.ingest"
    for bad in ("ingest team", "a:b", "x\nuser evil", "ab"):
        with pytest.raises(InvalidError):
            registry.create_service_account(SYSTEM, bad)


def test_ending_an_assignment_is_in_the_patients_audit(registry: Registry) -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    held = registry.assign(SYSTEM, s.AssignmentIn(device_id="sock-0001", patient="PT-0001", valid_from=start))
    registry.end_assignment(SYSTEM, held.id, s.AssignmentEnd(valid_to=start + timedelta(days=3)))
    actions = [(e.action, e.entity) for e in registry.patient_audit(SYSTEM, "PT-0001")]
    assert actions[:2] == [("end", "assignment"), ("create", "assignment")]


def test_an_abpi_above_1_3_is_not_reliable_and_asks_for_another_assessment() -> None:
    band = band_for("ral", "2", None, None)
    (finding,) = conflicts([("abpi", 1.45)], "sock", band)
    assert "above 1.3" in finding.explanation and "not reliable" in finding.explanation
    assert "toe pressure" in finding.explanation
    assert conflicts([("abpi", 1.45)], "boot", None)  # a boot too
    assert conflicts([("abpi", 1.3)], "sock", band) == []  # at the bound: a normal index
    assert conflicts([("abpi", 1.0)], "sock", band) == []
