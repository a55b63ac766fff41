"""Every registry operation: one transaction each, checked, audited; the API, CLI, CSV import and web page call these.

A method either commits its whole change together with its audit entry, or
raises a :mod:`devices.registry.errors` error and leaves the database as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from devices.protocol import CHANNELS, TOPIC_ROOT
from devices.registry import schemas as s
from devices.registry.classes import Band, ClassError, Finding, band_for, conflicts
from devices.registry.errors import (
    ConfirmationNeededError,
    ConflictError,
    ContraindicatedError,
    ForbiddenError,
    InvalidError,
    NotFoundError,
    ThrottledError,
)
from devices.registry.logins import LoginGuard
from devices.registry.models import (
    ApiToken,
    Assignment,
    AuditEntry,
    Clinic,
    Contraindication,
    Device,
    Gateway,
    Patient,
    Physio,
    Prescription,
    Reattribution,
    ServiceAccount,
    utcnow,
)
from devices.registry.secrets import (
    TOKEN_ADVICE,
    mosquitto_hash,
    new_password,
    new_token,
    password_hash,
    password_problem,
    password_verify,
    token_hash,
    token_problem,
)

SERVICE_ACCOUNT_RULE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,63}")
SESSION_HOURS: Final = 12
BOOTSTRAP_TOKEN_NAME: Final = "bootstrap-admin"
BOOTSTRAP_INGESTER_TOKEN_NAME: Final = "bootstrap-ingester"
WEB_SESSION: Final = "web-session"  # the name of every web session's token row
ANONYMOUS: Final = "anonymous"
UNKNOWN_ADDRESS: Final = "unknown"
INGESTER_SCOPE: Final = "ingester tokens may read only the enrichment snapshot (GET /api/v1/enrichment/snapshot)"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: their name for the audit trail, their role, and for a physio their clinic."""

    name: str
    role: str
    physio_id: int | None = None
    clinic_id: int | None = None
    token_id: int | None = None  # the API token or web session in use

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


SYSTEM: Final = Actor("system", "admin")


