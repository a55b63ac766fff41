"""The registry says what the simulators simulate: same class bands, same patients, garments and targets."""

from __future__ import annotations

from datetime import UTC, datetime

from devices.registry.classes import band_for
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry
from simulators.physiology import CLASSES, SockPrescription
from simulators.registration import register_fleet
from simulators.run import RunOptions, gateway_plan
from simulators.scenarios import every_scenario


def test_simulator_classes_are_the_registry_classes() -> None:
    for name, pclass in CLASSES.items():
        band = band_for(name[:-1].lower(), name[-1], None, None)  # type: ignore[arg-type]
        assert (band.low_mmhg, band.high_mmhg) == (pclass.low_mmhg, pclass.high_mmhg), name


def test_register_fleet_matches_every_scenario() -> None:
    engine = make_engine("sqlite://")
    migrate(engine)
    registry = Registry(session_factory(engine))
    fleet = every_scenario(seed=3, days=2, end=datetime(2026, 11, 20, tzinfo=UTC))
    plan = gateway_plan(fleet, RunOptions("mqtt://127.0.0.1", connections=3))
    out = register_fleet(registry, fleet, plan)

    assert set(out.gateways) == set(plan) and len(out.devices) == len(fleet.devices)
    patients = {p.code: p for p in registry.list_patients(SYSTEM)}
    assert set(patients) == {d.patient for d in fleet.devices}
    assert all(p.physio and p.display_name for p in patients.values())
    rx_by_patient = {rx.patient: rx for rx in registry.list_prescriptions(SYSTEM)}
    snapshot = registry.snapshot(SYSTEM)
    held = {(a.device_id, a.patient) for a in snapshot.assignments}
    for device in fleet.devices:
        assert (device.device_id, device.patient) in held
        sim_rx = fleet.plan(device)[0].prescription
        rx = rx_by_patient[device.patient]
        assert rx.garment_kind == device.scenario.kind
        if isinstance(sim_rx, SockPrescription):
            assert (rx.ankle_min_mmhg, rx.ankle_max_mmhg) == (sim_rx.pressure_class.low_mmhg,
                                                              sim_rx.pressure_class.high_mmhg)  # fmt: skip
            assert rx.wear_hours_per_day == sim_rx.wear_hours_per_day
        else:
            assert rx.max_chamber_mmhg == sim_rx.max_mmhg and rx.zones == list(sim_rx.chambers)
    # Assigned since before the simulated period, so every sample is attributed.
    assert all(a.from_ms < fleet.period.start_ms and a.to_ms is None for a in snapshot.assignments)
    relayed = {d for g in registry.list_gateways(SYSTEM) for d in g.devices}
    assert relayed == {d.device_id for d in fleet.devices}
