"""``compression devices ...``: the registry from the command line, as an admin named ``cli:<OS user>``.

Every command calls :class:`devices.registry.service.Registry`, so it is checked
and audited exactly like the API. The schema is migrated before each command
(idempotent), so a fresh database just works. Refusals (unknown ids,
duplicates, overlaps, bad input) are one ``error: ...`` line on stderr and exit
status 1; usage errors exit 2 as usual for click.
"""

from __future__ import annotations

import getpass
import json
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import BaseModel, ValidationError

from devices.registry import schemas as s
from devices.registry.classes import CONTRAINDICATION_KINDS
from devices.registry.csvimport import (
    KINDS,
    CsvImportError,
    credentials_csv,
    describe_validation_error,
    import_csv,
    write_private,
)
from devices.registry.errors import RegistryError

if TYPE_CHECKING:  # SQLAlchemy and Alembic load when a devices command runs, not with every `compression` command
    from sqlalchemy import Engine

    from devices.registry.service import Actor, Registry
    from devices.registry.settings import RegistrySettings

F = TypeVar("F", bound=Callable[..., Any])
LIST_SEPARATORS = ",;|"


class CliError(click.ClickException):
    """A refusal shown as one ``error: ...`` line on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class RegistryGroup(click.Group):
    """A group that turns registry, validation and database errors into :class:`CliError`."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return super().invoke(ctx)
        except CsvImportError as exc:
            for error in exc.errors:
                click.echo(f"{exc.source}:{error.line}: {error.message}", err=True)
            raise CliError(str(exc)) from exc
        except RegistryError as exc:
            raise CliError(str(exc)) from exc
        except ValidationError as exc:
            raise CliError(describe_validation_error(exc)) from exc
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise CliError(f"database: {str(cause).strip().splitlines()[0]}") from exc


# --- state: the database, opened and migrated on first use ----------------------------------------------------------


def _cli_actor() -> Actor:
    from devices.registry.service import Actor

    return Actor(f"cli:{_os_user()}", "admin")


def _today() -> str:
    """Today in UTC, ISO (the default day of prescriptions, contraindications, resolutions)."""
    return datetime.now(UTC).date().isoformat()


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass
class State:
    """What the ``devices`` group passes to its commands."""

    database_url: str | None
    actor: Actor = field(default_factory=_cli_actor)
    _registry: Registry | None = None
    _engine: Engine | None = None

    def settings(self) -> RegistrySettings:
        """Environment (``COMPRESSION_REGISTRY_*``, ``.env``), overridden by ``--database-url``."""
        from devices.registry.settings import RegistrySettings

        return RegistrySettings(database_url=self.database_url) if self.database_url else RegistrySettings()

    def engine(self) -> Engine:
        """The database, its schema brought up to date."""
        if self._engine is None:
            from devices.registry.db import make_engine, migrate

            self._engine = make_engine(self.settings().database_url)
            migrate(self._engine)
        return self._engine

    def registry(self) -> Registry:
        """The registry; when the broker's files are configured, they follow every credentials change."""
        if self._registry is None:
            from devices.registry.db import session_factory
            from devices.registry.service import Registry

            self._registry = Registry(session_factory(self.engine()))
            self._registry.on_credentials_changed = _broker_hook(self.settings(), self._registry)
        return self._registry

    def close(self) -> None:
        """Release the database connections."""
        if self._engine is not None:
            self._engine.dispose()


def _broker_hook(settings: RegistrySettings, registry: Registry) -> Callable[[], None] | None:
    if settings.broker_dir is None:
        return None
    folder = settings.broker_dir

    def sync() -> None:
        # Runs after the commit: a failure here must not hide credentials that are shown only once.
        try:
            from devices.registry.broker import BrokerSync

            BrokerSync(registry, folder, settings.broker_pid_file)()
        except (RegistryError, OSError, ImportError) as exc:
            click.echo(f"warning: the broker's files were not updated ({exc}); the change itself is stored", err=True)

    return sync


def _state() -> State:
    state = click.get_current_context().find_object(State)
    assert state is not None
    return state


def _registry() -> Registry:
    return _state().registry()


def _actor() -> Actor:
    return _state().actor


def current_registry() -> tuple[Registry, Actor]:
    """The registry and actor of the running ``compression devices`` command (for commands that other components
    add to this group: ``compression devices reattribute`` rewrites InfluxDB, which this package never touches)."""
    return _registry(), _actor()


