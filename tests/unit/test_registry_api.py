"""The registry's REST API, in process: every route, each way it says no, and that a refusal leaves no trace.

Each test gets a fresh in-memory registry seeded with two clinics (A and B), a
physio in each, a patient in each, a gateway and two garments in A and one in
B, plus tokens for an admin, each physio and an ingester. Every request goes
through :meth:`World.call`, which records the route and status it hit;
:func:`test_zz_every_route_is_exercised` (last in the module) fails when a route
in the OpenAPI schema lacks a success, a 401, a 403 (writes), a 404 (routes with
an id) or a 422 (routes with a body) somewhere in this module.
Refusals go through :meth:`World.refused`, which also checks that the database
is exactly as it was (no row, no audit entry, no changed field).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from devices.protocol import CHANNELS
from devices.registry import schemas as s
from devices.registry.api import API_PREFIX, create_app
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.models import Base
from devices.registry.service import SYSTEM, Registry

A: Final = "clinica"
B: Final = "clinicb"
ANNA: Final = "anna@clinica.example"
BEN: Final = "ben@clinicb.example"
PA: Final = "PA-001"
PB: Final = "PB-001"
PA_NAME: Final = "Alice Alpha"
PB_NAME: Final = "Bob Beta"
GW_A: Final = "GW-A-01"
SOCK_A: Final = "SOCK-A-01"
BOOT_A: Final = "BOOT-A-01"
SOCK_B: Final = "SOCK-B-01"

# (method, route template, status) of every request made in this module.
_SEEN: list[tuple[str, str, int]] = []


def _operations() -> list[tuple[str, str]]:
    # The schema never touches the database, so an empty registry will do.
    app = create_app(Registry(session_factory(make_engine("sqlite://"))))
    return sorted((method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops)


OPERATIONS: Final = _operations()
_INT_PARAMS: Final = ("{token_id}", "{assignment_id}", "{rx_id}", "{row_id}")


_PATTERNS: Final = [(m, p, re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(p)) + "$"))
                     for m, p in OPERATIONS]  # fmt: skip


def _template(method: str, path: str) -> str:
    """The schema's path template that ``method path`` hit (``path`` itself when none)."""
    hits = [p for m, p, pattern in _PATTERNS if m == method and pattern.match(path)]
    return min(hits, key=lambda p: p.count("{")) if hits else path


