"""The registry's Mosquitto files: what the renderers write, how they are replaced, and how reloads fail."""

from __future__ import annotations

import grp
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from devices.registry import schemas as s
from devices.registry.broker import (
    FILE_MODE,
    BrokerSync,
    BrokerSyncError,
    read_pid,
    reload_broker,
    render_acl_file,
    render_password_file,
    usable_accounts,
    write_broker_files,
)
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.errors import InvalidError, RegistryError
from devices.registry.secrets import mosquitto_hash, mosquitto_verify
from devices.registry.service import SYSTEM, BrokerAccounts, Registry

H = {name: mosquitto_hash(f"pw-{name}") for name in ("sock-a", "sock-b", "hub-1", "hub-2", "svc.ingest")}
ACCOUNTS = BrokerAccounts(
    devices=(("sock-b", H["sock-b"]), ("sock-a", H["sock-a"])),
    gateways=(("hub-2", H["hub-2"], ()), ("hub-1", H["hub-1"], ("sock-c", "sock-d"))),
    readers=(("svc.ingest", H["svc.ingest"]),),
)


def rules(acl: str) -> list[str]:
    return [line for line in acl.splitlines() if line.strip() and not line.startswith("#")]


def block(acl: str, user: str) -> list[str]:
    lines = rules(acl)
    start = lines.index(f"user {user}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("user ")), len(lines))
    return lines[start + 1 : end]


def test_password_file_has_every_account_once_sorted() -> None:
    text = render_password_file(ACCOUNTS)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert [line.split(":", 1)[0] for line in lines] == ["hub-1", "hub-2", "sock-a", "sock-b", "svc.ingest"]
    for line in lines:
        name, hashed = line.split(":", 1)
        assert hashed == H[name] and mosquitto_verify(f"pw-{name}", hashed)


def test_empty_accounts_render_empty_files_mosquitto_accepts() -> None:
    empty = BrokerAccounts((), (), ())
    assert render_password_file(empty) == ""
    assert rules(render_acl_file(empty)) == ["pattern write garments/v1/%u/#"]


def test_acl_gives_own_topics_by_pattern_gateways_their_garments_and_readers_read_only() -> None:
    acl = render_acl_file(ACCOUNTS)
    lines = rules(acl)
    assert lines[0] == "pattern write garments/v1/%u/#", "the pattern comes before any user block"
    assert [line for line in lines if line.startswith("pattern ")] == ["pattern write garments/v1/%u/#"]
    first_user = next(i for i, line in enumerate(lines) if line.startswith("user "))
    assert not any(line.startswith("topic ") for line in lines[:first_user]), "topics for anonymous clients"
    assert block(acl, "hub-1") == ["topic write garments/v1/sock-c/#", "topic write garments/v1/sock-d/#"]
    assert block(acl, "hub-2") == []
    # The pattern applies to readers too: the deny line takes back their own-name topics.
    assert block(acl, "svc.ingest") == ["topic read garments/v1/#", "topic deny garments/v1/svc.ingest/#"]
    assert not any(line in (f"user {d}" for d in ("sock-a", "sock-b")) for line in lines), "devices need no block"


def test_acl_is_deterministic() -> None:
    shuffled = BrokerAccounts(ACCOUNTS.devices[::-1], ACCOUNTS.gateways[::-1], ACCOUNTS.readers)
    assert render_acl_file(shuffled) == render_acl_file(ACCOUNTS)
    assert render_password_file(shuffled) == render_password_file(ACCOUNTS)


@pytest.mark.parametrize("name", ["ingest team", "a:b", "x\nuser evil", "#", "a/b", "a+b", "%u", "", "é"])
def test_unsafe_names_are_refused_by_the_renderers_and_left_out_by_usable_accounts(name: str) -> None:
    bad = BrokerAccounts(ACCOUNTS.devices, ACCOUNTS.gateways, (*ACCOUNTS.readers, (name, mosquitto_hash("x"))))
    with pytest.raises(BrokerSyncError):
        render_password_file(bad)
    with pytest.raises(BrokerSyncError):
        render_acl_file(bad)
    kept, skipped = usable_accounts(bad)
    assert skipped == [name] and kept == ACCOUNTS


def test_usable_accounts_drops_unsafe_relayed_garments_and_bad_hashes() -> None:
    odd = BrokerAccounts((("sock-a", "plaintext"),), (("hub-1", H["hub-1"], ("sock-c", "bad id")),), ())
    kept, skipped = usable_accounts(odd)
    assert skipped == ["sock-a"]
    assert kept == BrokerAccounts((), (("hub-1", H["hub-1"], ("sock-c",)),), ())
    with pytest.raises(BrokerSyncError, match="not a mosquitto"):
        render_password_file(BrokerAccounts((("sock-a", "plaintext"),), (), ()))


def test_sha512_hashes_of_mosquitto_passwd_are_accepted() -> None:
    six = "$6$c2FsdHNhbHQ=$" + "A" * 86 + "=="
    assert render_password_file(BrokerAccounts((("sock-a", six),), (), ())) == f"sock-a:{six}\n"


def test_write_broker_files_replaces_atomically_with_a_broker_readable_mode(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("old:stuff\n")
    before = passwd.stat().st_ino
    write_broker_files(ACCOUNTS, passwd, acl)
    assert passwd.read_text() == render_password_file(ACCOUNTS)
    assert acl.read_text() == render_acl_file(ACCOUNTS)
    assert passwd.stat().st_ino != before, "replaced by rename, never rewritten in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acl", "passwd"], "no temp file left behind"
    broker_group = {g.gr_name: g.gr_gid for g in grp.getgrall()}.get("mosquitto")
    for path in (passwd, acl):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == FILE_MODE == 0o640, "readable by owner and group, nobody else"
        if os.geteuid() == 0 and broker_group is not None:
            assert (info.st_uid, info.st_gid) == (0, broker_group), "root:mosquitto, so the broker can read it"


def test_write_into_a_missing_folder_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerSyncError, match="cannot write") as caught:
        write_broker_files(ACCOUNTS, tmp_path / "nowhere" / "passwd", tmp_path / "acl")
    assert isinstance(caught.value, RegistryError) and isinstance(caught.value.__cause__, OSError)