# --- output ---------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _table(rows: Sequence[BaseModel], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)", err=True)
        return
    cells = [[_cell(getattr(row, column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(r[i]) for r in cells)) for i, column in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    click.echo(json.dumps(_plain(value), indent=2, ensure_ascii=False))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _record(row: BaseModel) -> None:
    width = max(len(name) for name in type(row).model_fields)
    for name in type(row).model_fields:
        click.echo(f"{name.ljust(width)}  {_cell(getattr(row, name))}")


def _show(rows: Sequence[BaseModel], columns: Sequence[str], as_json: bool) -> None:
    if as_json:
        _json(list(rows))
    else:
        _table(rows, columns)


def _credentials(what: str, creds: s.Credentials, as_json: bool) -> None:
    """MQTT credentials on stdout, the warning that they are shown only once on stderr."""
    if as_json:
        _json(creds)
    else:
        click.echo(f"username: {creds.username}\npassword: {creds.password}")
        if creds.may_publish:
            click.echo(f"may publish: {', '.join(creds.may_publish)}")
    click.echo(f"These MQTT credentials of {what} are shown only once (the registry keeps only a hash): store the "
               "password now. Lost? `rotate` issues a new one.", err=True)  # fmt: skip


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    for sep in LIST_SEPARATORS[1:]:
        text = text.replace(sep, LIST_SEPARATORS[0])
    return [item.strip() for item in text.split(LIST_SEPARATORS[0]) if item.strip()]


def _given(**values: Any) -> dict[str, Any]:
    """Only the options that were given (so ``exclude_unset`` updates change only those)."""
    return {k: v for k, v in values.items() if v is not None}


# --- the group ------------------------------------------------------------------------------------------------------


@click.group(cls=RegistryGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--database-url", default=None, metavar="URL",
              help="Registry database: sqlite:///path.db or postgresql://user:pass@host/db "
                   "[env COMPRESSION_REGISTRY_DATABASE_URL; default sqlite:///var/registry.db].")  # fmt: skip
@click.pass_context
def devices(ctx: click.Context, database_url: str | None) -> None:
    """The device registry: clinics, physios, patients, garments, gateways, prescriptions, tokens.

    Acts as an admin named cli:<OS user>; every change is checked and written
    to the audit trail like a change through the API. The database schema is
    created or upgraded automatically before each command. MQTT passwords and
    API tokens are printed once, when made: only hashes are kept.
    """
    state = State(database_url)
    ctx.obj = state
    ctx.call_on_close(state.close)


@devices.command()
def migrate() -> None:
    """Create or upgrade the registry's database schema (every command also does this first)."""
    from alembic.migration import MigrationContext
    from sqlalchemy import make_url

    state = _state()
    engine = state.engine()
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    url = make_url(state.settings().database_url).render_as_string(hide_password=True)
    click.echo(f"{url}: schema at revision {revision}")


# --- clinics and physios --------------------------------------------------------------------------------------------


@devices.group()
def clinic() -> None:
    """Clinics: the code tags telemetry, the time zone defines the clinic's days."""


@clinic.command("add")
@click.argument("code")
@click.option("--name", required=True, help="The clinic's name.")
@click.option("--timezone", required=True, help="IANA time zone, e.g. America/Edmonton.")
def clinic_add(code: str, name: str, timezone: str) -> None:
    """Register clinic CODE (lower-case letters, digits, - and _; e.g. bowvalley)."""
    out = _registry().create_clinic(_actor(), s.ClinicIn(code=code, name=name, timezone=timezone))
    click.echo(f"clinic {out.code} added")


@clinic.command("list")
@json_option
def clinic_list(as_json: bool) -> None:
    """List the clinics with their time zones."""
    _show(_registry().list_clinics(_actor()), ["code", "name", "timezone"], as_json)


@devices.group()
def physio() -> None:
    """Physiotherapists: they see their clinic's patients and receive their alerts."""


password_option = click.option(
    "--password", default=None, prompt=True, prompt_required=False, hide_input=True, confirmation_prompt=True,
    help="Set the web-page password (12 to 128 characters, not guessable: docs/registry.md). "
         "Give the flag alone to be prompted (hidden, twice).",
)  # fmt: skip


@physio.command("add")
@click.option("--clinic", required=True, help="Code of the physio's clinic.")
@click.option("--name", required=True, help="Full name.")
@click.option("--email", required=True, help="E-mail: identifies the physio and receives alerts.")
@click.option("--inactive", is_flag=True, help="Register as inactive (cannot log in, gets no alerts).")
@password_option
def physio_add(clinic: str, name: str, email: str, inactive: bool, password: str | None) -> None:
    """Register a physio of a clinic."""
    data = s.PhysioIn.model_validate(_given(clinic=clinic, name=name, email=email, password=password)
                                     | {"active": not inactive})  # fmt: skip
    out = _registry().create_physio(_actor(), data)
    click.echo(f"physio {out.email} added (id {out.id})")


@physio.command("list")
@click.option("--clinic", default=None, help="Only this clinic's physios.")
@json_option
def physio_list(clinic: str | None, as_json: bool) -> None:
    """List physios: of every clinic, or of one with --clinic."""
    _show(_registry().list_physios(_actor(), clinic), ["id", "email", "name", "clinic", "active"], as_json)


@physio.command("update")
@click.argument("email")
@click.option("--name", default=None, help="New full name.")
@click.option("--email", "new_email", default=None, help="New e-mail address.")
@click.option("--active/--inactive", default=None, help="Re-activate, or deactivate (no log-in, no alerts).")
@password_option
def physio_update(email: str, name: str | None, new_email: str | None, active: bool | None,
                  password: str | None) -> None:  # fmt: skip
    """Change the physio with e-mail EMAIL: only the options given change."""
    data = s.PhysioUpdate.model_validate(_given(name=name, email=new_email, active=active, password=password))
    if not data.model_fields_set:
        raise click.UsageError("nothing to change: give --name, --email, --active/--inactive or --password")
    out = _registry().update_physio(_actor(), email, data)
    click.echo(f"physio {out.email} updated")


# --- patients -------------------------------------------------------------------------------------------------------


@devices.group()
def patient() -> None:
    """Patients, known by a pseudonymous code (the only patient identifier in telemetry)."""


@patient.command("add")
@click.argument("code")
@click.option("--clinic", required=True, help="Code of the patient's clinic.")
@click.option("--display-name", default=None, help="Name shown to the clinic (kept in the registry only).")
@click.option("--physio", default=None, metavar="EMAIL", help="E-mail of the responsible physio.")
def patient_add(code: str, clinic: str, display_name: str | None, physio: str | None) -> None:
    """Register patient CODE (letters, digits, - and _, 3-64 characters)."""
    data = s.PatientIn.model_validate(_given(code=code, clinic=clinic, display_name=display_name, physio=physio))
    out = _registry().create_patient(_actor(), data)
    click.echo(f"patient {out.code} added")


@patient.command("list")
@click.option("--clinic", default=None, help="Only this clinic's patients.")
@click.option("--physio", default=None, metavar="EMAIL", help="Only the patients of this physio.")
@json_option
def patient_list(clinic: str | None, physio: str | None, as_json: bool) -> None:
    """List patients: of every clinic, or of one clinic or physio."""
    rows = _registry().list_patients(_actor(), clinic, physio)
    _show(rows, ["code", "clinic", "display_name", "physio"], as_json)


@patient.command("show")
@click.argument("code")
@json_option
def patient_show(code: str, as_json: bool) -> None:
    """Show patient CODE with their garments, prescriptions and contraindications."""
    registry, actor = _registry(), _actor()
    out = registry.get_patient(actor, code)
    assignments = registry.list_assignments(actor, patient=code)
    prescriptions = registry.list_prescriptions(actor, patient=code)
    contraindications = registry.list_contraindications(actor, code)
    if as_json:
        _json({"patient": out, "assignments": assignments, "prescriptions": prescriptions,
               "contraindications": contraindications})  # fmt: skip
        return
    _record(out)
    _section("assignments", assignments, ["id", "device_id", "valid_from", "valid_to"])
    _section("prescriptions", prescriptions, RX_COLUMNS)
    _section("contraindications", contraindications, ["id", "kind", "abpi", "noted_on", "resolved_on", "note"])


def _section(title: str, rows: Sequence[BaseModel], columns: Sequence[str]) -> None:
    click.echo(f"\n{title}:")
    if rows:
        _table(rows, columns)
    else:
        click.echo("  (none)")


@patient.command("update")
@click.argument("code")
@click.option("--display-name", default=None, help="New display name.")
@click.option("--clear-display-name", is_flag=True, help="Remove the display name.")
@click.option("--physio", default=None, metavar="EMAIL", help="New responsible physio.")
@click.option("--no-physio", is_flag=True, help="Remove the responsible physio.")
def patient_update(code: str, display_name: str | None, clear_display_name: bool, physio: str | None,
                   no_physio: bool) -> None:  # fmt: skip
    """Change patient CODE: only the options given change."""
    values = _given(display_name=display_name, physio=physio)
    values |= {"display_name": None} if clear_display_name else {}
    values |= {"physio": None} if no_physio else {}
    if not values:
        raise click.UsageError("nothing to change: give --display-name, --clear-display-name, --physio or --no-physio")
    out = _registry().update_patient(_actor(), code, s.PatientUpdate.model_validate(values))
    click.echo(f"patient {out.code} updated")


# --- gateways and devices -------------------------------------------------------------------------------------------


@devices.group()
def gateway() -> None:
    """Gateways (phone apps, home hubs) relaying garments; each has an MQTT account."""


@gateway.command("add")
@click.argument("gateway_id")
@click.option("--clinic", required=True, help="Code of the gateway's clinic.")
@click.option("--description", default="", help="Free text, e.g. whose phone.")
@json_option
def gateway_add(gateway_id: str, clinic: str, description: str, as_json: bool) -> None:
    """Register gateway GATEWAY_ID and print its MQTT credentials (shown only once)."""
    data = s.GatewayIn(gateway_id=gateway_id, clinic=clinic, description=description)
    _credentials(f"gateway {gateway_id}", _registry().create_gateway(_actor(), data), as_json)


@gateway.command("list")
@json_option
def gateway_list(as_json: bool) -> None:
    """List gateways and the garments each relays."""
    _show(_registry().list_gateways(_actor()), ["gateway_id", "clinic", "revoked", "devices", "description"], as_json)


@gateway.command("revoke")
@click.argument("gateway_id")
def gateway_revoke(gateway_id: str) -> None:
    """Cut gateway GATEWAY_ID off the broker for good (its garments can still connect directly)."""
    _registry().revoke(_actor(), "gateway", gateway_id)
    click.echo(f"gateway {gateway_id} revoked")


@gateway.command("rotate")
@click.argument("gateway_id")
@json_option
def gateway_rotate(gateway_id: str, as_json: bool) -> None:
    """Give gateway GATEWAY_ID a new MQTT password (shown only once); the old one stops working."""
    _credentials(f"gateway {gateway_id}", _registry().rotate_credentials(_actor(), "gateway", gateway_id), as_json)


@devices.group()
def device() -> None:
    """Garments: socks/stockings and pneumatic boots, each with an MQTT account."""


zones_help = "Sensor zones, comma-separated (foot, ankle, calf, knee, thigh); default by kind."


@device.command("add")
@click.argument("device_id")
@click.option("--clinic", required=True, help="Code of the garment's clinic.")
@click.option("--kind", required=True, type=click.Choice(["sock", "boot"]), help="Sock/stocking or pneumatic boot.")
@click.option("--zones", default=None, help=zones_help)
@click.option("--firmware", default="", help="Firmware version.")
@click.option("--serial", default="", help="Manufacturer's serial number.")
@click.option("--gateway", default=None, help="Gateway relaying this garment, if any.")
@json_option
def device_add(device_id: str, clinic: str, kind: str, zones: str | None, firmware: str, serial: str,
               gateway: str | None, as_json: bool) -> None:  # fmt: skip
    """Register garment DEVICE_ID and print its MQTT credentials (shown only once)."""
    data = s.DeviceIn.model_validate(_given(device_id=device_id, clinic=clinic, kind=kind, zones=_split(zones),
                                            firmware=firmware, serial=serial, gateway=gateway))  # fmt: skip
    _credentials(f"device {device_id}", _registry().create_device(_actor(), data), as_json)


DEVICE_COLUMNS = ["device_id", "clinic", "kind", "zones", "gateway", "patient", "revoked", "firmware", "serial"]


@device.command("list")
@click.option("--clinic", default=None, help="Only this clinic's garments.")
@json_option
def device_list(clinic: str | None, as_json: bool) -> None:
    """List garments with the patient holding each now."""
    _show(_registry().list_devices(_actor(), clinic), DEVICE_COLUMNS, as_json)


@device.command("show")
@click.argument("device_id")
@json_option
def device_show(device_id: str, as_json: bool) -> None:
    """Show garment DEVICE_ID and its assignment history."""
    registry, actor = _registry(), _actor()
    out = registry.get_device(actor, device_id)
    history = registry.list_assignments(actor, device_id=device_id)
    if as_json:
        _json({"device": out, "assignments": history})
        return
    _record(out)
    _section("assignments", history, ["id", "patient", "valid_from", "valid_to"])


@device.command("update")
@click.argument("device_id")
@click.option("--zones", default=None, help="Sensor zones, comma-separated.")
@click.option("--firmware", default=None, help="Firmware version.")
@click.option("--serial", default=None, help="Manufacturer's serial number.")
@click.option("--gateway", default=None, help="Relay through this gateway from now on.")
@click.option("--detach-gateway", is_flag=True, help="No gateway any more (the garment connects itself).")
def device_update(device_id: str, zones: str | None, firmware: str | None, serial: str | None, gateway: str | None,
                  detach_gateway: bool) -> None:  # fmt: skip
    """Change garment DEVICE_ID: only the options given change."""
    values = _given(zones=_split(zones), firmware=firmware, serial=serial, gateway=gateway)
    values |= {"detach_gateway": True} if detach_gateway else {}
    if not values:
        raise click.UsageError("nothing to change: give --zones, --firmware, --serial, --gateway or --detach-gateway")
    _registry().update_device(_actor(), device_id, s.DeviceUpdate.model_validate(values))
    click.echo(f"device {device_id} updated")


@device.command("revoke")
@click.argument("device_id")
def device_revoke(device_id: str) -> None:
    """Cut garment DEVICE_ID off the broker for good; its open assignment ends now."""
    _registry().revoke(_actor(), "device", device_id)
    click.echo(f"device {device_id} revoked")


@device.command("rotate")
@click.argument("device_id")
@json_option
def device_rotate(device_id: str, as_json: bool) -> None:
    """Give garment DEVICE_ID a new MQTT password (shown only once); the old one stops working."""
    _credentials(f"device {device_id}", _registry().rotate_credentials(_actor(), "device", device_id), as_json)


# --- assignments ----------------------------------------------------------------------------------------------------

time_help = "ISO 8601 time with offset or Z, e.g. 2026-11-26T08:00:00Z"


@devices.command()
@click.argument("device_id")
@click.argument("patient")
@click.option("--from", "valid_from", default=None, help=f"Start ({time_help}); default now.")
@click.option("--to", "valid_to", default=None, help=f"End ({time_help}); default open-ended.")
@click.option("--leg", type=click.Choice(["left", "right", "both"]), default=None,
              help="The leg the garment is worn on (both: a boot pair); each leg is judged apart.")  # fmt: skip
def assign(device_id: str, patient: str, valid_from: str | None, valid_to: str | None, leg: str | None) -> None:
    """Give garment DEVICE_ID to PATIENT (refused if it overlaps the garment's history)."""
    data = s.AssignmentIn.model_validate(_given(device_id=device_id, patient=patient, valid_from=valid_from,
                                                valid_to=valid_to, leg=leg))  # fmt: skip
    out = _registry().assign(_actor(), data)
    click.echo(f"assignment {out.id}: {out.device_id} -> {out.patient}" + (f" ({out.leg} leg)" if out.leg else "")
               + f" from {out.valid_from.isoformat()}"
               + (f" to {out.valid_to.isoformat()}" if out.valid_to else ""))  # fmt: skip


@devices.command()
@click.argument("assignment_id", type=int, required=False)
@click.option("--device", "device_id", default=None, help="End this garment's open assignment (instead of an id).")
@click.option("--at", "valid_to", default=None, help=f"End time ({time_help}); default now.")
def unassign(assignment_id: int | None, device_id: str | None, valid_to: str | None) -> None:
    """End assignment ASSIGNMENT_ID, or with --device the garment's open assignment."""
    if (assignment_id is None) == (device_id is None):
        raise click.UsageError("give an ASSIGNMENT_ID or --device DEVICE_ID (one of them)")
    registry, actor = _registry(), _actor()
    if assignment_id is None:
        assert device_id is not None
        assignment_id = _open_assignment(registry, actor, device_id)
    out = registry.end_assignment(actor, assignment_id, s.AssignmentEnd.model_validate(_given(valid_to=valid_to)))
    click.echo(f"assignment {out.id} ({out.device_id} -> {out.patient}) ended at {_cell(out.valid_to)}")


def _open_assignment(registry: Registry, actor: Actor, device_id: str) -> int:
    open_ = [a for a in registry.list_assignments(actor, device_id=device_id) if a.valid_to is None]
    if not open_:
        raise CliError(f"device {device_id} has no open assignment")
    return open_[-1].id


# --- prescriptions and contraindications ----------------------------------------------------------------------------

RX_HELP = {
    "patient": "Patient code.",
    "garment_kind": "sock (graduated compression) or boot (intermittent pneumatic compression).",
    "valid_from": "First day it applies (YYYY-MM-DD); default today (UTC).",
    "valid_to": "Last day it applies (YYYY-MM-DD); default open-ended.",
    "class_system": "Sock: class table (ral, uk, us) or explicit with --ankle-min-mmhg/--ankle-max-mmhg.",
    "class_name": "Sock: class in that table, e.g. 2.",
    "ankle_min_mmhg": "Sock, explicit: lowest ankle pressure (mmHg).",
    "ankle_max_mmhg": "Sock, explicit: highest ankle pressure (mmHg).",
    "zones": "Zones, comma-separated; default by garment kind.",
    "wear_hours_per_day": "Sock: hours to wear per day.",
    "wear_days_per_week": "Sock: days per week (default 7).",
    "sessions_per_week": "Boot: sessions per week.",
    "session_min_minutes": "Boot: shortest session (minutes).",
    "session_max_minutes": "Boot: longest session (minutes).",
    "max_chamber_mmhg": "Boot: highest chamber pressure (mmHg).",
    "out_of_range_tolerance_minutes": "Minutes out of the band before it counts (default 30).",
    "max_silence_hours": "Hours without data before an alert (default 24).",
    "override_reason": "Prescribe despite a contraindication: the reason (needs a physio's token, so not via the CLI "
    "as admin; recorded).",
}
RX_COLUMNS = ["id", "patient", "garment_kind", "valid_from", "valid_to", "class_system", "class_name", "ankle_min_mmhg",
              "ankle_max_mmhg", "wear_hours_per_day", "sessions_per_week", "max_chamber_mmhg"]  # fmt: skip


def _click_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    if typing.get_origin(base) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(base)])
    return {int: int, float: float}.get(base, str)


