"""Bulk import of the registry from CSV files: ``compression devices import KIND FILE.csv``.

One file holds one kind of record. Its header row names the columns with the
field names of the kind's input schema (:mod:`devices.registry.schemas`);
columns may come in any order, optional ones may be left out, an empty cell
means "the default". List-valued fields (``zones``) separate their items with
``;`` or ``|``. Blank lines and lines whose first cell starts with ``#`` are
skipped. The format of each kind, with examples: ``docs/registry-csv.md``.

Import is all or nothing: every row is validated first and every bad row is
reported with its line number; only a file without errors is written, in one
:meth:`Registry.unit_of_work`, and a row the registry refuses (an unknown
clinic, a duplicate id) rolls the whole file back, again reporting every such row.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

from devices.registry import schemas as s
from devices.registry.errors import InvalidError, RegistryError

if TYPE_CHECKING:  # the service (SQLAlchemy) loads only when an import runs: `compression --help` stays quick
    from devices.registry.service import Actor, Registry

_LIST_SPLIT: Final = re.compile(r"[;|]")
CREDENTIALS_HEADER: Final = "# MQTT credentials, shown only once (the registry keeps only hashes): username,password"

Writer = Callable[["Registry", "Actor", Any], s.Credentials | None]


def _clinic(registry: Registry, actor: Actor, data: s.ClinicIn) -> None:
    registry.create_clinic(actor, data)


def _physio(registry: Registry, actor: Actor, data: s.PhysioIn) -> None:
    registry.create_physio(actor, data)


def _patient(registry: Registry, actor: Actor, data: s.PatientIn) -> None:
    registry.create_patient(actor, data)


def _gateway(registry: Registry, actor: Actor, data: s.GatewayIn) -> s.Credentials:
    return registry.create_gateway(actor, data)


def _device(registry: Registry, actor: Actor, data: s.DeviceIn) -> s.Credentials:
    return registry.create_device(actor, data)


def _assignment(registry: Registry, actor: Actor, data: s.AssignmentIn) -> None:
    registry.assign(actor, data)


def _prescription(registry: Registry, actor: Actor, data: s.PrescriptionIn) -> None:
    registry.prescribe(actor, data)


def _contraindication(registry: Registry, actor: Actor, data: s.ContraindicationIn) -> None:
    registry.add_contraindication(actor, data)


@dataclass(frozen=True, slots=True)
class CsvKind:
    """One importable kind: its input schema and the registry operation that stores a row."""

    model: type[s.Model]
    write: Writer

    @property
    def columns(self) -> list[str]:
        """Every column the kind accepts (the schema's field names, in order)."""
        return list(self.model.model_fields)

    @property
    def required(self) -> list[str]:
        """Columns that must be present and filled in."""
        return [name for name, info in self.model.model_fields.items() if info.is_required()]

    @property
    def list_columns(self) -> set[str]:
        """Columns holding a list (items separated by ``;`` or ``|``)."""
        return {name for name, info in self.model.model_fields.items() if "list[" in str(info.annotation)}


KINDS: Final[dict[str, CsvKind]] = {
    "clinics": CsvKind(s.ClinicIn, _clinic),
    "physios": CsvKind(s.PhysioIn, _physio),
    "patients": CsvKind(s.PatientIn, _patient),
    "gateways": CsvKind(s.GatewayIn, _gateway),
    "devices": CsvKind(s.DeviceIn, _device),
    "assignments": CsvKind(s.AssignmentIn, _assignment),
    "prescriptions": CsvKind(s.PrescriptionIn, _prescription),
    "contraindications": CsvKind(s.ContraindicationIn, _contraindication),
}


@dataclass(frozen=True, slots=True)
class RowError:
    """What is wrong with the record starting at ``line`` (1-based; the header is a line too)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class CsvImportError(InvalidError):
    """A file with bad rows (or a bad header): nothing of it was imported."""

    def __init__(self, source: str, errors: Sequence[RowError]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__(f"{len(self.errors)} problem(s) in {source}; nothing was imported")


@dataclass(slots=True)
class ImportResult:
    """What an import stored: how many rows, and the credentials generated for them (shown only once)."""

    kind: str
    rows: int
    dry_run: bool = False
    credentials: list[s.Credentials] = field(default_factory=list)


def describe_validation_error(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field: reason; field: reason``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


# --- reading ------------------------------------------------------------------------------------------------------


def _records(lines: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """Each non-blank, non-comment record with the line it starts on (quoted cells may span lines)."""
    reader = csv.reader(lines)
    end = 0
    for record in reader:
        start, end = end + 1, reader.line_num
        if not any(cell.strip() for cell in record) or record[0].lstrip().startswith("#"):
            continue
        yield start, record


def _check_header(kind: CsvKind, header: list[str], line: int) -> list[RowError]:
    errors = []
    unknown = [name for name in header if name not in kind.columns]
    if unknown:
        errors.append(RowError(line, f"unknown column(s) {', '.join(unknown)}; columns are {', '.join(kind.columns)}"))
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        errors.append(RowError(line, f"column(s) given twice: {', '.join(repeated)}"))
    missing = [name for name in kind.required if name not in header]
    if missing:
        errors.append(RowError(line, f"missing required column(s) {', '.join(missing)}"))
    return errors


def _row_data(kind: CsvKind, header: list[str], record: list[str]) -> dict[str, Any]:
    extra = [cell for cell in record[len(header) :] if cell.strip()]
    if extra:
        raise ValueError(f"{len(record)} cells but only {len(header)} columns")
    data: dict[str, Any] = {}
    for name, cell in zip(header, record, strict=False):
        value = cell.strip()
        if not value:
            continue  # empty cell: the field's default
        data[name] = [item.strip() for item in _LIST_SPLIT.split(value) if item.strip()] if (
            name in kind.list_columns) else value  # fmt: skip
    return data


def parse(kind_name: str, lines: Iterable[str], source: str = "<csv>") -> list[tuple[int, s.Model]]:
    """Every row validated against the kind's schema, with its line; :class:`CsvImportError` lists every bad row."""
    kind = _kind(kind_name)
    records = _records(lines)
    errors: list[RowError] = []
    rows: list[tuple[int, s.Model]] = []
    line = 1
    try:
        line, header = _header(kind, records, source)
        for line, record in records:
            try:
                rows.append((line, kind.model.model_validate(_row_data(kind, header, record))))
            except ValidationError as exc:
                errors.append(RowError(line, describe_validation_error(exc)))
            except ValueError as exc:
                errors.append(RowError(line, str(exc)))
    except csv.Error as exc:
        errors.append(RowError(line + 1, f"not readable as CSV: {exc}"))
    if errors:
        raise CsvImportError(source, errors)
    return rows


def _header(kind: CsvKind, records: Iterator[tuple[int, list[str]]], source: str) -> tuple[int, list[str]]:
    first = next(records, None)
    if first is None:
        raise CsvImportError(source, [RowError(1, "empty file: expected a header row of column names")])
    line, cells = first
    header = [name.strip() for name in cells]
    errors = _check_header(kind, header, line)
    if errors:
        raise CsvImportError(source, errors)
    return line, header


def _kind(name: str) -> CsvKind:
    if name not in KINDS:
        raise InvalidError(f"unknown kind {name!r}; use one of {', '.join(KINDS)}")
    return KINDS[name]


# --- writing ------------------------------------------------------------------------------------------------------


class _RollbackError(Exception):
    """Raised inside the unit of work to undo it (a refused row, or a dry run)."""


def import_rows(
    registry: Registry, actor: Actor, kind_name: str, rows: Sequence[tuple[int, s.Model]], *,
    source: str = "<csv>", dry_run: bool = False,
) -> ImportResult:  # fmt: skip
    """Store validated rows in one transaction; any refused row undoes all (every refused row is reported)."""
    from sqlalchemy.exc import IntegrityError

    kind = _kind(kind_name)
    result = ImportResult(kind_name, len(rows), dry_run)
    errors: list[RowError] = []
    try:
        with registry.unit_of_work():
            for line, data in rows:
                try:
                    credentials = kind.write(registry, actor, data)
                except RegistryError as exc:
                    errors.append(RowError(line, str(exc)))
                    continue
                except IntegrityError as exc:
                    errors.append(RowError(line, f"conflicts with what is stored: {exc.orig}"))
                    break  # the transaction cannot go on after a failed statement
                if credentials is not None:
                    result.credentials.append(credentials)
            if errors or dry_run:
                raise _RollbackError
    except _RollbackError:
        if errors:
            raise CsvImportError(source, errors) from None
        result.credentials.clear()  # a dry run's passwords were never stored
    return result


def import_csv(registry: Registry, actor: Actor, kind_name: str, path: Path, *, dry_run: bool = False) -> ImportResult:
    """Validate a whole file, then store it all in one transaction (or nothing, with every bad row reported)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = parse(kind_name, fh, str(path))
    return import_rows(registry, actor, kind_name, rows, source=str(path), dry_run=dry_run)


def credentials_csv(credentials: Iterable[s.Credentials]) -> str:
    """``username,password`` lines under a comment (the format ``compression simulate --credentials`` reads)."""
    lines = [CREDENTIALS_HEADER]
    lines += [f"{c.username},{c.password}" for c in credentials]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (0600); never overwrite an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
