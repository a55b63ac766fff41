"""Dashboards' isolation: one deployment per organisation, each with its own InfluxDB database and users.

docs/security.md explains the choice. What makes it hold is tested here against
a real InfluxDB with authentication, its users made by the same script the
compose stack runs (deploy/influxdb/compression-users.sh): two organisations
sharing one InfluxDB server (a hosting provider's case), and the Grafana user
of one of them trying to read, write and widen its rights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from compression.localservers import InfluxDB, remove_server_folder, start_influxdb

ROOT = Path(__file__).resolve().parents[2]
USERS_SCRIPT = ROOT / "deploy" / "influxdb" / "compression-users.sh"
ADMIN = ("admin", "admin-secret-for-the-test")
Orgs = dict[str, dict[str, tuple[str, str]]]
"""Per organisation (its database's name): its users by role, as (name, password)."""

# `$INFLUX_CMD "<statement>"` in the users script: here a statement posted to /query as the admin.
INFLUX_EXEC = """
import os, sys, urllib.parse, urllib.request
body = urllib.parse.urlencode({"q": sys.argv[-1]}).encode()
req = urllib.request.Request(os.environ["TEST_INFLUX_URL"] + "/query", data=body)
req.add_header("Authorization", "Basic " + os.environ["TEST_INFLUX_BASIC"])
with urllib.request.urlopen(req, timeout=10) as resp:
    sys.exit(0 if b'"error"' not in resp.read() else 1)
"""


def _basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _request(db: InfluxDB, path: str, user: tuple[str, str], data: dict[str, str] | bytes) -> tuple[int, str]:
    body = data if isinstance(data, bytes) else urllib.parse.urlencode(data).encode()
    req = urllib.request.Request(f"{db.url}{path}", data=body)
    req.add_header("Authorization", f"Basic {_basic(*user)}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# Points a day old: inside the raw retention the users script sets (13 months), as every live point is.
RECENT_NS = (int(time.time()) - 86_400) * 1_000_000_000


def query(db: InfluxDB, statement: str, user: tuple[str, str], database: str = "") -> tuple[int, str]:
    """Status and body of an InfluxQL statement, as ``user``."""
    return _request(db, "/query", user, {"q": statement, "db": database})


def write(db: InfluxDB, database: str, line: str, user: tuple[str, str]) -> int:
    return _request(db, f"/write?db={database}", user, line.encode())[0]


def make_users(db: InfluxDB, tmp_path: Path, database: str, prefix: str) -> dict[str, tuple[str, str]]:
    """Run the compose stack's users script for one organisation's database."""
    exec_file = tmp_path / "influx-exec.py"
    exec_file.write_text(INFLUX_EXEC)
    users = {
        "monitor": (f"{prefix}monitor", f"{prefix}monitor-pw"),
        "grafana": (f"{prefix}grafana", f"{prefix}grafana-pw"),
    }
    env = {**os.environ, "INFLUX_CMD": f"{sys.executable} {exec_file}", "INFLUXDB_DB": database,
           "TEST_INFLUX_URL": db.url, "TEST_INFLUX_BASIC": _basic(*ADMIN),
           "INFLUXDB_MONITOR_USER": users["monitor"][0], "INFLUXDB_MONITOR_PASSWORD": users["monitor"][1],
           "INFLUXDB_GRAFANA_USER": users["grafana"][0], "INFLUXDB_GRAFANA_PASSWORD": users["grafana"][1]}  # fmt: skip
    done = subprocess.run(["bash", str(USERS_SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return users


@pytest.fixture(scope="module")
def secured_influx(servers_root: Path) -> Iterator[InfluxDB]:
    server = start_influxdb(servers_root, auth=True)
    # With no user yet, InfluxDB 1.x accepts exactly this one statement without credentials.
    assert query(server, f"CREATE USER {ADMIN[0]} WITH PASSWORD '{ADMIN[1]}' WITH ALL PRIVILEGES", ("", ""))[0] == 200
    yield server
    server.kill()
    remove_server_folder(server.folder)


@pytest.fixture(scope="module")
def two_organisations(
    secured_influx: InfluxDB, tmp_path_factory: pytest.TempPathFactory
) -> Orgs:
    db = secured_influx
    orgs = {}
    for name in ("org_a", "org_b"):
        assert query(db, f'CREATE DATABASE "{name}"', ADMIN)[0] == 200
        orgs[name] = make_users(db, tmp_path_factory.mktemp(name), name, f"{name}_")
        line = f"sample,clinic={name}-clinic,patient=PT-{name.upper()} ankle_mmhg=24 {RECENT_NS}"
        assert write(db, name, line, ADMIN) == 204
    return orgs


def test_an_organisations_grafana_user_reads_its_own_database(
    secured_influx: InfluxDB, two_organisations: Orgs
) -> None:
    status, body = query(secured_influx, "SELECT * FROM sample", two_organisations["org_a"]["grafana"], "org_a")
    assert status == 200 and "PT-ORG_A" in body, body


def test_it_reads_nothing_of_another_organisation(secured_influx: InfluxDB, two_organisations: Orgs) -> None:
    grafana_a = two_organisations["org_a"]["grafana"]
    for statement in ("SELECT * FROM sample", "SHOW TAG VALUES FROM sample WITH KEY = patient", "SHOW SERIES"):
        status, body = query(secured_influx, statement, grafana_a, "org_b")
        assert status == 403 or "not authorized" in body, (statement, status, body)
        assert "PT-ORG_B" not in body
    # A statement naming the other database inside its FROM clause is refused too.
    status, body = query(secured_influx, 'SELECT * FROM "org_b"."autogen"."sample"', grafana_a, "org_a")
    assert "PT-ORG_B" not in body and (status == 403 or "not authorized" in body), body
    # Listing databases shows only what the user may read.
    status, body = query(secured_influx, "SHOW DATABASES", grafana_a)
    assert "org_b" not in body, body


def test_it_can_neither_write_nor_widen_its_rights(secured_influx: InfluxDB, two_organisations: Orgs) -> None:
    grafana_a = two_organisations["org_a"]["grafana"]
    assert write(secured_influx, "org_a", f"sample,patient=PT-FAKE ankle_mmhg=1 {RECENT_NS}", grafana_a) == 403
    widen = [
        f'GRANT READ ON "org_b" TO "{grafana_a[0]}"',
        f'GRANT ALL PRIVILEGES TO "{grafana_a[0]}"',
        "CREATE USER intruder WITH PASSWORD 'x' WITH ALL PRIVILEGES",
        'DROP DATABASE "org_b"',
    ]
    for statement in widen:
        status, body = query(secured_influx, statement, grafana_a)
        assert status == 403 or "not authorized" in body or "requires admin" in body, (statement, status, body)
    status, body = query(secured_influx, "SELECT * FROM sample", two_organisations["org_b"]["grafana"], "org_b")
    assert "PT-ORG_B" in body and "PT-FAKE" not in body, body


def test_the_monitors_user_writes_its_own_database_only(secured_influx: InfluxDB, two_organisations: Orgs) -> None:
    monitor_a = two_organisations["org_a"]["monitor"]
    assert (
        write(secured_influx, "org_a", f"flag_day,patient=PT-ORG_A under_use=1i {RECENT_NS}", monitor_a) == 204
    )
    assert (
        write(secured_influx, "org_b", f"flag_day,patient=PT-ORG_B under_use=1i {RECENT_NS}", monitor_a) == 403
    )
    status, body = query(secured_influx, "SELECT * FROM sample", monitor_a, "org_b")
    assert "PT-ORG_B" not in body and (status == 403 or "not authorized" in body), body


def test_the_stack_gives_grafana_only_the_read_only_user_and_no_anonymous_or_self_made_accounts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert grafana["INFLUXDB_READ_USER"].startswith("${INFLUXDB_GRAFANA_USER")
    influx_env = compose["services"]["influxdb"]["environment"]
    assert influx_env["INFLUXDB_GRAFANA_USER"].startswith("${INFLUXDB_GRAFANA_USER")
    assert influx_env["INFLUXDB_DB"] == grafana["COMPRESSION_INFLUX_DATABASE"]  # one database: this organisation's
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/influxdb.yaml").read_text())
    (influx_source,) = [s for s in sources["datasources"] if s["type"] == "influxdb"]
    assert influx_source["user"] == "${INFLUXDB_READ_USER}" and influx_source["editable"] is False
    assert json.dumps(influx_source).count("ADMIN") == 0