class Registry:
    """The registry over one database. ``on_credentials_changed`` runs after a commit that changed MQTT accounts."""

    def __init__(self, factory: sessionmaker[Session], on_credentials_changed: Callable[[], None] | None = None):
        self._factory = factory
        self.on_credentials_changed = on_credentials_changed
        self.logins = LoginGuard()  # failed passwords per account and address (the app sets its limits)
        # Set inside unit_of_work(): the operations of this thread or task share one transaction.
        self._outer: ContextVar[_Unit | None] = ContextVar(f"registry-unit-{id(self)}", default=None)

    # --- plumbing -----------------------------------------------------------------------------------------------

    @contextmanager
    def unit_of_work(self) -> Iterator[None]:
        """Run several operations as one transaction: all of them land, or none (bulk import)."""
        if self._outer.get() is not None:
            raise RuntimeError("unit_of_work() does not nest")
        unit = _Unit()
        with self._factory() as session, session.begin():
            unit.session = session
            reset = self._outer.set(unit)
            try:
                yield
                session.flush()
            except IntegrityError as exc:
                raise ConflictError(f"conflicts with what is stored: {exc.orig}") from exc
            finally:
                self._outer.reset(reset)
        if unit.credentials_changed:
            self._credentials_changed()

    @contextmanager
    def _tx(self, actor: Actor, *, write: bool = False, admin: bool = False, snapshot: bool = False
            ) -> Iterator[Session]:  # fmt: skip
        if admin and not actor.is_admin:
            raise ForbiddenError(f"{actor.role} tokens cannot do this; an admin token is needed")
        if write and actor.role not in ("admin", "physio"):
            raise ForbiddenError(f"{actor.role} tokens are read-only")
        # The ingester tags telemetry with codes: the snapshot is all it may read (no names, no clinical notes).
        if actor.role == "ingester" and not snapshot:
            raise ForbiddenError(INGESTER_SCOPE)
        unit = self._outer.get()
        if unit is not None and unit.session is not None:
            try:
                yield unit.session
                unit.session.flush()
            except IntegrityError as exc:
                raise ConflictError(f"conflicts with what is stored: {exc.orig}") from exc
            return
        with self._factory() as session, session.begin():
            try:
                yield session
                session.flush()
            except IntegrityError as exc:
                # A race past our own checks (two requests creating the same id): still a 409, never a 500.
                raise ConflictError(f"conflicts with what is stored: {exc.orig}") from exc

    def _credentials_changed(self) -> None:
        unit = self._outer.get()
        if unit is not None:
            unit.credentials_changed = True  # once, after the unit commits
            return
        if self.on_credentials_changed is not None:
            self.on_credentials_changed()

    @staticmethod
    def _audit(session: Session, actor: Actor, action: str, entity: str, key: str, changes: dict[str, Any]) -> None:
        session.add(AuditEntry(actor=actor.name, action=action, entity=entity, key=key, changes=_jsonable(changes)))

    @staticmethod
    def _one(session: Session, query: Select[T], what: str) -> T:
        row = session.scalars(query).first()
        if row is None:
            raise NotFoundError(f"no {what}")
        return row

    def _clinic(self, session: Session, actor: Actor, code: str) -> Clinic:
        what = f"clinic {code!r}"
        clinic = self._one(session, select(Clinic).where(Clinic.code == code), what)
        _same_clinic(actor, clinic.id, what)
        return clinic

    def _patient(self, session: Session, actor: Actor, code: str) -> Patient:
        what = f"patient {code!r}"
        patient = self._one(session, select(Patient).where(Patient.code == code), what)
        _same_clinic(actor, patient.clinic_id, what)
        return patient

    def _physio_by_email(self, session: Session, actor: Actor, email: str, clinic_id: int) -> Physio:
        what = f"physio {email!r}"
        physio = self._one(session, select(Physio).where(Physio.email == email.lower()), what)
        _same_clinic(actor, physio.clinic_id, what)  # to a physio, another clinic's colleague does not exist
        if physio.clinic_id != clinic_id:
            raise InvalidError(f"physio {email} works for another clinic")
        return physio

    def _device(self, session: Session, actor: Actor, device_id: str) -> Device:
        what = f"device {device_id!r}"
        device = self._one(session, select(Device).where(Device.device_id == device_id), what)
        _same_clinic(actor, device.clinic_id, what)
        return device

    def _gateway(self, session: Session, actor: Actor, gateway_id: str) -> Gateway:
        what = f"gateway {gateway_id!r}"
        gateway = self._one(session, select(Gateway).where(Gateway.gateway_id == gateway_id), what)
        _same_clinic(actor, gateway.clinic_id, what)
        return gateway

    @staticmethod
    def _mqtt_name_free(session: Session, name: str) -> None:
        # Devices, gateways and service accounts share the broker's user names.
        for model, column in ((Device, Device.device_id), (Gateway, Gateway.gateway_id),
                              (ServiceAccount, ServiceAccount.username)):  # fmt: skip
            if session.scalars(select(model).where(column == name)).first() is not None:
                raise ConflictError(f"{name!r} is already registered (as a {model.__tablename__[:-1]})")

    # --- clinics and physios ------------------------------------------------------------------------------------

    def create_clinic(self, actor: Actor, data: s.ClinicIn) -> s.ClinicOut:
        """Register a clinic (admin)."""
        with self._tx(actor, admin=True) as session:
            if session.scalars(select(Clinic).where(Clinic.code == data.code)).first():
                raise ConflictError(f"clinic {data.code!r} already exists")
            clinic = Clinic(code=data.code, name=data.name, timezone=data.timezone)
            session.add(clinic)
            self._audit(session, actor, "create", "clinic", data.code, data.model_dump())
            return s.ClinicOut.model_validate(clinic)

    def list_clinics(self, actor: Actor) -> list[s.ClinicOut]:
        """Clinics the caller may see (a physio: their own)."""
        with self._tx(actor) as session:
            query = select(Clinic).order_by(Clinic.code)
            if actor.clinic_id is not None:
                query = query.where(Clinic.id == actor.clinic_id)
            return [s.ClinicOut.model_validate(c) for c in session.scalars(query)]

    def get_clinic(self, actor: Actor, code: str) -> s.ClinicOut:
        """One clinic."""
        with self._tx(actor) as session:
            return s.ClinicOut.model_validate(self._clinic(session, actor, code))

    def create_physio(self, actor: Actor, data: s.PhysioIn) -> s.PhysioOut:
        """Register a physio of a clinic (admin)."""
        with self._tx(actor, admin=True) as session:
            clinic = self._clinic(session, actor, data.clinic)
            email = data.email.lower()
            if session.scalars(select(Physio).where(Physio.email == email)).first():
                raise ConflictError(f"a physio with e-mail {email} already exists")
            if data.password:
                _strong_enough(data.password, email, data.name)
            physio = Physio(clinic_id=clinic.id, name=data.name, email=email, active=data.active,
                            password_hash=password_hash(data.password) if data.password else None)  # fmt: skip
            session.add(physio)
            session.flush()
            self._audit(session, actor, "create", "physio", email, data.model_dump(exclude={"password"}))
            return _physio_out(physio)

    def update_physio(self, actor: Actor, email: str, data: s.PhysioUpdate, address: str = UNKNOWN_ADDRESS
                      ) -> s.PhysioOut:  # fmt: skip
        """Change a physio (admin), or one's own password (a physio, giving the current one).

        A new password must pass :func:`~devices.registry.secrets.password_problem`; it ends every web
        session of the physio but the one making the change. A wrong current password counts like a failed
        sign-in (:attr:`logins`).
        """
        own = actor.role == "physio" and set(data.model_fields_set) <= {"password", "current_password"}
        if own:
            self._check_current_password(actor, email, data.current_password, address)
        with self._tx(actor, write=True, admin=not own) as session:
            physio = self._one(session, select(Physio).where(Physio.email == email.lower()), f"physio {email!r}")
            changes = data.model_dump(exclude_unset=True, exclude={"password", "current_password"})
            if changes.get("email") is not None:  # null means unchanged, like the other fields
                changes["email"] = changes["email"].lower()  # stored lower-case, as every lookup expects
                if changes["email"] != physio.email and session.scalars(
                        select(Physio).where(Physio.email == changes["email"])).first():  # fmt: skip
                    raise ConflictError(f"a physio with e-mail {changes['email']} already exists")
            before = {k: getattr(physio, k) for k in changes}
            for key, value in changes.items():
                if value is not None:
                    setattr(physio, key, value)
            if data.password:
                _strong_enough(data.password, physio.email, physio.name)
                physio.password_hash = password_hash(data.password)
                changes["password"] = "changed"
                changes["sessions_ended"] = self._end_sessions(session, physio.id, keep=actor.token_id)
            self._audit(session, actor, "update", "physio", physio.email, {"before": before, "after": changes})
            return _physio_out(physio)

    def _check_current_password(self, actor: Actor, email: str, current: str | None, address: str) -> None:
        """A physio changing her own password: it is her account and ``current`` is her password, or refuse."""
        with self._factory() as session:
            physio = session.scalars(select(Physio).where(Physio.email == email.lower())).first()
            # Another physio's account, existing or not, is refused alike: the answer tells no one who has one.
            if physio is None or physio.id != actor.physio_id:
                raise ForbiddenError("a physio may change only their own password")
            stored, account = physio.password_hash, physio.email
        if current is None:
            raise InvalidError("current_password: give your current password to set a new one")
        self._attempt(account, address, lambda: password_verify(current, stored), actor_name=actor.name)

    def _attempt(self, account: str, address: str, check: Callable[[], bool], actor_name: str) -> None:
        """Run a password ``check`` for ``account`` under the throttle; a failure is counted, audited and refused."""
        wait = self.logins.wait_s(account, address)
        if wait > 0:
            raise ThrottledError(wait)
        if check():
            self.logins.succeeded(account, address)
            return
        locks = self.logins.failed(account, address)
        with self._factory() as session, session.begin():
            who = Actor(actor_name, "anonymous")
            self._audit(session, who, "login_failed", "login", account[:254], {"address": address})
            for lock in locks:
                self._audit(session, who, "login_locked", "login", account[:254] if lock.scope == "account" else
                            address, {"scope": lock.scope, "seconds": lock.seconds, "failures": lock.failures,
                                      "refused_meanwhile": lock.refused_meanwhile, "address": address})  # fmt: skip
        if locks:  # this failure started a lock: say so now rather than at the next try
            raise ThrottledError(max(lock.seconds for lock in locks))
        raise ForbiddenError("wrong e-mail or password" if actor_name == ANONYMOUS else "the current password is wrong")

    @staticmethod
    def _end_sessions(session: Session, physio_id: int, keep: int | None) -> int:
        """Revoke the physio's live web sessions except ``keep``; how many were ended."""
        now = utcnow()
        live = session.scalars(select(ApiToken).where(
            ApiToken.physio_id == physio_id, ApiToken.name == WEB_SESSION, ApiToken.revoked_at.is_(None),
            ApiToken.id != (keep or -1), or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
        )).all()  # fmt: skip
        for row in live:
            row.revoked_at = now
        return len(live)

    def list_physios(self, actor: Actor, clinic: str | None = None) -> list[s.PhysioOut]:
        """Physios (a physio sees their clinic's)."""
        with self._tx(actor) as session:
            query = select(Physio).order_by(Physio.email)
            if clinic is not None:
                query = query.where(Physio.clinic_id == self._clinic(session, actor, clinic).id)
            if actor.clinic_id is not None:
                query = query.where(Physio.clinic_id == actor.clinic_id)
            return [_physio_out(p) for p in session.scalars(query)]

    # --- patients ------------------------------------------------------------------------------------------------

    def create_patient(self, actor: Actor, data: s.PatientIn) -> s.PatientOut:
        """Register a patient under a pseudonymous code."""
        with self._tx(actor, write=True) as session:
            clinic = self._clinic(session, actor, data.clinic)
            if session.scalars(select(Patient).where(Patient.code == data.code)).first():
                raise ConflictError(f"patient code {data.code!r} is taken")
            physio = self._physio_by_email(session, actor, data.physio, clinic.id) if data.physio else None
            patient = Patient(clinic_id=clinic.id, code=data.code, display_name=data.display_name,
                              physio_id=physio.id if physio else None)  # fmt: skip
            session.add(patient)
            session.flush()
            self._audit(session, actor, "create", "patient", data.code, data.model_dump(exclude={"display_name"}))
            return _patient_out(patient)

    def update_patient(self, actor: Actor, code: str, data: s.PatientUpdate) -> s.PatientOut:
        """Change a patient's display name or responsible physio."""
        with self._tx(actor, write=True) as session:
            patient = self._patient(session, actor, code)
            changes: dict[str, Any] = {}
            if "display_name" in data.model_fields_set:
                patient.display_name = data.display_name
                changes["display_name"] = "changed"  # the name itself stays out of the audit trail
            if "physio" in data.model_fields_set:
                before = patient.physio.email if patient.physio else None
                physio = self._physio_by_email(session, actor, data.physio, patient.clinic_id) if data.physio else None
                patient.physio = physio
                changes["physio"] = {"before": before, "after": data.physio}
            self._audit(session, actor, "update", "patient", code, changes)
            session.flush()
            return _patient_out(patient)

    def get_patient(self, actor: Actor, code: str) -> s.PatientOut:
        """One patient."""
        with self._tx(actor) as session:
            return _patient_out(self._patient(session, actor, code))

    def list_patients(self, actor: Actor, clinic: str | None = None, physio: str | None = None) -> list[s.PatientOut]:
        """Patients, optionally of one clinic or one physio (a physio sees their clinic's)."""
        with self._tx(actor) as session:
            query = select(Patient).order_by(Patient.code)
            if clinic is not None:
                query = query.where(Patient.clinic_id == self._clinic(session, actor, clinic).id)
            if actor.clinic_id is not None:
                query = query.where(Patient.clinic_id == actor.clinic_id)
            if physio is not None:
                query = query.join(Physio, Patient.physio_id == Physio.id).where(Physio.email == physio.lower())
            return [_patient_out(p) for p in session.scalars(query)]

    # --- gateways and devices -----------------------------------------------------------------------------------

    def create_gateway(self, actor: Actor, data: s.GatewayIn) -> s.Credentials:
        """Register a gateway; returns its MQTT credentials, shown this once."""
        password = new_password()
        with self._tx(actor, admin=True) as session:
            clinic = self._clinic(session, actor, data.clinic)
            self._mqtt_name_free(session, data.gateway_id)
            session.add(Gateway(gateway_id=data.gateway_id, clinic_id=clinic.id, description=data.description,
                                mqtt_password_hash=mosquitto_hash(password)))  # fmt: skip
            self._audit(session, actor, "create", "gateway", data.gateway_id, data.model_dump())
        self._credentials_changed()
        return s.Credentials(username=data.gateway_id, password=password,
                             may_publish=may_publish("gateway", data.gateway_id))  # fmt: skip

    def list_gateways(self, actor: Actor) -> list[s.GatewayOut]:
        """Gateways and the garments each relays."""
        with self._tx(actor) as session:
            query = select(Gateway).order_by(Gateway.gateway_id)
            if actor.clinic_id is not None:
                query = query.where(Gateway.clinic_id == actor.clinic_id)
            return [self._gateway_out(session, g) for g in session.scalars(query)]

    def get_gateway(self, actor: Actor, gateway_id: str) -> s.GatewayOut:
        """One gateway."""
        with self._tx(actor) as session:
            return self._gateway_out(session, self._gateway(session, actor, gateway_id))

    @staticmethod
    def _gateway_out(session: Session, gateway: Gateway) -> s.GatewayOut:
        devices = session.scalars(select(Device.device_id).where(Device.gateway_id == gateway.id).order_by(
            Device.device_id))  # fmt: skip
        return s.GatewayOut(gateway_id=gateway.gateway_id, clinic=gateway.clinic.code, description=gateway.description,
                            revoked=gateway.revoked_at is not None, devices=list(devices))  # fmt: skip

    def create_device(self, actor: Actor, data: s.DeviceIn) -> s.Credentials:
        """Register a garment; returns its MQTT credentials, shown this once."""
        password = new_password()
        zones = list(data.zones or s.DEFAULT_ZONES[data.kind])
        _check_zones(data.kind, zones)
        with self._tx(actor, admin=True) as session:
            clinic = self._clinic(session, actor, data.clinic)
            self._mqtt_name_free(session, data.device_id)
            gateway = self._usable_gateway(session, actor, data.gateway, clinic.id) if data.gateway else None
            session.add(Device(device_id=data.device_id, clinic_id=clinic.id, kind=data.kind, zones=zones,
                               firmware=data.firmware, serial=data.serial, gateway=gateway,
                               mqtt_password_hash=mosquitto_hash(password)))  # fmt: skip
            self._audit(session, actor, "create", "device", data.device_id, data.model_dump())
        self._credentials_changed()
        return s.Credentials(username=data.device_id, password=password,
                             may_publish=may_publish("device", data.device_id))  # fmt: skip

    def _usable_gateway(self, session: Session, actor: Actor, gateway_id: str, clinic_id: int) -> Gateway:
        gateway = self._gateway(session, actor, gateway_id)
        if gateway.revoked_at is not None:
            raise ConflictError(f"gateway {gateway_id!r} is revoked")
        if gateway.clinic_id != clinic_id:
            raise InvalidError(f"gateway {gateway_id!r} belongs to another clinic")
        return gateway

    def update_device(self, actor: Actor, device_id: str, data: s.DeviceUpdate) -> s.DeviceOut:
        """Change a garment's firmware, serial, zones or gateway (admin)."""
        with self._tx(actor, admin=True) as session:
            device = self._device(session, actor, device_id)
            changes = data.model_dump(exclude_unset=True)
            if data.zones is not None:
                _check_zones(device.kind, list(data.zones))
                device.zones = list(data.zones)
            device.firmware = data.firmware if data.firmware is not None else device.firmware
            device.serial = data.serial if data.serial is not None else device.serial
            gateway_changed = data.gateway is not None or data.detach_gateway
            if data.gateway is not None:
                device.gateway = self._usable_gateway(session, actor, data.gateway, device.clinic_id)
            elif data.detach_gateway:
                device.gateway = None
            self._audit(session, actor, "update", "device", device_id, changes)
            out = self._device_out(session, device)
        if gateway_changed:
            self._credentials_changed()
        return out

    def get_device(self, actor: Actor, device_id: str) -> s.DeviceOut:
        """One garment, with the patient holding it now."""
        with self._tx(actor) as session:
            return self._device_out(session, self._device(session, actor, device_id))

    def list_devices(self, actor: Actor, clinic: str | None = None) -> list[s.DeviceOut]:
        """Garments (a physio sees their clinic's)."""
        with self._tx(actor) as session:
            query = select(Device).order_by(Device.device_id)
            if clinic is not None:
                query = query.where(Device.clinic_id == self._clinic(session, actor, clinic).id)
            if actor.clinic_id is not None:
                query = query.where(Device.clinic_id == actor.clinic_id)
            return [self._device_out(session, d) for d in session.scalars(query)]

    @staticmethod
    def _device_out(session: Session, device: Device) -> s.DeviceOut:
        now = utcnow()
        holder = session.scalars(select(Patient.code).join(Assignment, Assignment.patient_id == Patient.id).where(
            Assignment.device_id == device.id, Assignment.valid_from <= now,
            or_(Assignment.valid_to.is_(None), Assignment.valid_to > now))).first()  # fmt: skip
        return s.DeviceOut(device_id=device.device_id, clinic=device.clinic.code, kind=device.kind,
                           zones=list(device.zones), firmware=device.firmware, serial=device.serial,
                           gateway=device.gateway.gateway_id if device.gateway else None,
                           revoked=device.revoked_at is not None, patient=holder)  # fmt: skip

    def revoke(self, actor: Actor, kind: str, name: str) -> None:
        """Cut a device, gateway or service account off the broker; a device's open assignment ends now."""
        now = utcnow()
        with self._tx(actor, admin=True) as session:
            if kind == "device":
                device = self._device(session, actor, name)
                _not_revoked(device.revoked_at, name)
                device.revoked_at = now
                for assignment in session.scalars(select(Assignment).where(
                        Assignment.device_id == device.id, Assignment.valid_to.is_(None))):  # fmt: skip
                    assignment.valid_to = max(now, assignment.valid_from)
            elif kind == "gateway":
                gateway = self._gateway(session, actor, name)
                _not_revoked(gateway.revoked_at, name)
                gateway.revoked_at = now
            else:
                account = self._one(session, select(ServiceAccount).where(ServiceAccount.username == name),
                                    f"service account {name!r}")  # fmt: skip
                _not_revoked(account.revoked_at, name)
                account.revoked_at = now
            self._audit(session, actor, "revoke", kind, name, {"revoked_at": now})
        self._credentials_changed()

    def rotate_credentials(self, actor: Actor, kind: str, name: str) -> s.Credentials:
        """A new MQTT password for a device or gateway (the old one stops working at the next broker reload)."""
        password = new_password()
        with self._tx(actor, admin=True) as session:
            target: Device | Gateway = (
                self._device(session, actor, name) if kind == "device" else self._gateway(session, actor, name)
            )
            _not_revoked(target.revoked_at, name)
            target.mqtt_password_hash = mosquitto_hash(password)
            self._audit(session, actor, "rotate_credentials", kind, name, {})
        self._credentials_changed()
        return s.Credentials(username=name, password=password, may_publish=may_publish(kind, name))

    def create_service_account(self, actor: Actor, username: str, role: str = "ingester") -> s.Credentials:
        """An MQTT account for the ingester: read-only on every garment topic."""
        if role != "ingester":
            raise InvalidError("the only service-account role is ingester")
        if not SERVICE_ACCOUNT_RULE.fullmatch(username):
            # It becomes an MQTT user name and a line of the password and ACL files; the dot
            # allowed here (svc.ingest) is never in a device id, so the two cannot collide.
            raise InvalidError(f"service account names match {SERVICE_ACCOUNT_RULE.pattern}; got {username!r}")
        password = new_password()
        with self._tx(actor, admin=True) as session:
            self._mqtt_name_free(session, username)
            session.add(ServiceAccount(username=username, role=role, mqtt_password_hash=mosquitto_hash(password)))
            self._audit(session, actor, "create", "service_account", username, {"role": role})
        self._credentials_changed()
        return s.Credentials(username=username, password=password, may_publish=[])

    # --- assignments --------------------------------------------------------------------------------------------

    def assign(self, actor: Actor, data: s.AssignmentIn) -> s.AssignmentOut:
        """Give a device to a patient from ``valid_from`` (default now); refuses overlaps with its history."""
        start = data.valid_from or utcnow()
        with self._tx(actor, write=True) as session:
            device = self._device(session, actor, data.device_id)
            patient = self._patient(session, actor, data.patient)
            if device.revoked_at is not None:
                raise ConflictError(f"device {data.device_id!r} is revoked")
            if device.clinic_id != patient.clinic_id:
                raise InvalidError(f"device {data.device_id} and patient {data.patient} are in different clinics")
            if data.valid_to is not None and data.valid_to <= start:
                raise InvalidError("valid_to must be after valid_from")
            _no_overlap(session, device, start, data.valid_to)
            assignment = Assignment(device=device, patient=patient, valid_from=start, valid_to=data.valid_to,
                                    leg=data.leg)  # fmt: skip
            session.add(assignment)
            session.flush()
            self._audit(session, actor, "create", "assignment", f"{data.device_id}->{data.patient}",
                        {"id": assignment.id, "valid_from": start, "valid_to": data.valid_to,
                         "leg": data.leg})  # fmt: skip
            return _assignment_out(assignment)

    def end_assignment(self, actor: Actor, assignment_id: int, data: s.AssignmentEnd) -> s.AssignmentOut:
        """Close an open assignment at ``valid_to`` (default now)."""
        end = data.valid_to or utcnow()
        with self._tx(actor, write=True) as session:
            what = f"assignment {assignment_id}"
            assignment = self._one(session, select(Assignment).where(Assignment.id == assignment_id), what)
            _same_clinic(actor, assignment.patient.clinic_id, what)
            if assignment.valid_to is not None:
                raise ConflictError(f"assignment {assignment_id} already ended at {assignment.valid_to.isoformat()}")
            if end <= assignment.valid_from:
                raise InvalidError("the end must be after the assignment's start")
            _no_overlap(session, assignment.device, assignment.valid_from, end, ignore=assignment.id)
            assignment.valid_to = end
            self._audit(session, actor, "end", "assignment",
                        f"{assignment.device.device_id}->{assignment.patient.code}",
                        {"id": assignment_id, "valid_to": end})  # fmt: skip
            return _assignment_out(assignment)

    def list_assignments(
        self, actor: Actor, device_id: str | None = None, patient: str | None = None
    ) -> list[s.AssignmentOut]:
        """Assignment history, optionally of one device or patient."""
        with self._tx(actor) as session:
            query = select(Assignment).join(Patient, Assignment.patient_id == Patient.id).order_by(
                Assignment.valid_from, Assignment.id)  # fmt: skip
            if device_id is not None:
                query = query.where(Assignment.device_id == self._device(session, actor, device_id).id)
            if patient is not None:
                query = query.where(Assignment.patient_id == self._patient(session, actor, patient).id)
            if actor.clinic_id is not None:
                query = query.where(Patient.clinic_id == actor.clinic_id)
            return [_assignment_out(a) for a in session.scalars(query)]

    # --- re-attribution of stored readings ----------------------------------------------------------------------

    def request_reattribution(self, actor: Actor, data: s.ReattributionIn) -> s.ReattributionOut:
        """Record that ``data.device_id``'s readings of the period belong to ``data.patient`` (audited, idempotent).

        The assignments are made to agree first: an assignment of the device to the patient starting inside the
        period is moved back to its start, or one is created for the period; another holder then is a conflict.
        The stored readings are rewritten by whoever carries the request out (``compression devices reattribute``
        or the monitor), which then marks it done.
        """
        with self._tx(actor, write=True) as session:
            device = self._device(session, actor, data.device_id)
            patient = self._patient(session, actor, data.patient)
            if device.clinic_id != patient.clinic_id:
                raise InvalidError(f"device {data.device_id} and patient {data.patient} are in different clinics")
            same = session.scalars(select(Reattribution).where(
                Reattribution.device_id == device.id, Reattribution.patient_id == patient.id,
                Reattribution.valid_from == data.valid_from,
                Reattribution.valid_to == data.valid_to)).first()  # fmt: skip
            if same is not None:
                return _reattribution_out(same)  # asked again: the same request
            self._cover(session, actor, device, patient, data.valid_from, data.valid_to)
            row = Reattribution(device=device, patient=patient, valid_from=data.valid_from, valid_to=data.valid_to,
                                requested_by=actor.name)  # fmt: skip
            session.add(row)
            session.flush()
            self._audit(session, actor, "reattribute", "device", data.device_id,
                        {"id": row.id, "patient": data.patient, "valid_from": data.valid_from,
                         "valid_to": data.valid_to})  # fmt: skip
            return _reattribution_out(row)

    def _cover(self, session: Session, actor: Actor, device: Device, patient: Patient, start: datetime,
               end: datetime) -> None:  # fmt: skip
        """Make the device's assignments say it was the patient's over ``[start, end)``."""
        # Those overlapping the period, and the patient's one starting right at its end (to be moved back).
        held = [a for a in session.scalars(select(Assignment).where(
            Assignment.device_id == device.id, Assignment.valid_from <= end,
            or_(Assignment.valid_to.is_(None), Assignment.valid_to > start))
            .order_by(Assignment.valid_from)) if a.valid_from < end or a.patient_id == patient.id]  # fmt: skip
        if any(a.patient_id != patient.id for a in held):
            other = next(a for a in held if a.patient_id != patient.id)
            raise ConflictError(f"device {device.device_id} is assigned to {other.patient.code} from "
                                f"{other.valid_from.isoformat()} (assignment {other.id}): its readings then are "
                                "that patient's; end or correct that assignment first")  # fmt: skip
        if held and held[0].valid_from <= start:
            return  # already the patient's over the whole period (assignments do not overlap)
        if held:
            first = held[0]
            _no_overlap(session, device, start, first.valid_to, ignore=first.id)
            self._audit(session, actor, "update", "assignment", f"{device.device_id}->{patient.code}",
                        {"id": first.id, "before": {"valid_from": first.valid_from},
                         "after": {"valid_from": start}})  # fmt: skip
            first.valid_from = start
            return
        _no_overlap(session, device, start, end)
        leg = session.scalars(select(Assignment.leg).where(Assignment.device_id == device.id,
                                                           Assignment.patient_id == patient.id)).first()  # fmt: skip
        row = Assignment(device=device, patient=patient, valid_from=start, valid_to=end, leg=leg)
        session.add(row)
        session.flush()
        self._audit(session, actor, "create", "assignment", f"{device.device_id}->{patient.code}",
                    {"id": row.id, "valid_from": start, "valid_to": end, "leg": leg})  # fmt: skip

    def finish_reattribution(self, actor: Actor, row_id: int, points: int, note: str = "") -> s.ReattributionOut:
        """Mark a re-attribution carried out: its readings were rewritten (audited)."""
        with self._tx(actor, write=True) as session:
            what = f"re-attribution {row_id}"
            row = self._one(session, select(Reattribution).where(Reattribution.id == row_id), what)
            _same_clinic(actor, row.patient.clinic_id, what)
            row.state, row.done_at, row.points, row.note = "done", utcnow(), points, note
            self._audit(session, actor, "reattributed", "device", row.device.device_id,
                        {"id": row.id, "patient": row.patient.code, "points": points})  # fmt: skip
            return _reattribution_out(row)

    def list_reattributions(self, actor: Actor, state: str | None = None) -> list[s.ReattributionOut]:
        """Re-attributions, oldest first, optionally only those in ``state`` (``pending``: still to carry out)."""
        with self._tx(actor) as session:
            query = select(Reattribution).join(Patient, Reattribution.patient_id == Patient.id).order_by(
                Reattribution.id)  # fmt: skip
            if state is not None:
                query = query.where(Reattribution.state == state)
            if actor.clinic_id is not None:
                query = query.where(Patient.clinic_id == actor.clinic_id)
            return [_reattribution_out(r) for r in session.scalars(query)]

    # --- prescriptions and contraindications --------------------------------------------------------------------

    def prescribe(self, actor: Actor, data: s.PrescriptionIn) -> s.PrescriptionOut:
        """Record a prescription; refused on overlap, bad class or contraindication (unless overridden)."""
        with self._tx(actor, write=True) as session:
            patient = self._patient(session, actor, data.patient)
            rx = Prescription(patient=patient, garment_kind=data.garment_kind, valid_from=data.valid_from,
                              valid_to=data.valid_to, zones=[])  # fmt: skip
            _apply_prescription(rx, data.model_dump(exclude={"patient", "garment_kind", "valid_from",
                                                             "override_reason"}))  # fmt: skip
            self._check_prescription(session, actor, rx, data.override_reason, before=None)
            session.add(rx)
            session.flush()
            self._audit(session, actor, "create", "prescription", f"{data.patient}#{rx.id}",
                        data.model_dump())  # fmt: skip
            return _prescription_out(rx)

    def update_prescription(self, actor: Actor, rx_id: int, data: s.PrescriptionUpdate) -> s.PrescriptionOut:
        """Change a prescription (e.g. the daily wear target): a new version from ``effective_from``.

        The version ``rx_id`` is never rewritten for days it already applied to: it ends the day before the
        change and the returned new version (``supersedes`` = ``rx_id``) starts on it. A version that has not
        started yet is changed in place, and so is a change of ``valid_to`` alone (ending the prescription).
        Checked again like a new prescription.
        """
        with self._tx(actor, write=True) as session:
            what = f"prescription {rx_id}"
            rx = self._one(session, select(Prescription).where(Prescription.id == rx_id), what)
            _same_clinic(actor, rx.patient.clinic_id, what)
            changes = data.model_dump(exclude_unset=True, exclude={"override_reason", "effective_from",
                                                                   "confirm_reason"})  # fmt: skip
            effective = data.effective_from or clinic_today(rx.patient.clinic.timezone)
            _confirmed_raise(rx, changes, data.confirm_reason)
            confirm = data.confirm_reason
            if set(changes) <= {"valid_to"} or effective <= rx.valid_from:
                return self._edit_version(session, actor, rx, changes, effective, data.override_reason, confirm)
            return self._new_version(session, actor, rx, changes, effective, data.override_reason, confirm)

    def _edit_version(self, session: Session, actor: Actor, rx: Prescription, changes: dict[str, Any],
                      effective: date, override: str | None, confirm: str | None) -> s.PrescriptionOut:  # fmt: skip
        content = set(changes) - {"valid_to"}
        if content and rx.valid_from < clinic_today(rx.patient.clinic.timezone):
            raise InvalidError(f"prescription #{rx.id} applies since {rx.valid_from}: a change takes effect "
                               "after that day (effective_from), so the days already judged keep their "
                               "prescription")  # fmt: skip
        before = {key: getattr(rx, key) for key in changes}
        dose = _dose(rx)
        _apply_prescription(rx, changes)
        self._check_prescription(session, actor, rx, override, before=dose)
        self._audit(session, actor, "update", "prescription", f"{rx.patient.code}#{rx.id}",
                    {"before": before, "after": changes, "override_reason": override,
                     "confirm_reason": confirm})  # fmt: skip
        return _prescription_out(rx)

    def _new_version(self, session: Session, actor: Actor, rx: Prescription, changes: dict[str, Any],
                     effective: date, override: str | None, confirm: str | None) -> s.PrescriptionOut:  # fmt: skip
        if rx.valid_to is not None and effective > rx.valid_to:
            raise InvalidError(f"prescription #{rx.id} ended on {rx.valid_to}; effective_from {effective} is after")
        before = {key: getattr(rx, key) for key in changes}
        dose = _dose(rx)  # before rx ends: the new version runs to rx's end, so only a real change is riskier
        new = Prescription(patient=rx.patient, garment_kind=rx.garment_kind, valid_from=effective,
                           valid_to=rx.valid_to, zones=list(rx.zones), supersedes_id=rx.id,
                           override_physio_id=rx.override_physio_id, override_reason=rx.override_reason,
                           override_covers=rx.override_covers)  # fmt: skip
        for key in (*_RX_FIELDS, "legs"):
            if key != "valid_to":
                setattr(new, key, getattr(rx, key))
        _apply_prescription(new, changes)
        rx.valid_to = effective - timedelta(days=1)
        session.flush()
        # Judged against the version it follows: the same dose needs no new override, a riskier one does.
        self._check_prescription(session, actor, new, override, before=dose)
        session.add(new)
        session.flush()
        self._audit(session, actor, "update", "prescription", f"{rx.patient.code}#{new.id}",
                    {"supersedes": rx.id, "effective_from": effective, "before": before, "after": changes,
                     "override_reason": override, "confirm_reason": confirm})  # fmt: skip
        return _prescription_out(new)

    def _check_prescription(self, session: Session, actor: Actor, rx: Prescription, override: str | None,
                            before: Dose | None) -> None:  # fmt: skip
        """Refuse what cannot be followed, overlaps, and contraindicated compression without a physio's override.

        ``before``: the dose of the prescription before this change (None: a new one). A change that is not
        riskier (:func:`_riskier`) never needs an override, so lowering or ending one is never blocked; a new
        prescription or a riskier change does, whenever an active contraindication conflicts with it, and an
        override recorded earlier does not count: it covered the contraindications and the dose of its day.
        """
        band = _validate_prescription(rx)
        if rx.valid_to is not None and rx.valid_to < rx.valid_from:
            raise InvalidError("valid_to is before valid_from")
        overlapping = session.scalars(select(Prescription).where(
            Prescription.patient_id == rx.patient.id, Prescription.garment_kind == rx.garment_kind,
            Prescription.id != (rx.id or -1),
            or_(Prescription.valid_to.is_(None), Prescription.valid_to >= rx.valid_from),
            *([Prescription.valid_from <= rx.valid_to] if rx.valid_to else []))).first()  # fmt: skip
        if overlapping is not None:
            raise ConflictError(f"patient {rx.patient.code} already has a {rx.garment_kind} prescription "
                                f"(#{overlapping.id}) valid then; end it first (valid_to)")  # fmt: skip
        found = self._findings(session, rx, band)
        riskier = before is None or _riskier(before, _dose(rx))
        if not found or (not riskier and override is None):
            return
        if override is None:
            reasons = "; ".join(f.explanation for _, f in found)
            what = "contraindicated" if before is None else "this change makes a contraindicated prescription riskier"
            raise ContraindicatedError(f"{what} for {rx.patient.code}: {reasons}. A physio may override with "
                                       "override_reason (an earlier override covers only the contraindications "
                                       "and the dose it was given for).")  # fmt: skip
        if actor.physio_id is None:
            raise ForbiddenError("only a physio can override a contraindication (use a physio's token)")
        rx.override_physio_id = actor.physio_id
        rx.override_reason = override
        rx.override_covers = sorted({row_id for row_id, _ in found})

    @staticmethod
    def _findings(session: Session, rx: Prescription, band: Band | None) -> list[tuple[int, Finding]]:
        """Each active contraindication (by id) that conflicts with ``rx``, with the reason."""
        rows = session.scalars(select(Contraindication).where(
            Contraindication.patient_id == rx.patient.id,
            or_(Contraindication.resolved_on.is_(None), Contraindication.resolved_on > rx.valid_from))
            .order_by(Contraindication.id)).all()  # fmt: skip
        return [(row.id, finding) for row in rows
                for finding in conflicts([(row.kind, row.abpi)], rx.garment_kind, band)]  # fmt: skip

    def get_prescription(self, actor: Actor, rx_id: int) -> s.PrescriptionOut:
        """One prescription."""
        with self._tx(actor) as session:
            what = f"prescription {rx_id}"
            rx = self._one(session, select(Prescription).where(Prescription.id == rx_id), what)
            _same_clinic(actor, rx.patient.clinic_id, what)
            return _prescription_out(rx)

    def list_prescriptions(self, actor: Actor, patient: str | None = None) -> list[s.PrescriptionOut]:
        """Prescriptions, optionally of one patient."""
        with self._tx(actor) as session:
            query = select(Prescription).join(Patient, Prescription.patient_id == Patient.id).order_by(
                Patient.code, Prescription.valid_from)  # fmt: skip
            if patient is not None:
                query = query.where(Prescription.patient_id == self._patient(session, actor, patient).id)
            if actor.clinic_id is not None:
                query = query.where(Patient.clinic_id == actor.clinic_id)
            return [_prescription_out(rx) for rx in session.scalars(query)]

    def add_contraindication(self, actor: Actor, data: s.ContraindicationIn) -> s.ContraindicationOut:
        """Record a contraindication; later prescriptions are checked against it."""
        with self._tx(actor, write=True) as session:
            patient = self._patient(session, actor, data.patient)
            row = Contraindication(patient_id=patient.id, kind=data.kind, abpi=data.abpi, noted_on=data.noted_on,
                                   note=data.note)  # fmt: skip
            session.add(row)
            session.flush()
            self._audit(session, actor, "create", "contraindication", f"{data.patient}#{row.id}", data.model_dump())
            return _contraindication_out(row, patient.code)

    def resolve_contraindication(self, actor: Actor, row_id: int, data: s.ResolveIn) -> s.ContraindicationOut:
        """Mark a contraindication resolved (e.g. a DVT treated) from a date on."""
        with self._tx(actor, write=True) as session:
            what = f"contraindication {row_id}"
            row = self._one(session, select(Contraindication).where(Contraindication.id == row_id), what)
            patient = session.get(Patient, row.patient_id)
            assert patient is not None
            _same_clinic(actor, patient.clinic_id, what)
            if row.resolved_on is not None:
                raise ConflictError(f"contraindication {row_id} was already resolved on {row.resolved_on}")
            if data.resolved_on < row.noted_on:
                raise InvalidError("resolved_on is before noted_on")
            row.resolved_on = data.resolved_on
            self._audit(session, actor, "resolve", "contraindication", f"{patient.code}#{row.id}",
                        data.model_dump())  # fmt: skip
            return _contraindication_out(row, patient.code)

    def list_contraindications(self, actor: Actor, patient: str) -> list[s.ContraindicationOut]:
        """A patient's contraindications, resolved ones included."""
        with self._tx(actor) as session:
            row_patient = self._patient(session, actor, patient)
            rows = session.scalars(select(Contraindication).where(Contraindication.patient_id == row_patient.id)
                                   .order_by(Contraindication.noted_on, Contraindication.id))  # fmt: skip
            return [_contraindication_out(r, patient) for r in rows]

    # --- tokens, sessions, audit --------------------------------------------------------------------------------

    def create_token(self, actor: Actor, data: s.TokenIn) -> s.TokenOut:
        """An API token with a role; the token is returned this once."""
        token = new_token()
        with self._tx(actor, admin=True) as session:
            physio = None
            if data.physio is not None:
                physio = self._one(session, select(Physio).where(Physio.email == data.physio.lower()),
                                   f"physio {data.physio!r}")  # fmt: skip
            row = ApiToken(name=data.name, role=data.role, physio=physio, token_hash=token_hash(token))
            session.add(row)
            session.flush()
            self._audit(session, actor, "create", "token", data.name, data.model_dump())
            return s.TokenOut(id=row.id, name=row.name, role=row.role, token=token)

    def list_tokens(self, actor: Actor) -> list[s.TokenOut]:
        """Live API tokens (never their values)."""
        with self._tx(actor, admin=True) as session:
            rows = session.scalars(select(ApiToken).where(ApiToken.revoked_at.is_(None), ApiToken.expires_at.is_(None))
                                   .order_by(ApiToken.id))  # fmt: skip
            return [s.TokenOut(id=r.id, name=r.name, role=r.role) for r in rows]

    def revoke_token(self, actor: Actor, token_id: int) -> None:
        """Revoke an API token."""
        with self._tx(actor, admin=True) as session:
            row = self._one(session, select(ApiToken).where(ApiToken.id == token_id), f"token {token_id}")
            if row.revoked_at is not None:
                raise ConflictError(f"token {token_id} is already revoked")
            row.revoked_at = utcnow()
            self._audit(session, actor, "revoke", "token", row.name, {"id": token_id})

    def bootstrap_admin_token(self, name: str = BOOTSTRAP_TOKEN_NAME) -> str:
        """The first admin token (CLI ``devices token create`` and the demo use it)."""
        return self.create_token(SYSTEM, s.TokenIn(name=name, role="admin")).token or ""

    def ensure_admin_token(self, token: str, name: str = BOOTSTRAP_TOKEN_NAME) -> None:
        """Make ``token`` the bootstrap admin token (automated set-ups: compose, the demo); see :meth:`ensure_token`."""
        self.ensure_token(token, "admin", name)

    def ensure_token(self, token: str, role: Literal["admin", "ingester"], name: str) -> None:
        """Make ``token`` the bootstrap token ``name`` of ``role`` (set by the environment in automated set-ups).

        It replaces the previous one: every other live token of that name and
        role is revoked, so changing the environment's token retires the old value.
        """
        problem = token_problem(token)
        if problem is not None:
            raise InvalidError(f"the bootstrap {role} token {problem}; {TOKEN_ADVICE}")
        digest = token_hash(token)
        with self._factory() as session, session.begin():
            live = session.scalars(select(ApiToken).where(
                ApiToken.name == name, ApiToken.role == role, ApiToken.physio_id.is_(None),
                ApiToken.revoked_at.is_(None))).all()  # fmt: skip
            for old in live:
                if old.token_hash != digest:
                    old.revoked_at = utcnow()
                    self._audit(session, SYSTEM, "revoke", "token", name, {"id": old.id, "replaced": True})
            if any(old.token_hash == digest for old in live):
                return
            if session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first() is not None:
                raise ConflictError(f"the bootstrap {role} token is already in use as another (or a revoked) token")
            session.add(ApiToken(name=name, role=role, token_hash=digest))
            self._audit(session, SYSTEM, "create", "token", name, {"role": role, "bootstrap": True})

    def authenticate(self, token: str) -> Actor:
        """The actor a token (API token or web session) stands for; :class:`ForbiddenError` when it is not valid."""
        with self._factory() as session:
            row = session.scalars(select(ApiToken).where(ApiToken.token_hash == token_hash(token))).first()
            now = utcnow()
            if row is None or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
                raise ForbiddenError("unknown, revoked or expired token")
            if row.physio is not None:
                if not row.physio.active:
                    raise ForbiddenError("this physio is no longer active")
                return Actor(f"{row.physio.email} ({row.name})", row.role, row.physio.id, row.physio.clinic_id,
                             row.id)  # fmt: skip
            return Actor(f"token:{row.name}", row.role, token_id=row.id)

    def login(self, email: str, password: str, address: str = UNKNOWN_ADDRESS) -> str:
        """A physio's web session token for a right e-mail and password (valid :data:`SESSION_HOURS`).

        The same work is done whether the e-mail has an account or not (the password is hashed against a dummy);
        failures are counted per account and address (:attr:`logins`), audited, and past the free ones lock the
        account or address for a while (:class:`ThrottledError`, 429). Slow on purpose (scrypt): call it from a
        worker thread, never on an event loop.
        """
        account = email.strip().lower()
        with self._factory() as session:
            physio = session.scalars(select(Physio).where(Physio.email == account)).first()
            stored = physio.password_hash if physio is not None and physio.active else None
            physio_id, clinic_id = (physio.id, physio.clinic_id) if physio is not None else (None, None)
        self._attempt(account, address, lambda: password_verify(password, stored), actor_name=ANONYMOUS)
        token = new_token()
        with self._factory() as session, session.begin():
            session.add(ApiToken(name=WEB_SESSION, role="physio", physio_id=physio_id, token_hash=token_hash(token),
                                 expires_at=utcnow() + timedelta(hours=SESSION_HOURS)))  # fmt: skip
            self._audit(session, Actor(account, "physio", physio_id, clinic_id), "login", "physio", account,
                        {"address": address})  # fmt: skip
        return token

    def logout(self, token: str) -> None:
        """End a web session."""
        with self._factory() as session, session.begin():
            row = session.scalars(select(ApiToken).where(ApiToken.token_hash == token_hash(token))).first()
            if row is not None and row.revoked_at is None:
                row.revoked_at = utcnow()

    def audit(
        self, actor: Actor, entity: str | None = None, key: str | None = None, limit: int = 200
    ) -> list[s.AuditOut]:
        """The newest audit entries, optionally of one entity kind and key prefix (admin)."""
        with self._tx(actor, admin=True) as session:
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, 10_000)))
            if entity is not None:
                query = query.where(AuditEntry.entity == entity)
            if key is not None:
                query = query.where(AuditEntry.key.startswith(key, autoescape=True))
            return [s.AuditOut.model_validate(e) for e in session.scalars(query)]

    def patient_audit(self, actor: Actor, code: str, limit: int = 50) -> list[s.AuditOut]:
        """Audit entries about one patient (its record, prescriptions, contraindications, assignments)."""
        with self._tx(actor) as session:
            self._patient(session, actor, code)
            # Keyed per entity: a device or gateway may carry the same code in another clinic.
            query = select(AuditEntry).where(or_(
                and_(AuditEntry.entity == "patient", AuditEntry.key == code),
                and_(AuditEntry.entity.in_(("prescription", "contraindication", "episode")),
                     AuditEntry.key.startswith(f"{code}#", autoescape=True)),
                and_(AuditEntry.entity == "assignment", AuditEntry.key.endswith(f"->{code}", autoescape=True)),
            )).order_by(AuditEntry.id.desc()).limit(limit)  # fmt: skip
            return [s.AuditOut.model_validate(e) for e in session.scalars(query)]

    def record_episode_action(self, actor: Actor, code: str, episode: int, action: str,
                              changes: dict[str, Any]) -> None:  # fmt: skip
        """Audit what a physio did about one of the patient's monitor episodes (acknowledged, snoozed, noted,
        handed over; the workspace keeps the action itself in the monitor's state): entity ``episode``, key
        ``<patient>#<episode id>``, so :meth:`patient_audit` lists it. Another clinic's patient is not found."""
        with self._tx(actor, write=True) as session:
            self._patient(session, actor, code)
            self._audit(session, actor, action, "episode", f"{code}#{int(episode)}", changes)

    # --- what the ingester and the broker need ------------------------------------------------------------------

    def version(self) -> int:
        """Changes so far (the newest audit id): the ingester refreshes its cache when this moves."""
        with self._factory() as session:
            return int(session.scalar(select(func.coalesce(func.max(AuditEntry.id), 0))) or 0)

    def snapshot(self, actor: Actor) -> s.Snapshot:
        """Every device and every assignment with its patient code and clinic code, for tagging at ingest."""
        with self._tx(actor, snapshot=True) as session:
            version = int(session.scalar(select(func.coalesce(func.max(AuditEntry.id), 0))) or 0)
            device_query = select(Device.device_id).order_by(Device.device_id)
            query = (
                select(Device.device_id, Patient.code, Clinic.code, Assignment.valid_from, Assignment.valid_to)
                .join(Device, Assignment.device_id == Device.id)
                .join(Patient, Assignment.patient_id == Patient.id)
                .join(Clinic, Patient.clinic_id == Clinic.id)
                .order_by(Device.device_id, Assignment.valid_from)
            )
            if actor.clinic_id is not None:  # a physio sees their own clinic only
                device_query = device_query.where(Device.clinic_id == actor.clinic_id)
                query = query.where(Patient.clinic_id == actor.clinic_id)
            devices = list(session.scalars(device_query))
            rows = session.execute(query).all()
            entries = [s.SnapshotEntry(device_id=d, patient=p, clinic=c, from_ms=_ms(f), to_ms=_ms(t) if t else None)
                       for d, p, c, f, t in rows]  # fmt: skip
            return s.Snapshot(version=version, devices=devices, assignments=entries)

    def broker_accounts(self) -> BrokerAccounts:
        """Every live MQTT account with its hash and what it may publish or read."""
        with self._factory() as session:
            devices = session.scalars(select(Device).where(Device.revoked_at.is_(None)).order_by(Device.device_id))
            device_rows = [(d.device_id, d.mqtt_password_hash) for d in devices]
            live = select(Gateway).where(Gateway.revoked_at.is_(None)).order_by(Gateway.gateway_id)
            gateways = session.scalars(live)
            gateway_rows = []
            for gateway in gateways:
                relayed = session.scalars(
                    select(Device.device_id)
                    .where(Device.gateway_id == gateway.id, Device.revoked_at.is_(None))
                    .order_by(Device.device_id)
                )
                gateway_rows.append((gateway.gateway_id, gateway.mqtt_password_hash, tuple(relayed)))
            readers = session.scalars(select(ServiceAccount).where(ServiceAccount.revoked_at.is_(None))
                                      .order_by(ServiceAccount.username))  # fmt: skip
            return BrokerAccounts(tuple(device_rows), tuple(gateway_rows),
                                  tuple((a.username, a.mqtt_password_hash) for a in readers))  # fmt: skip


