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
    DEVICE_ACL,
    DEVICE_PASSWD,
    FILE_MODE,
    SERVICE_ACL,
    SERVICE_PASSWD,
    BrokerSync,
    BrokerSyncError,
    read_pid,
    reload_broker,
    render_devices_acl,
    render_devices_passwd,
    render_files,
    render_services_acl,
    render_services_passwd,
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
FOUR = (DEVICE_PASSWD, DEVICE_ACL, SERVICE_PASSWD, SERVICE_ACL)


def rules(acl: str) -> list[str]:
    return [line for line in acl.splitlines() if line.strip() and not line.startswith("#")]


def block(acl: str, user: str) -> list[str]:
    lines = rules(acl)
    start = lines.index(f"user {user}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("user ")), len(lines))
    return lines[start + 1 : end]


def writes(name: str) -> list[str]:
    return [f"topic write fleet/garments/v1/{name}/{channel}" for channel in ("telemetry", "event", "status")]


def test_password_files_split_devices_and_services_each_account_once_sorted() -> None:
    devices, services = render_devices_passwd(ACCOUNTS), render_services_passwd(ACCOUNTS)
    assert devices.endswith("\n") and services.endswith("\n")
    assert [line.split(":", 1)[0] for line in devices.splitlines()] == ["hub-1", "hub-2", "sock-a", "sock-b"]
    assert [line.split(":", 1)[0] for line in services.splitlines()] == ["svc.ingest"]
    for line in devices.splitlines() + services.splitlines():
        name, hashed = line.split(":", 1)
        assert hashed == H[name] and mosquitto_verify(f"pw-{name}", hashed)


def test_empty_accounts_render_files_mosquitto_accepts_and_that_let_nobody_act() -> None:
    empty = BrokerAccounts((), (), ())
    assert render_devices_passwd(empty) == render_services_passwd(empty) == ""
    assert rules(render_devices_acl(empty)) == rules(render_services_acl([])) == []


def test_device_acl_names_exact_topics_per_account_under_the_mount_point() -> None:
    acl = render_devices_acl(ACCOUNTS)
    lines = rules(acl)
    assert not [line for line in lines if line.startswith("pattern ")], "patterns would apply to every account"
    assert lines[0].startswith("user "), "rules before the first user line would apply to anonymous clients"
    assert block(acl, "sock-a") == writes("sock-a") and block(acl, "sock-b") == writes("sock-b")
    # A gateway: its own status only (no telemetry or events under its id), and its garments' three topics.
    assert block(acl, "hub-1") == ["topic write fleet/garments/v1/hub-1/status", *writes("sock-c"), *writes("sock-d")]
    assert block(acl, "hub-2") == ["topic write fleet/garments/v1/hub-2/status"]
    assert not [line for line in lines if line.startswith("topic read") or (line.startswith("topic ") and "#" in line)]
    assert "svc.ingest" not in acl


def test_service_acl_reads_every_garments_three_topics_and_publishes_nothing() -> None:
    acl = render_services_acl(["svc.ingest"], ["svc.healthcheck"])
    assert block(acl, "svc.ingest") == [f"topic read fleet/garments/v1/+/{channel}"
                                        for channel in ("telemetry", "event", "status")]  # fmt: skip
    assert block(acl, "svc.healthcheck") == ["topic read $SYS/broker/version"]
    assert not [line for line in rules(acl) if line.startswith("topic write") or line.startswith("pattern")]
    assert render_files(ACCOUNTS)[SERVICE_ACL] == render_services_acl(["svc.ingest"])


def test_renderings_are_deterministic() -> None:
    shuffled = BrokerAccounts(ACCOUNTS.devices[::-1], ACCOUNTS.gateways[::-1], ACCOUNTS.readers)
    assert render_files(shuffled) == render_files(ACCOUNTS)


@pytest.mark.parametrize("name", ["ingest team", "a:b", "x\nuser evil", "#", "a/b", "a+b", "%u", "", "é"])
def test_unsafe_names_are_refused_by_the_renderers_and_left_out_by_usable_accounts(name: str) -> None:
    bad = BrokerAccounts(ACCOUNTS.devices, ACCOUNTS.gateways, (*ACCOUNTS.readers, (name, mosquitto_hash("x"))))
    for render in (render_devices_passwd, render_devices_acl, render_services_passwd):
        with pytest.raises(BrokerSyncError):
            render(bad)
    with pytest.raises(BrokerSyncError):
        render_services_acl([name])
    kept, skipped = usable_accounts(bad)
    assert skipped == [name] and kept == ACCOUNTS


def test_usable_accounts_drops_unsafe_relayed_garments_and_bad_hashes() -> None:
    odd = BrokerAccounts((("sock-a", "plaintext"),), (("hub-1", H["hub-1"], ("sock-c", "bad id")),), ())
    kept, skipped = usable_accounts(odd)
    assert skipped == ["sock-a"]
    assert kept == BrokerAccounts((), (("hub-1", H["hub-1"], ("sock-c",)),), ())
    with pytest.raises(BrokerSyncError, match="not a mosquitto"):
        render_devices_passwd(BrokerAccounts((("sock-a", "plaintext"),), (), ()))


def test_sha512_hashes_of_mosquitto_passwd_are_accepted() -> None:
    six = "$6$c2FsdHNhbHQ=$" + "A" * 86 + "=="
    assert render_devices_passwd(BrokerAccounts((("sock-a", six),), (), ())) == f"sock-a:{six}\n"


def test_write_broker_files_replaces_atomically_with_a_broker_readable_mode(tmp_path: Path) -> None:
    passwd = tmp_path / DEVICE_PASSWD
    passwd.write_text("old:stuff\n")
    before = passwd.stat().st_ino
    files = write_broker_files(ACCOUNTS, tmp_path)
    assert files.devices_passwd == passwd and files.services_acl == tmp_path / SERVICE_ACL
    for name, text in render_files(ACCOUNTS).items():
        assert (tmp_path / name).read_text() == text
    assert passwd.stat().st_ino != before, "replaced by rename, never rewritten in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FOUR), "no temp file left behind"
    broker_group = {g.gr_name: g.gr_gid for g in grp.getgrall()}.get("mosquitto")
    for path in (tmp_path / name for name in FOUR):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == FILE_MODE == 0o640, "readable by owner and group, nobody else"
        if os.geteuid() == 0 and broker_group is not None:
            assert (info.st_uid, info.st_gid) == (0, broker_group), "root:mosquitto, so the broker can read it"


def test_write_into_a_missing_folder_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerSyncError, match="cannot write") as caught:
        write_broker_files(ACCOUNTS, tmp_path / "nowhere")
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
    passwd, acl, services = tmp_path / DEVICE_PASSWD, tmp_path / DEVICE_ACL, tmp_path / SERVICE_PASSWD
    sync = BrokerSync(registry, tmp_path)  # no pid file: files only
    registry.on_credentials_changed = sync
    registry.create_clinic(SYSTEM, s.ClinicIn(code="north", name="North", timezone="Europe/Berlin"))
    hub = registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id="hub-1", clinic="north"))
    sock = registry.create_device(SYSTEM, s.DeviceIn(device_id="sock-a", clinic="north", kind="sock",
                                                     gateway="hub-1"))  # fmt: skip
    registry.create_service_account(SYSTEM, "svc.ingest")
    assert sync.syncs == 3
    lines = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert set(lines) == {"hub-1", "sock-a"}
    assert [line.split(":", 1)[0] for line in services.read_text().splitlines()] == ["svc.ingest"]
    assert mosquitto_verify(hub.password, lines["hub-1"]) and mosquitto_verify(sock.password, lines["sock-a"])
    assert block(acl.read_text(), "hub-1") == ["topic write fleet/garments/v1/hub-1/status", *writes("sock-a")]
    assert block(acl.read_text(), "sock-a") == writes("sock-a")
    assert sock.may_publish == ["garments/v1/sock-a/telemetry", "garments/v1/sock-a/event", "garments/v1/sock-a/status"]
    assert hub.may_publish == ["garments/v1/hub-1/status"]

    registry.revoke(SYSTEM, "device", "sock-a")
    assert sync.syncs == 4
    assert "sock-a" not in passwd.read_text()
    assert block(acl.read_text(), "hub-1") == ["topic write fleet/garments/v1/hub-1/status"], "no longer relayed"
    assert "user sock-a" not in acl.read_text()

    # A name the files cannot hold never gets into the registry; the renderers guard the files anyway (above).
    with pytest.raises(InvalidError, match="service account names"):
        registry.create_service_account(SYSTEM, "ingest team")
    assert sync.syncs == 4 and "ingest team" not in services.read_text()
    with caplog.at_level(logging.INFO, logger="devices.registry.broker"):
        sync()
    assert sync.syncs == 5 and "sync #5" in caplog.text


def test_broker_sync_failure_says_the_change_is_saved(tmp_path: Path) -> None:
    registry = registry_at(tmp_path)
    registry.on_credentials_changed = BrokerSync(registry, tmp_path, tmp_path / "missing.pid")
    registry.create_clinic(SYSTEM, s.ClinicIn(code="north", name="North", timezone="Europe/Berlin"))
    with pytest.raises(BrokerSyncError, match="saved the change") as caught:
        registry.create_gateway(SYSTEM, s.GatewayIn(gateway_id="hub-1", clinic="north"))
    assert isinstance(caught.value.__cause__, BrokerSyncError)
    assert [g.gateway_id for g in registry.list_gateways(SYSTEM)] == ["hub-1"]
