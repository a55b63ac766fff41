"""The registry's tables (SQLAlchemy 2 declarative). Alembic migrations in ``migrations/`` create them.

Natural keys are what people and garments use (clinic code, patient code,
device id); integer ids join the tables. Every time is stored as naive UTC
and handed out timezone-aware, so SQLite and PostgreSQL behave the same.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Date, DateTime, Float, ForeignKey, Integer, MetaData, String, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Explicit constraint names keep migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A UTC instant: stored naive (UTC), returned aware; naive input is refused."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the registry; use timezone-aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base with the naming convention."""

    metadata = MetaData(naming_convention=NAMING)


class Clinic(Base):
    """A clinic: its code is what telemetry is tagged with, its time zone defines its days."""

    __tablename__ = "clinics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Physio(Base):
    """A physiotherapist of a clinic; receives the alerts of the patients they are responsible for."""

    __tablename__ = "physios"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    password_hash: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    clinic: Mapped[Clinic] = relationship()


class Patient(Base):
    """A client. ``code`` is pseudonymous and the only patient identifier that leaves the registry."""

    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(200), default=None)
    physio_id: Mapped[int | None] = mapped_column(ForeignKey("physios.id"), default=None, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    clinic: Mapped[Clinic] = relationship()
    physio: Mapped[Physio | None] = relationship()


class Gateway(Base):
    """A phone app or home hub relaying Bluetooth garments; an MQTT account of its own."""

    __tablename__ = "gateways"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    gateway_id: Mapped[str] = mapped_column(String(64), unique=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    mqtt_password_hash: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    clinic: Mapped[Clinic] = relationship()


class Device(Base):
    """A garment: sock/stocking or pneumatic boot, with its MQTT account and optional gateway."""

    __tablename__ = "devices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), unique=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    zones: Mapped[list[str]] = mapped_column(JSON)
    firmware: Mapped[str] = mapped_column(String(64), default="")
    serial: Mapped[str] = mapped_column(String(64), default="")
    gateway_id: Mapped[int | None] = mapped_column(ForeignKey("gateways.id"), default=None, index=True)
    mqtt_password_hash: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    clinic: Mapped[Clinic] = relationship()
    gateway: Mapped[Gateway | None] = relationship()


class Assignment(Base):
    """A device worn by a patient from ``valid_from`` until ``valid_to`` (open while ``None``)."""

    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    valid_to: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # Where the garment is worn: "left" or "right" leg, "both" (a boot pair, a two-leg garment); None: not recorded.
    leg: Mapped[str | None] = mapped_column(String(8), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    device: Mapped[Device] = relationship()
    patient: Mapped[Patient] = relationship()


class Prescription(Base):
    """What a patient should wear, per garment kind, valid over a range of dates (inclusive).

    One row is one *version*: a change makes a new row effective from a date and ends the previous one the
    day before (``supersedes_id``), so every past day keeps the prescription it was judged against.
    """

    __tablename__ = "prescriptions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    garment_kind: Mapped[str] = mapped_column(String(8))
    valid_from: Mapped[date] = mapped_column(Date)
    valid_to: Mapped[date | None] = mapped_column(Date, default=None)
    class_system: Mapped[str | None] = mapped_column(String(16), default=None)
    class_name: Mapped[str | None] = mapped_column(String(16), default=None)
    ankle_min_mmhg: Mapped[float | None] = mapped_column(Float, default=None)
    ankle_max_mmhg: Mapped[float | None] = mapped_column(Float, default=None)
    zones: Mapped[list[str]] = mapped_column(JSON)
    wear_hours_per_day: Mapped[float | None] = mapped_column(Float, default=None)
    wear_days_per_week: Mapped[int | None] = mapped_column(Integer, default=None)
    sessions_per_week: Mapped[int | None] = mapped_column(Integer, default=None)
    session_min_minutes: Mapped[float | None] = mapped_column(Float, default=None)
    session_max_minutes: Mapped[float | None] = mapped_column(Float, default=None)
    max_chamber_mmhg: Mapped[float | None] = mapped_column(Float, default=None)
    out_of_range_tolerance_minutes: Mapped[float] = mapped_column(Float, default=30.0)
    max_silence_hours: Mapped[float] = mapped_column(Float, default=24.0)
    override_physio_id: Mapped[int | None] = mapped_column(ForeignKey("physios.id"), default=None)
    override_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # Ids of the contraindications the override was given for (those that conflicted when the physio overrode).
    override_covers: Mapped[list[int] | None] = mapped_column(JSON, default=None)
    legs: Mapped[str | None] = mapped_column(String(8), default=None)  # "left", "right", "both"; None: not said
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("prescriptions.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    patient: Mapped[Patient] = relationship()
    override_physio: Mapped[Physio | None] = relationship()


class Contraindication(Base):
    """A recorded reason against compression (an ABPI measurement or a condition)."""

    __tablename__ = "contraindications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    abpi: Mapped[float | None] = mapped_column(Float, default=None)
    noted_on: Mapped[date] = mapped_column(Date)
    resolved_on: Mapped[date | None] = mapped_column(Date, default=None)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Reattribution(Base):
    """A request to give a device's stored readings of a period to a patient (re-tagging them in InfluxDB).

    ``state`` is ``pending`` until the readings were rewritten (``done``, with the number of ``points``).
    """

    __tablename__ = "reattributions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    valid_to: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(16), default="pending")
    requested_by: Mapped[str] = mapped_column(String(200))
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    points: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str] = mapped_column(Text, default="")
    device: Mapped[Device] = relationship()
    patient: Mapped[Patient] = relationship()


class ServiceAccount(Base):
    """A non-garment MQTT account (the ingester: read-only on every garment topic)."""

    __tablename__ = "service_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    mqtt_password_hash: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiToken(Base):
    """An API token (only its SHA-256 is stored) or a web session of a physio."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    physio_id: Mapped[int | None] = mapped_column(ForeignKey("physios.id"), default=None)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    physio: Mapped[Physio | None] = relationship()


class AuditEntry(Base):
    """One change: who, when, what, and the fields before and after. Written in the change's transaction."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    entity: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(300))
    changes: Mapped[dict[str, Any]] = mapped_column(JSON)
