"""The registry's REST API (FastAPI; OpenAPI at ``/docs`` and ``/openapi.json`` when ``api_docs`` is on).

Authentication: ``Authorization: Bearer <token>``. Roles: ``admin`` (everything),
``physio`` (read and write their own clinic's patients, prescriptions,
contraindications and assignments), ``ingester`` (the enrichment snapshot only).
Errors are JSON ``{"detail": "..."}``: 401 without a valid token (before the
body is read), 403 for a role that may not, 404 for an unknown id (or another
clinic's, alike), 409 for a conflict (duplicate id, overlapping assignment or
prescription, contraindication), 413 for a body over the limit, 422 for input
that cannot be right (never echoing it), 429 after too many wrong passwords.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.errors import ForbiddenError, InvalidError, RegistryError, ThrottledError
from devices.registry.guards import BearerFirst, SecurityHeaders
from devices.registry.logins import LoginGuard
from devices.registry.service import BOOTSTRAP_INGESTER_TOKEN_NAME, UNKNOWN_ADDRESS, Actor, Registry
from devices.registry.settings import RegistrySettings

API_PREFIX = "/api/v1"
# Password hashes (scrypt, ~50 ms of CPU each) computed at once by the web page's worker threads; more wait their
# turn, so sign-ins cannot take every core from the rest of the server.
PASSWORD_WORK_CONCURRENCY = 1
_bearer = HTTPBearer(auto_error=False, description="An API token: `compression devices token create`.")


class Problem(BaseModel):
    """An error: one sentence saying what was wrong."""

    detail: str


class ServiceAccountIn(BaseModel):
    """An MQTT account for a service (the ingester)."""

    model_config = ConfigDict(extra="forbid")
    username: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{2,63}$")] = Field(
        description="MQTT user name, e.g. svc.ingest (a dot never appears in a device id, so they cannot collide)."
    )
    role: str = "ingester"


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (400, 401, 403, 404, 409)}


def registry_of(request: Request) -> Registry:
    """The app's registry."""
    registry = request.app.state.registry
    assert isinstance(registry, Registry)
    return registry


