"""What comes into and goes out of the registry: pydantic models shared by the API, the CLI and CSV import.

Input models check shape (identifier patterns, ranges, time zones); the
service checks what needs the database (unknown ids, overlaps, contraindications).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from devices.protocol import ZONES
from devices.registry.classes import CONTRAINDICATION_KINDS, ClassSystem, ContraindicationKind
from devices.registry.secrets import PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH

# Device, gateway and patient codes follow the protocol's identifier rule: they end up in topics and tags.
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$")]
ClinicCode = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{1,63}$")]
# One plain address: a dot-atom local part (no quotes, commas, angle brackets or spaces that could smuggle a second
# recipient into an e-mail header) and a host name; the monitor checks it again before RCPT TO (monitor.recipients).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
Email = Annotated[str, StringConstraints(pattern=rf"^{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+$", max_length=254)]
# Display text: no control, line/paragraph separator or bidi override characters (they end up in e-mail headers).
_NOT_DISPLAY_TEXT = re.compile("[\x01-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _display_text(value: str) -> str:
    if _NOT_DISPLAY_TEXT.search(value):
        raise ValueError("may not contain line breaks, tabs or other control characters, or direction overrides")
    return value  # NUL is refused for every text by _Model


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                 AfterValidator(_display_text)]  # fmt: skip
GarmentKind = Literal["sock", "boot"]
# Where a garment is worn, and which legs a prescription is for: a boot pair or a two-leg garment is "both".
Leg = Literal["left", "right", "both"]
Role = Literal["admin", "physio", "ingester"]
ZoneName = Literal["foot", "ankle", "calf", "knee", "thigh"]
SOCK_ZONES: tuple[str, ...] = ("ankle", "calf", "thigh")
DEFAULT_ZONES: dict[str, list[str]] = {"sock": ["ankle", "calf"], "boot": ["foot", "ankle", "calf", "thigh"]}
assert set(SOCK_ZONES) <= set(ZONES)


def _known_zone(tz: str) -> str:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {tz!r} (use an IANA name such as America/Edmonton)") from exc
    return tz


def _aware(value: datetime) -> datetime:
    # A naive time is ambiguous for a clinic in another zone: refuse it rather than guess.
    if value.tzinfo is None:
        raise ValueError("give the time with its offset or Z, e.g. 2026-11-26T08:00:00Z")
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+01:00: not a ValueError, so pydantic would not catch it
        raise ValueError("the time is out of range once converted to UTC") from exc


TimeZone = Annotated[str, AfterValidator(_known_zone)]
Instant = Annotated[datetime, AfterValidator(_aware)]


class Model(BaseModel):
    """Base: unknown fields are an error, so a typo is never silently ignored; no NUL characters in text."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # PostgreSQL cannot store NUL in text; refuse it for every database alike.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("text may not contain NUL characters")
        return value


class Out(BaseModel):
    """Base of responses, built from ORM rows or dicts."""

    model_config = ConfigDict(from_attributes=True)


# --- clinics and people ---------------------------------------------------------------------------------------------


class ClinicIn(Model):
    code: ClinicCode = Field(description="Short code tagged on telemetry, e.g. `bowvalley`.")
    name: Name
    timezone: TimeZone = Field(description="IANA time zone defining the clinic's days, e.g. America/Edmonton.")


class ClinicOut(Out):
    code: str
    name: str
    timezone: str


class PhysioIn(Model):
    clinic: ClinicCode
    name: Name
    email: Email
    active: bool = True
    password: str | None = Field(default=None, min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH,
                                 description="For the web page; not guessable (see docs/registry.md).")  # fmt: skip


class PhysioUpdate(Model):
    name: Name | None = None
    email: Email | None = None
    active: bool | None = None
    password: str | None = Field(default=None, min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)
    current_password: str | None = Field(
        default=None, max_length=PASSWORD_MAX_LENGTH,
        description="A physio changing her own password gives the current one (an admin resetting it does not).",
    )


class PhysioOut(Out):
    id: int
    clinic: str
    name: str
    email: str
    active: bool


class PatientIn(Model):
    clinic: ClinicCode
    code: Identifier = Field(description="Pseudonymous code, the only patient identifier in telemetry.")
    display_name: Name | None = Field(default=None, description="Kept in the registry only.")
    physio: Email | None = Field(default=None, description="E-mail of the responsible physio.")


class PatientUpdate(Model):
    display_name: Name | None = None
    physio: Email | None = None