def model_options(model: type[BaseModel], skip: Sequence[str] = ()) -> Callable[[F], F]:
    """One ``--field-name`` option per field of ``model`` (all optional; pydantic checks what is required)."""

    def decorate(func: F) -> F:
        for name in reversed([n for n in model.model_fields if n not in skip]):
            info = model.model_fields[name]
            help_text = RX_HELP.get(name) or info.description or name.replace("_", " ")
            func = click.option(f"--{name.replace('_', '-')}", name, type=_click_type(info.annotation), default=None,
                                help=help_text)(func)  # fmt: skip
        return func

    return decorate


def _rx_values(values: dict[str, Any]) -> dict[str, Any]:
    given = _given(**values)
    if "zones" in given:
        given["zones"] = _split(given["zones"])
    return given


@devices.command()
@model_options(s.PrescriptionIn)
def prescribe(**values: Any) -> None:
    """Record a prescription (sock: class and daily wear; boot: sessions and pressure).

    Refused when it overlaps the patient's prescription of the same garment
    kind, names a class that does not exist, or conflicts with a recorded
    contraindication.
    """
    given = _rx_values(values)
    given.setdefault("valid_from", _today())
    if "patient" not in given or "garment_kind" not in given:
        raise click.UsageError("--patient and --garment-kind are required")
    out = _registry().prescribe(_actor(), s.PrescriptionIn.model_validate(given))
    click.echo(f"prescription {out.id} for {out.patient}: {_rx_summary(out)}")