@dataclass
class World:
    """A seeded registry, its app and client, the tokens, and the credentials handed out at seeding."""

    registry: Registry
    factory: sessionmaker[Session]
    app: FastAPI
    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    def call(
        self,
        method: str,
        path: str,
        who: str | None = "admin",
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        content: str | None = None,
    ) -> httpx.Response:
        """``method path`` as ``who`` (a key of ``tokens``, or None for no token); ``path`` below /api/v1."""
        url = path if path.startswith("/healthz") else API_PREFIX + path
        sent = dict(headers or {}) | ({"Content-Type": "application/json"} if content is not None else {})
        if who is not None:
            sent["Authorization"] = f"Bearer {self.tokens.get(who, who)}"
        response: httpx.Response = self.client.request(
            method, url, json=json, params=params, headers=sent, content=content
        )
        _SEEN.append((method.upper(), _template(method.upper(), url), response.status_code))
        return response

    def ok(self, method: str, path: str, who: str | None = "admin", *, status: int = 200, **kw: Any) -> Any:
        """The JSON body of a call that must succeed with ``status``."""
        response = self.call(method, path, who, **kw)
        assert response.status_code == status, response.text
        return response.json() if response.content else None

    def refused(
        self, method: str, path: str, who: str | None, status: int, *, match: str = "", **kw: Any
    ) -> httpx.Response:
        """A call that must fail with ``status`` and a JSON detail, leaving the database exactly as it was."""
        before = self.dump()
        response = self.call(method, path, who, **kw)
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        assert detail, response.text
        assert match.lower() in str(detail).lower(), detail
        assert self.dump() == before, f"{method} {path} was refused with {status} but changed the database"
        return response

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table."""
        with self.factory() as session:
            return {t.name: [tuple(r) for r in session.execute(select(t))] for t in Base.metadata.sorted_tables}

    def audit_count(self) -> int:
        return len(self.dump()["audit"])


@dataclass(frozen=True)
class Seed:
    """A migrated, seeded database to copy for each test, with the tokens and passwords handed out seeding it."""

    engine: Engine
    tokens: dict[str, str]
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def seed() -> Iterator[Seed]:
    # Migrating and seeding once and copying the database per test keeps each test's set-up to milliseconds.
    engine = make_engine("sqlite://")
    migrate(engine)
    registry = Registry(session_factory(engine))
    tokens, passwords = {"admin": registry.bootstrap_admin_token()}, {}
    for code, name, tz in ((A, "Clinic A", "Europe/Berlin"), (B, "Clinic B", "America/Edmonton")):
        registry.create_clinic(SYSTEM, s.ClinicIn(code=code, name=name, timezone=tz))
    registry.create_physio(SYSTEM, s.PhysioIn(clinic=A, name="Anna", email=ANNA, password="harbour-lights-1907"))
    registry.create_physio(SYSTEM, s.PhysioIn(clinic=B, name="Ben", email=BEN))
    registry.create_patient(SYSTEM, s.PatientIn(clinic=A, code=PA, display_name=PA_NAME, physio=ANNA))
    registry.create_patient(SYSTEM, s.PatientIn(clinic=B, code=PB, display_name=PB_NAME, physio=BEN))
    passwords[GW_A] = registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id=GW_A, clinic=A)).password
    for device_id, clinic, kind, gateway in ((SOCK_A, A, "sock", GW_A), (BOOT_A, A, "boot", None),
                                             (SOCK_B, B, "sock", None)):  # fmt: skip
        data = s.DeviceIn(device_id=device_id, clinic=clinic, kind=kind, gateway=gateway)
        passwords[device_id] = registry.create_device(SYSTEM, data).password
    for key, role, physio in (
        ("physio_a", "physio", ANNA),
        ("physio_b", "physio", BEN),
        ("ingester", "ingester", None),
    ):
        token = registry.create_token(SYSTEM, s.TokenIn(name=key, role=role, physio=physio))
        assert token.token is not None
        tokens[key] = token.token
    yield Seed(engine, tokens, passwords)
    engine.dispose()


def _copy(source: Engine, target: Engine) -> None:
    with source.connect() as src, target.connect() as dst:
        src_raw, dst_raw = src.connection.driver_connection, dst.connection.driver_connection
        assert isinstance(src_raw, sqlite3.Connection) and isinstance(dst_raw, sqlite3.Connection)
        src_raw.backup(dst_raw)


@pytest.fixture(scope="module")
def client(seed: Seed) -> Iterator[TestClient]:
    # Building the app takes a good part of a second (pydantic models for ~50 routes): one per module, and each
    # test points it at a fresh copy of the seeded database. (/healthz checks the registry it was built with.)
    with TestClient(create_app(Registry(session_factory(seed.engine)))) as test_client:
        yield test_client


@pytest.fixture
def world(seed: Seed, client: TestClient) -> Iterator[World]:
    engine = make_engine("sqlite://")
    _copy(seed.engine, engine)
    factory = session_factory(engine)
    registry = Registry(factory)
    app = client.app
    assert isinstance(app, FastAPI)
    app.state.registry = registry
    yield World(registry, factory, app, client, dict(seed.tokens), dict(seed.passwords))
    engine.dispose()


def _sock(patient: str = PA, **extra: Any) -> dict[str, Any]:
    return {"patient": patient, "garment_kind": "sock", "valid_from": "2025-02-01", "class_system": "ral",
            "class_name": "2", "wear_hours_per_day": 10} | extra  # fmt: skip


def _boot(patient: str = PA, **extra: Any) -> dict[str, Any]:
    return {"patient": patient, "garment_kind": "boot", "valid_from": "2025-02-01", "sessions_per_week": 7,
            "session_min_minutes": 30, "session_max_minutes": 60, "max_chamber_mmhg": 40} | extra  # fmt: skip


def _assign(w: World, device: str = SOCK_A, patient: str = PA, **extra: Any) -> dict[str, Any]:
    body = {"device_id": device, "patient": patient, "valid_from": "2025-01-01T08:00:00Z"} | extra
    result: dict[str, Any] = w.ok("POST", "/assignments", json=body, status=201)
    return result


def _contraindication(w: World, kind: str = "abpi", abpi: float | None = None, who: str = "admin") -> int:
    body = {"patient": PA, "kind": kind, "noted_on": "2025-01-10"} | ({"abpi": abpi} if abpi is not None else {})
    row_id: int = w.ok("POST", "/contraindications", who, json=body, status=201)["id"]
    return row_id


# --- authentication and health ---------------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    for name in _INT_PARAMS:
        path = path.replace(name, "1")
    return path.replace("{email}", ANNA).replace("{code}", PA).replace("{name}", SOCK_A).replace(
        "{device_id}", SOCK_A).replace("{gateway_id}", GW_A).removeprefix(API_PREFIX)  # fmt: skip


@pytest.mark.parametrize(("method", "path"), [op for op in OPERATIONS if op[1].startswith(API_PREFIX)])
def test_every_api_route_needs_a_valid_bearer_token(world: World, method: str, path: str) -> None:
    url = _concrete(path)
    for who, headers in ((None, None), ("ct_not-a-token", None), (None, {"Authorization": "Basic YWRtaW46YWRtaW4="}),
                         (None, {"Authorization": f"Token {world.tokens['admin']}"})):  # fmt: skip
        response = world.refused(method, url, who, 401, json={}, headers=headers)
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_healthz_needs_no_token(world: World) -> None:
    assert world.ok("GET", "/healthz", None) == {"status": "ok"}


def test_revoked_token_is_401(world: World) -> None:
    created = world.ok("POST", "/tokens", json={"name": "laptop", "role": "ingester"}, status=201)
    assert created["role"] == "ingester" and created["token"].startswith("ct_")
    world.tokens["laptop"] = created["token"]
    assert world.ok("GET", "/enrichment/snapshot", "laptop")
    before = world.audit_count()
    assert world.ok("DELETE", f"/tokens/{created['id']}", status=204) is None
    assert world.audit_count() == before + 1
    world.refused("GET", "/enrichment/snapshot", "laptop", 401, match="revoked")
    world.refused("DELETE", f"/tokens/{created['id']}", "admin", 409, match="already revoked")


def test_deactivated_physio_token_is_401(world: World) -> None:
    assert world.ok("GET", "/clinics", "physio_a")
    assert world.ok("PATCH", f"/physios/{ANNA}", json={"active": False})["active"] is False
    world.refused("GET", "/clinics", "physio_a", 401, match="no longer active")


# --- clinics ---------------------------------------------------------------------------------------------------------


def test_create_clinic(world: World) -> None:
    body = {"code": "clinicc", "name": " Clinic C ", "timezone": "Pacific/Auckland"}
    before = world.audit_count()
    created = world.ok("POST", "/clinics", json=body, status=201)
    assert created == {"code": "clinicc", "name": "Clinic C", "timezone": "Pacific/Auckland"}
    assert world.audit_count() == before + 1
    assert world.ok("GET", "/clinics/clinicc") == created
    entry = world.ok("GET", "/audit", params={"entity": "clinic", "key": "clinicc"})[0]
    assert (entry["action"], entry["actor"], entry["changes"]["timezone"]) == ("create", "token:bootstrap-admin",
                                                                             "Pacific/Auckland")  # fmt: skip
    world.refused("POST", "/clinics", "admin", 409, json=body, match="already exists")


@pytest.mark.parametrize("who", ["physio_a", "ingester"])
def test_create_clinic_needs_admin(world: World, who: str) -> None:
    world.refused("POST", "/clinics", who, 403, json={"code": "clinicc", "name": "C", "timezone": "UTC"})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"code": "clinicc", "name": "C", "timezone": "Mars/Olympus_Mons"}, "unknown time zone"),
        ({"code": "clinicc", "name": "C", "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"code": "Clinic C", "name": "C", "timezone": "UTC"}, "pattern"),
        ({"code": "c", "name": "C", "timezone": "UTC"}, "pattern"),
        ({"code": "clinicc", "name": "   ", "timezone": "UTC"}, "at least 1"),
        ({"code": "clinicc", "name": "C", "timezone": "UTC", "colour": "red"}, "extra"),
        ({"code": "clinicc", "name": "C"}, "missing"),
    ],
)
def test_create_clinic_bad_input(world: World, body: dict[str, Any], match: str) -> None:
    world.refused("POST", "/clinics", "admin", 422, json=body, match=match)


def test_list_and_get_clinics(world: World) -> None:
    both = [{"code": A, "name": "Clinic A", "timezone": "Europe/Berlin"},
            {"code": B, "name": "Clinic B", "timezone": "America/Edmonton"}]  # fmt: skip
    assert world.ok("GET", "/clinics") == both
    world.refused("GET", "/clinics", "ingester", 403, match="snapshot")  # the ingester reads the snapshot only
    assert world.ok("GET", "/clinics", "physio_a") == both[:1]
    assert world.ok("GET", "/clinics", "physio_b") == both[1:]
    assert world.ok("GET", f"/clinics/{A}", "physio_a") == both[0]
    world.refused("GET", f"/clinics/{A}", "physio_b", 404)
    world.refused("GET", "/clinics/nowhere", "admin", 404, match="nowhere")


# --- physios ---------------------------------------------------------------------------------------------------------


def test_create_physio(world: World) -> None:
    body = {"clinic": A, "name": "Carla", "email": "Carla@ClinicA.example", "password": "a-long-password"}
    created = world.ok("POST", "/physios", json=body, status=201)
    assert created == {"id": created["id"], "clinic": A, "name": "Carla", "email": "carla@clinica.example",
                       "active": True}  # fmt: skip
    audit = world.ok("GET", "/audit", params={"entity": "physio"})
    assert "a-long-password" not in str(audit)
    world.refused("POST", "/physios", "admin", 409, json=body | {"email": "CARLA@clinica.example"}, match="exists")
    world.refused("POST", "/physios", "admin", 404, json=body | {"clinic": "nowhere", "email": "x@y.example"})


@pytest.mark.parametrize("who", ["physio_a", "ingester"])
def test_create_physio_needs_admin(world: World, who: str) -> None:
    world.refused("POST", "/physios", who, 403, json={"clinic": A, "name": "Carla", "email": "c@clinica.example"})


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"email": "not-an-email"}, "pattern"), ({"password": "short"}, "at least 12"), ({"clinic": "A!"}, "pattern"),
     ({"role": "admin"}, "extra"), ({"active": "perhaps"}, "bool")],
)  # fmt: skip
def test_create_physio_bad_input(world: World, extra: dict[str, Any], match: str) -> None:
    body = {"clinic": A, "name": "Carla", "email": "c@clinica.example"} | extra
    world.refused("POST", "/physios", "admin", 422, json=body, match=match)


def test_list_physios(world: World) -> None:
    assert [p["email"] for p in world.ok("GET", "/physios")] == [ANNA, BEN]
    assert [p["email"] for p in world.ok("GET", "/physios", params={"clinic": B})] == [BEN]
    assert [p["email"] for p in world.ok("GET", "/physios", "physio_b")] == [BEN]
    world.refused("GET", "/physios", "ingester", 403, match="snapshot")
    world.refused("GET", "/physios", "physio_b", 404, params={"clinic": A})
    world.refused("GET", "/physios", "admin", 404, params={"clinic": "nowhere"})


def test_update_physio_as_admin(world: World) -> None:
    updated = world.ok("PATCH", f"/physios/{ANNA.upper()}", json={"name": "Anna M.", "email": "Anna.M@clinica.example"})
    assert updated == {"id": updated["id"], "clinic": A, "name": "Anna M.", "email": "anna.m@clinica.example",
                       "active": True}  # fmt: skip
    entry = world.ok("GET", "/audit", params={"entity": "physio"})[0]
    assert entry["changes"]["before"] == {"name": "Anna", "email": ANNA}
    world.refused("PATCH", "/physios/anna.m@clinica.example", "admin", 409, json={"email": BEN}, match="exists")
    world.refused("PATCH", "/physios/nobody@clinica.example", "admin", 404, json={"name": "X"})


def test_update_physio_email_is_always_stored_lower_case(world: World) -> None:
    # Regression: an e-mail differing only in case was stored as given, and then no lookup found the physio.
    assert world.ok("PATCH", f"/physios/{ANNA}", json={"email": ANNA.upper()})["email"] == ANNA
    assert world.ok("GET", "/physios", params={"clinic": A})[0]["email"] == ANNA
    assert world.ok("GET", "/clinics", "physio_a")


def test_update_physio_null_email_changes_nothing(world: World) -> None:
    # Regression: {"email": null} called None.lower() and answered 500.
    assert world.ok("PATCH", f"/physios/{ANNA}", json={"email": None, "name": None})["email"] == ANNA


def test_physio_changes_only_own_password(world: World) -> None:
    before = world.dump()["physios"]
    updated = world.ok("PATCH", f"/physios/{ANNA}", "physio_a", json={"password": "a-new-long-password",
                                                                      "current_password": "harbour-lights-1907"})
    assert updated["email"] == ANNA and "password" not in updated
    after = world.dump()["physios"]
    assert before != after  # the hash changed
    entry = world.ok("GET", "/audit", params={"entity": "physio", "key": ANNA})[0]
    assert entry["changes"]["after"] == {"password": "changed", "sessions_ended": 0}
    assert "a-new-long-password" not in str(entry) and "harbour-lights" not in str(entry)
    world.refused("PATCH", f"/physios/{BEN}", "physio_a", 403, json={"password": "a-new-long-password"}, match="own")
    world.refused("PATCH", f"/physios/{ANNA}", "physio_a", 403, json={"name": "Anna the Great"}, match="admin")
    world.refused("PATCH", f"/physios/{ANNA}", "ingester", 403, json={"password": "a-new-long-password"})


@pytest.mark.parametrize(
    ("body", "match"),
    [({"password": "short"}, "at least 12"), ({"clinic": B}, "extra"), ({"email": "no-at-sign"}, "pattern"),
     ({"active": [1]}, "bool")],
)  # fmt: skip
def test_update_physio_bad_input(world: World, body: dict[str, Any], match: str) -> None:
    world.refused("PATCH", f"/physios/{ANNA}", "admin", 422, json=body, match=match)


# --- patients --------------------------------------------------------------------------------------------------------


def test_create_patient(world: World) -> None:
    body = {"clinic": A, "code": "PA-002", "display_name": "Carol Gamma", "physio": ANNA.upper()}
    created = world.ok("POST", "/patients", "physio_a", json=body, status=201)
    assert created == {"code": "PA-002", "clinic": A, "display_name": "Carol Gamma", "physio": ANNA}
    assert world.ok("GET", "/patients/PA-002", "physio_a") == created
    entry = world.ok("GET", "/patients/PA-002/audit", "physio_a")[0]
    assert entry["action"] == "create" and entry["actor"] == f"{ANNA} (physio_a)"
    assert "Carol" not in str(world.ok("GET", "/audit"))  # names stay out of the audit trail
    minimal = world.ok("POST", "/patients", json={"clinic": B, "code": "PB-002"}, status=201)
    assert minimal == {"code": "PB-002", "clinic": B, "display_name": None, "physio": None}


def test_create_patient_refusals(world: World) -> None:
    body = {"clinic": A, "code": "PA-002"}
    world.refused("POST", "/patients", "admin", 409, json=body | {"code": PB}, match="taken")
    world.refused("POST", "/patients", "admin", 404, json=body | {"clinic": "nowhere"})
    world.refused("POST", "/patients", "admin", 404, json=body | {"physio": "nobody@clinica.example"})
    world.refused("POST", "/patients", "admin", 422, json=body | {"physio": BEN}, match="another clinic")
    world.refused("POST", "/patients", "physio_b", 404, json=body)  # clinic A does not exist for Ben
    world.refused("POST", "/patients", "ingester", 403, json=body, match="read-only")


@pytest.mark.parametrize(
    "extra",
    [{"code": "P A 1"}, {"code": "ab"}, {"code": "-PA-002"}, {"code": "x" * 65}, {"code": "PA/002"}, {"code": 12345},
     {"display_name": ""}, {"physio": "anna"}, {"date_of_birth": "1950-01-01"}],
)  # fmt: skip
def test_create_patient_bad_input(world: World, extra: dict[str, Any]) -> None:
    world.refused("POST", "/patients", "admin", 422, json={"clinic": A, "code": "PA-002"} | extra)


def test_list_patients_is_per_clinic_for_physios(world: World) -> None:
    assert [p["code"] for p in world.ok("GET", "/patients")] == [PA, PB]
    world.refused("GET", "/patients", "ingester", 403, match="snapshot")
    assert world.ok("GET", "/patients", "physio_b") == [{"code": PB, "clinic": B, "display_name": PB_NAME,
                                                           "physio": BEN}]  # fmt: skip
    assert [p["code"] for p in world.ok("GET", "/patients", params={"clinic": A})] == [PA]
    assert [p["code"] for p in world.ok("GET", "/patients", params={"physio": BEN.upper()})] == [PB]
    assert world.ok("GET", "/patients", "physio_b", params={"physio": ANNA}) == []
    world.refused("GET", "/patients", "physio_b", 404, params={"clinic": A})


def test_get_patient(world: World) -> None:
    expected = {"code": PA, "clinic": A, "display_name": PA_NAME, "physio": ANNA}
    assert world.ok("GET", f"/patients/{PA}", "physio_a") == expected
    world.refused("GET", f"/patients/{PA}", "ingester", 403, match="snapshot")
    world.refused("GET", f"/patients/{PA}", "physio_b", 404)
    world.refused("GET", "/patients/PX-999", "admin", 404, match="PX-999")


def test_update_patient(world: World) -> None:
    before = world.audit_count()
    updated = world.ok("PATCH", f"/patients/{PA}", "physio_a", json={"display_name": "Alice A.", "physio": None})
    assert updated == {"code": PA, "clinic": A, "display_name": "Alice A.", "physio": None}
    assert world.audit_count() == before + 1
    entry = world.ok("GET", f"/patients/{PA}/audit", "physio_a", params={"limit": 1})
    assert entry[0]["changes"] == {"display_name": "changed", "physio": {"before": ANNA, "after": None}}
    assert world.ok("PATCH", f"/patients/{PA}", json={"physio": ANNA})["physio"] == ANNA
    world.refused("PATCH", f"/patients/{PA}", "physio_b", 404, json={"display_name": "X"})
    world.refused("PATCH", f"/patients/{PA}", "ingester", 403, json={"display_name": "X"})
    world.refused("PATCH", "/patients/PX-999", "admin", 404, json={"display_name": "X"})
    world.refused("PATCH", f"/patients/{PA}", "admin", 422, json={"physio": BEN}, match="another clinic")
    world.refused("PATCH", f"/patients/{PA}", "admin", 404, json={"physio": "nobody@clinica.example"})
    world.refused("PATCH", f"/patients/{PA}", "admin", 422, json={"clinic": B}, match="extra")
    world.refused("PATCH", f"/patients/{PA}", "admin", 422, json={"display_name": ""})


def test_patient_audit(world: World) -> None:
    rx_id = world.ok("POST", "/prescriptions", json=_sock(), status=201)["id"]
    _assign(world)
    entries = world.ok("GET", f"/patients/{PA}/audit", "physio_a")
    assert [(e["entity"], e["key"]) for e in entries] == [
        ("assignment", f"{SOCK_A}->{PA}"), ("prescription", f"{PA}#{rx_id}"), ("patient", PA)]  # fmt: skip
    assert len(world.ok("GET", f"/patients/{PA}/audit", "admin", params={"limit": 2})) == 2
    world.refused("GET", f"/patients/{PA}/audit", "ingester", 403, match="snapshot")
    world.refused("GET", f"/patients/{PA}/audit", "physio_b", 404)
    world.refused("GET", "/patients/PX-999/audit", "admin", 404)
    world.refused("GET", f"/patients/{PA}/audit", "admin", 422, params={"limit": 0})
    world.refused("GET", f"/patients/{PA}/audit", "admin", 422, params={"limit": "many"})


def test_patient_audit_shows_no_other_entity_with_the_same_code(world: World) -> None:
    # Regression: the patient audit matched keys only, so a clinic B patient coded like clinic A's device showed
    # that device's entries (clinic, gateway) to clinic B's physio.
    world.ok("POST", "/patients", json={"clinic": B, "code": SOCK_A}, status=201)
    world.ok("PATCH", f"/devices/{SOCK_A}", json={"firmware": "2.0"})
    entries = world.ok("GET", f"/patients/{SOCK_A}/audit", "physio_b")
    assert [(e["entity"], e["key"]) for e in entries] == [("patient", SOCK_A)]


# --- gateways and devices --------------------------------------------------------------------------------------------


def _assert_secret_never_shown(w: World, secret: str) -> None:
    for path, params in (("/gateways", None), (f"/gateways/{GW_A}", None), ("/devices", None), (f"/devices/{SOCK_A}",
                         None), ("/audit", {"limit": 10_000}), (f"/patients/{PA}/audit", None), ("/tokens", None),
                         ("/enrichment/snapshot", None), ("/assignments", None)):  # fmt: skip
        assert secret not in world_text(w, path, params)


def world_text(w: World, path: str, params: dict[str, Any] | None) -> str:
    response = w.call("GET", path, "admin", params=params)
    assert response.status_code == 200, response.text
    return response.text


def test_create_gateway_credentials_shown_once(world: World) -> None:
    creds = world.ok("POST", "/gateways", json={"gateway_id": "GW-A-02", "clinic": A, "description": "hub"}, status=201)
    assert creds["username"] == "GW-A-02" and creds["may_publish"] == ["garments/v1/GW-A-02/status"]
    assert len(creds["password"]) >= 32
    assert world.ok("GET", "/gateways/GW-A-02") == {"gateway_id": "GW-A-02", "clinic": A, "description": "hub",
                                                    "revoked": False, "devices": []}  # fmt: skip
    for secret in [creds["password"], *world.passwords.values()]:
        _assert_secret_never_shown(world, secret)


def test_create_gateway_refusals(world: World) -> None:
    body = {"gateway_id": "GW-A-02", "clinic": A}
    world.refused("POST", "/gateways", "admin", 409, json=body | {"gateway_id": GW_A}, match="already registered")
    world.refused("POST", "/gateways", "admin", 409, json=body | {"gateway_id": SOCK_A}, match="as a device")
    world.refused("POST", "/gateways", "admin", 404, json=body | {"clinic": "nowhere"})
    world.refused("POST", "/gateways", "physio_a", 403, json=body, match="admin")
    world.refused("POST", "/gateways", "ingester", 403, json=body)
    for bad in ({"gateway_id": "gw a"}, {"gateway_id": "g#"}, {"description": "x" * 201}, {"secret": "x"}):
        world.refused("POST", "/gateways", "admin", 422, json=body | bad)


def test_list_and_get_gateways(world: World) -> None:
    gateway = {"gateway_id": GW_A, "clinic": A, "description": "", "revoked": False, "devices": [SOCK_A]}
    assert world.ok("GET", "/gateways") == [gateway]
    assert world.ok("GET", "/gateways", "physio_a") == [gateway]
    assert world.ok("GET", "/gateways", "physio_b") == []
    assert world.ok("GET", f"/gateways/{GW_A}", "admin") == gateway
    world.refused("GET", f"/gateways/{GW_A}", "ingester", 403, match="snapshot")
    world.refused("GET", f"/gateways/{GW_A}", "physio_b", 404)
    world.refused("GET", "/gateways/GW-X-99", "admin", 404)


def test_revoke_and_rotate_gateway(world: World) -> None:
    world.refused("POST", f"/gateways/{GW_A}/revoke", "physio_a", 403)
    world.refused("POST", f"/gateways/{GW_A}/credentials", "ingester", 403)
    world.refused("POST", "/gateways/GW-X-99/revoke", "admin", 404)
    world.refused("POST", "/gateways/GW-X-99/credentials", "admin", 404)
    creds = world.ok("POST", f"/gateways/{GW_A}/credentials")
    assert creds["username"] == GW_A and creds["password"] != world.passwords[GW_A]
    _assert_secret_never_shown(world, creds["password"])
    before = world.audit_count()
    assert world.ok("POST", f"/gateways/{GW_A}/revoke", status=204) is None
    assert world.audit_count() == before + 1
    assert world.ok("GET", f"/gateways/{GW_A}")["revoked"] is True
    world.refused("POST", f"/gateways/{GW_A}/revoke", "admin", 409, match="already revoked")
    world.refused("POST", f"/gateways/{GW_A}/credentials", "admin", 409, match="revoked")
    new = {"device_id": "SOCK-A-02", "clinic": A, "kind": "sock", "gateway": GW_A}
    world.refused("POST", "/devices", "admin", 409, json=new, match="revoked")


def test_create_device(world: World) -> None:
    sock = world.ok("POST", "/devices", json={"device_id": "SOCK-A-02", "clinic": A, "kind": "sock",
                                              "firmware": "1.2.0", "serial": "SN9"}, status=201)  # fmt: skip
    assert sock["username"] == "SOCK-A-02" and sock["may_publish"] == [f"garments/v1/SOCK-A-02/{c}" for c in CHANNELS]
    assert world.ok("GET", "/devices/SOCK-A-02") == {
        "device_id": "SOCK-A-02", "clinic": A, "kind": "sock", "zones": ["ankle", "calf"], "firmware": "1.2.0",
        "serial": "SN9", "gateway": None, "revoked": False, "patient": None}  # fmt: skip
    world.ok("POST", "/devices", json={"device_id": "BOOT-A-02", "clinic": A, "kind": "boot"}, status=201)
    assert world.ok("GET", "/devices/BOOT-A-02")["zones"] == ["foot", "ankle", "calf", "thigh"]
    thigh = {"device_id": "SOCK-A-03", "clinic": A, "kind": "sock", "zones": ["ankle", "thigh"], "gateway": GW_A}
    world.ok("POST", "/devices", json=thigh, status=201)
    assert world.ok("GET", f"/gateways/{GW_A}")["devices"] == [SOCK_A, "SOCK-A-03"]
    _assert_secret_never_shown(world, sock["password"])


def test_create_device_refusals(world: World) -> None:
    body = {"device_id": "SOCK-A-02", "clinic": A, "kind": "sock"}
    world.refused("POST", "/devices", "admin", 409, json=body | {"device_id": SOCK_B}, match="already registered")
    world.refused("POST", "/devices", "admin", 409, json=body | {"device_id": GW_A}, match="as a gateway")
    world.refused("POST", "/devices", "admin", 404, json=body | {"clinic": "nowhere"})
    world.refused("POST", "/devices", "admin", 404, json=body | {"gateway": "GW-X-99"})
    world.refused("POST", "/devices", "admin", 422, json=body | {"clinic": B, "gateway": GW_A}, match="another clinic")
    world.refused("POST", "/devices", "physio_a", 403, json=body)
    world.refused("POST", "/devices", "ingester", 403, json=body)


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"zones": ["foot", "ankle"]}, "sock zones"), ({"zones": ["calf"]}, "ankle"), ({"zones": ["ankle", "ankle"]},
     "repeat"), ({"zones": ["elbow"]}, "literal"), ({"kind": "glove"}, "literal"), ({"device_id": "s"}, "pattern"),
     ({"device_id": "sock a"}, "pattern"), ({"firmware": "x" * 65}, "at most"), ({"password": "hunter2"}, "extra")],
)  # fmt: skip
def test_create_device_bad_input(world: World, extra: dict[str, Any], match: str) -> None:
    body = {"device_id": "SOCK-A-02", "clinic": A, "kind": "sock"} | extra
    world.refused("POST", "/devices", "admin", 422, json=body, match=match)


def test_list_and_get_devices(world: World) -> None:
    assert [d["device_id"] for d in world.ok("GET", "/devices")] == [BOOT_A, SOCK_A, SOCK_B]
    assert [d["device_id"] for d in world.ok("GET", "/devices", "admin", params={"clinic": B})] == [SOCK_B]
    world.refused("GET", "/devices", "ingester", 403, params={"clinic": B}, match="snapshot")
    assert [d["device_id"] for d in world.ok("GET", "/devices", "physio_b")] == [SOCK_B]
    world.refused("GET", "/devices", "physio_b", 404, params={"clinic": A})
    _assign(world)
    device = world.ok("GET", f"/devices/{SOCK_A}", "physio_a")
    assert device == {"device_id": SOCK_A, "clinic": A, "kind": "sock", "zones": ["ankle", "calf"], "firmware": "",
                      "serial": "", "gateway": GW_A, "revoked": False, "patient": PA}  # fmt: skip
    world.refused("GET", f"/devices/{SOCK_A}", "physio_b", 404)
    world.refused("GET", "/devices/SOCK-X-99", "admin", 404)


def test_update_device(world: World) -> None:
    updated = world.ok("PATCH", f"/devices/{SOCK_A}", json={"zones": ["ankle", "calf", "thigh"], "firmware": "2.0"})
    assert (updated["zones"], updated["firmware"], updated["gateway"]) == (["ankle", "calf", "thigh"], "2.0", GW_A)
    assert world.ok("PATCH", f"/devices/{SOCK_A}", json={"detach_gateway": True})["gateway"] is None
    assert world.ok("GET", f"/gateways/{GW_A}")["devices"] == []
    assert world.ok("PATCH", f"/devices/{BOOT_A}", json={"gateway": GW_A})["gateway"] == GW_A
    world.refused("PATCH", f"/devices/{SOCK_A}", "admin", 422, json={"zones": ["foot", "ankle"]}, match="sock zones")
    world.refused("PATCH", f"/devices/{SOCK_A}", "admin", 422, json={"zones": []}, match="at least one zone")
    world.refused("PATCH", f"/devices/{SOCK_A}", "admin", 422, json={"kind": "boot"}, match="extra")
    world.refused("PATCH", f"/devices/{SOCK_B}", "admin", 422, json={"gateway": GW_A}, match="another clinic")
    world.refused("PATCH", f"/devices/{SOCK_A}", "admin", 404, json={"gateway": "GW-X-99"})
    world.refused("PATCH", "/devices/SOCK-X-99", "admin", 404, json={"firmware": "3"})
    world.refused("PATCH", f"/devices/{SOCK_A}", "physio_a", 403, json={"firmware": "3"})
    world.refused("PATCH", f"/devices/{SOCK_A}", "ingester", 403, json={"firmware": "3"})


def test_revoking_a_device_ends_its_open_assignment(world: World) -> None:
    assignment = _assign(world)
    assert assignment["valid_to"] is None
    world.refused("POST", f"/devices/{SOCK_A}/revoke", "physio_a", 403)
    world.refused("POST", f"/devices/{SOCK_A}/revoke", "ingester", 403)
    world.refused("POST", "/devices/SOCK-X-99/revoke", "admin", 404)
    assert world.ok("POST", f"/devices/{SOCK_A}/revoke", status=204) is None
    (ended,) = world.ok("GET", "/assignments", params={"device_id": SOCK_A})
    assert ended["id"] == assignment["id"] and ended["valid_to"] is not None
    device = world.ok("GET", f"/devices/{SOCK_A}")
    assert (device["revoked"], device["patient"]) == (True, None)
    snapshot = world.ok("GET", "/enrichment/snapshot", "ingester")
    assert snapshot["assignments"][0]["to_ms"] is not None
    world.refused("POST", f"/devices/{SOCK_A}/revoke", "admin", 409, match="already revoked")
    world.refused("POST", f"/devices/{SOCK_A}/credentials", "admin", 409, match="revoked")
    later = {"device_id": SOCK_A, "patient": PA, "valid_from": "2030-01-01T00:00:00Z"}
    world.refused("POST", "/assignments", "admin", 409, json=later, match="revoked")


def test_rotate_device_credentials(world: World) -> None:
    world.refused("POST", f"/devices/{SOCK_A}/credentials", "physio_a", 403)
    world.refused("POST", f"/devices/{SOCK_A}/credentials", "ingester", 403)
    world.refused("POST", "/devices/SOCK-X-99/credentials", "admin", 404)
    before = world.dump()["devices"]
    creds = world.ok("POST", f"/devices/{SOCK_A}/credentials")
    own = [f"garments/v1/{SOCK_A}/{c}" for c in CHANNELS]
    assert creds == {"username": SOCK_A, "password": creds["password"], "may_publish": own}
    assert creds["password"] != world.passwords[SOCK_A]
    assert world.dump()["devices"] != before
    _assert_secret_never_shown(world, creds["password"])


# --- assignments -----------------------------------------------------------------------------------------------------


def test_assign_and_end(world: World) -> None:
    before = world.audit_count()
    created = world.ok("POST", "/assignments", "physio_a", status=201, json={
        "device_id": SOCK_A, "patient": PA, "valid_from": "2025-01-01T09:00:00+01:00"})  # fmt: skip
    assert created == {"id": created["id"], "device_id": SOCK_A, "patient": PA,
                       "valid_from": "2025-01-01T08:00:00Z", "valid_to": None, "leg": None}  # fmt: skip
    assert world.audit_count() == before + 1
    clash = {"device_id": SOCK_A, "patient": PA, "valid_from": "2025-06-01T00:00:00Z"}
    world.refused("POST", "/assignments", "admin", 409, json=clash, match="end that first")
    world.refused("POST", f"/assignments/{created['id']}/end", "physio_b", 404, json={})
    world.refused("POST", f"/assignments/{created['id']}/end", "ingester", 403, json={})
    world.refused("POST", f"/assignments/{created['id']}/end", "admin", 422,
                  json={"valid_to": "2024-12-31T00:00:00Z"}, match="after")  # fmt: skip
    world.refused("POST", f"/assignments/{created['id']}/end", "admin", 422,
                  json={"valid_to": "2025-03-01T00:00:00"}, match="offset")  # fmt: skip
    ended = world.ok("POST", f"/assignments/{created['id']}/end", "physio_a", json={"valid_to": "2025-03-01T00:00Z"})
    assert ended == created | {"valid_to": "2025-03-01T00:00:00Z"}
    world.refused("POST", f"/assignments/{created['id']}/end", "admin", 409, json={}, match="already ended")
    world.refused("POST", "/assignments/999999/end", "admin", 404, json={})
    # Back to back is not an overlap; a bounded stretch before it neither.
    world.ok("POST", "/assignments", json=clash | {"valid_from": "2025-03-01T00:00:00Z"}, status=201)
    early = {"device_id": SOCK_A, "patient": PA, "valid_from": "2024-01-01T00:00:00Z", "valid_to": "2024-06-01T00:00Z"}
    world.ok("POST", "/assignments", json=early, status=201)
    world.refused("POST", "/assignments", "admin", 409, json=early | {"valid_to": "2025-01-02T00:00:00Z"})


def test_reattribute_stored_readings(world: World) -> None:
    """A garment that sent before its assignment was recorded: its readings of a period are given to the patient;
    the assignments are made to agree; asking again is the same request; another holder then is a conflict."""
    world.ok("POST", "/assignments", json={"device_id": SOCK_A, "patient": PA, "leg": "left",
                                           "valid_from": "2025-01-10T00:00:00Z"}, status=201)  # fmt: skip
    body = {"device_id": SOCK_A, "patient": PA, "valid_from": "2025-01-05T00:00:00Z",
            "valid_to": "2025-01-10T00:00:00Z"}  # fmt: skip
    before = world.audit_count()
    row = world.ok("POST", f"/devices/{SOCK_A}/reattributions", "physio_a", json=body, status=201)
    assert (row["state"], row["patient"], row["clinic"], row["points"]) == ("pending", PA, A, 0)
    assert world.audit_count() == before + 2  # the assignment moved back to the 5th, and the request
    held = [a for a in world.ok("GET", "/assignments", params={"device_id": SOCK_A}) if a["leg"] == "left"]
    assert [a["valid_from"] for a in held] == ["2025-01-05T00:00:00Z"]
    assert world.ok("POST", f"/devices/{SOCK_A}/reattributions", json=body, status=201) == row  # idempotent
    assert world.ok("GET", "/reattributions", params={"state": "pending"}) == [row]
    assert world.ok("GET", "/reattributions", "physio_b") == []  # another clinic's rows do not exist for Ben
    world.refused("POST", f"/devices/{SOCK_A}/reattributions", "ingester", 403, json=body)
    world.refused("POST", f"/devices/{SOCK_A}/reattributions", "physio_b", 404, json=body)
    world.refused("POST", "/devices/SOCK-X-99/reattributions", "admin", 404, json=body | {"device_id": "SOCK-X-99"})
    world.refused("POST", f"/devices/{SOCK_A}/reattributions", "admin", 422, match="after",
                  json=body | {"valid_to": "2025-01-01T00:00:00Z"})  # fmt: skip
    world.refused("POST", f"/devices/{SOCK_A}/reattributions", "admin", 422, match="differs",
                  json=body | {"device_id": BOOT_A})  # fmt: skip
    # Before any assignment: one is created for exactly the period.
    earlier = body | {"valid_from": "2024-12-01T00:00:00Z", "valid_to": "2024-12-08T00:00:00Z"}
    count = len(world.ok("GET", "/assignments", params={"device_id": SOCK_A}))
    world.ok("POST", f"/devices/{SOCK_A}/reattributions", json=earlier, status=201)
    made = world.ok("GET", "/assignments", params={"device_id": SOCK_A})
    assert len(made) == count + 1 and {"2024-12-01T00:00:00Z"} <= {a["valid_from"] for a in made}
    # Another patient held the garment then: their readings are theirs.
    world.ok("POST", "/patients", json={"clinic": A, "code": "PA-002"}, status=201)
    world.refused("POST", f"/devices/{SOCK_A}/reattributions", "admin", 409, match="assigned to PA-001",
                  json=body | {"patient": "PA-002"})  # fmt: skip


def test_assign_refusals(world: World) -> None:
    body = {"device_id": SOCK_A, "patient": PA, "valid_from": "2025-01-01T08:00:00Z"}
    world.refused("POST", "/assignments", "admin", 404, json=body | {"device_id": "SOCK-X-99"})
    world.refused("POST", "/assignments", "admin", 404, json=body | {"patient": "PX-999"})
    world.refused("POST", "/assignments", "admin", 422, json=body | {"patient": PB}, match="different clinics")
    world.refused("POST", "/assignments", "physio_b", 404, json=body)
    world.refused("POST", "/assignments", "physio_b", 404, json=body | {"device_id": SOCK_B})  # PA is not Ben's
    world.refused("POST", "/assignments", "ingester", 403, json=body)


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"valid_from": "2025-01-01T08:00:00"}, "offset"), ({"valid_to": "2025-02-01T08:00:00"}, "offset"),
     ({"valid_to": "2024-12-31T08:00:00Z"}, "after"), ({"valid_to": "2025-01-01T08:00:00Z"}, "after"),
     ({"valid_from": "yesterday"}, "datetime"), ({"device_id": "S"}, "pattern"), ({"patient": "P A"}, "pattern"),
     ({"note": "x"}, "extra")],
)  # fmt: skip
def test_assign_bad_input(world: World, extra: dict[str, Any], match: str) -> None:
    body = {"device_id": SOCK_A, "patient": PA, "valid_from": "2025-01-01T08:00:00Z"} | extra
    world.refused("POST", "/assignments", "admin", 422, json=body, match=match)


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_assign_time_out_of_range_is_422(world: World, when: str) -> None:
    # Regression: converting these to UTC overflowed (OverflowError escaped validation: 500).
    body = {"device_id": SOCK_A, "patient": PA, "valid_from": when}
    world.refused("POST", "/assignments", "admin", 422, json=body, match="range")
    world.refused("POST", "/assignments/1/end", "admin", 422, json={"valid_to": when}, match="range")


def test_list_assignments(world: World) -> None:
    a = _assign(world)
    b = _assign(world, SOCK_B, PB)
    assert world.ok("GET", "/assignments") == [a, b]
    assert world.ok("GET", "/assignments", "admin", params={"patient": PB}) == [b]
    world.refused("GET", "/assignments", "ingester", 403, params={"patient": PB}, match="snapshot")
    assert world.ok("GET", "/assignments", "physio_a", params={"device_id": SOCK_A}) == [a]
    assert world.ok("GET", "/assignments", "physio_b") == [b]
    world.refused("GET", "/assignments", "physio_b", 404, params={"patient": PA})
    world.refused("GET", "/assignments", "physio_b", 404, params={"device_id": SOCK_A})
    world.refused("GET", "/assignments", "admin", 404, params={"device_id": "SOCK-X-99"})


# --- prescriptions ---------------------------------------------------------------------------------------------------


def test_prescribe_sock_and_boot(world: World) -> None:
    before = world.audit_count()
    sock = world.ok("POST", "/prescriptions", "physio_a", json=_sock(class_name="CCL 2"), status=201)
    assert sock == {
        "id": sock["id"], "patient": PA, "garment_kind": "sock", "valid_from": "2025-02-01", "valid_to": None,
        "class_system": "ral", "class_name": "CCL 2", "ankle_min_mmhg": 23.0, "ankle_max_mmhg": 32.0,
        "zones": ["ankle", "calf"], "wear_hours_per_day": 10.0, "wear_days_per_week": 7, "sessions_per_week": None,
        "session_min_minutes": None, "session_max_minutes": None, "max_chamber_mmhg": None,
        "out_of_range_tolerance_minutes": 30.0, "max_silence_hours": 24.0, "override_by": None,
        "override_reason": None, "override_covers": None, "legs": None, "supersedes": None}  # fmt: skip
    assert world.audit_count() == before + 1
    boot = world.ok("POST", "/prescriptions", json=_boot(), status=201)  # a boot beside a sock is fine
    assert (boot["garment_kind"], boot["zones"], boot["max_chamber_mmhg"], boot["class_system"]) == (
        "boot", ["foot", "ankle", "calf", "thigh"], 40.0, None)  # fmt: skip
    explicit = _sock(PB, class_system="explicit", class_name=None, ankle_min_mmhg=15, ankle_max_mmhg=20)
    assert world.ok("POST", "/prescriptions", json=explicit, status=201)["ankle_max_mmhg"] == 20.0
    uk3 = world.ok("POST", "/prescriptions", json=_sock(class_system="uk", class_name="3", valid_from="2026-01-01"),
                   status=409)  # overlaps the open-ended RAL 2 sock  # fmt: skip
    assert "already has a sock prescription" in uk3["detail"]


def test_prescription_overlap_is_409(world: World) -> None:
    world.ok("POST", "/prescriptions", json=_sock(valid_to="2025-06-30"), status=201)
    world.refused("POST", "/prescriptions", "admin", 409, json=_sock(valid_from="2025-06-30"), match="already has")
    world.refused("POST", "/prescriptions", "admin", 409, json=_sock(valid_from="2025-01-01", valid_to="2025-02-01"))
    assert world.ok("POST", "/prescriptions", json=_sock(valid_from="2025-07-01"), status=201)["valid_to"] is None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (_sock(class_system="explicit", class_name=None), "needs ankle_min_mmhg and ankle_max_mmhg"),
        (_sock(class_system="explicit", ankle_min_mmhg=20, ankle_max_mmhg=15), "min < max"),
        (_sock(class_system="uk", class_name="4"), "UK has classes 1, 2, 3"),
        (_sock(class_name=None), "RAL has classes"),
        (_sock(class_system="eu"), "literal"),
        (_sock(wear_hours_per_day=None), "needs wear_hours_per_day"),
        (_sock(wear_hours_per_day=25), "less than or equal to 24"),
        (_sock(class_system=None), "needs class_system"),
        (_sock(zones=["foot", "ankle"]), "sock zones"),
        (_sock(zones=["calf", "thigh"]), "at least the ankle"),
        (_sock(valid_from="2025-03-01", valid_to="2025-02-28"), "valid_to is before valid_from"),
        (_sock(valid_from="2025-02-30"), "date"),
        (_sock(colour="beige"), "extra"),
        (_sock(override_by=ANNA), "extra"),
        (_sock(override_reason="short"), "at least 10"),
        (_sock(patient="P A"), "pattern"),
        (_sock(garment_kind="glove"), "literal"),
        (_boot(max_chamber_mmhg=None), "needs max_chamber_mmhg"),
        (_boot(session_min_minutes=90), "above session_max_minutes"),
        (_boot(class_system="ral", class_name="1"), "no compression class"),
        (_boot(max_chamber_mmhg=250), "less than or equal to 200"),
    ],
)
def test_prescribe_bad_input(world: World, body: dict[str, Any], match: str) -> None:
    world.refused("POST", "/prescriptions", "admin", 422, json=body, match=match)


def test_prescribe_refusals(world: World) -> None:
    world.refused("POST", "/prescriptions", "admin", 404, json=_sock("PX-999"))
    world.refused("POST", "/prescriptions", "physio_b", 404, json=_sock())
    world.refused("POST", "/prescriptions", "ingester", 403, json=_sock(), match="read-only")


def test_abpi_below_0_6_refuses_any_compression(world: World) -> None:
    _contraindication(world, abpi=0.5)
    mild = _sock(class_system="explicit", class_name=None, ankle_min_mmhg=8, ankle_max_mmhg=12)
    for body in (_sock(), mild, _boot()):
        world.refused("POST", "/prescriptions", "physio_a", 409, json=body, match="no compression")


def test_abpi_0_6_to_0_8_allows_reduced_compression_only(world: World) -> None:
    _contraindication(world, abpi=0.7)
    world.refused("POST", "/prescriptions", "physio_a", 409, json=_sock(), match="reduced compression only")
    world.refused("POST", "/prescriptions", "physio_a", 409, json=_boot(), match="no boot")
    reduced = _sock(class_system="explicit", class_name=None, ankle_min_mmhg=15, ankle_max_mmhg=20)
    rx = world.ok("POST", "/prescriptions", "physio_a", json=reduced, status=201)
    assert (rx["ankle_min_mmhg"], rx["ankle_max_mmhg"], rx["override_by"]) == (15.0, 20.0, None)
    # Raising it to RAL 2 later is checked like a new prescription.
    world.refused("PATCH", f"/prescriptions/{rx['id']}", "physio_a", 409,
                  json={"class_system": "ral", "class_name": "2"}, match="reduced compression only")  # fmt: skip


def test_abpi_at_least_0_8_allows_class_2(world: World) -> None:
    _contraindication(world, abpi=0.8)
    assert world.ok("POST", "/prescriptions", json=_sock(), status=201)["ankle_max_mmhg"] == 32.0


def test_untreated_dvt_refuses_until_resolved(world: World) -> None:
    row_id = _contraindication(world, kind="untreated_dvt", who="physio_a")
    world.refused("POST", "/prescriptions", "physio_a", 409, json=_sock(), match="deep-vein thrombosis")
    world.refused("POST", "/prescriptions", "admin", 409, json=_boot(), match="override_reason")
    world.ok("POST", f"/contraindications/{row_id}/resolve", "physio_a", json={"resolved_on": "2025-01-20"})
    assert world.ok("POST", "/prescriptions", "physio_a", json=_sock(), status=201)["override_by"] is None


def test_physio_override_is_recorded(world: World) -> None:
    _contraindication(world, kind="untreated_dvt")
    reason = "Vascular surgeon cleared light compression on 2025-01-28"
    rx = world.ok("POST", "/prescriptions", "physio_a", json=_sock(override_reason=reason), status=201)
    assert (rx["override_by"], rx["override_reason"]) == (ANNA, reason)
    assert world.ok("GET", f"/prescriptions/{rx['id']}") == rx
    entry = world.ok("GET", "/audit", params={"entity": "prescription"})[0]
    assert entry["actor"] == f"{ANNA} (physio_a)" and entry["changes"]["override_reason"] == reason
    # The recorded override still stands when a physio later changes the wear target.
    assert world.ok("PATCH", f"/prescriptions/{rx['id']}", "physio_a", json={"wear_hours_per_day": 8})[
        "override_by"] == ANNA  # fmt: skip


def test_admin_cannot_override(world: World) -> None:
    _contraindication(world, abpi=0.5)
    body = _sock(override_reason="The admin thinks this is fine anyway")
    world.refused("POST", "/prescriptions", "admin", 403, json=body, match="only a physio")


def test_list_and_get_prescriptions(world: World) -> None:
    pa = world.ok("POST", "/prescriptions", json=_sock(), status=201)
    pb = world.ok("POST", "/prescriptions", json=_boot(PB), status=201)
    assert world.ok("GET", "/prescriptions") == [pa, pb]
    assert world.ok("GET", "/prescriptions", "admin", params={"patient": PB}) == [pb]
    world.refused("GET", "/prescriptions", "ingester", 403, params={"patient": PB}, match="snapshot")
    assert world.ok("GET", "/prescriptions", "physio_a") == [pa]
    assert world.ok("GET", "/prescriptions", "physio_b") == [pb]
    world.refused("GET", "/prescriptions", "physio_b", 404, params={"patient": PA})
    assert world.ok("GET", f"/prescriptions/{pa['id']}", "physio_a") == pa
    world.refused("GET", f"/prescriptions/{pa['id']}", "physio_b", 404)
    world.refused("GET", "/prescriptions/999999", "admin", 404)
    world.refused("GET", "/prescriptions/first", "admin", 422)


def test_update_prescription(world: World) -> None:
    rx = world.ok("POST", "/prescriptions", json=_sock(), status=201)
    # A change of what is prescribed is a new version from its effective date: the old one is never rewritten.
    updated = world.ok("PATCH", f"/prescriptions/{rx['id']}", "physio_a",
                       json={"wear_hours_per_day": 12, "valid_to": "2025-12-31", "class_name": "1",
                             "effective_from": "2025-06-01"})  # fmt: skip
    assert updated == rx | {"id": updated["id"], "wear_hours_per_day": 12.0, "valid_from": "2025-06-01",
                            "valid_to": "2025-12-31", "class_name": "1", "ankle_min_mmhg": 18.0,
                            "ankle_max_mmhg": 21.0, "supersedes": rx["id"]}  # fmt: skip
    assert world.ok("GET", f"/prescriptions/{rx['id']}") == rx | {"valid_to": "2025-05-31"}
    entry = world.ok("GET", f"/patients/{PA}/audit", params={"limit": 1})[0]
    assert entry["changes"]["supersedes"] == rx["id"] and entry["changes"]["effective_from"] == "2025-06-01"
    world.refused("PATCH", f"/prescriptions/{rx['id']}", "admin", 422, match="ended on 2025-05-31",
                  json={"wear_hours_per_day": 9, "effective_from": "2025-07-01"})  # fmt: skip
    world.refused("PATCH", f"/prescriptions/{rx['id']}", "admin", 422, match="days already judged",
                  json={"wear_hours_per_day": 9, "effective_from": "2025-02-01"})  # fmt: skip
    rx = updated
    path = f"/prescriptions/{rx['id']}"
    world.refused("PATCH", path, "admin", 422, json={"valid_to": "2025-01-01"}, match="before valid_from")
    july = {"effective_from": "2025-07-01"}
    world.refused("PATCH", path, "admin", 422, json={"class_system": "uk", "class_name": "4"} | july,
                  match="UK has")  # fmt: skip
    world.refused("PATCH", path, "admin", 422, json={"zones": ["foot"]} | july, match="sock zones")
    world.refused("PATCH", path, "admin", 422, json={"garment_kind": "boot"}, match="extra")
    world.refused("PATCH", path, "admin", 422, json={"class_system": "explicit", "ankle_min_mmhg": None} | july,
                  match="explicit class needs")  # fmt: skip
    world.refused("PATCH", path, "physio_b", 404, json={"wear_hours_per_day": 1})
    world.refused("PATCH", path, "ingester", 403, json={"wear_hours_per_day": 1})
    world.refused("PATCH", "/prescriptions/999999", "admin", 404, json={"wear_hours_per_day": 1})
    world.ok("POST", "/prescriptions", json=_sock(valid_from="2026-01-01"), status=201)
    world.refused("PATCH", path, "admin", 409, json={"valid_to": None}, match="already has")


def test_raising_a_boots_maximum_pressure_needs_a_reason(world: World) -> None:
    """An over-pressure alert may be open (the registry cannot see the monitor's): raising the maximum is confirmed
    with a reason, kept in the audit trail; lowering it is not."""
    rx = world.ok("POST", "/prescriptions", json=_boot(), status=201)
    path = f"/prescriptions/{rx['id']}"
    raise_ = {"max_chamber_mmhg": 180, "effective_from": "2025-06-01"}
    world.refused("PATCH", path, "physio_a", 409, json=raise_, match="needs a reason")
    assert world.ok("GET", path)["max_chamber_mmhg"] == 40
    world.refused("PATCH", path, "physio_a", 422, json=raise_ | {"confirm_reason": "short"}, match="at least 10")
    why = "vascular surgeon asked for 180 mmHg for the arterial programme"
    new = world.ok("PATCH", path, "physio_a", json=raise_ | {"confirm_reason": why})
    assert (new["max_chamber_mmhg"], new["valid_from"], new["supersedes"]) == (180.0, "2025-06-01", rx["id"])
    entry = world.ok("GET", f"/patients/{PA}/audit", params={"limit": 1})[0]
    assert entry["changes"]["confirm_reason"] == why
    lowered = world.ok("PATCH", f"/prescriptions/{new['id']}", json={"max_chamber_mmhg": 50,
                                                                      "effective_from": "2025-07-01"})  # fmt: skip
    assert lowered["max_chamber_mmhg"] == 50.0


# --- contraindications -----------------------------------------------------------------------------------------------


def test_contraindications(world: World) -> None:
    before = world.audit_count()
    created = world.ok("POST", "/contraindications", "physio_a", status=201, json={
        "patient": PA, "kind": "abpi", "abpi": 0.72, "noted_on": "2025-01-10", "note": "left leg"})  # fmt: skip
    assert created == {"id": created["id"], "patient": PA, "kind": "abpi", "abpi": 0.72, "noted_on": "2025-01-10",
                       "resolved_on": None, "note": "left leg"}  # fmt: skip
    assert world.audit_count() == before + 1
    assert world.ok("GET", "/contraindications", "admin", params={"patient": PA}) == [created]
    world.refused("GET", "/contraindications", "ingester", 403, params={"patient": PA}, match="snapshot")
    world.refused("GET", "/contraindications", "physio_b", 404, params={"patient": PA})
    world.refused("GET", "/contraindications", "admin", 404, params={"patient": "PX-999"})
    world.refused("GET", "/contraindications", "admin", 422)  # patient is required
    resolved = world.ok("POST", f"/contraindications/{created['id']}/resolve", json={"resolved_on": "2025-02-01"})
    assert resolved == created | {"resolved_on": "2025-02-01"}
    world.refused("POST", f"/contraindications/{created['id']}/resolve", "admin", 409,
                  json={"resolved_on": "2025-02-02"}, match="already resolved")  # fmt: skip


def test_contraindication_refusals(world: World) -> None:
    body = {"patient": PA, "kind": "untreated_dvt", "noted_on": "2025-01-10"}
    world.refused("POST", "/contraindications", "admin", 404, json=body | {"patient": "PX-999"})
    world.refused("POST", "/contraindications", "physio_b", 404, json=body)
    world.refused("POST", "/contraindications", "ingester", 403, json=body)
    for bad, match in (({"abpi": 0.5}, "exactly when"), ({"kind": "abpi"}, "exactly when"),
                       ({"kind": "abpi", "abpi": 0}, "greater than 0"), ({"kind": "abpi", "abpi": 3.5}, "less than"),
                       ({"kind": "bad_knee"}, "literal"), ({"noted_on": "2025-13-01"}, "date"),
                       ({"severity": "high"}, "extra")):  # fmt: skip
        world.refused("POST", "/contraindications", "admin", 422, json=body | bad, match=match)


def test_resolve_contraindication_refusals(world: World) -> None:
    row_id = _contraindication(world, kind="untreated_dvt")
    path = f"/contraindications/{row_id}/resolve"
    world.refused("POST", path, "admin", 422, json={"resolved_on": "2025-01-09"}, match="before noted_on")
    world.refused("POST", path, "admin", 422, json={}, match="missing")
    world.refused("POST", path, "admin", 422, json={"resolved_on": "2025-02-01", "by": "x"}, match="extra")
    world.refused("POST", path, "physio_b", 404, json={"resolved_on": "2025-02-01"})
    world.refused("POST", path, "ingester", 403, json={"resolved_on": "2025-02-01"})
    world.refused("POST", "/contraindications/999999/resolve", "admin", 404, json={"resolved_on": "2025-02-01"})


# --- tokens, service accounts, audit ---------------------------------------------------------------------------------


def test_tokens(world: World) -> None:
    created = world.ok("POST", "/tokens", json={"name": "ben-tablet", "role": "physio", "physio": BEN.upper()},
                       status=201)  # fmt: skip
    assert created == {"id": created["id"], "name": "ben-tablet", "role": "physio", "token": created["token"]}
    world.tokens["tablet"] = created["token"]
    assert [p["code"] for p in world.ok("GET", "/patients", "tablet")] == [PB]
    listed = world.ok("GET", "/tokens")
    assert {"id": created["id"], "name": "ben-tablet", "role": "physio", "token": None} in listed
    assert [t["name"] for t in listed] == ["bootstrap-admin", "physio_a", "physio_b", "ingester", "ben-tablet"]
    assert not any(token in str(listed) + str(world.ok("GET", "/audit")) for token in world.tokens.values())
    world.refused("GET", "/tokens", "physio_a", 403)
    world.refused("GET", "/tokens", "ingester", 403)
    world.refused("DELETE", f"/tokens/{created['id']}", "physio_b", 403)
    world.refused("DELETE", f"/tokens/{created['id']}", "ingester", 403)
    world.refused("DELETE", "/tokens/999999", "admin", 404)
    world.refused("DELETE", "/tokens/latest", "admin", 422)
    world.ok("DELETE", f"/tokens/{created['id']}", status=204)
    assert created["id"] not in [t["id"] for t in world.ok("GET", "/tokens")]
    world.refused("GET", "/patients", "tablet", 401)


def test_create_token_refusals(world: World) -> None:
    world.refused("POST", "/tokens", "physio_a", 403, json={"name": "mine", "role": "admin"})
    world.refused("POST", "/tokens", "ingester", 403, json={"name": "mine", "role": "ingester"})
    world.refused("POST", "/tokens", "admin", 404, json={"name": "x", "role": "physio", "physio": "no@clinica.example"})
    for bad, match in (({"role": "physio"}, "names its physio"), ({"role": "admin", "physio": ANNA}, "name none"),
                       ({"role": "root"}, "literal"), ({"role": "admin", "name": ""}, "at least 1"),
                       ({"role": "admin", "expires": "never"}, "extra")):  # fmt: skip
        world.refused("POST", "/tokens", "admin", 422, json={"name": "x"} | bad, match=match)


def test_service_accounts(world: World) -> None:
    creds = world.ok("POST", "/service-accounts", json={"username": "ingest-1"}, status=201)
    assert creds == {"username": "ingest-1", "password": creds["password"], "may_publish": []}
    assert world.ok("GET", "/audit", params={"entity": "service_account"})[0]["changes"] == {"role": "ingester"}
    _assert_secret_never_shown(world, creds["password"])
    world.refused("POST", "/service-accounts", "admin", 409, json={"username": "ingest-1"}, match="already")
    world.refused("POST", "/service-accounts", "admin", 409, json={"username": SOCK_A}, match="as a device")
    world.refused("POST", "/service-accounts", "admin", 422, json={"username": "ingest-2", "role": "admin"},
                  match="only service-account role")  # fmt: skip
    world.refused("POST", "/service-accounts", "admin", 422, json={"username": "in gest"}, match="pattern")
    world.refused("POST", "/service-accounts", "admin", 422, json={"username": "ingest-2", "acl": "#"}, match="extra")
    world.refused("POST", "/service-accounts", "physio_a", 403, json={"username": "ingest-2"})
    world.refused("POST", "/service-accounts", "ingester", 403, json={"username": "ingest-2"})


def test_audit(world: World) -> None:
    world.ok("PATCH", f"/devices/{SOCK_A}", json={"firmware": "9"})
    entries = world.ok("GET", "/audit")
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    newest = entries[0]
    assert (newest["action"], newest["entity"], newest["key"], newest["changes"]) == ("update", "device", SOCK_A,
                                                                                      {"firmware": "9"})  # fmt: skip
    assert [e["key"] for e in world.ok("GET", "/audit", params={"entity": "patient"})] == [PB, PA]
    assert [e["key"] for e in world.ok("GET", "/audit", params={"key": "SOCK-"})] == [SOCK_A, SOCK_B, SOCK_A]
    assert world.ok("GET", "/audit", params={"key": "%"}) == []  # LIKE wildcards are escaped
    assert len(world.ok("GET", "/audit", params={"limit": 2})) == 2
    world.refused("GET", "/audit", "physio_a", 403)
    world.refused("GET", "/audit", "ingester", 403)
    world.refused("GET", "/audit", "admin", 422, params={"limit": 0})
    world.refused("GET", "/audit", "admin", 422, params={"limit": 10_001})


@pytest.mark.parametrize("row_id", ["9223372036854775808", "2147483648", "0", "-1"])
def test_row_ids_out_of_range_are_422(world: World, row_id: str) -> None:
    # Regression: an id past 2**63 - 1 overflowed the SQLite driver (500); past 2**31 - 1 PostgreSQL's INTEGER.
    world.refused("GET", f"/prescriptions/{row_id}", "admin", 422)
    world.refused("PATCH", f"/prescriptions/{row_id}", "admin", 422, json={"wear_hours_per_day": 8})
    world.refused("POST", f"/assignments/{row_id}/end", "admin", 422, json={})
    world.refused("POST", f"/contraindications/{row_id}/resolve", "admin", 422, json={"resolved_on": "2025-02-01"})
    world.refused("DELETE", f"/tokens/{row_id}", "admin", 422)


def _strict_json(text: str | bytes) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/contraindications", '{"patient": "PA-001", "kind": "abpi", "abpi": NaN, "noted_on": "2025-01-10"}'),
        ("/contraindications", '{"patient": "PA-001", "kind": "abpi", "abpi": -Infinity, "noted_on": "2025-01-10"}'),
        ("/prescriptions", '{"patient": "PA-001", "garment_kind": "boot", "valid_from": "2025-02-01", '
         '"sessions_per_week": 7, "session_min_minutes": 30, "session_max_minutes": 1e999, "max_chamber_mmhg": 40}'),
        ("/clinics", '{"code": "clinicc", "name": "\\ud800", "timezone": "UTC"}'),
        ("/clinics", '{"code": "clinicc", "name": "C", "timezone": "\\udfff"}'),
        ("/clinics", '{"code": "clinicc", "name": "C", "timezone": "UTC", "\\ud800": NaN}'),
        ("/physios", '{"clinic": "clinica", "name": "C", "email": "c@clinica.example", "password": "\\ud800-secret"}'),
    ],
)  # fmt: skip
def test_input_that_json_cannot_echo_is_still_a_422(world: World, path: str, raw: str) -> None:
    # Regression: FastAPI's 422 echoes the input, and NaN, Infinity, 1e999 (Python's json reads them all) or a lone
    # surrogate could not be rendered back: a 500 instead of the 422.
    response = world.refused("POST", path, "admin", 422, content=raw)
    assert _strict_json(response.content)["detail"][0]["loc"][0] == "body"


# --- the ingester's snapshot -----------------------------------------------------------------------------------------


def test_snapshot_etag_and_304(world: World) -> None:
    assignment = _assign(world)
    first = world.call("GET", "/enrichment/snapshot", "ingester")
    assert first.status_code == 200
    snap = first.json()
    assert first.headers["ETag"] == f'"{snap["version"]}"'
    assert snap["devices"] == [BOOT_A, SOCK_A, SOCK_B]
    assert snap["assignments"] == [{"device_id": SOCK_A, "patient": PA, "clinic": A, "from_ms": 1_735_718_400_000,
                                    "to_ms": None}]  # fmt: skip
    assert PA_NAME not in first.text and PB_NAME not in first.text and "Alice" not in first.text
    unchanged = world.call("GET", "/enrichment/snapshot", "ingester", headers={"If-None-Match": first.headers["ETag"]})
    assert (unchanged.status_code, unchanged.content, unchanged.headers["ETag"]) == (304, b"", first.headers["ETag"])
    world.ok("POST", f"/assignments/{assignment['id']}/end", json={"valid_to": "2025-01-02T00:00:00Z"})
    changed = world.call("GET", "/enrichment/snapshot", "ingester", headers={"If-None-Match": first.headers["ETag"]})
    assert changed.status_code == 200 and changed.headers["ETag"] != first.headers["ETag"]
    assert changed.json()["assignments"][0]["to_ms"] == 1_735_776_000_000
    assert world.call("GET", "/enrichment/snapshot", "admin", headers={"If-None-Match": '"0"'}).status_code == 200


def test_snapshot_of_a_physio_is_their_clinic(world: World) -> None:
    # Regression: the snapshot listed every clinic's devices and patient codes to any physio.
    _assign(world)
    _assign(world, SOCK_B, PB)
    snap = world.ok("GET", "/enrichment/snapshot", "physio_b")
    assert snap["devices"] == [SOCK_B]
    assert [(e["device_id"], e["patient"]) for e in snap["assignments"]] == [(SOCK_B, PB)]
    assert len(world.ok("GET", "/enrichment/snapshot", "ingester")["assignments"]) == 2


def test_refused_writes_of_every_role_leave_no_audit_entry(world: World) -> None:
    # Across the module every refusal compares full table dumps; here the audit count is checked explicitly once.
    before = world.audit_count()
    world.refused("POST", "/clinics", "physio_a", 403, json={"code": "clinicc", "name": "C", "timezone": "UTC"})
    world.refused("POST", "/prescriptions", "admin", 422, json=_sock(class_system="uk", class_name="4"))
    world.refused("POST", "/patients", "admin", 409, json={"clinic": A, "code": PA})
    world.refused("POST", "/patients", None, 401, json={"clinic": A, "code": "PA-003"})
    assert world.audit_count() == before
    world.ok("POST", "/patients", json={"clinic": A, "code": "PA-003"}, status=201)
    assert world.audit_count() == before + 1


# --- coverage: keep last ---------------------------------------------------------------------------------------------


def _requirements(method: str, path: str) -> dict[str, set[int]]:
    needed: dict[str, set[int]] = {"success": {200, 201, 204, 304}}
    if path.startswith(API_PREFIX):
        needed["401"] = {401}
    if method != "GET":
        needed["403"] = {403}
    if "{" in path:
        needed["404"] = {404}
    if path.startswith(API_PREFIX) and method in ("POST", "PATCH") and "{name}" not in path:
        needed["422"] = {422}
    return needed


def test_zz_every_route_is_exercised(request: pytest.FixtureRequest) -> None:
    module_items = [i for i in request.session.items if isinstance(i, pytest.Function) and i.module is request.module]
    ran = {getattr(item, "originalname", item.name) for item in module_items}
    defined = {name for name in dir(request.module) if name.startswith("test_")}
    if ran != defined or module_items[-1] is not request.node:
        pytest.skip("route coverage is checked when the whole module runs, in order")
    statuses: dict[tuple[str, str], set[int]] = {}
    for method, template, status in _SEEN:
        statuses.setdefault((method, template), set()).add(status)
    missing = [f"{method} {path}: {what}" for method, path in OPERATIONS
               for what, codes in _requirements(method, path).items()
               if not statuses.get((method, path), set()) & codes]  # fmt: skip
    assert not missing, "routes without a test:\n" + "\n".join(missing)
    unknown = sorted({f"{m} {p}" for m, p, _ in _SEEN} - {f"{m} {p}" for m, p in OPERATIONS})
    assert not unknown, f"requests to routes not in the schema: {unknown}"
