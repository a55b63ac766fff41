"""``compression devices ...`` on a SQLite file: every command group, one-line refusals, all-or-nothing CSV import."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from compression.cli import cli
from devices.protocol import CHANNELS
from devices.registry.cli import devices
from devices.registry.csvimport import KINDS
from devices.registry.db import make_engine, session_factory
from devices.registry.secrets import mosquitto_verify
from devices.registry.service import SYSTEM, Registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "registry-examples"
ORDER = ["clinics", "physios", "patients", "gateways", "devices", "assignments", "prescriptions", "contraindications"]
Run = Callable[..., Result]


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout, no var/ written there
    for name in list(os.environ):
        if name.startswith("COMPRESSION_REGISTRY_"):
            monkeypatch.delenv(name)
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
def run(db_url: str) -> Run:
    """``compression devices --database-url URL ARGS...``; by default the command must succeed."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, code: int = 0) -> Result:
        result = runner.invoke(cli, ["devices", "--database-url", db_url, *args], input=input, prog_name="compression")
        assert result.exit_code == code, (result.output, result.exception)
        assert "Traceback" not in result.output
        return result

    return invoke


def fails(run: Run, *args: str, code: int = 1) -> str:
    """The one-line refusal a failing command prints on stderr."""
    result = run(*args, code=code)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or code == 2, result.stderr
    return lines[-1]


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    engine = make_engine(db_url)
    yield Registry(session_factory(engine))
    engine.dispose()


@pytest.fixture
def clinic(run: Run) -> Run:
    """A clinic with a physio, two patients and a sock."""
    run("clinic", "add", "bowvalley", "--name", "Bow Valley", "--timezone", "America/Edmonton")
    run("physio", "add", "--clinic", "bowvalley", "--name", "Ana Moreau", "--email", "ana@bowvalley.example")
    run("patient", "add", "BV-0001", "--clinic", "bowvalley", "--physio", "ana@bowvalley.example")
    run("patient", "add", "BV-0002", "--clinic", "bowvalley", "--display-name", "Second")
    run("device", "add", "sock-0001", "--clinic", "bowvalley", "--kind", "sock")
    return run


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_explains_itself(run: Run) -> None:
    paths = list(_commands(devices))
    assert len(paths) >= 40
    for path in paths:
        result = run(*path, "--help")
        assert "Usage: compression devices " + " ".join(path) in result.output
        summary = result.output.split("\n\n")[1].strip()
        assert len(summary) > 15, path
    assert {"serve", "broker-sync"} <= set(devices.commands)


def test_migrate_and_clinics(run: Run) -> None:
    assert "schema at revision 0003" in run("migrate").stdout
    assert run("migrate").exit_code == 0
    run("clinic", "add", "bowvalley", "--name", "Bow Valley", "--timezone", "America/Edmonton")
    table = run("clinic", "list").stdout.splitlines()
    assert table[0].split() == ["CODE", "NAME", "TIMEZONE"] and table[1].split()[0] == "bowvalley"
    assert as_json(run("clinic", "list", "--json")) == [
        {"code": "bowvalley", "name": "Bow Valley", "timezone": "America/Edmonton"}
    ]


def test_refusals_are_one_line_with_exit_1(clinic: Run) -> None:
    run = clinic
    assert fails(run, "clinic", "add", "bowvalley", "--name", "X", "--timezone", "UTC") == (
        "error: clinic 'bowvalley' already exists"
    )
    assert fails(run, "patient", "show", "NOPE-1") == "error: no patient 'NOPE-1'"
    assert fails(run, "assign", "sock-0001", "NOPE-1") == "error: no patient 'NOPE-1'"
    assert "unknown time zone" in fails(run, "clinic", "add", "canmore", "--name", "C", "--timezone", "Mars/Base")
    assert fails(run, "device", "add", "sock-0001", "--clinic", "bowvalley", "--kind", "sock") == (
        "error: 'sock-0001' is already registered (as a device)"
    )
    run("assign", "sock-0001", "BV-0001", "--from", "2026-11-01T08:00:00Z")
    overlap = fails(run, "assign", "sock-0001", "BV-0002", "--from", "2026-11-10T08:00:00Z")
    assert overlap.startswith("error: device sock-0001 is assigned to BV-0001 from 2026-11-01T08:00:00+00:00")
    assert "offset" in fails(run, "assign", "sock-0001", "BV-0002", "--from", "2026-11-10T08:00:00")
    # Usage errors stay click's: exit 2.
    assert "Missing option '--timezone'" in fails(run, "clinic", "add", "x1", "--name", "X", code=2)
    assert "ASSIGNMENT_ID or --device" in fails(run, "unassign", code=2)