def _rx_summary(rx: s.PrescriptionOut) -> str:
    until = f" to {rx.valid_to}" if rx.valid_to else ""
    if rx.garment_kind == "boot":
        return (f"boot from {rx.valid_from}{until}, {rx.sessions_per_week}x/week, {rx.session_min_minutes:g}-"
                f"{rx.session_max_minutes:g} min, at most {rx.max_chamber_mmhg:g} mmHg")  # fmt: skip
    return (f"sock from {rx.valid_from}{until}, ankle {rx.ankle_min_mmhg:g}-{rx.ankle_max_mmhg:g} mmHg, "
            f"{rx.wear_hours_per_day:g} h/day")  # fmt: skip


@devices.group()
def prescription() -> None:
    """Prescriptions: what each patient should wear, over a range of days."""


@prescription.command("list")
@click.option("--patient", default=None, help="Only this patient's prescriptions.")
@json_option
def prescription_list(patient: str | None, as_json: bool) -> None:
    """List prescriptions: of every patient, or of one with --patient."""
    _show(_registry().list_prescriptions(_actor(), patient), RX_COLUMNS, as_json)


@prescription.command("show")
@click.argument("prescription_id", type=int)
@json_option
def prescription_show(prescription_id: int, as_json: bool) -> None:
    """Show prescription PRESCRIPTION_ID in full."""
    out = _registry().get_prescription(_actor(), prescription_id)
    if as_json:
        _json(out)
    else:
        _record(out)


