"""The monitor reads the registry again only when that could change what it judges by (``Contexts``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from monitor.registry import Contexts, load_context, load_contexts, valid_until

# 15:00 in Edmonton (UTC-7 in December): the next local midnight is 07:00 UTC the next day.
NOW = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)
MIDNIGHT = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)


@pytest.fixture
def registry() -> Registry:
    engine = make_engine("sqlite://")
    migrate(engine)
    reg = Registry(session_factory(engine))
    reg.create_clinic(SYSTEM, s.ClinicIn(code="bow", name="Bow", timezone="America/Edmonton"))
    reg.create_patient(SYSTEM, s.PatientIn(clinic="bow", code="PT-0001"))
    reg.create_device(SYSTEM, s.DeviceIn(device_id="sock-0001", clinic="bow", kind="sock"))
    reg.assign(SYSTEM, s.AssignmentIn(device_id="sock-0001", patient="PT-0001", valid_from=NOW - timedelta(days=9)))
    return reg


def test_an_unchanged_registry_is_read_once(registry: Registry) -> None:
    contexts = Contexts(registry)
    first = contexts.get(NOW)
    assert contexts.get(NOW + timedelta(minutes=5)) is first
    assert contexts.reads == 1


def test_a_change_in_the_registry_is_read_at_the_next_call(registry: Registry) -> None:
    contexts = Contexts(registry)
    assert contexts.get(NOW)[0].rx is None
    registry.prescribe(SYSTEM, s.PrescriptionIn(patient="PT-0001", garment_kind="sock", valid_from=NOW.date()
                                                - timedelta(days=3), class_system="explicit", ankle_min_mmhg=20,
                                                ankle_max_mmhg=30, wear_hours_per_day=8))  # fmt: skip
    (ctx,) = contexts.get(NOW + timedelta(seconds=1))
    assert ctx.rx is not None and contexts.reads == 2


def test_a_local_midnight_or_an_assignment_ending_makes_it_read_again(registry: Registry) -> None:
    assert valid_until(Contexts(registry).get(NOW), NOW) == int(MIDNIGHT.timestamp() * 1000)
    (held,) = [a for a in registry.list_assignments(SYSTEM) if a.patient == "PT-0001"]
    ends = NOW + timedelta(hours=2)
    registry.end_assignment(SYSTEM, held.id, s.AssignmentEnd(valid_to=ends))
    contexts = Contexts(registry)
    assert contexts.get(NOW)[0].devices == ("sock-0001",)
    assert contexts.get(ends - timedelta(seconds=1)) is contexts.get(NOW) and contexts.reads == 1
    assert contexts.get(ends)[0].devices == () and contexts.reads == 2
    contexts.get(MIDNIGHT)
    assert contexts.reads == 3


def test_one_patients_context_is_the_one_of_the_whole_registry(registry: Registry) -> None:
    registry.create_patient(SYSTEM, s.PatientIn(clinic="bow", code="PT-0002"))
    registry.prescribe(SYSTEM, s.PrescriptionIn(patient="PT-0001", garment_kind="sock", valid_from=NOW.date()
                                                - timedelta(days=3), class_system="explicit", ankle_min_mmhg=20,
                                                ankle_max_mmhg=30, wear_hours_per_day=8))  # fmt: skip
    everyone = {c.patient: c for c in load_contexts(registry, NOW)}
    assert load_context(registry, "PT-0001", NOW) == everyone["PT-0001"]
    assert load_context(registry, "PT-0002", NOW) == everyone["PT-0002"]
    assert load_context(registry, "PT-9999", NOW) is None