def test_physios_with_prompted_password(clinic: Run, registry: Registry) -> None:
    run = clinic
    run("physio", "add", "--clinic", "bowvalley", "--name", "Ben Okafor", "--email", "ben@bowvalley.example",
        "--password", input="first-secret-1\nfirst-secret-1\n")  # fmt: skip
    assert registry.login("ben@bowvalley.example", "first-secret-1")
    result = run("physio", "update", "ben@bowvalley.example", "--password", input="second-secret\nsecond-secret\n")
    assert "second-secret" not in result.output  # hidden input
    assert registry.login("ben@bowvalley.example", "second-secret")
    run("physio", "update", "ana@bowvalley.example", "--name", "Ana M.", "--inactive")
    rows = as_json(run("physio", "list", "--clinic", "bowvalley", "--json"))
    assert [(r["email"], r["name"], r["active"]) for r in rows] == [
        ("ana@bowvalley.example", "Ana M.", False), ("ben@bowvalley.example", "Ben Okafor", True),
    ]  # fmt: skip
    assert "nothing to change" in fails(run, "physio", "update", "ana@bowvalley.example", code=2)
    assert "at least 12 characters" in fails(run, "physio", "update", "ana@bowvalley.example", "--password", "short")


def test_patients(clinic: Run) -> None:
    run = clinic
    run("patient", "update", "BV-0002", "--physio", "ana@bowvalley.example", "--clear-display-name")
    rows = as_json(run("patient", "list", "--physio", "ana@bowvalley.example", "--json"))
    assert [(r["code"], r["display_name"]) for r in rows] == [("BV-0001", None), ("BV-0002", None)]
    run("assign", "sock-0001", "BV-0001", "--from", "2026-11-01T08:00:00Z")
    shown = as_json(run("patient", "show", "BV-0001", "--json"))
    assert shown["patient"]["physio"] == "ana@bowvalley.example"
    assert [a["device_id"] for a in shown["assignments"]] == ["sock-0001"]
    text = run("patient", "show", "BV-0001").stdout
    assert "assignments:" in text and "prescriptions:" in text and "contraindications:" in text


def test_gateways_and_devices_print_credentials_once(clinic: Run, registry: Registry) -> None:
    run = clinic
    added = run("gateway", "add", "gw-0001", "--clinic", "bowvalley", "--description", "hub")
    assert "shown only once" in added.stderr
    password = added.stdout.splitlines()[1].removeprefix("password: ")
    gateways = {name: hashed for name, hashed, _ in registry.broker_accounts().gateways}
    assert mosquitto_verify(password, gateways["gw-0001"])

    creds = as_json(run("device", "add", "boot-0001", "--clinic", "bowvalley", "--kind", "boot", "--gateway",
                        "gw-0001", "--zones", "foot,calf", "--json"))  # fmt: skip
    assert creds["username"] == "boot-0001" and creds["may_publish"] == [f"garments/v1/boot-0001/{c}" for c in CHANNELS]
    assert mosquitto_verify(creds["password"], dict(registry.broker_accounts().devices)["boot-0001"])
    assert as_json(run("gateway", "list", "--json"))[0]["devices"] == ["boot-0001"]

    run("device", "update", "boot-0001", "--firmware", "2.1", "--detach-gateway")
    shown = as_json(run("device", "show", "boot-0001", "--json"))["device"]
    assert (shown["firmware"], shown["gateway"], shown["zones"]) == ("2.1", None, ["foot", "calf"])
    rotated = as_json(run("device", "rotate", "boot-0001", "--json"))
    assert not mosquitto_verify(creds["password"], dict(registry.broker_accounts().devices)["boot-0001"])
    assert mosquitto_verify(rotated["password"], dict(registry.broker_accounts().devices)["boot-0001"])
    assert "password:" in run("gateway", "rotate", "gw-0001").stdout

    run("device", "revoke", "boot-0001")
    run("gateway", "revoke", "gw-0001")
    assert "already revoked" in fails(run, "device", "revoke", "boot-0001")
    assert [d["device_id"] for d in as_json(run("device", "list", "--json")) if d["revoked"]] == ["boot-0001"]
    assert "gw-0001" in run("gateway", "list").stdout