@prescription.command("update")
@click.argument("prescription_id", type=int)
@model_options(s.PrescriptionUpdate)
@click.option("--open-ended", is_flag=True, help="Remove the end date (valid_to).")
def prescription_update(prescription_id: int, open_ended: bool, **values: Any) -> None:
    """Change prescription PRESCRIPTION_ID (only the options given); checked again like a new one.

    A change of what is prescribed becomes a new version from --effective-from (default today); the old
    version ends the day before, so past days keep the prescription they were judged against.
    """
    given = _rx_values(values) | ({"valid_to": None} if open_ended else {})
    if not set(given) - {"effective_from"}:
        raise click.UsageError("nothing to change: give at least one option (see --help)")
    out = _registry().update_prescription(_actor(), prescription_id, s.PrescriptionUpdate.model_validate(given))
    version = f" (new version from {out.valid_from}; #{out.supersedes} ends the day before)" if out.supersedes else ""
    click.echo(f"prescription {out.id} for {out.patient}: {_rx_summary(out)}{version}")


@devices.group()
def contraindication() -> None:
    """Contraindications (ABPI, heart failure, DVT, arterial disease): prescriptions are checked against them."""


@contraindication.command("add")
@click.argument("patient")
@click.option("--kind", "kind", required=True, type=click.Choice(CONTRAINDICATION_KINDS),
              help="What was found.")  # fmt: skip
