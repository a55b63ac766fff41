"""``compression export fhir`` and ``compression report``: a patient's period as FHIR, a month as PDF and CSV.

Both read what the monitor reads: the registry's database (``COMPRESSION_MONITOR_REGISTRY_DATABASE_URL``),
InfluxDB and the monitor's state database (``COMPRESSION_MONITOR_*``), and the clinic's choices
(``COMPRESSION_RECORDS_*``). They act as the system, like ``compression devices``: whoever runs them can read the
databases anyway. The API (``/fhir``, ``/records``) is the way for a clinic's own systems.
"""

from __future__ import annotations

import asyncio
import json
import sys
import typing
from datetime import UTC, datetime
from pathlib import Path

import click

from records.model import Period, PeriodError

if typing.TYPE_CHECKING:
    from records.model import PatientRecord
    from records.settings import RecordsSettings

# The heavy imports (the monitor, InfluxDB, PDF and FHIR libraries) happen when a command runs, not when the
# `compression` command starts: every other subcommand would pay for them.


def _record(code: str, period: Period) -> tuple[PatientRecord, RecordsSettings]:
    from devices.registry.db import make_engine, migrate, session_factory
    from devices.registry.errors import RegistryError
    from devices.registry.service import SYSTEM, Registry
    from monitor.compliance import InfluxQueryError, InfluxReader
    from monitor.settings import MonitorSettings
    from records.settings import RecordsSettings
    from records.sources import open_sources

    monitor = MonitorSettings()
    settings = RecordsSettings()
    engine = make_engine(monitor.registry_database_url)
    migrate(engine)
    registry = Registry(session_factory(engine))
    reader = InfluxReader(monitor.influx_url, monitor.influx_username, monitor.influx_password, monitor.influx_token)
    source = open_sources(registry, settings, reader, monitor.influx_database, monitor.state_database_url)
    try:
        return asyncio.run(source.record(SYSTEM, code, period)), settings
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    except InfluxQueryError as exc:
        raise click.ClickException(f"InfluxDB could not be read: {exc}") from exc
    finally:
        source.monitor.state.close()
        engine.dispose()


def _write(out: str, data: bytes) -> None:
    if out == "-":
        sys.stdout.buffer.write(data)
        return
    Path(out).write_bytes(data)
    click.echo(f"wrote {out} ({len(data):,} bytes)", err=True)


@click.group()
def export() -> None:
    """Export a patient's record for the clinic's electronic health record."""


@export.command("fhir")
@click.option("--patient", required=True, help="The patient's pseudonymous code.")
@click.option("--from", "start", required=True, type=click.DateTime(["%Y-%m-%d"]), help="First local day.")
@click.option("--to", "end", required=True, type=click.DateTime(["%Y-%m-%d"]), help="Last local day (included).")
@click.option("--out", default=None, help="File to write ('-': standard output) [default: CODE_FROM_TO.fhir.json].")
def export_fhir(patient: str, start: datetime, end: datetime, out: str | None) -> None:
    """The patient's garments, their use, prescriptions, one Observation per day with data and the open episodes'
    Flags, as one FHIR R4 Bundle (JSON), validated before it is written (docs/records.md)."""
    from records import fhir

    try:
        period = Period(start.date(), end.date())
    except PeriodError as exc:
        raise click.BadParameter(str(exc), param_hint="--from/--to") from exc
    record, settings = _record(patient, period)
    bundle = fhir.bundle(record, settings)
    target = out or f"{patient}_{period.start}_{period.end}.fhir.json"
    _write(target, (json.dumps(bundle, indent=1, ensure_ascii=False) + "\n").encode())
    observations = sum(1 for _ in fhir.entries(bundle, "Observation"))
    click.echo(f"{len(bundle.get('entry', []))} resources, {observations} daily Observation(s) for "
               f"{sum(1 for d in record.days if d.has_data)} day(s) with data", err=True)  # fmt: skip


@click.command("report")
@click.option("--patient", required=True, help="The patient's pseudonymous code.")
@click.option("--month", required=True, metavar="YYYY-MM", help="The calendar month.")
@click.option("--format", "kind", type=click.Choice(["pdf", "csv", "both"]), default="both", show_default=True)
@click.option("--out", default=None, help="File name without extension [default: adherence-CODE-MONTH].")
def report_command(patient: str, month: str, kind: str, out: str | None) -> None:
    """The monthly adherence report of a patient: PDF for the record, CSV for the clinic's own tools."""
    from monitor.compliance import RTM_MIN_DAYS
    from records import report

    try:
        period = Period.month(month)
    except PeriodError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from exc
    if period.start > datetime.now(UTC).date():
        raise click.BadParameter("that month has not begun", param_hint="--month")
    record, _ = _record(patient, period)
    base = out or f"adherence-{patient}-{month}"
    if kind in ("pdf", "both"):
        _write(f"{base}.pdf", report.pdf(record))
    if kind in ("csv", "both"):
        _write(f"{base}.csv", report.csv_text(record).encode())
    s = report.summarise(record)
    rule = f"{'meets' if s.rtm_met else 'below'} the {RTM_MIN_DAYS}-day rule"
    click.echo(f"{s.data_days} of {s.days_complete} days with data ({rule}), {s.target_days} meeting the target, "
               f"{s.episodes} episode(s)", err=True)  # fmt: skip