def test_assign_and_unassign(clinic: Run) -> None:
    run = clinic
    first = run("assign", "sock-0001", "BV-0001", "--from", "2026-10-01T00:00:00Z").stdout
    assert first.startswith("assignment 1: sock-0001 -> BV-0001")
    assert "ended at 2026-10-15T00:00:00+00:00" in run("unassign", "--device", "sock-0001", "--at",
                                                       "2026-10-15T00:00:00Z").stdout  # fmt: skip
    assert "no open assignment" in fails(run, "unassign", "--device", "sock-0001")
    run("assign", "sock-0001", "BV-0002", "--from", "2026-10-15T00:00:00Z")
    run("unassign", "2", "--at", "2026-10-20T00:00:00+02:00")
    history = as_json(run("device", "show", "sock-0001", "--json"))["assignments"]
    assert [(a["patient"], a["valid_to"]) for a in history] == [
        ("BV-0001", "2026-10-15T00:00:00Z"), ("BV-0002", "2026-10-19T22:00:00Z"),
    ]  # fmt: skip


def test_prescriptions_and_contraindications(clinic: Run) -> None:
    run = clinic
    out = run("prescribe", "--patient", "BV-0001", "--garment-kind", "sock", "--valid-from", "2026-11-01",
              "--class-system", "ral", "--class-name", "2", "--wear-hours-per-day", "10",
              "--zones", "ankle;calf")  # fmt: skip
    assert out.stdout == "prescription 1 for BV-0001: sock from 2026-11-01, ankle 23-32 mmHg, 10 h/day\n"
    run("prescribe", "--patient", "BV-0001", "--garment-kind", "boot", "--valid-from", "2026-11-01",
        "--sessions-per-week", "7", "--session-min-minutes", "30", "--session-max-minutes", "60",
        "--max-chamber-mmhg", "50")  # fmt: skip
    assert "already has a sock prescription" in fails(
        run, "prescribe", "--patient", "BV-0001", "--garment-kind", "sock", "--valid-from", "2026-12-01",
        "--class-system", "us", "--class-name", "1", "--wear-hours-per-day", "8")  # fmt: skip
    # A change is a new version from its effective date; the old one ends the day before, unchanged.
    out = run("prescription", "update", "1", "--wear-hours-per-day", "12", "--valid-to", "2026-12-31",
              "--effective-from", "2026-11-20")  # fmt: skip
    assert out.stdout.endswith("(new version from 2026-11-20; #1 ends the day before)\n")
    (new_id,) = [r["id"] for r in as_json(run("prescription", "list", "--patient", "BV-0001", "--json"))
                 if r["supersedes"] == 1]  # fmt: skip
    shown = as_json(run("prescription", "show", str(new_id), "--json"))
    assert (shown["wear_hours_per_day"], shown["valid_from"], shown["valid_to"]) == (12.0, "2026-11-20", "2026-12-31")
    old = as_json(run("prescription", "show", "1", "--json"))
    assert (old["wear_hours_per_day"], old["valid_to"]) == (10.0, "2026-11-19")
    run("prescription", "update", str(new_id), "--open-ended")  # ending (or not) is not a new version
    assert as_json(run("prescription", "show", str(new_id), "--json"))["valid_to"] is None
    assert len(as_json(run("prescription", "list", "--patient", "BV-0001", "--json"))) == 3
    assert "ankle_min_mmhg" in run("prescription", "show", "1").stdout

    run("contraindication", "add", "BV-0002", "--kind", "abpi", "--abpi", "0.5", "--noted-on", "2026-10-01")
    refused = fails(run, "prescribe", "--patient", "BV-0002", "--garment-kind", "sock", "--class-system", "uk",
                    "--class-name", "1", "--wear-hours-per-day", "8")  # fmt: skip
    assert "contraindicated for BV-0002: ABPI 0.50 is below 0.6" in refused
    assert "give abpi exactly when kind is abpi" in fails(run, "contraindication", "add", "BV-0002", "--kind", "abpi")
    run("contraindication", "resolve", "1", "--on", "2026-10-20")
    rows = as_json(run("contraindication", "list", "BV-0002", "--json"))
    assert [(r["kind"], r["resolved_on"]) for r in rows] == [("abpi", "2026-10-20")]