@click.option("--abpi", type=float, default=None, help="Ankle-brachial pressure index (with --kind abpi).")
@click.option("--noted-on", default=None, help="Date found (YYYY-MM-DD); default today (UTC).")
@click.option("--note", default="", help="Free text.")
def contraindication_add(patient: str, kind: str, abpi: float | None, noted_on: str | None, note: str) -> None:
    """Record a contraindication of PATIENT."""
    data = s.ContraindicationIn.model_validate(_given(patient=patient, kind=kind, abpi=abpi, note=note,
                                                      noted_on=noted_on or _today()))  # fmt: skip
    out = _registry().add_contraindication(_actor(), data)
    click.echo(f"contraindication {out.id} ({out.kind}) recorded for {out.patient}")


@contraindication.command("list")
@click.argument("patient")
@json_option
def contraindication_list(patient: str, as_json: bool) -> None:
    """List PATIENT's contraindications, resolved ones included."""
    rows = _registry().list_contraindications(_actor(), patient)
    _show(rows, ["id", "kind", "abpi", "noted_on", "resolved_on", "note"], as_json)


@contraindication.command("resolve")
@click.argument("contraindication_id", type=int)
@click.option("--on", "resolved_on", default=None, help="Resolved from this day (YYYY-MM-DD); default today (UTC).")
def contraindication_resolve(contraindication_id: int, resolved_on: str | None) -> None:
    """Mark contraindication CONTRAINDICATION_ID resolved (e.g. a DVT treated)."""
    data = s.ResolveIn.model_validate({"resolved_on": resolved_on or _today()})
    out = _registry().resolve_contraindication(_actor(), contraindication_id, data)
    click.echo(f"contraindication {out.id} of {out.patient} resolved on {out.resolved_on}")


