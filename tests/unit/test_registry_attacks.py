"""Attacks on the registry API from issue 10, each performed against the real app (in process) and refused.

Findings 3 (an override reused for ever), 6 (password change), 7 (over-broad
tokens) and 8 (answers that tell another clinic's objects from missing ones).
The seeded world is test_registry_api's: clinics A and B, Anna (A, web password)
and Ben (B), a patient in each, tokens for an admin, each physio and an ingester.
Every refusal goes through :meth:`World.refused`, which also checks that the
database is exactly as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from devices.registry.api import app_from_settings
from devices.registry.models import ApiToken
from devices.registry.settings import RegistrySettings
from tests.unit import test_registry_api as api
from tests.unit.test_registry_api import ANNA, GW_A, PA, PA_NAME, PB, PB_NAME, SOCK_A, SOCK_B, A, B, World, _boot, _sock

# The seeded world of test_registry_api, fixture for fixture.
seed, client, world = api.seed, api.client, api.world

ANNA_PASSWORD: Final = "harbour-lights-1907"
STRONG: Final = "violet-harbour-47-quietly"


# --- finding 7: over-broad tokens ---------------------------------------------------------------------------------


INGESTER_MAY_NOT: Final = [
    ("GET", "/clinics", None), ("GET", f"/clinics/{A}", None), ("GET", "/physios", None),
    ("GET", "/patients", None), ("GET", f"/patients/{PA}", None), ("GET", f"/patients/{PA}/audit", None),
    ("GET", "/prescriptions", None), ("GET", "/contraindications", {"patient": PA}), ("GET", "/assignments", None),
    ("GET", "/devices", None), ("GET", f"/devices/{SOCK_A}", None), ("GET", "/gateways", None),
    ("GET", f"/gateways/{GW_A}", None),
]  # fmt: skip


def test_the_ingester_token_reads_the_snapshot_and_nothing_else(world: World) -> None:
    world.ok("POST", "/contraindications", "physio_a", status=201, json={
        "patient": PA, "kind": "abpi", "abpi": 0.9, "noted_on": "2025-01-10", "note": "clinical note: left leg ulcer"})
    for method, path, params in INGESTER_MAY_NOT:
        response = world.refused(method, path, "ingester", 403, params=params, match="snapshot")
        assert PA_NAME not in response.text and "ulcer" not in response.text
    snapshot = world.call("GET", "/enrichment/snapshot", "ingester")
    assert snapshot.status_code == 200
    assert PA_NAME not in snapshot.text and PB_NAME not in snapshot.text and "ulcer" not in snapshot.text


def _token_rows(world: World) -> list[tuple[str, bool]]:
    with world.factory() as session:
        return [(r.name, r.revoked_at is None) for r in session.scalars(select(ApiToken).order_by(ApiToken.id))]


OLD_TOKEN: Final = "kQ3vX8pL2mN7rT1wY6zB4cF9hJ0sD5gA8eU2iO7uP3y"
NEW_TOKEN: Final = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_a_changed_bootstrap_admin_token_replaces_the_old_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    from fastapi.testclient import TestClient

    with TestClient(app_from_settings(RegistrySettings(database_url=url, bootstrap_admin_token=OLD_TOKEN))) as first:
        assert first.get("/api/v1/clinics", headers={"Authorization": f"Bearer {OLD_TOKEN}"}).status_code == 200
    # The operator rotates REGISTRY_ADMIN_TOKEN and restarts the registry.
    with TestClient(app_from_settings(RegistrySettings(database_url=url, bootstrap_admin_token=NEW_TOKEN))) as second:
        assert second.get("/api/v1/clinics", headers={"Authorization": f"Bearer {NEW_TOKEN}"}).status_code == 200
        old = second.get("/api/v1/clinics", headers={"Authorization": f"Bearer {OLD_TOKEN}"})
        assert old.status_code == 401, "the replaced bootstrap token still works"
        audit = second.get("/api/v1/audit", params={"entity": "token"},
                           headers={"Authorization": f"Bearer {NEW_TOKEN}"}).json()  # fmt: skip
        assert {"create", "revoke"} <= {e["action"] for e in audit}
        assert OLD_TOKEN not in str(audit) and NEW_TOKEN not in str(audit)


WEAK_TOKENS: Final = [
    "a" * 20,  # what the registry accepted: any 20 characters
    "changeme-changeme-changeme-changeme-changeme",
    "0123456789abcdef" * 4,
    "x" * 64,
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c",  # openssl rand -hex 24: 24 bytes, too few
    "set-this-to-a-long-random-value-before-you-start-it",
]


@pytest.mark.parametrize("token", WEAK_TOKENS)
def test_a_low_entropy_bootstrap_admin_token_is_refused_at_start(token: str) -> None:
    with pytest.raises(ValidationError, match="bootstrap_admin_token") as raised:
        RegistrySettings(bootstrap_admin_token=token)
    assert "openssl rand -hex 32" in str(raised.value)
    assert token not in str(raised.value)  # the error does not echo the secret


def test_the_server_refuses_to_start_with_a_weak_admin_token(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COMPRESSION_REGISTRY_BOOTSTRAP_ADMIN_TOKEN": "a" * 20,
           "COMPRESSION_REGISTRY_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
           "COMPRESSION_REGISTRY_PORT": "1"}  # fmt: skip
    cli = Path(sys.executable).parent / "compression"
    done = subprocess.run([str(cli), "devices", "serve"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "COMPRESSION_REGISTRY_BOOTSTRAP_ADMIN_TOKEN" in done.stderr and "a" * 20 not in done.stderr


@pytest.mark.parametrize("token", [OLD_TOKEN, NEW_TOKEN, "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5d2FsZG8rL3A9"])
def test_a_random_admin_token_is_accepted(token: str) -> None:
    assert RegistrySettings(bootstrap_admin_token=token).bootstrap_admin_token == token


# --- finding 3: an override belongs to the contraindications it was given for -------------------------------------


def _contra(world: World, who: str = "physio_a", **body: Any) -> int:
    row: dict[str, Any] = world.ok("POST", "/contraindications", who, status=201,
                                   json={"patient": PA, "noted_on": "2025-01-10"} | body)  # fmt: skip
    return int(row["id"])


def _overridden_boot(world: World) -> dict[str, Any]:
    abpi = _contra(world, kind="abpi", abpi=0.7)  # reduced compression only: no boot
    reason = "Vascular team cleared the boot at 60 mmHg on 2025-01-28"
    rx: dict[str, Any] = world.ok("POST", "/prescriptions", "physio_a", status=201,
                                  json=_boot(max_chamber_mmhg=60, override_reason=reason))  # fmt: skip
    assert rx["override_by"] == ANNA and rx["override_covers"] == [abpi]
    return rx


def test_an_override_does_not_cover_a_contraindication_recorded_after_it(world: World) -> None:
    rx = _overridden_boot(world)
    path = f"/prescriptions/{rx['id']}"
    _contra(world, kind="untreated_dvt")  # new, absolute
    # The attack: an admin raises the boot to 150 mmHg without any override reason.
    # (A raise of a boot's maximum needs a confirm_reason first: given, so that the contraindication is what refuses.)
    raise_to_150 = {"max_chamber_mmhg": 150, "confirm_reason": "no over-pressure alert open"}
    world.refused("PATCH", path, "admin", 409, json=raise_to_150, match="deep-vein thrombosis")
    world.refused("PATCH", path, "admin", 403, json=raise_to_150 | {"override_reason": "admin knows best"},
                  match="only a physio")  # fmt: skip
    # Even a physio's harmless-looking change needs a new override once the new contraindication is there...
    world.refused("PATCH", path, "physio_a", 409, json={"sessions_per_week": 8}, match="override_reason")
    # ...and a change that makes it safer does not (stopping or lowering must never be blocked).
    lowered = world.ok("PATCH", path, "admin", json={"max_chamber_mmhg": 40})
    assert lowered["override_covers"] == rx["override_covers"]
    # A change is a new version (issue 11): the old one keeps its days, the new one holds the lower maximum.
    assert world.ok("GET", f"/prescriptions/{lowered['id']}")["max_chamber_mmhg"] == 40


def test_a_riskier_change_needs_a_new_physio_override(world: World) -> None:
    rx = _overridden_boot(world)
    path = f"/prescriptions/{rx['id']}"
    confirmed = {"confirm_reason": "no over-pressure alert open"}  # a raise of a boot's maximum needs one anyway
    for riskier in ({"max_chamber_mmhg": 150} | confirmed, {"sessions_per_week": 14}, {"session_max_minutes": 120},
                    {"zones": ["foot", "ankle", "calf", "knee", "thigh"]}):  # fmt: skip
        world.refused("PATCH", path, "admin", 409, json=riskier, match="override")
        world.refused("PATCH", path, "physio_a", 409, json=riskier, match="override")
    reason = "Re-assessed 2025-02-10: 80 mmHg tolerated, vascular team agrees"
    raised = world.ok("PATCH", path, "physio_a", json={"max_chamber_mmhg": 80, "override_reason": reason} | confirmed)
    assert (raised["max_chamber_mmhg"], raised["override_reason"], raised["override_by"]) == (80, reason, ANNA)
    # Changes that are not riskier keep the override (on the version now in force).
    latest = f"/prescriptions/{raised['id']}"
    assert world.ok("PATCH", latest, "admin", json={"out_of_range_tolerance_minutes": 20})["override_reason"] == reason


# --- finding 6 (API): changing a password -------------------------------------------------------------------------


def _sessions(world: World, count: int) -> list[str]:
    return [world.registry.login(ANNA, ANNA_PASSWORD) for _ in range(count)]


def _refused_and_audited(world: World, path: str, who: str, body: dict[str, Any]) -> str:
    """A wrong current password: 403, nothing changed but one audited failure that holds no password."""
    before = world.dump()
    response = world.call("PATCH", path, who, json=body)
    assert response.status_code == 403 and "current password" in response.json()["detail"], response.text
    after = world.dump()
    assert {k: v for k, v in after.items() if k != "audit"} == {k: v for k, v in before.items() if k != "audit"}
    (failure,) = world.ok("GET", "/audit", params={"entity": "login", "limit": 1})
    assert (failure["action"], failure["key"], failure["changes"]) == ("login_failed", ANNA, {"address": "testclient"})
    assert not any(secret in str(failure) for secret in body.values())
    return response.text


def test_changing_your_password_needs_the_current_one(world: World) -> None:
    (mine,) = _sessions(world, 1)
    world.tokens["web"] = mine
    path = f"/physios/{ANNA}"
    world.refused("PATCH", path, "web", 422, json={"password": STRONG}, match="current_password")
    _refused_and_audited(world, path, "web", {"password": STRONG, "current_password": "harbour-lights-1908"})


def test_changing_your_password_ends_every_other_session(world: World) -> None:
    mine, other, another = _sessions(world, 3)
    world.tokens |= {"web": mine, "other": other, "another": another}
    world.ok("PATCH", f"/physios/{ANNA}", "web", json={"password": STRONG, "current_password": ANNA_PASSWORD})
    world.refused("GET", "/clinics", "other", 401)
    world.refused("GET", "/clinics", "another", 401)
    assert world.ok("GET", "/clinics", "web")  # the session that changed it goes on
    assert world.registry.login(ANNA, STRONG)
    entry = next(e for e in world.ok("GET", "/audit", params={"entity": "physio", "key": ANNA})
                 if e["action"] == "update")  # fmt: skip
    assert entry["changes"]["after"] == {"password": "changed", "sessions_ended": 2}


def test_an_admin_password_reset_ends_every_session(world: World) -> None:
    (session,) = _sessions(world, 1)
    world.tokens["web"] = session
    world.ok("PATCH", f"/physios/{ANNA}", json={"password": STRONG})
    world.refused("GET", "/clinics", "web", 401)


@pytest.mark.parametrize(
    ("password", "match"),
    [("aaaaaaaaaaaaaaaa", "repeats"), ("abcdefghijklmnop", "sequence"), ("Password12345", "common"),
     (ANNA, "e-mail"), ("anna-clinica-example", "e-mail"), ("Zq9-short", "at least 12"), ("x" * 129, "at most 128")],
)  # fmt: skip
def test_a_weak_password_is_refused_and_never_echoed(world: World, password: str, match: str) -> None:
    (mine,) = _sessions(world, 1)
    world.tokens["web"] = mine
    for who, body in (("web", {"password": password, "current_password": ANNA_PASSWORD}),
                      ("admin", {"password": password})):  # fmt: skip
        response = world.refused("PATCH", f"/physios/{ANNA}", who, 422, json=body, match=match)
        assert password not in response.text
    carla = password.replace("anna", "carla")  # a new physio's own e-mail
    body = {"clinic": A, "name": "Carla", "email": "carla@clinica.example", "password": carla}
    response = world.refused("POST", "/physios", "admin", 422, json=body, match=match)
    assert carla not in response.text


def test_a_refused_current_password_is_never_echoed(world: World) -> None:
    (mine,) = _sessions(world, 1)
    world.tokens["web"] = mine
    guess = "guessing-the-current-one"
    text = _refused_and_audited(world, f"/physios/{ANNA}", "web", {"password": STRONG, "current_password": guess})
    assert guess not in text and STRONG not in text


# --- finding 8: another clinic's objects look exactly like missing ones ---------------------------------------------


def _same_answer(world: World, method: str, theirs: str, missing: str, *, json: Any = None,
                 params: dict[str, Any] | None = None, secret: str = "", nothing: str = "") -> None:  # fmt: skip
    """Ben's answer for clinic A's object equals his answer for one that does not exist (ids blanked out)."""
    answers = []
    for path, body, query, name in ((theirs, json, params, secret), (missing, _swap(json, secret, nothing),
                                    _swap(params, secret, nothing), nothing)):  # fmt: skip
        before = world.dump()
        response = world.call(method, path, "physio_b", json=body, params=query)
        assert world.dump() == before
        text = response.text
        ids = path.split("/")[2:3] if theirs != missing else []  # /patients/PA-001/audit: PA-001
        for value in filter(None, (name, *ids)):
            text = text.replace(value, "<id>")
        answers.append((response.status_code, text))
    assert answers[0] == answers[1], f"{method} {theirs}: {answers[0]} vs {answers[1]}"
    assert answers[0][0] in (403, 404, 409)


def _swap(value: Any, old: str, new: str) -> Any:
    if not old or value is None:
        return value
    if isinstance(value, dict):
        return {k: _swap(v, old, new) for k, v in value.items()}
    return new if value == old else value


def _clinic_a_rows(world: World) -> dict[str, int]:
    rx = world.ok("POST", "/prescriptions", json=_sock(), status=201)["id"]
    contra = world.ok("POST", "/contraindications", status=201,
                      json={"patient": PA, "kind": "untreated_dvt", "noted_on": "2026-01-10"})["id"]  # fmt: skip
    assignment = world.ok("POST", "/assignments", status=201,
                          json={"device_id": SOCK_A, "patient": PA, "valid_from": "2025-01-01T08:00:00Z"})["id"]
    return {"rx": rx, "contra": contra, "assignment": assignment}


def test_another_clinics_objects_answer_like_missing_ones(world: World) -> None:
    rows = _clinic_a_rows(world)
    same = _same_answer
    same(world, "GET", f"/clinics/{A}", "/clinics/nowhere")
    for method in ("GET", "PATCH"):
        body = {"display_name": "X"} if method == "PATCH" else None
        same(world, method, f"/patients/{PA}", "/patients/PX-999", json=body)
    same(world, "GET", f"/patients/{PA}/audit", "/patients/PX-999/audit")
    same(world, "GET", f"/devices/{SOCK_A}", "/devices/SOCK-X-99")
    same(world, "GET", f"/gateways/{GW_A}", "/gateways/GW-X-99")
    same(world, "GET", f"/prescriptions/{rows['rx']}", "/prescriptions/999999")
    same(world, "PATCH", f"/prescriptions/{rows['rx']}", "/prescriptions/999999", json={"wear_hours_per_day": 4})
    same(world, "POST", f"/assignments/{rows['assignment']}/end", "/assignments/999999/end", json={})
    same(world, "POST", f"/contraindications/{rows['contra']}/resolve", "/contraindications/999999/resolve",
         json={"resolved_on": "2026-02-01"})
    for path, key, theirs, nothing in (("/contraindications", "patient", PA, "PX-999"),
                                       ("/prescriptions", "patient", PA, "PX-999"),
                                       ("/assignments", "patient", PA, "PX-999"),
                                       ("/assignments", "device_id", SOCK_A, "SOCK-X-99"),
                                       ("/patients", "clinic", A, "nowhere"), ("/devices", "clinic", A, "nowhere"),
                                       ("/physios", "clinic", A, "nowhere")):  # fmt: skip
        same(world, "GET", path, path, params={key: theirs}, secret=theirs, nothing=nothing)


def test_another_clinics_codes_and_people_answer_like_missing_ones_on_writes(world: World) -> None:
    same = _same_answer
    rx = _sock(PA) | {"valid_from": "2027-01-01"}
    same(world, "POST", "/prescriptions", "/prescriptions", json=rx, secret=PA, nothing="PX-999")
    contra = {"patient": PA, "kind": "untreated_dvt", "noted_on": "2026-01-10"}
    same(world, "POST", "/contraindications", "/contraindications", json=contra, secret=PA, nothing="PX-999")
    assign = {"device_id": SOCK_A, "patient": PB, "valid_from": "2030-01-01T00:00:00Z"}
    same(world, "POST", "/assignments", "/assignments", json=assign, secret=SOCK_A, nothing="SOCK-X-99")
    assign = {"device_id": SOCK_B, "patient": PA, "valid_from": "2030-01-01T00:00:00Z"}
    same(world, "POST", "/assignments", "/assignments", json=assign, secret=PA, nothing="PX-999")
    # A physio of clinic A named as responsible physio: like an unknown e-mail.
    patient = {"clinic": B, "code": "PB-077", "physio": ANNA}
    same(world, "POST", "/patients", "/patients", json=patient, secret=ANNA, nothing="nobody@clinica.example")
    same(world, "PATCH", f"/patients/{PB}", f"/patients/{PB}", json={"physio": ANNA}, secret=ANNA,
         nothing="nobody@clinica.example")  # fmt: skip
    # Another clinic's physio's account: like one that does not exist.
    same(world, "PATCH", f"/physios/{ANNA}", "/physios/nobody@clinica.example",
         json={"password": STRONG, "current_password": "whatever-it-is-now"})  # fmt: skip
    # A patient code in use in clinic A answers like one in use in Ben's own clinic.
    same(world, "POST", "/patients", "/patients", json={"clinic": B, "code": PA}, secret=PA, nothing=PB)


def test_guessing_the_current_password_through_the_api_is_throttled(world: World) -> None:
    """A stolen session cannot try passwords through the change endpoint faster than at the sign-in page."""
    (mine,) = _sessions(world, 1)
    world.tokens["web"] = mine
    path = f"/physios/{ANNA}"
    answers = [world.call("PATCH", path, "web", json={"password": STRONG, "current_password": f"guess-{i}-of-many"})
               for i in range(7)]  # fmt: skip
    assert [a.status_code for a in answers] == [403] * 5 + [429] * 2
    assert int(answers[-1].headers["Retry-After"]) >= 1
    world.refused("PATCH", path, "web", 429, json={"password": STRONG, "current_password": ANNA_PASSWORD},
                  match="too many wrong passwords")  # fmt: skip


# --- finding 4, at the registry's door: names and addresses that would smuggle a recipient or a header -------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "cat,attacker@evil.example"),
        ("email", "Cat <attacker@evil.example>"),
        ("email", '"cat"@clinica.example'),
        ("email", "cat@clinica.example\nBcc: attacker@evil.example"),
        ("name", "Carla <attacker@evil.example>,\nBcc: attacker@evil.example"),
        ("name", "Carla\rBcc: attacker@evil.example"),
        ("name", "Carla \u202eelpmaxe.live"),
    ],
)
def test_a_physio_record_cannot_carry_a_second_recipient_or_a_header(world: World, field: str, value: str) -> None:
    body = {"clinic": A, "name": "Carla", "email": "carla@clinica.example", field: value}
    response = world.refused("POST", "/physios", "admin", 422, json=body)
    assert "attacker" not in response.text


def test_plain_names_and_addresses_stay_accepted(world: World) -> None:
    body = {"clinic": A, "name": "Zoë Ünal-O'Brien", "email": "zoe.unal+physio@clinic-a.example.org"}
    assert world.ok("POST", "/physios", json=body, status=201)


def test_the_bootstrap_ingester_token_reads_the_snapshot_only_and_a_new_one_replaces_it(tmp_path: Path) -> None:
    """Compose's ingester reads the registry over the API with REGISTRY_INGEST_TOKEN, not its database file."""
    from fastapi.testclient import TestClient

    url = f"sqlite:///{tmp_path / 'registry.db'}"

    def settings(ingester: str) -> RegistrySettings:
        return RegistrySettings(database_url=url, bootstrap_admin_token=NEW_TOKEN, bootstrap_ingester_token=ingester)

    with TestClient(app_from_settings(settings(OLD_TOKEN))) as first:
        as_ingester = {"Authorization": f"Bearer {OLD_TOKEN}"}
        assert first.get("/api/v1/enrichment/snapshot", headers=as_ingester).status_code == 200
        assert first.get("/api/v1/patients", headers=as_ingester).status_code == 403
    rotated = "Zr8mW2xK5pQ9tV1bN4cH7jL0sF3gD6yA2eU8iO5uP1w"
    with TestClient(app_from_settings(settings(rotated))) as second:
        assert (
            second.get("/api/v1/enrichment/snapshot", headers={"Authorization": f"Bearer {OLD_TOKEN}"}).status_code
            == 401
        )
        assert (
            second.get("/api/v1/enrichment/snapshot", headers={"Authorization": f"Bearer {rotated}"}).status_code == 200
        )
    with pytest.raises(ValidationError, match="BOOTSTRAP_INGESTER_TOKEN"):
        RegistrySettings(database_url=url, bootstrap_ingester_token="ingester-token-please")
