"""Drive a simulated fleet through the broker: backfill at full speed, or live in real time.

Garments reach the broker the way Bluetooth garments do: through gateways.
The fleet's devices are spread over ``connections`` gateway clients (the
reference :class:`devices.client.DeviceClient`), each with its own in-flight
window and outbox; messages go out in the order a live fleet would send them
(``publish_at``), original timestamps kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from devices.client import MEMORY, DeviceClient
from simulators.scenarios import Fleet, SimMessage

# Messages waiting in one gateway's outbox before the runner waits for acks:
# the outbox bound evicts old telemetry when full, which a simulator must never cause.
MAX_BACKLOG = 20_000


@dataclass
class RunReport:
    """What a simulation run sent."""

    messages: int = 0
    samples: int = 0
    bad_payloads: int = 0
    seconds: float = 0.0
    acked: int = 0
    dropped: int = 0
    per_scenario: dict[str, int] = field(default_factory=dict)
    # How far through the simulated period the run has got (0..1), by publish time.
    done: float = 0.0


@dataclass(frozen=True)
class RunOptions:
    """How to reach the broker and how to spread the fleet over gateway connections."""

    mqtt_url: str
    connections: int = 4
    client_prefix: str = "sim-gw"
    queue_dir: Path | None = None
    window: int = 500
    topic_root: str = "garments/v1"
    tls_ca_file: str | None = None
    # Gateway id -> password, for brokers that require each connection's own credentials.
    credentials: dict[str, str] = field(default_factory=dict)

    def url_for(self, client_id: str) -> str:
        """The broker URL with ``client_id``'s own credentials, when there are any."""
        password = self.credentials.get(client_id)
        if password is None:
            return self.mqtt_url
        scheme, _, rest = self.mqtt_url.partition("://")
        host = rest.rsplit("@", 1)[-1]
        return f"{scheme}://{quote(client_id, safe='')}:{quote(password, safe='')}@{host}"


Progress = Callable[[RunReport], None]


def gateway_plan(fleet: Fleet, options: RunOptions) -> dict[str, list[str]]:
    """Which gateway connection relays which devices (what the registry must know to grant them)."""
    ids = [f"{options.client_prefix}-{fleet.seed}-{i}" for i in range(max(1, options.connections))]
    plan: dict[str, list[str]] = {gateway: [] for gateway in ids}
    for device in fleet.devices:
        plan[ids[device.rank % len(ids)]].append(device.device_id)
    return plan


def _gateways(fleet: Fleet, options: RunOptions) -> list[DeviceClient]:
    if options.queue_dir:
        options.queue_dir.mkdir(parents=True, exist_ok=True)
    clients = []
    for client_id in gateway_plan(fleet, options):
        queue = options.queue_dir / f"{client_id}.db" if options.queue_dir else MEMORY
        clients.append(
            DeviceClient(
                options.url_for(client_id),
                client_id,
                queue,
                window=options.window,
                topic_root=options.topic_root,
                tls_ca_file=options.tls_ca_file,
                max_messages=4 * MAX_BACKLOG,
            )
        )
    return clients


def _send(client: DeviceClient, message: SimMessage, report: RunReport) -> None:
    while client.queue_depth >= MAX_BACKLOG:
        client.flush(0.05)
    client.publish_raw(message.device_id, message.channel, message.payload, message.retain)
    report.messages += 1
    report.samples += message.samples
    report.bad_payloads += message.expected_reason is not None
    report.per_scenario[message.scenario] = report.per_scenario.get(message.scenario, 0) + 1


def run_fleet(
    fleet: Fleet,
    options: RunOptions,
    live: bool = False,
    progress: Progress | None = None,
    flush_timeout: float = 600.0,
    only: Callable[[SimMessage], bool] | None = None,
) -> RunReport:
    """Publish the messages of ``fleet`` (those ``only`` keeps); with ``live``, each no earlier than its publish time.

    Returns once the broker has acknowledged everything (or ``flush_timeout``
    ran out: then ``acked`` < ``messages`` says so).
    """
    clients = _gateways(fleet, options)
    ranks = {d.device_id: d.rank for d in fleet.devices}
    report = RunReport()
    started = time.monotonic()
    for client in clients:
        client.start()
    first, span = fleet.period.start_ms, max(1, fleet.period.end_ms - fleet.period.start_ms)
    try:
        for message in fleet.messages():
            if only is not None and not only(message):
                continue
            if live:
                _wait_until(message.publish_at_ms)
            _send(clients[ranks[message.device_id] % len(clients)], message, report)
            if progress is not None and report.messages % 1000 == 0:
                report.done = min(1.0, max(0.0, (message.publish_at_ms - first) / span))
                progress(report)
        deadline = time.monotonic() + flush_timeout
        for client in clients:
            client.flush(max(0.0, deadline - time.monotonic()))
    finally:
        for client in clients:
            stats = client.stats()
            report.acked += stats.acked
            report.dropped += stats.dropped_overflow
            client.stop()
    report.seconds = time.monotonic() - started
    return report


def _wait_until(epoch_ms: int) -> None:
    delay = epoch_ms / 1000 - time.time()
    if delay > 0:
        time.sleep(delay)