# --- tokens, service accounts, audit --------------------------------------------------------------------------------


@devices.group()
def token() -> None:
    """API tokens for the REST API (admin, physio or ingester role)."""


@token.command("create")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "physio", "ingester"]), help="What it may do.")
@click.option("--physio", default=None, metavar="EMAIL", help="The physio a physio token acts as.")
def token_create(name: str, role: str, physio: str | None) -> None:
    """Create API token NAME and print it (shown only once: only its hash is kept)."""
    out = _registry().create_token(_actor(), s.TokenIn.model_validate(_given(name=name, role=role, physio=physio)))
    click.echo(out.token)
    click.echo(f"token {out.id} ({out.name}, {out.role}): shown only once, store it now "
               "(use as Authorization: Bearer <token>)", err=True)  # fmt: skip


@token.command("list")
@json_option
def token_list(as_json: bool) -> None:
    """List live API tokens (never their values)."""
    _show(_registry().list_tokens(_actor()), ["id", "name", "role"], as_json)


@token.command("revoke")
@click.argument("token_id", type=int)
def token_revoke(token_id: int) -> None:
    """Revoke API token TOKEN_ID (see `token list`)."""
    _registry().revoke_token(_actor(), token_id)
    click.echo(f"token {token_id} revoked")


@devices.group("service-account")
def service_account() -> None:
    """MQTT accounts of services: the ingester reads every garment topic."""


@service_account.command("add")
@click.argument("username")
@json_option
def service_account_add(username: str, as_json: bool) -> None:
    """Create the ingester's MQTT account USERNAME and print its credentials (shown only once)."""
    _credentials(f"service account {username}", _registry().create_service_account(_actor(), username), as_json)


@devices.command()
@click.option("--entity", default=None, help="Only this kind (clinic, physio, patient, device, assignment, ...).")
@click.option("--key", default=None, help="Only keys starting with this (a code or id).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000), help="At most this many.")
@json_option
def audit(entity: str | None, key: str | None, limit: int, as_json: bool) -> None:
    """Show the newest audit entries: who changed what, when."""
    rows = _registry().audit(_actor(), entity, key, limit)
    _show(rows, ["id", "at", "actor", "action", "entity", "key", "changes"], as_json)


# --- bulk import ----------------------------------------------------------------------------------------------------


@devices.command("import")
@click.argument("kind", type=click.Choice(list(KINDS)))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--credentials-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write generated MQTT credentials (devices, gateways) to this new file (mode 0600) "
                   "instead of printing them.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Check every row against the registry, then store nothing.")