def test_tokens_service_accounts_and_audit(clinic: Run, registry: Registry) -> None:
    run = clinic
    created = run("token", "create", "ops", "--role", "admin")
    token = created.stdout.strip()
    assert token.startswith("ct_") and "shown only once" in created.stderr
    assert registry.authenticate(token).role == "admin"
    run("token", "create", "ana-laptop", "--role", "physio", "--physio", "ana@bowvalley.example")
    assert [t["name"] for t in as_json(run("token", "list", "--json"))] == ["ops", "ana-laptop"]
    assert all(t["token"] is None for t in as_json(run("token", "list", "--json")))
    run("token", "revoke", "1")
    assert [t["name"] for t in as_json(run("token", "list", "--json"))] == ["ana-laptop"]
    assert "a physio token names its physio" in fails(run, "token", "create", "x", "--role", "physio")

    account = run("service-account", "add", "ingester-1")
    assert "username: ingester-1" in account.stdout and "shown only once" in account.stderr

    entries = as_json(run("audit", "--json", "--limit", "100"))
    assert entries[0]["entity"] == "service_account" and entries[0]["actor"].startswith("cli:")
    assert {e["entity"] for e in entries} >= {"clinic", "physio", "patient", "device", "token", "service_account"}
    patients = as_json(run("audit", "--entity", "patient", "--key", "BV-0001", "--json"))
    assert [(e["action"], e["key"]) for e in patients] == [("create", "BV-0001")]
    assert "ACTOR" in run("audit", "--limit", "3").stdout


def _import_examples(run: Run, tmp_path: Path) -> dict[str, Result]:
    results = {}
    for kind in ORDER:
        extra = ["--credentials-out", str(tmp_path / "devices-credentials.csv")] if kind == "devices" else []
        results[kind] = run("import", kind, str(EXAMPLES / f"{kind}.csv"), *extra)
    return results


def test_import_shipped_examples(run: Run, tmp_path: Path, registry: Registry) -> None:
    results = _import_examples(run, tmp_path)
    assert "imported 2 row(s) of clinics" in results["clinics"].stderr
    gateway_lines = results["gateways"].stdout.splitlines()
    assert gateway_lines[0].startswith("# MQTT credentials, shown only once")
    name, password = gateway_lines[1].split(",")
    assert name == "gw-bv-0001"
    assert mosquitto_verify(password, registry.broker_accounts().gateways[0][1])

    written = tmp_path / "devices-credentials.csv"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600 and results["devices"].stdout == ""
    pairs = dict(line.split(",") for line in written.read_text().splitlines()[1:])
    hashes = dict(registry.broker_accounts().devices)
    assert sorted(pairs) == sorted(hashes) and all(mosquitto_verify(pairs[d], hashes[d]) for d in pairs)

    assert len(registry.list_clinics(SYSTEM)) == 2 and len(registry.list_physios(SYSTEM)) == 3
    assert registry.get_patient(SYSTEM, "LS-0001").display_name == "Müller, K."
    assert registry.get_device(SYSTEM, "sock-bv-0002").zones == ["ankle", "calf", "thigh"]
    assert len(registry.list_assignments(SYSTEM)) == 4
    rx = registry.list_prescriptions(SYSTEM, "BV-0002")[0]
    assert (rx.class_system, rx.ankle_max_mmhg, rx.wear_days_per_week) == ("explicit", 25.0, 5)
    assert len(registry.list_contraindications(SYSTEM, "BV-0002")) == 1
    assert "exists" in fails(run, "import", "devices", str(EXAMPLES / "devices.csv"), "--credentials-out", str(written))