@dataclass(slots=True)
class _Unit:
    session: Session | None = None
    credentials_changed: bool = False


@dataclass(frozen=True, slots=True)
class BrokerAccounts:
    """Live MQTT accounts: devices (name, hash), gateways (name, hash, relayed devices), readers (name, hash)."""

    devices: tuple[tuple[str, str], ...]
    gateways: tuple[tuple[str, str, tuple[str, ...]], ...]
    readers: tuple[tuple[str, str], ...]


# --- helpers ---------------------------------------------------------------------------------------------------------


def may_publish(kind: str, name: str) -> list[str]:
    """The topics the broker's ACL lets this account publish on (devices.registry.broker renders the same):
    a garment its three topics; a gateway its own status (and, not listed here, its garments' topics)."""
    if kind == "gateway":
        return [f"{TOPIC_ROOT}/{name}/status"]
    return [f"{TOPIC_ROOT}/{name}/{channel}" for channel in CHANNELS]


def _same_clinic(actor: Actor, clinic_id: int, what: str) -> None:
    # A physio sees only their own clinic; to them another clinic's rows do not exist, in the very words used for
    # a row that does not exist at all (a different answer would tell them apart).
    if actor.clinic_id is not None and actor.clinic_id != clinic_id:
        raise NotFoundError(f"no {what}")