def import_(kind: str, file: Path, credentials_out: Path | None, dry_run: bool) -> None:
    """Import FILE (CSV) of KIND: all rows or none.

    The header row names the columns with the field names of the kind (see
    docs/registry-csv.md); lists such as zones separate items with ; or |.
    Every bad row is reported with its line number, and then nothing is
    stored. Devices and gateways get MQTT credentials, printed (or written to
    --credentials-out) this once.
    """
    if credentials_out is not None and credentials_out.exists():
        raise CliError(f"{credentials_out} exists; credentials are never written over an existing file")
    result = import_csv(_registry(), _actor(), kind, file, dry_run=dry_run)
    if dry_run:
        click.echo(f"{file}: {result.rows} row(s) of {kind} would be imported (dry run, nothing stored)", err=True)
        return
    click.echo(f"{file}: imported {result.rows} row(s) of {kind}", err=True)
    if result.credentials:
        _import_credentials(result.credentials, credentials_out)


def _import_credentials(credentials: list[s.Credentials], out: Path | None) -> None:
    text = credentials_csv(credentials)
    if out is None:
        click.echo(text, nl=False)
        click.echo("The MQTT passwords above are shown only once: store them now.", err=True)
        return
    write_private(out, text)
    click.echo(f"{len(credentials)} MQTT credential(s) written to {out} (mode 0600); they are shown only once",
               err=True)  # fmt: skip


# --- running the registry -------------------------------------------------------------------------------------------


@devices.command("broker-sync")
def broker_sync() -> None:
    """Rewrite Mosquitto's account files from the registry and make the broker reload them.

    Writes devices.passwd, devices.acl, services.passwd and services.acl into
    COMPRESSION_REGISTRY_BROKER_DIR and (with ..._PID_FILE) sends the broker
    SIGHUP. The API server and every credentials-changing command do this by
    themselves; run it by hand after restoring a backup or when a sync failed.
    """
    from devices.registry.broker import BrokerSync

    settings = _state().settings()
    if settings.broker_dir is None:
        raise CliError("set COMPRESSION_REGISTRY_BROKER_DIR first")
    BrokerSync(_registry(), settings.broker_dir, settings.broker_pid_file)()
    reload = f", broker PID in {settings.broker_pid_file} told to reload" if settings.broker_pid_file else ""
    click.echo(f"wrote the broker's account files in {settings.broker_dir}{reload}", err=True)


@devices.command("broker-config")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for mosquitto.conf and services.acl [default: deploy/mosquitto].")  # fmt: skip
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if the files differ from the renderer's output.")
def broker_config(out: Path | None, check: bool) -> None:
    """Write the deployed broker's mosquitto.conf and the services' static ACL, or --check they are up to date.

    Both are generated (devices/registry/brokerconf.py), like the account files the
    registry writes; compression/localservers.py renders the same layout for the
    demo and the tests.
    """
    from devices.registry import brokerconf

    folder = out or brokerconf.DEPLOY_DIR
    if check:
        stale = brokerconf.stale(folder)
        if stale:
            raise CliError(f"out of date in {folder}: {', '.join(stale)} (compression devices broker-config)")
        click.echo(f"{folder}: up to date")
        return
    for path in brokerconf.write(folder):
        click.echo(f"wrote {path}")


@dataclass(frozen=True)
class ServeExtras:
    """Routes that a command above the registry adds to the app ``serve`` runs, each an ``install(app)`` (the
    ``compression`` command gives the FHIR export and reports of ``records/``). Found on the click context, so the
    registry imports none of them."""

    installers: tuple[Callable[[Any], None], ...] = ()


@devices.command()
@click.option("--host", default=None, help="Address to listen on [default: COMPRESSION_REGISTRY_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: COMPRESSION_REGISTRY_PORT or 8070].")
def serve(host: str | None, port: int | None) -> None:
    """Run the registry's REST API (/api/v1; /docs with COMPRESSION_REGISTRY_API_DOCS) and web page (/ui) with uvicorn.

    The schema is migrated first; with the broker files configured, the
    server keeps them in step with every credentials change.
    """
    import uvicorn

    from devices.registry.api import app_from_settings

    settings = _state().settings()
    settings = settings.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    app = app_from_settings(settings)
    extras = click.get_current_context().find_object(ServeExtras)
    for install in extras.installers if extras else ():
        install(app)
    docs = ", OpenAPI /docs" if settings.api_docs else ""
    click.echo(f"registry on http://{settings.host}:{settings.port} (API /api/v1{docs}, web page /ui)", err=True)
    # proxy_headers off: the app itself believes X-Forwarded-* from COMPRESSION_REGISTRY_TRUSTED_PROXIES only.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", proxy_headers=False)