class PatientOut(Out):
    code: str
    clinic: str
    display_name: str | None
    physio: str | None


# --- garments and gateways ------------------------------------------------------------------------------------------


class GatewayIn(Model):
    gateway_id: Identifier
    clinic: ClinicCode
    description: str = Field(default="", max_length=200)


class GatewayOut(Out):
    gateway_id: str
    clinic: str
    description: str
    revoked: bool
    devices: list[str]


class DeviceIn(Model):
    device_id: Identifier
    clinic: ClinicCode
    kind: GarmentKind
    zones: list[ZoneName] | None = Field(default=None, description="Sensor zones; default by kind.")
    firmware: str = Field(default="", max_length=64)
    serial: str = Field(default="", max_length=64)
    gateway: Identifier | None = Field(default=None, description="Gateway relaying this garment, if any.")


class DeviceUpdate(Model):
    zones: list[ZoneName] | None = None
    firmware: str | None = Field(default=None, max_length=64)
    serial: str | None = Field(default=None, max_length=64)
    gateway: Identifier | None = None
    detach_gateway: bool = False


class DeviceOut(Out):
    device_id: str
    clinic: str
    kind: str
    zones: list[str]
    firmware: str
    serial: str
    gateway: str | None
    revoked: bool
    patient: str | None = Field(description="Patient holding the device now, if any.")


class Credentials(Out):
    """MQTT credentials, shown once: only a hash is kept."""

    username: str
    password: str
    may_publish: list[str]


# --- assignments, prescriptions, contraindications ------------------------------------------------------------------


class AssignmentIn(Model):
    device_id: Identifier
    patient: Identifier
    valid_from: Instant | None = Field(default=None, description="Default: now.")
    valid_to: Instant | None = None
    leg: Leg | None = Field(default=None, description="Worn on the left or right leg, or both (a boot pair).")


class AssignmentEnd(Model):
    valid_to: Instant | None = Field(default=None, description="Default: now.")


class AssignmentOut(Out):
    id: int
    device_id: str
    patient: str
    valid_from: datetime
    valid_to: datetime | None
    leg: str | None = None