def test_read_pid_errors(tmp_path: Path) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    with pytest.raises(BrokerSyncError, match="cannot read") as caught:
        read_pid(pid_file)
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    pid_file.write_text("nonsense\n")
    with pytest.raises(BrokerSyncError, match="not a process id"):
        read_pid(pid_file)
    pid_file.write_text("1\n")
    with pytest.raises(BrokerSyncError):
        read_pid(pid_file)
    pid_file.write_text("4242\n")
    assert read_pid(pid_file) == 4242


def test_reload_refuses_a_stale_pid_and_a_process_that_is_not_mosquitto(tmp_path: Path) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    done = subprocess.Popen(["true"])
    done.wait()
    pid_file.write_text(f"{done.pid}\n")
    with pytest.raises(BrokerSyncError, match="stale pid file"):
        reload_broker(pid_file)
    pid_file.write_text(f"{os.getpid()}\n")  # this Python process: it must not get a SIGHUP
    with pytest.raises(BrokerSyncError, match="not mosquitto"):
        reload_broker(pid_file)


def registry_at(tmp_path: Path) -> Registry:
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    return Registry(session_factory(engine))


def test_broker_sync_follows_the_registry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = registry_at(tmp_path)
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    sync = BrokerSync(registry, passwd, acl)  # no pid file: files only
    registry.on_credentials_changed = sync
    registry.create_clinic(SYSTEM, s.ClinicIn(code="north", name="North", timezone="Europe/Berlin"))
    hub = registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id="hub-1", clinic="north"))
    sock = registry.create_device(SYSTEM, s.DeviceIn(device_id="sock-a", clinic="north", kind="sock",
                                                     gateway="hub-1"))  # fmt: skip
    registry.create_service_account(SYSTEM, "svc.ingest")
    assert sync.syncs == 3
    lines = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert set(lines) == {"hub-1", "sock-a", "svc.ingest"}
    assert mosquitto_verify(hub.password, lines["hub-1"]) and mosquitto_verify(sock.password, lines["sock-a"])
    assert block(acl.read_text(), "hub-1") == ["topic write garments/v1/sock-a/#"]

    registry.revoke(SYSTEM, "device", "sock-a")
    assert sync.syncs == 4
    assert "sock-a" not in passwd.read_text()
    assert block(acl.read_text(), "hub-1") == [], "a revoked garment is no longer relayed"

    # A name the files cannot hold never gets into the registry; the renderers guard the files anyway (above).
    with pytest.raises(InvalidError, match="service account names"):
        registry.create_service_account(SYSTEM, "ingest team")
    assert sync.syncs == 4 and "ingest team" not in passwd.read_text()
    with caplog.at_level(logging.INFO, logger="devices.registry.broker"):
        sync()
    assert sync.syncs == 5 and "sync #5" in caplog.text


def test_broker_sync_failure_says_the_change_is_saved(tmp_path: Path) -> None:
    registry = registry_at(tmp_path)
    registry.on_credentials_changed = BrokerSync(registry, tmp_path / "passwd", tmp_path / "acl",
                                                 tmp_path / "missing.pid")  # fmt: skip
    registry.create_clinic(SYSTEM, s.ClinicIn(code="north", name="North", timezone="Europe/Berlin"))
    with pytest.raises(BrokerSyncError, match="saved the change") as caught:
        registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id="hub-1", clinic="north"))
    assert isinstance(caught.value.__cause__, BrokerSyncError)
    assert [g.gateway_id for g in registry.list_gateways(SYSTEM)] == ["hub-1"]
