"""Register a simulated fleet in the device registry: a clinic, physios, patients, garments, gateways, prescriptions.

The demo and the tests use this so the registry says exactly what the
scenarios simulate: each device's kind and zones, the gateway that relays it,
the patient holding it since before the simulated period, and the scenario's
prescription (class and wear target, or boot sessions and maximum pressure).
Display names are obviously fictional; only the pseudonymous codes leave the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Final

from devices.registry import schemas as s
from devices.registry.service import SYSTEM, Actor, Registry
from simulators.physiology import BootPrescription, SockPrescription
from simulators.scenarios import Device, Fleet

DEMO_CLINIC: Final = "demo-clinic"
DEMO_PASSWORD: Final = "demo-physio-password"
FIRMWARE: Final = "sim-1.0"


@dataclass(slots=True)
class Registered:
    """What registration handed out once: gateway and device MQTT passwords, physio logins."""

    clinic: str
    gateways: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    physios: dict[str, str] = field(default_factory=dict)


def register_fleet(
    registry: Registry,
    fleet: Fleet,
    gateways: dict[str, list[str]],
    clinic: str = DEMO_CLINIC,
    physios: int = 2,
    actor: Actor = SYSTEM,
    physio_password: Callable[[], str] = lambda: DEMO_PASSWORD,
) -> Registered:
    """Register ``fleet`` (relayed as ``gateways`` says) in one transaction; returns the credentials made.

    ``physio_password`` makes each physio's web password: the fixed :data:`DEMO_PASSWORD` suits only a
    throw-away demo registry (``compression demo``); a shared one gets random ones (deploy/demo/seed_registry.py).
    """
    out = Registered(clinic)
    relay = {device: gateway for gateway, devices in gateways.items() for device in devices}
    since = datetime.fromtimestamp(fleet.period.start_ms / 1000, UTC) - timedelta(days=1)
    with registry.unit_of_work():
        registry.create_clinic(actor, s.ClinicIn(code=clinic, name="Demo Vein & Sports Clinic",
                                                 timezone=fleet.period.tz.key))  # fmt: skip
        emails = [_physio(registry, actor, clinic, n, out, physio_password()) for n in range(1, physios + 1)]
        for gateway in gateways:
            creds = registry.create_gateway(actor, s.GatewayIn(gateway_id=gateway, clinic=clinic,
                                                               description="simulated phone app"))  # fmt: skip
            out.gateways[gateway] = creds.password
        for n, device in enumerate(fleet.devices):
            _patient_and_garment(registry, actor, fleet, device, clinic, emails[n % len(emails)],
                                 relay.get(device.device_id), since, out)  # fmt: skip
    return out


def _physio(registry: Registry, actor: Actor, clinic: str, n: int, out: Registered, password: str) -> str:
    email = f"physio{n}@{clinic}.example"
    registry.create_physio(actor, s.PhysioIn(clinic=clinic, name=f"Demo Physio {n}", email=email,
                                             password=password))  # fmt: skip
    out.physios[email] = password
    return email


def _patient_and_garment(
    registry: Registry,
    actor: Actor,
    fleet: Fleet,
    device: Device,
    clinic: str,
    physio: str,
    gateway: str | None,
    since: datetime,
    out: Registered,
) -> None:
    plan, _ = fleet.plan(device)
    rx = plan.prescription
    zones = list(rx.zones if isinstance(rx, SockPrescription) else rx.chambers)
    if device.garment == 0:
        registry.create_patient(actor, s.PatientIn(clinic=clinic, code=device.patient, physio=physio,
                                                   display_name=f"Demo client {device.rank + 1}"))  # fmt: skip
    creds = registry.create_device(actor, s.DeviceIn(device_id=device.device_id, clinic=clinic,
                                                     kind=device.scenario.kind, zones=zones,
                                                     firmware=FIRMWARE, serial=f"SIM-{device.device_id}",
                                                     gateway=gateway))  # fmt: skip
    out.devices[device.device_id] = creds.password
    late = device.scenario.assigned_from_day
    start = since if not late else datetime.fromtimestamp(
        fleet.period.day_bounds(fleet.period.days[late]).start_ms / 1000, UTC)  # fmt: skip
    registry.assign(actor, s.AssignmentIn(device_id=device.device_id, patient=device.patient, valid_from=start,
                                          leg=device.leg))  # fmt: skip
    if device.garment > 0:
        return  # the patient's other garment: one patient, one prescription
    legs = device.scenario.legs
    # Prescribed from the period's first day: the days before are not the patient's to judge.
    initial = prescription_for(device.patient, rx, fleet.period.days[0])
    if legs:
        initial = initial.model_copy(update={"legs": "both" if len(legs) > 1 else legs[0]})
    version = registry.prescribe(actor, initial)
    for first, changed in plan.changes:  # the physio's later changes: new versions from their day
        effective = fleet.period.days[first]
        fields = prescription_for(device.patient, changed, effective).model_dump(include=_VERSIONED)
        version = registry.update_prescription(actor, version.id,
                                               s.PrescriptionUpdate(effective_from=effective, **fields))  # fmt: skip


_VERSIONED: Final = {"class_system", "class_name", "zones", "wear_hours_per_day", "wear_days_per_week",
                     "sessions_per_week", "session_min_minutes", "session_max_minutes", "max_chamber_mmhg"}  # fmt: skip


def prescription_for(patient: str, rx: SockPrescription | BootPrescription, valid_from: date) -> s.PrescriptionIn:
    """The registry's form of a simulator prescription."""
    if isinstance(rx, SockPrescription):
        system, name = rx.compression_class[:-1].lower(), rx.compression_class[-1]
        return s.PrescriptionIn(patient=patient, garment_kind="sock", valid_from=valid_from, class_system=system,
                                class_name=name, zones=list(rx.zones), wear_hours_per_day=rx.wear_hours_per_day,
                                wear_days_per_week=rx.wear_days_per_week)  # fmt: skip
    return s.PrescriptionIn(patient=patient, garment_kind="boot", valid_from=valid_from, zones=list(rx.chambers),
                            sessions_per_week=rx.sessions_per_week, session_min_minutes=rx.session_min_s / 60,
                            session_max_minutes=rx.session_max_s / 60, max_chamber_mmhg=rx.max_mmhg)  # fmt: skip
