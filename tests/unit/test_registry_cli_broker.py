"""``compression devices broker-sync``: the broker's files from the registry, by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.registry.secrets import mosquitto_verify
from tests.unit.test_registry_cli import Run, clinic, db_url, fails, run  # noqa: F401  (fixtures)


def test_broker_sync_needs_the_files_configured(clinic: Run) -> None:  # noqa: F811
    assert "COMPRESSION_REGISTRY_BROKER_DIR" in fails(clinic, "broker-sync")


def test_broker_sync_writes_the_account_files(
    clinic: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    passwd, acl = tmp_path / "devices.passwd", tmp_path / "devices.acl"
    monkeypatch.setenv("COMPRESSION_REGISTRY_BROKER_DIR", str(tmp_path))
    created = clinic("device", "add", "sock-0002", "--clinic", "bowvalley", "--kind", "sock", "--json")
    password = __import__("json").loads(created.stdout)["password"]
    passwd.unlink()
    clinic("broker-sync")
    lines = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert set(lines) == {"sock-0001", "sock-0002"}
    assert mosquitto_verify(password, lines["sock-0002"])
    assert "topic write fleet/garments/v1/sock-0002/telemetry" in acl.read_text()
    assert (tmp_path / "services.passwd").read_text() == "" and (tmp_path / "services.acl").exists()
    clinic("device", "revoke", "sock-0002")
    assert "sock-0002" not in passwd.read_text()


def test_broker_config_writes_and_checks_the_deployed_files(run: Run, tmp_path: Path) -> None:  # noqa: F811
    # The committed deploy/mosquitto files are up to date (the default folder).
    assert "up to date" in run("broker-config", "--check").output
    out = str(tmp_path)
    assert "out of date" in fails(run, "broker-config", "--check", "--out", out)
    written = run("broker-config", "--out", out).output
    assert "mosquitto.conf" in written and "services.acl" in written
    assert "up to date" in run("broker-config", "--check", "--out", out).output
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(conf.read_text().replace("use_username_as_clientid true", "use_username_as_clientid false"))
    assert "mosquitto.conf" in fails(run, "broker-config", "--check", "--out", out)