def actor_of(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Actor:
    """The caller, from the bearer token (checked already by :class:`~devices.registry.guards.BearerFirst`)."""
    known = getattr(request.state, "actor", None)
    if isinstance(known, Actor):
        return known
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _UnauthorizedError("missing bearer token (Authorization: Bearer <token>)")
    try:
        return registry_of(request).authenticate(credentials.credentials)
    except ForbiddenError as exc:
        raise _UnauthorizedError(str(exc)) from exc


class _UnauthorizedError(Exception):
    pass


Reg = Annotated[Registry, Depends(registry_of)]
Who = Annotated[Actor, Depends(actor_of)]
# Row ids are positive 32-bit integers (INTEGER columns); a larger one would overflow the database driver: 500.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _routes() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, responses=_ERRORS)
    for add in (_clinic_routes, _people_routes, _garment_routes, _care_routes, _admin_routes):
        add(router)
    return router


def _clinic_routes(r: APIRouter) -> None:
    @r.post("/clinics", status_code=201, tags=["clinics"])
    def create_clinic(body: s.ClinicIn, reg: Reg, who: Who) -> s.ClinicOut:
        """Register a clinic (admin)."""
        return reg.create_clinic(who, body)

    @r.get("/clinics", tags=["clinics"])
    def list_clinics(reg: Reg, who: Who) -> list[s.ClinicOut]:
        """Clinics you may see."""
        return reg.list_clinics(who)

    @r.get("/clinics/{code}", tags=["clinics"])
    def get_clinic(code: str, reg: Reg, who: Who) -> s.ClinicOut:
        """One clinic."""
        return reg.get_clinic(who, code)


def _people_routes(r: APIRouter) -> None:
    @r.post("/physios", status_code=201, tags=["physios"])
    def create_physio(body: s.PhysioIn, reg: Reg, who: Who) -> s.PhysioOut:
        """Register a physio (admin)."""
        return reg.create_physio(who, body)

    @r.get("/physios", tags=["physios"])
    def list_physios(reg: Reg, who: Who, clinic: str | None = None) -> list[s.PhysioOut]:
        """Physios, optionally of one clinic."""
        return reg.list_physios(who, clinic)

    @r.patch("/physios/{email}", tags=["physios"])
    def update_physio(email: str, body: s.PhysioUpdate, reg: Reg, who: Who, request: Request) -> s.PhysioOut:
        """Change a physio (admin), or your own password (physio: give `current_password` too).

        A new password ends every other web session of the physio; a wrong current password counts like a failed
        sign-in (429 after too many).
        """
        return reg.update_physio(who, email, body, client_address(request))

    @r.post("/patients", status_code=201, tags=["patients"])
    def create_patient(body: s.PatientIn, reg: Reg, who: Who) -> s.PatientOut:
        """Register a patient under a pseudonymous code."""
        return reg.create_patient(who, body)

    @r.get("/patients", tags=["patients"])
    def list_patients(reg: Reg, who: Who, clinic: str | None = None, physio: str | None = None) -> list[s.PatientOut]:
        """Patients, optionally of one clinic or physio (by e-mail)."""
        return reg.list_patients(who, clinic, physio)

    @r.get("/patients/{code}", tags=["patients"])
    def get_patient(code: str, reg: Reg, who: Who) -> s.PatientOut:
        """One patient."""
        return reg.get_patient(who, code)

    @r.patch("/patients/{code}", tags=["patients"])
    def update_patient(code: str, body: s.PatientUpdate, reg: Reg, who: Who) -> s.PatientOut:
        """Change a patient's display name or responsible physio."""
        return reg.update_patient(who, code, body)

    @r.get("/patients/{code}/audit", tags=["patients"])
    def patient_audit(
        code: str, reg: Reg, who: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 50
    ) -> list[s.AuditOut]:
        """Changes to one patient's record, prescriptions, contraindications and assignments."""
        return reg.patient_audit(who, code, limit)


def _garment_routes(r: APIRouter) -> None:
    @r.post("/gateways", status_code=201, tags=["gateways"])
    def create_gateway(body: s.GatewayIn, reg: Reg, who: Who) -> s.Credentials:
        """Register a gateway (admin). The MQTT password is in this response only."""
        return reg.create_gateway(who, body)

    @r.get("/gateways", tags=["gateways"])
    def list_gateways(reg: Reg, who: Who) -> list[s.GatewayOut]:
        """Gateways and the garments each relays."""
        return reg.list_gateways(who)

    @r.get("/gateways/{gateway_id}", tags=["gateways"])
    def get_gateway(gateway_id: str, reg: Reg, who: Who) -> s.GatewayOut:
        """One gateway."""
        return reg.get_gateway(who, gateway_id)

    @r.post("/devices", status_code=201, tags=["devices"])
    def create_device(body: s.DeviceIn, reg: Reg, who: Who) -> s.Credentials:
        """Register a garment (admin). The MQTT password is in this response only."""
        return reg.create_device(who, body)

    @r.get("/devices", tags=["devices"])
    def list_devices(reg: Reg, who: Who, clinic: str | None = None) -> list[s.DeviceOut]:
        """Garments, optionally of one clinic."""
        return reg.list_devices(who, clinic)

    @r.get("/devices/{device_id}", tags=["devices"])
    def get_device(device_id: str, reg: Reg, who: Who) -> s.DeviceOut:
        """One garment and who holds it now."""
        return reg.get_device(who, device_id)

    @r.patch("/devices/{device_id}", tags=["devices"])
    def update_device(device_id: str, body: s.DeviceUpdate, reg: Reg, who: Who) -> s.DeviceOut:
        """Change a garment's zones, firmware, serial or gateway (admin)."""
        return reg.update_device(who, device_id, body)

    @r.post("/devices/{device_id}/reattributions", tags=["devices"], status_code=201)
    def reattribute(device_id: str, body: s.ReattributionIn, reg: Reg, who: Who) -> s.ReattributionOut:
        """Give the device's stored readings of a period to a patient (audited; asking again returns the same
        request). The monitor rewrites the readings and recomputes those days; ``state`` says when it has."""
        if body.device_id != device_id:
            raise InvalidError("device_id in the body differs from the path")
        return reg.request_reattribution(who, body)

    @r.get("/reattributions", tags=["devices"])
    def list_reattributions(reg: Reg, who: Who, state: str | None = None) -> list[s.ReattributionOut]:
        """Re-attributions of stored readings, optionally only ``pending`` or ``done`` ones."""
        return reg.list_reattributions(who, state)

    for kind in ("device", "gateway"):
        _credential_routes(r, kind)


def _credential_routes(r: APIRouter, kind: str) -> None:
    def revoke(name: str, reg: Reg, who: Who) -> Response:
        reg.revoke(who, kind, name)
        return Response(status_code=204)

    def rotate(name: str, reg: Reg, who: Who) -> s.Credentials:
        return reg.rotate_credentials(who, kind, name)

    revoke.__doc__ = f"Revoke a {kind}: the broker refuses it from the next reload on (admin)."
    rotate.__doc__ = f"New MQTT credentials for a {kind}, shown in this response only (admin)."
    r.add_api_route(f"/{kind}s/{{name}}/revoke", revoke, methods=["POST"], status_code=204, tags=[f"{kind}s"],
                    operation_id=f"revoke_{kind}", response_class=Response)  # fmt: skip
    r.add_api_route(f"/{kind}s/{{name}}/credentials", rotate, methods=["POST"], tags=[f"{kind}s"],
                    operation_id=f"rotate_{kind}_credentials", response_model=s.Credentials)  # fmt: skip


def _care_routes(r: APIRouter) -> None:
    @r.post("/assignments", status_code=201, tags=["assignments"])
    def assign(body: s.AssignmentIn, reg: Reg, who: Who) -> s.AssignmentOut:
        """Give a garment to a patient from a time on (default now); overlaps are refused with 409."""
        return reg.assign(who, body)

    @r.get("/assignments", tags=["assignments"])
    def list_assignments(
        reg: Reg, who: Who, device_id: str | None = None, patient: str | None = None
    ) -> list[s.AssignmentOut]:
        """Assignment history."""
        return reg.list_assignments(who, device_id, patient)

    @r.post("/assignments/{assignment_id}/end", tags=["assignments"])
    def end_assignment(assignment_id: RowId, body: s.AssignmentEnd, reg: Reg, who: Who) -> s.AssignmentOut:
        """End an open assignment (default now)."""
        return reg.end_assignment(who, assignment_id, body)

    @r.post("/prescriptions", status_code=201, tags=["prescriptions"])
    def prescribe(body: s.PrescriptionIn, reg: Reg, who: Who) -> s.PrescriptionOut:
        """Prescribe; 409 when it overlaps another or a contraindication forbids it (physio override possible)."""
        return reg.prescribe(who, body)

    @r.get("/prescriptions", tags=["prescriptions"])
    def list_prescriptions(reg: Reg, who: Who, patient: str | None = None) -> list[s.PrescriptionOut]:
        """Prescriptions, optionally of one patient."""
        return reg.list_prescriptions(who, patient)

    @r.get("/prescriptions/{rx_id}", tags=["prescriptions"])
    def get_prescription(rx_id: RowId, reg: Reg, who: Who) -> s.PrescriptionOut:
        """One prescription."""
        return reg.get_prescription(who, rx_id)

    @r.patch("/prescriptions/{rx_id}", tags=["prescriptions"])
    def update_prescription(rx_id: RowId, body: s.PrescriptionUpdate, reg: Reg, who: Who) -> s.PrescriptionOut:
        """Change a prescription (e.g. the daily wear target); checked like a new one."""
        return reg.update_prescription(who, rx_id, body)

    @r.post("/contraindications", status_code=201, tags=["contraindications"])
    def add_contraindication(body: s.ContraindicationIn, reg: Reg, who: Who) -> s.ContraindicationOut:
        """Record a contraindication (ABPI or a condition)."""
        return reg.add_contraindication(who, body)

    @r.get("/contraindications", tags=["contraindications"])
    def list_contraindications(patient: str, reg: Reg, who: Who) -> list[s.ContraindicationOut]:
        """A patient's contraindications."""
        return reg.list_contraindications(who, patient)

    @r.post("/contraindications/{row_id}/resolve", tags=["contraindications"])
    def resolve_contraindication(row_id: RowId, body: s.ResolveIn, reg: Reg, who: Who) -> s.ContraindicationOut:
        """Mark a contraindication resolved from a date on."""
        return reg.resolve_contraindication(who, row_id, body)


def _admin_routes(r: APIRouter) -> None:
    @r.post("/tokens", status_code=201, tags=["tokens"])
    def create_token(body: s.TokenIn, reg: Reg, who: Who) -> s.TokenOut:
        """Create an API token (admin); the token is in this response only."""
        return reg.create_token(who, body)

    @r.get("/tokens", tags=["tokens"])
    def list_tokens(reg: Reg, who: Who) -> list[s.TokenOut]:
        """Live API tokens, without their values (admin)."""
        return reg.list_tokens(who)

    @r.delete("/tokens/{token_id}", status_code=204, tags=["tokens"], response_class=Response)
    def revoke_token(token_id: RowId, reg: Reg, who: Who) -> Response:
        """Revoke an API token (admin)."""
        reg.revoke_token(who, token_id)
        return Response(status_code=204)

    @r.post("/service-accounts", status_code=201, tags=["broker"])
    def create_service_account(body: ServiceAccountIn, reg: Reg, who: Who) -> s.Credentials:
        """An MQTT account for the ingester, read-only on garment topics (admin); password in this response only."""
        return reg.create_service_account(who, body.username, body.role)

    @r.get("/audit", tags=["audit"])
    def audit(
        reg: Reg,
        who: Who,
        entity: str | None = None,
        key: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    ) -> list[s.AuditOut]:
        """The audit trail, newest first (admin)."""
        return reg.audit(who, entity, key, limit)

    @r.get("/enrichment/snapshot", tags=["ingest"], response_model=s.Snapshot,
           responses={304: {"description": "Unchanged since the ETag"}})  # fmt: skip
    def snapshot(
        reg: Reg, who: Who, response: Response, if_none_match: Annotated[str | None, Header()] = None
    ) -> s.Snapshot | Response:
        """Device -> patient/clinic history for tagging at ingest; ``ETag`` is the registry version."""
        version = reg.version()
        etag = f'"{version}"'
        if if_none_match == etag:
            return Response(status_code=304, headers={"ETag": etag})
        snap = reg.snapshot(who)
        response.headers["ETag"] = f'"{snap.version}"'
        return snap


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RegistryError)
    def registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, ThrottledError) else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(_UnauthorizedError)
    def unauthorized(_request: Request, exc: _UnauthorizedError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    def request_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input: a password or token sent would come back in the answer (and in
        # whatever logs it), so the input is left out; what is left must still be JSON (NaN, Infinity, 1e999 or a
        # lone surrogate "\ud800" in a message were a 500).
        return JSONResponse({"detail": _json_safe(jsonable_encoder(_without_input(exc.errors())))}, status_code=422)

    @app.exception_handler(ValidationError)
    def validation_error(_request: Request, exc: ValidationError) -> JSONResponse:
        # A model built inside the service from checked input failed: still the caller's input (never echoed).
        errors = exc.errors(include_url=False, include_input=False)
        return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)


def _without_input(errors: Sequence[Any]) -> list[Any]:
    """Validation errors without the ``input`` they were given (it may be a secret)."""
    return [{k: v for k, v in e.items() if k != "input"} if isinstance(e, dict) else e for e in errors]


def client_address(request: Request) -> str:
    """The client's address as the app sees it (after trusted proxies' X-Forwarded-For), for counting attempts."""
    return request.client.host if request.client is not None else UNKNOWN_ADDRESS


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as text and text re-encodable as UTF-8 (surrogates escaped)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def create_app(registry: Registry, settings: RegistrySettings | None = None) -> FastAPI:
    """The API (and the physios' web page) over ``registry``."""
    settings = settings or RegistrySettings()
    docs = settings.api_docs
    app = FastAPI(
        title="Compression garment registry",
        version="1",
        description=__doc__,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        max_body_size=settings.max_body_bytes,
    )
    app.state.registry = registry
    app.state.settings = settings
    app.state.password_work = anyio.CapacityLimiter(PASSWORD_WORK_CONCURRENCY)
    registry.logins = LoginGuard(settings.login_limits())
    _error_handlers(app)
    app.include_router(_routes())
    _mount_extras(app)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the database answers."""
        registry.version()
        return {"status": "ok"}

    # Added last = outermost: proxies first (the real client and scheme), then headers on every answer, then the
    # bearer check before any body is read.
    app.add_middleware(BearerFirst)
    app.add_middleware(SecurityHeaders, always_https=settings.always_https)
    if settings.trusted_proxies and settings.trusted_proxies.strip():
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    return app


def _mount_extras(app: FastAPI) -> None:
    # The physios' web page lives in its own module; mounted here so one process serves both.
    from devices.registry import web

    web.mount(app)


def app_from_settings(settings: RegistrySettings | None = None) -> FastAPI:
    """Build the app from settings: open (and migrate) the database, wire broker file upkeep if configured."""
    settings = settings or RegistrySettings()
    engine = make_engine(settings.database_url)
    migrate(engine)
    registry = Registry(session_factory(engine))
    if settings.bootstrap_admin_token:
        registry.ensure_admin_token(settings.bootstrap_admin_token)
    if settings.bootstrap_ingester_token:
        registry.ensure_token(settings.bootstrap_ingester_token, "ingester", BOOTSTRAP_INGESTER_TOKEN_NAME)
    _wire_broker(registry, settings)
    return create_app(registry, settings)


def _wire_broker(registry: Registry, settings: RegistrySettings) -> None:
    if settings.broker_dir is None:
        return
    from devices.registry.broker import BrokerSync

    sync = BrokerSync(registry, settings.broker_dir, settings.broker_pid_file)
    registry.on_credentials_changed = sync
    sync()  # the files match the database from the start


__all__ = ["API_PREFIX", "app_from_settings", "create_app"]