def test_import_with_bad_rows_writes_nothing_and_reports_every_line(clinic: Run, tmp_path: Path) -> None:
    run = clinic
    bad = tmp_path / "devices.csv"
    bad.write_text("device_id,clinic,kind,zones\n"
                   "# garments from the October batch\n"
                   "sock-0100,bowvalley,sock,ankle;calf\n"
                   "sock-0101,bowvalley,shoe,\n"
                   "x,bowvalley,sock,\n"
                   "\n"
                   "sock-0102,bowvalley,sock,ankle|elbow\n"
                   "sock-0103,bowvalley,sock,,surplus\n")  # fmt: skip
    result = run("import", "devices", str(bad), code=1)
    lines = result.stderr.strip().splitlines()
    assert [line.split(":")[1] for line in lines[:-1]] == ["4", "5", "7", "8"]
    assert "kind: Input should be 'sock' or 'boot'" in lines[0] and "device_id" in lines[1]
    assert "zones.1" in lines[2] and "5 cells but only 4 columns" in lines[3]
    assert lines[-1] == f"error: 4 problem(s) in {bad}; nothing was imported"
    assert [d["device_id"] for d in as_json(run("device", "list", "--json"))] == ["sock-0001"]

    refused = tmp_path / "patients.csv"
    refused.write_text("clinic,code\nbowvalley,BV-0100\nbowvalley,BV-0001\nnowhere,BV-0101\nbowvalley,BV-0100\n")
    lines = run("import", "patients", str(refused), code=1).stderr.strip().splitlines()
    assert lines == [
        f"{refused}:3: patient code 'BV-0001' is taken",
        f"{refused}:4: no clinic 'nowhere'",
        f"{refused}:5: patient code 'BV-0100' is taken",
        f"error: 3 problem(s) in {refused}; nothing was imported",
    ]
    assert [p["code"] for p in as_json(run("patient", "list", "--json"))] == ["BV-0001", "BV-0002"]

    header = tmp_path / "clinics.csv"
    header.write_text("code,nme\n")
    assert "unknown column(s) nme" in run("import", "clinics", str(header), code=1).stderr


def test_import_dry_run_stores_nothing(clinic: Run, tmp_path: Path) -> None:
    run = clinic
    good = tmp_path / "devices.csv"
    good.write_text("device_id,clinic,kind\nsock-0200,bowvalley,sock\n")
    result = run("import", "devices", str(good), "--dry-run")
    assert "would be imported" in result.stderr and result.stdout == ""
    assert [d["device_id"] for d in as_json(run("device", "list", "--json"))] == ["sock-0001"]


def test_docs_show_the_shipped_examples() -> None:
    docs = (ROOT / "docs" / "registry-csv.md").read_text()
    assert sorted(ORDER) == sorted(KINDS)
    for kind in ORDER:
        text = (EXAMPLES / f"{kind}.csv").read_text()
        assert f"```csv\n{text}```" in docs, kind
        assert set(text.splitlines()[0].split(",")) <= set(KINDS[kind].columns)


def test_an_up_to_date_database_is_not_handed_to_alembic(tmp_path: Path) -> None:
    """Each `compression devices` command checks the schema: at head, that is one query, not Alembic's import and
    checks (most of a short command's time: about 1.3 s before, 0.65 s now on the 2-core build machine)."""
    from alembic.script import ScriptDirectory

    from devices.registry.db import HEAD, MIGRATIONS, alembic_config, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    assert ScriptDirectory.from_config(alembic_config(engine)).get_current_head() == HEAD
    assert MIGRATIONS.is_dir()
    migrate(engine)
    engine.dispose()
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    probe = ("import sys; from devices.registry.db import make_engine, migrate; "
             f"migrate(make_engine('{url}')); print('alembic' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
