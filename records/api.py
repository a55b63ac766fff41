"""The records' routes on the registry's app: the FHIR export under ``/fhir`` and the monthly report.

:func:`install` adds them to an app made by ``devices.registry.api.create_app`` (or ``app_from_settings``); the
registry itself never imports this package. ``compression devices serve`` runs the registry with them
(compression/cli.py passes :func:`installer_from_settings` to it).

- ``GET /fhir/Patient/{code}/$everything?start=YYYY-MM-DD&end=YYYY-MM-DD``: the patient's record for the period as
  a FHIR R4 ``collection`` Bundle (``application/fhir+json``); a period of at most 92 days, ``end`` at most today.
- ``GET /fhir/CodeSystem/{id}``: the project's code systems (``compression``, ``flag``).
- ``GET /records/patients/{code}/report.pdf?month=YYYY-MM`` and ``report.csv``: the monthly report.
- ``GET /ui/records/patients/{code}/report.pdf|csv?month=YYYY-MM``: the same for a physio signed in on the web
  page (the registry's session cookie); the patient page's "Monthly report" button.

Authentication and isolation are the registry's: the same bearer tokens (``devices.registry.api.actor_of``), the
same error answers, and every read goes through the registry's service as the caller, so a physio token of clinic
A gets 404 for a patient of clinic B, exactly as ``/api/v1/patients/{code}`` answers, and an ingester token 403.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Final

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

from devices.registry.api import actor_of
from devices.registry.errors import ForbiddenError, InvalidError, NotFoundError
from devices.registry.service import Actor, Registry
from devices.registry.web import SESSION_COOKIE, UI
from records import codes, fhir, report
from records.model import PatientRecord, Period, PeriodError
from records.settings import RecordsSettings
from records.sources import RecordSource

FHIR_JSON: Final = "application/fhir+json"
FHIR_PREFIX: Final = "/fhir"
REPORT_PREFIX: Final = "/records"
Installer = Callable[[FastAPI], None]
Who = Annotated[Actor, Depends(actor_of)]
DateQuery = Annotated[date, Query(description="First local day of the clinic (YYYY-MM-DD).")]
MonthQuery = Annotated[str, Query(pattern=r"^\d{4}-\d{2}$", description="The calendar month, YYYY-MM.")]


def _period(start: date, end: date) -> Period:
    try:
        return Period(start, end)
    except PeriodError as exc:
        raise InvalidError(str(exc)) from exc


def _month(text: str) -> Period:
    try:
        return Period.month(text)
    except PeriodError as exc:
        raise InvalidError(str(exc)) from exc


def _web_actor(request: Request) -> Actor:
    """The physio signed in on the web page (the registry's session cookie); anyone else is told to sign in."""
    registry = request.app.state.registry
    assert isinstance(registry, Registry)
    token = request.cookies.get(SESSION_COOKIE)
    try:
        actor = registry.authenticate(token) if token else None
    except ForbiddenError:
        actor = None
    if actor is None or actor.role != "physio":
        raise NotFoundError("sign in on the web page first")
    return actor


WebWho = Annotated[Actor, Depends(_web_actor)]


def _report_response(record: PatientRecord, kind: str) -> Response:
    name = f"adherence-{record.patient.code}-{record.period.start:%Y-%m}.{kind}"
    disposition = {"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"}
    if kind == "csv":
        return Response(report.csv_text(record), media_type="text/csv; charset=utf-8", headers=disposition)
    return Response(report.pdf(record), media_type="application/pdf", headers=disposition)


def install(app: FastAPI, source: RecordSource, settings: RecordsSettings) -> FastAPI:
    """Add the FHIR export and the report routes to the registry's ``app``; returns ``app``."""
    router = APIRouter()

    @router.get(FHIR_PREFIX + "/Patient/{code}/$everything", tags=["fhir"], response_class=JSONResponse)
    async def everything(code: str, start: DateQuery, end: DateQuery, who: Who) -> Response:
        """The patient's record for a period as a FHIR R4 Bundle (Device, DeviceUseStatement, DeviceRequest,
        one Observation per day with data, Flag per open episode); the patient by pseudonymous code only."""
        if end >= datetime.now(UTC).date() + timedelta(days=2):
            raise InvalidError("the period cannot end in the future")
        record = await source.record(who, code, _period(start, end))
        body = json.dumps(fhir.bundle(record, settings), ensure_ascii=False)
        return Response(body, media_type=FHIR_JSON, headers={"Cache-Control": "no-store"})

    @router.get(FHIR_PREFIX + "/CodeSystem/{identifier}", tags=["fhir"], response_class=JSONResponse)
    def code_system(identifier: str, who: Who) -> Response:
        """One of the project's code systems (``compression``, ``flag``)."""
        if identifier not in codes.CODE_SYSTEM_IDS:
            raise NotFoundError(f"no code system {identifier!r}")
        resource = fhir.validated(codes.code_system(identifier))
        return Response(json.dumps(resource, ensure_ascii=False), media_type=FHIR_JSON)

    for kind in ("pdf", "csv"):
        _report_routes(router, source, kind)
    app.include_router(router)
    app.state.records_source = source
    app.state.records_reports = f"{UI}/records/patients"  # the patient page shows its report button
    return app


def _report_routes(router: APIRouter, source: RecordSource, kind: str) -> None:
    async def by_token(code: str, month: MonthQuery, who: Who) -> Response:
        return _report_response(await source.record(who, code, _month(month)), kind)

    async def by_session(code: str, month: MonthQuery, who: WebWho) -> Response:
        return _report_response(await source.record(who, code, _month(month)), kind)

    by_token.__doc__ = f"The patient's monthly adherence report as {kind.upper()}."
    by_session.__doc__ = by_token.__doc__ + " For a physio signed in on the web page."
    router.add_api_route(f"{REPORT_PREFIX}/patients/{{code}}/report.{kind}", by_token, methods=["GET"],
                         tags=["records"], response_class=Response, operation_id=f"report_{kind}")  # fmt: skip
    router.add_api_route(f"{UI}/records/patients/{{code}}/report.{kind}", by_session, methods=["GET"],
                         include_in_schema=False, response_class=Response)  # fmt: skip


def installer_from_settings() -> Installer:
    """An installer reading the monitor's settings (InfluxDB, state database) and the records' from the
    environment: what ``compression devices serve`` runs with."""
    from monitor.compliance import InfluxReader
    from monitor.settings import MonitorSettings
    from records.sources import open_sources

    def add(app: FastAPI) -> None:
        monitor = MonitorSettings()
        records = RecordsSettings()
        registry = app.state.registry
        assert isinstance(registry, Registry)
        reader = InfluxReader(monitor.influx_url, monitor.influx_username, monitor.influx_password,
                              monitor.influx_token)  # fmt: skip
        install(app, open_sources(registry, records, reader, monitor.influx_database, monitor.state_database_url),
                records)  # fmt: skip

    return add