def _strong_enough(password: str, email: str, name: str) -> None:
    problem = password_problem(password, (email, name))
    if problem is not None:
        raise InvalidError(f"password: {problem}")


def _not_revoked(revoked_at: datetime | None, name: str) -> None:
    if revoked_at is not None:
        raise ConflictError(f"{name!r} was already revoked at {revoked_at.isoformat()}")


def _check_zones(kind: str, zones: Sequence[str]) -> None:
    if not zones:
        raise InvalidError("a garment has at least one zone")
    if len(set(zones)) != len(zones):
        raise InvalidError("zones repeat")
    if kind == "sock" and not set(zones) <= set(s.SOCK_ZONES):
        raise InvalidError(f"sock zones are {', '.join(s.SOCK_ZONES)}; got {', '.join(zones)}")
    if kind == "sock" and "ankle" not in zones:
        raise InvalidError("a sock measures at least the ankle (the prescribed class is an ankle pressure)")


def _no_overlap(session: Session, device: Device, start: datetime, end: datetime | None, ignore: int = -1) -> None:
    clash = session.scalars(select(Assignment).where(
        Assignment.device_id == device.id, Assignment.id != ignore,
        or_(Assignment.valid_to.is_(None), Assignment.valid_to > start),
        *([Assignment.valid_from < end] if end is not None else []))).first()  # fmt: skip
    if clash is not None:
        until = clash.valid_to.isoformat() if clash.valid_to else "open-ended"
        raise ConflictError(
            f"device {device.device_id} is assigned to {clash.patient.code} from "
            f"{clash.valid_from.isoformat()} to {until} (assignment {clash.id}); end that first"
        )