class PrescriptionIn(Model):
    patient: Identifier
    garment_kind: GarmentKind
    valid_from: date
    valid_to: date | None = None
    class_system: ClassSystem | None = Field(default=None, description="Sock: ral, uk, us or explicit.")
    class_name: str | None = Field(default=None, max_length=16, description="Sock: class in that table, e.g. 2.")
    ankle_min_mmhg: float | None = Field(default=None, gt=0, le=120)
    ankle_max_mmhg: float | None = Field(default=None, gt=0, le=120)
    zones: list[ZoneName] | None = None
    wear_hours_per_day: float | None = Field(default=None, gt=0, le=24)
    wear_days_per_week: int | None = Field(default=None, ge=1, le=7)
    sessions_per_week: int | None = Field(default=None, ge=1, le=28)
    session_min_minutes: float | None = Field(default=None, gt=0, le=240)
    session_max_minutes: float | None = Field(default=None, gt=0, le=240)
    max_chamber_mmhg: float | None = Field(default=None, gt=0, le=200)
    out_of_range_tolerance_minutes: float = Field(default=30.0, ge=0, le=1440)
    max_silence_hours: float = Field(default=24.0, gt=0, le=24 * 14)
    legs: Leg | None = Field(default=None, description="The legs the garment is prescribed for.")
    override_reason: str | None = Field(
        default=None, min_length=10, max_length=2000,
        description="Prescribe despite a contraindication: the physio's recorded reason.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _dates_in_order(self) -> PrescriptionIn:
        if self.valid_to is not None and self.valid_to < self.valid_from:
            raise ValueError("valid_to is before valid_from")
        return self


class PrescriptionUpdate(Model):
    """Fields a physio changes on an existing prescription (the rest stays).

    A change of what is prescribed makes a new version effective from ``effective_from`` (default: today in
    the clinic) and ends this one the day before; only ``valid_to`` alone ends this version in place.
    """

    effective_from: date | None = Field(default=None, description="First day the change applies; default today.")
    valid_to: date | None = None
    class_system: ClassSystem | None = None
    class_name: str | None = Field(default=None, max_length=16)
    ankle_min_mmhg: float | None = Field(default=None, gt=0, le=120)
    ankle_max_mmhg: float | None = Field(default=None, gt=0, le=120)
    zones: list[ZoneName] | None = None
    wear_hours_per_day: float | None = Field(default=None, gt=0, le=24)
    wear_days_per_week: int | None = Field(default=None, ge=1, le=7)
    sessions_per_week: int | None = Field(default=None, ge=1, le=28)
    session_min_minutes: float | None = Field(default=None, gt=0, le=240)
    session_max_minutes: float | None = Field(default=None, gt=0, le=240)
    max_chamber_mmhg: float | None = Field(default=None, gt=0, le=200)
    out_of_range_tolerance_minutes: float | None = Field(default=None, ge=0, le=1440)
    max_silence_hours: float | None = Field(default=None, gt=0, le=24 * 14)
    legs: Leg | None = None
    override_reason: str | None = Field(default=None, min_length=10, max_length=2000)
    confirm_reason: str | None = Field(
        default=None, min_length=10, max_length=2000,
        description="Raising a boot's maximum chamber pressure: why (recorded in the audit trail).")  # fmt: skip


class PrescriptionOut(Out):
    id: int
    patient: str
    garment_kind: str
    valid_from: date
    valid_to: date | None
    class_system: str | None
    class_name: str | None
    ankle_min_mmhg: float | None
    ankle_max_mmhg: float | None
    zones: list[str]
    wear_hours_per_day: float | None
    wear_days_per_week: int | None
    sessions_per_week: int | None
    session_min_minutes: float | None
    session_max_minutes: float | None
    max_chamber_mmhg: float | None
    out_of_range_tolerance_minutes: float
    max_silence_hours: float
    override_by: str | None
    override_reason: str | None
    override_covers: list[int] | None = Field(
        description="Ids of the contraindications the override was given for; a riskier change needs a new one.")
    legs: str | None = None
    supersedes: int | None = Field(default=None, description="The version this one replaced, if any.")


class ReattributionIn(Model):
    """Give a device's readings stored in ``[valid_from, valid_to)`` to ``patient`` (e.g. a garment that sent before
    its assignment was recorded). The registry's assignments are made to say the same."""

    device_id: Identifier
    patient: Identifier
    valid_from: Instant
    valid_to: Instant

    @model_validator(mode="after")
    def _in_order(self) -> ReattributionIn:
        if self.valid_to <= self.valid_from:
            raise ValueError("valid_to must be after valid_from")
        return self


class ReattributionOut(Out):
    id: int
    device_id: str
    patient: str
    clinic: str
    valid_from: datetime
    valid_to: datetime
    state: str = Field(description="pending until the stored readings were rewritten, then done.")
    requested_by: str
    requested_at: datetime
    done_at: datetime | None
    points: int = Field(description="Readings rewritten (done).")
    note: str


class ContraindicationIn(Model):
    patient: Identifier
    kind: ContraindicationKind = Field(description=f"One of {', '.join(CONTRAINDICATION_KINDS)}.")
    abpi: float | None = Field(default=None, gt=0, le=3, description="Ankle-brachial pressure index (kind abpi).")
    noted_on: date
    note: str = Field(default="", max_length=2000)

    @model_validator(mode="after")
    def _abpi_given(self) -> ContraindicationIn:
        if (self.kind == "abpi") != (self.abpi is not None):
            raise ValueError("give abpi exactly when kind is abpi")
        return self


class ContraindicationOut(Out):
    id: int
    patient: str
    kind: str
    abpi: float | None
    noted_on: date
    resolved_on: date | None
    note: str


class ResolveIn(Model):
    resolved_on: date


# --- tokens, audit, ingester snapshot -------------------------------------------------------------------------------


class TokenIn(Model):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    role: Role
    physio: Email | None = Field(default=None, description="Required for the physio role.")

    @model_validator(mode="after")
    def _physio_for_role(self) -> TokenIn:
        if (self.role == "physio") != (self.physio is not None):
            raise ValueError("a physio token names its physio; other roles name none")
        return self


class TokenOut(Out):
    id: int
    name: str
    role: str
    token: str | None = Field(default=None, description="Shown once, at creation.")


class AuditOut(Out):
    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    key: str
    changes: dict[str, object]


class SnapshotEntry(Out):
    """One stretch of a device's history: who held it, from/to in epoch ms (``to_ms`` None: still)."""

    device_id: str
    patient: str
    clinic: str
    from_ms: int
    to_ms: int | None


class Snapshot(Out):
    """Everything the ingester needs to tag samples, with the registry version it came from."""

    version: int
    devices: list[str] = Field(description="Every registered device id (assigned or not).")
    assignments: list[SnapshotEntry]
