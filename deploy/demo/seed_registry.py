"""Register the compose demo's simulated fleet in the registry and hand its gateways' passwords to the simulator.

The one-shot ``registry-seed`` service of docker-compose.yml's ``demo`` profile
runs it (``python /demo/seed_registry.py --credentials-out FILE ...``) with the
same fleet options the ``simulator`` service then gives ``compression
simulate``: one garment per clinical scenario (``--every-scenario``), a
patient holding each, its prescription, two physios and the gateways
``sim-gw-SEED-N`` relaying them, as ``compression demo`` registers them
(``simulators.registration.register_fleet``). The registry's broker files are
rewritten (COMPRESSION_REGISTRY_BROKER_DIR), so the
broker's watcher lets the gateways in within seconds.

The gateways' passwords are written once, as ``gateway_id,password`` lines
(mode 0600), to the file the simulator reads with ``--credentials``. Run again,
it changes nothing while that file exists; if the file is gone, the gateways'
passwords are rotated and written anew.

The demo physios' web passwords are random (this registry is the platform's
own, not a throw-away one) and printed once, when they are made (``docker
compose logs registry-seed``); they are never written to a file. Lost? An
admin sets a new one (``compression devices physio update EMAIL --password``).

With ``--wait-broker mqtt://host:port`` it then waits (up to a minute) until
the broker accepts the first gateway's login, so the simulator, which starts
when this job has succeeded, does not race the broker's reload.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devices.registry.broker import BrokerSync
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.errors import NotFoundError
from devices.registry.service import SYSTEM, Registry
from devices.registry.settings import RegistrySettings
from simulators.registration import DEMO_CLINIC, register_fleet
from simulators.run import RunOptions, gateway_plan
from simulators.scenarios import DEFAULT_TZ, every_scenario


def new_physio_password() -> str:
    """A random web password for a demo physio (about 128 bits)."""
    return secrets.token_urlsafe(16)


def write_credentials(path: Path, passwords: dict[str, str]) -> None:
    """``gateway_id,password`` lines, mode 0600, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(
            "# gateway_id,password: written by deploy/demo/seed_registry.py for compression simulate --credentials\n"
        )
        out.writelines(f"{gateway},{password}\n" for gateway, password in sorted(passwords.items()))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def broker_accepts(url: str, user: str, password: str) -> bool:
    """Whether the broker at ``url`` (mqtt://host:port) answers this login with CONNACK success."""
    parts = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-seed-check", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    answer: list[bool] = []
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        answer.append(not reason.is_failure)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=10)
    except OSError:
        return False
    client.loop_start()
    try:
        done.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return bool(answer and answer[0])


def wait_for_broker(url: str, credentials: Path, timeout_s: float = 60.0) -> bool:
    """Wait until the broker lets the first gateway of ``credentials`` in (its watcher reloaded the accounts)."""
    rows = [line.split(",", 1) for line in credentials.read_text(encoding="utf-8").splitlines()]
    gateway, password = next((g, p) for g, p in (r for r in rows if len(r) == 2) if not g.startswith("#"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if broker_accepts(url, gateway, password):
            print(f"the broker at {url} accepts gateway {gateway}")
            return True
        time.sleep(2)
    print(f"the broker at {url} still refuses gateway {gateway} after {timeout_s:.0f} s", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    """Seed once; 0 when the registry holds the demo fleet and the credentials file exists."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--credentials-out", type=Path, required=True, help="gateway_id,password file for the simulator"
    )
    parser.add_argument("--seed", type=int, default=1, help="as compression simulate --seed")
    parser.add_argument("--days", type=int, default=14, help="as compression simulate --days")
    parser.add_argument("--tz", default=DEFAULT_TZ, help="as compression simulate --tz")
    parser.add_argument("--connections", type=int, default=4, help="as compression simulate --connections")
    parser.add_argument("--wait-broker", metavar="URL", help="then wait until this broker accepts a gateway")
    args = parser.parse_args(argv)
    seeded = seed(args)
    if seeded == 0 and args.wait_broker:
        return 0 if wait_for_broker(args.wait_broker, args.credentials_out) else 1
    return seeded


def seed(args: argparse.Namespace) -> int:
    """Register the fleet (once) and write the credentials file."""

    settings = RegistrySettings()
    engine = make_engine(settings.database_url)
    migrate(engine)
    registry = Registry(session_factory(engine))
    if settings.broker_dir:
        # No pid file: the broker runs in another container; its entry point's watcher reloads it.
        registry.on_credentials_changed = BrokerSync(registry, settings.broker_dir)

    fleet = every_scenario(seed=args.seed, days=args.days, end=datetime.now(UTC), tz=args.tz)
    plan = gateway_plan(fleet, RunOptions("mqtt://unused", connections=args.connections))
    try:
        registry.get_clinic(SYSTEM, DEMO_CLINIC)
    except NotFoundError:
        registered = register_fleet(registry, fleet, plan, physio_password=new_physio_password)
        write_credentials(args.credentials_out, registered.gateways)
        print(f"seeded clinic {DEMO_CLINIC}: {len(fleet.devices)} patients and garments, gateways {', '.join(plan)}")
        print("demo physios' web passwords (shown this once, not stored anywhere else):")
        for email, password in sorted(registered.physios.items()):
            print(f"  {email}  password: {password}")
        return 0
    if args.credentials_out.exists():
        print(f"clinic {DEMO_CLINIC} is already registered and {args.credentials_out} exists: nothing to do")
        return 0
    passwords = {gateway: registry.rotate_credentials(SYSTEM, "gateway", gateway).password for gateway in plan}
    write_credentials(args.credentials_out, passwords)
    print(f"clinic {DEMO_CLINIC} was registered; new passwords for gateways {', '.join(plan)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