_RX_FIELDS: Final = (
    "valid_to", "class_system", "class_name", "ankle_min_mmhg", "ankle_max_mmhg", "zones", "wear_hours_per_day",
    "wear_days_per_week", "sessions_per_week", "session_min_minutes", "session_max_minutes", "max_chamber_mmhg",
    "out_of_range_tolerance_minutes", "max_silence_hours", "legs",
)  # fmt: skip


# More of any of these is more compression or later alerts: a riskier prescription.
DOSE_FIELDS: Final = (
    "ankle_min_mmhg", "ankle_max_mmhg", "wear_hours_per_day", "wear_days_per_week", "sessions_per_week",
    "session_min_minutes", "session_max_minutes", "max_chamber_mmhg", "out_of_range_tolerance_minutes",
    "max_silence_hours",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Dose:
    """What makes a prescription more or less risky: its amounts, its zones, how long it runs."""

    amounts: tuple[float | None, ...]
    zones: frozenset[str]
    valid_to: date | None


def _dose(rx: Prescription) -> Dose:
    return Dose(tuple(getattr(rx, key) for key in DOSE_FIELDS), frozenset(rx.zones or ()), rx.valid_to)


def _riskier(before: Dose, after: Dose) -> bool:
    """Whether ``after`` compresses more, longer, on more zones, or alerts later than ``before``."""
    more = any(new is not None and (old is None or new > old) for old, new in zip(before.amounts, after.amounts,
                                                                                   strict=True))  # fmt: skip
    longer = before.valid_to is not None and (after.valid_to is None or after.valid_to > before.valid_to)
    return more or longer or not after.zones <= before.zones


def _confirmed_raise(rx: Prescription, changes: dict[str, Any], reason: str | None) -> None:
    """Raising a boot's maximum chamber pressure can silence an over-pressure alert the registry cannot see (the
    monitor's): it needs the physio's reason, kept in the audit trail."""
    new = changes.get("max_chamber_mmhg")
    if rx.garment_kind != "boot" or new is None or rx.max_chamber_mmhg is None or new <= rx.max_chamber_mmhg:
        return
    if not reason:
        raise ConfirmationNeededError(
            f"raising the boot's maximum chamber pressure from {rx.max_chamber_mmhg:g} to {new:g} mmHg needs a reason "
            "(confirm_reason): check first that no over-pressure alert is open for this patient; the new maximum "
            "applies from its effective date only")  # fmt: skip


def _apply_prescription(rx: Prescription, values: dict[str, Any]) -> None:
    for key in _RX_FIELDS:
        if key in values and (values[key] is not None or key in ("valid_to", "ankle_min_mmhg", "ankle_max_mmhg")):
            setattr(rx, key, list(values[key]) if key == "zones" else values[key])


def _validate_prescription(rx: Prescription) -> Band | None:
    """The sock's ankle band; raises :class:`InvalidError` for a prescription that cannot be followed."""
    if not rx.zones:
        rx.zones = list(s.DEFAULT_ZONES[rx.garment_kind])
    _check_zones(rx.garment_kind, rx.zones)
    if rx.garment_kind == "boot":
        _validate_boot(rx)
        return None
    missing = [k for k in ("class_system", "wear_hours_per_day") if getattr(rx, k) is None]
    if missing:
        raise InvalidError(f"a sock prescription needs {', '.join(missing)}")
    rx.wear_days_per_week = rx.wear_days_per_week or 7
    try:
        band = band_for(rx.class_system, rx.class_name, rx.ankle_min_mmhg, rx.ankle_max_mmhg)  # type: ignore[arg-type]
    except ClassError as exc:
        raise InvalidError(str(exc)) from exc
    if rx.class_system != "explicit":
        rx.ankle_min_mmhg, rx.ankle_max_mmhg = band.low_mmhg, band.high_mmhg
    return band


def _validate_boot(rx: Prescription) -> None:
    needed = ("sessions_per_week", "session_min_minutes", "session_max_minutes", "max_chamber_mmhg")
    missing = [k for k in needed if getattr(rx, k) is None]
    if missing:
        raise InvalidError(f"a boot prescription needs {', '.join(missing)}")
    if rx.session_min_minutes > rx.session_max_minutes:  # type: ignore[operator]
        raise InvalidError("session_min_minutes is above session_max_minutes")
    if rx.class_system is not None or rx.class_name is not None:
        raise InvalidError("a boot prescription has no compression class; give max_chamber_mmhg")


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _physio_out(physio: Physio) -> s.PhysioOut:
    return s.PhysioOut(id=physio.id, clinic=physio.clinic.code, name=physio.name, email=physio.email,
                       active=physio.active)  # fmt: skip


def _patient_out(patient: Patient) -> s.PatientOut:
    return s.PatientOut(code=patient.code, clinic=patient.clinic.code, display_name=patient.display_name,
                        physio=patient.physio.email if patient.physio else None)  # fmt: skip


def _assignment_out(assignment: Assignment) -> s.AssignmentOut:
    return s.AssignmentOut(id=assignment.id, device_id=assignment.device.device_id, patient=assignment.patient.code,
                           valid_from=assignment.valid_from, valid_to=assignment.valid_to,
                           leg=assignment.leg)  # fmt: skip


def _prescription_out(rx: Prescription) -> s.PrescriptionOut:
    data = {key: getattr(rx, key) for key in s.PrescriptionOut.model_fields if hasattr(rx, key)}
    data.update(patient=rx.patient.code, override_by=rx.override_physio.email if rx.override_physio else None,
                supersedes=rx.supersedes_id)  # fmt: skip
    return s.PrescriptionOut.model_validate(data)


def _reattribution_out(row: Reattribution) -> s.ReattributionOut:
    return s.ReattributionOut(id=row.id, device_id=row.device.device_id, patient=row.patient.code,
                              clinic=row.patient.clinic.code, valid_from=row.valid_from, valid_to=row.valid_to,
                              state=row.state, requested_by=row.requested_by, requested_at=row.requested_at,
                              done_at=row.done_at, points=row.points, note=row.note)  # fmt: skip


def _contraindication_out(row: Contraindication, patient: str) -> s.ContraindicationOut:
    return s.ContraindicationOut(id=row.id, patient=patient, kind=row.kind, abpi=row.abpi, noted_on=row.noted_on,
                                 resolved_on=row.resolved_on, note=row.note)  # fmt: skip


def clinic_today(timezone: str) -> date:
    """Today's date in the clinic's time zone (a prescription change takes effect from a clinic day)."""
    return datetime.now(ZoneInfo(timezone)).date()


def today_utc() -> date:
    """Today's date in UTC (default start of a prescription made from the CLI)."""
    return datetime.now(UTC).date()
