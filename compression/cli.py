"""The ``compression`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import sys
import time
import typing
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from dashboards.cli import dashboards
from devices.registry.cli import ServeExtras, devices
from ingest.settings import IngestSettings, SettingsError
from monitor.settings import MonitorSettings
from records.cli import export, report_command
from workspace.cli import workspace

if typing.TYPE_CHECKING:
    from simulators.publisher import PublishReport
    from simulators.run import RunReport

F = typing.TypeVar("F", bound=Callable[..., Any])


def _records_routes(app: Any) -> None:
    """``compression devices serve`` adds the FHIR export and the reports (records/), imported only then."""
    from records.api import installer_from_settings

    installer_from_settings()(app)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="compression-telemetry")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Telemetry platform for connected compression garments.

    Garments publish over MQTT (protocol v1); `ingest` stores every reading in
    InfluxDB and acknowledges it only once stored. Settings come from
    COMPRESSION_* environment variables (see .env.example); flags override them.
    """
    # `compression devices serve` runs the registry with the FHIR export and the monthly reports (records/).
    ctx.obj = ServeExtras((_records_routes,))


def _click_type(info: FieldInfo) -> Any:
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    base = args[0] if args else annotation
    return {int: int, float: float}.get(base, str)  # type: ignore[arg-type]


def settings_options(model: type[BaseSettings]) -> Callable[[F], F]:
    """One CLI flag per settings field, documented by the field's description."""
    prefix = str(model.model_config.get("env_prefix", "COMPRESSION_"))

    def decorate(func: F) -> F:
        for name, info in reversed(list(model.model_fields.items())):
            flag = "--" + name.replace("_", "-")
            env = f"{prefix}{name.upper()}"
            help_text = f"{info.description} [env {env}; default {info.default!r}]"
            if info.annotation is bool:
                decl = f"{flag}/--no-{name.replace('_', '-')}"
                func = click.option(decl, name, default=None, help=help_text)(func)
            else:
                func = click.option(flag, name, type=_click_type(info), default=None, help=help_text)(func)
        return func

    return decorate


def load_settings(overrides: dict[str, Any]) -> IngestSettings:
    """Environment first, then the flags that were given; exit 2 with a clear message if invalid."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return IngestSettings(**given)
    except (ValidationError, SettingsError) as exc:
        raise click.UsageError(f"invalid settings:\n{exc}") from exc


@cli.command()
@settings_options(IngestSettings)
def ingest(**overrides: Any) -> None:
    """Consume garment telemetry from MQTT and store it in InfluxDB.

    Subscribes to fleet/garments/v1/+/telemetry, /event and /status (the
    garments' garments/v1 topics as the broker's services listener shows them;
    COMPRESSION_MQTT_TOPIC_ROOT) at QoS 1 with a persistent session;
    acknowledges each message only after its samples (or its dead letter) are
    written. Serves Prometheus metrics on /metrics.
    Stops cleanly on SIGTERM/SIGINT: what was received is written and acked.
    """
    from compression import logs
    from ingest.app import run_ingester

    settings = load_settings(overrides)
    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(run_ingester(settings))


@cli.command()
@settings_options(MonitorSettings)
@click.option("--once", is_flag=True, help="Evaluate once, queue and send what is due, then exit (cron, checks).")
def monitor(once: bool, **overrides: Any) -> None:
    """Watch compliance: flags per patient and day, episodes, alert e-mails to the responsible physio.

    Every --interval-s it recomputes each patient's last --days-back local days
    from InfluxDB (late data counts), keeps flags as episodes with hysteresis,
    and e-mails the physio once when an episode opens and once when it resolves
    (safety flags such as boot over-pressure within --safety-interval-s), plus
    a daily digest. Replicas share --state-database-url; one holds the lease
    and works. Stops cleanly on SIGTERM/SIGINT.
    """
    from compression import logs
    from monitor.app import Monitor, run_monitor

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = MonitorSettings(**given)
    except ValidationError as exc:
        raise click.UsageError(f"invalid settings:\n{exc}") from exc
    logs.configure(settings.log_level, settings.log_format)
    if not once:
        asyncio.run(run_monitor(settings))
        return

    async def one_round() -> None:
        mon = Monitor(settings)
        if not mon.state.acquire_lease(mon.replica, settings.lease_s):
            raise click.ClickException("another monitor replica holds the lease; nothing done")
        try:
            if not await mon.evaluate_once():
                raise click.ClickException("InfluxDB could not be read; nothing evaluated")
            await mon.digest_if_due()
            sent = await mon.send_due()
            click.echo(f"evaluated; episodes opened {mon.counters.opened}, resolved {mon.counters.resolved}; "
                       f"e-mails sent {sent}, waiting {mon.state.pending()}", err=True)  # fmt: skip
        finally:
            mon.state.release_lease(mon.replica)

    asyncio.run(one_round())


def _progress(total: int) -> Callable[[PublishReport], None]:
    def show(report: PublishReport) -> None:
        click.echo(f"\r  published {report.samples:>9,}/{total:,} samples, broker acked {report.acked:,} messages",
                   nl=False, err=True)  # fmt: skip

    return show


def _parse_mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    from simulators.scenarios import ALL_SCENARIOS

    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in ALL_SCENARIOS:
            raise click.BadParameter(f"unknown scenario {name.strip()!r} (see --list-scenarios)", param_hint="--mix")
        try:
            mix[name.strip()] = float(weight or 1)
        except ValueError as exc:
            raise click.BadParameter(f"weight of {name!r} is not a number", param_hint="--mix") from exc
    return mix


def _list_scenarios() -> None:
    from simulators.scenarios import list_scenarios

    for name, kind, description in list_scenarios():
        click.echo(f"{name:<22} {kind:<5} {description}")


@cli.command()
@click.option("--list-scenarios", "list_only", is_flag=True, help="List the scenarios, a line each, and exit.")
@click.option("--mqtt-url", envvar="COMPRESSION_MQTT_URL", default="mqtt://127.0.0.1:1883", show_default=True,
              help="Broker URL; with credentials (mqtt://user:pass@...) when the broker requires them.")  # fmt: skip
@click.option("--socks", default=10, show_default=True, help="Simulated socks/stockings in the fleet.")
@click.option("--boots", default=4, show_default=True, help="Simulated pneumatic boots in the fleet.")
@click.option("--scenario", "scenarios", multiple=True, metavar="NAME",
              help="Only these scenarios (repeatable); --every-scenario gives one device of each.")  # fmt: skip
@click.option("--every-scenario", is_flag=True, help="One device per scenario (ignores --socks/--boots/--mix).")
@click.option(
    "--mix", default=None, metavar="NAME=W,...", help="Scenario weights across the fleet (default: mostly compliant)."
)
@click.option("--days", default=14, show_default=True, help="Days of history to backfill (1..28).")
@click.option("--live", "live_hours", type=float, default=None, metavar="HOURS",
              help="Then go on in real time for HOURS (each message sent when it falls due).")  # fmt: skip
@click.option("--seed", default=1, show_default=True, help="Same seed, same fleet, same readings.")
@click.option("--tz", default="America/Edmonton", show_default=True, help="The clinic's (and patients') time zone.")
@click.option("--ground-truth", type=click.Path(dir_okay=False), default=None,
              help="Write what the platform must conclude per patient and day to this JSON file.")  # fmt: skip
@click.option("--connections", default=4, show_default=True,
              help="Gateway connections the fleet (or the --load devices) is spread over.")  # fmt: skip
@click.option("--queue-dir", type=click.Path(file_okay=False), default=None,
              help="SQLite outboxes here (survive a restart); default: in memory.")  # fmt: skip
@click.option("--credentials", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV of gateway_id,password: each gateway connection logs in as itself "
                   "(gateway ids are sim-gw-SEED-N).")  # fmt: skip
@click.option("--topic-root", default="garments/v1", show_default=True, hidden=True)
@click.option(
    "--load", is_flag=True, help="Benchmark load instead of a clinical fleet: see --devices/--messages/--rate."
)
@click.option("--devices", default=10, show_default=True, help="--load: number of simulated socks.")
@click.option("--messages", default=10, show_default=True, help="--load: telemetry messages per device.")
@click.option("--samples", default=10, show_default=True, help="--load: samples per message (1..500).")
@click.option("--rate", type=float, default=None, help="--load: samples/s (default: as fast as possible).")
def simulate(list_only: bool, mqtt_url: str, socks: int, boots: int, scenarios: tuple[str, ...], every_scenario: bool,
             mix: str | None, days: int, live_hours: float | None, seed: int, tz: str, ground_truth: str | None,
             connections: int, queue_dir: str | None, credentials: str | None, topic_root: str, load: bool,
             devices: int, messages: int, samples: int, rate: float | None) -> None:  # fmt: skip
    """Simulate garments: a clinic's fleet with clinical scenarios, or a benchmark load.

    By default: a fleet of --socks and --boots following a scenario mix
    (compliant, under_use, rolled_down, boot_overpressure, ...; see
    --list-scenarios), backfilled over the last --days days at full speed
    with their original timestamps, through --connections gateway clients
    at QoS 1. --live HOURS goes on in real time afterwards. --ground-truth
    writes what the platform must conclude (docs/ground-truth.md).
    """
    if list_only:
        _list_scenarios()
        return
    if load:
        _simulate_load(mqtt_url, devices, messages, samples, rate, seed, connections)
        return
    from simulators.run import RunOptions, run_fleet
    from simulators.scenarios import ALL_SCENARIOS, build_fleet
    from simulators.scenarios import every_scenario as every_scenario_fleet

    unknown = [n for n in scenarios if n not in ALL_SCENARIOS]
    if unknown:
        raise click.BadParameter(f"unknown scenario(s) {unknown} (see --list-scenarios)", param_hint="--scenario")
    end = datetime.now(UTC) + timedelta(hours=live_hours or 0)
    try:
        if every_scenario:
            fleet = every_scenario_fleet(seed=seed, days=days, end=end, tz=tz)
        else:
            fleet = build_fleet(socks=socks, boots=boots, mix=_parse_mix(mix), seed=seed, days=days, end=end, tz=tz,
                                scenarios=list(scenarios) or None)  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"fleet: {len(fleet.devices)} devices, {days} days of history"
               + (f", then {live_hours:g} h live" if live_hours else ""), err=True)  # fmt: skip
    if ground_truth:
        fleet.write_ground_truth(ground_truth, mode="live" if live_hours else "backfill")
        click.echo(f"ground truth: {ground_truth}", err=True)
    options = RunOptions(mqtt_url, connections=connections, queue_dir=Path(queue_dir) if queue_dir else None,
                         topic_root=topic_root, credentials=_read_credentials(credentials))  # fmt: skip
    report = run_fleet(fleet, options, live=bool(live_hours), progress=_fleet_progress)
    click.echo(f"\ndone: {report.messages:,} messages ({report.samples:,} samples, {report.bad_payloads} deliberately "
               f"bad) in {report.seconds:.1f} s; broker acknowledged {report.acked:,}")  # fmt: skip
    if report.acked < report.messages or report.dropped:
        raise click.ClickException(f"{report.messages - report.acked} message(s) not acknowledged, "
                                   f"{report.dropped} dropped")  # fmt: skip


def _read_credentials(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        pairs = [row for row in csv.reader(fh) if row and not row[0].startswith("#")]
    bad = [row for row in pairs if len(row) != 2]
    if bad:
        raise click.BadParameter(f"expected gateway_id,password per line, got {bad[0]!r}", param_hint="--credentials")
    return {gateway.strip(): password.strip() for gateway, password in pairs}


def _fleet_progress(report: RunReport) -> None:
    filled = int(report.done * 30)
    bar = "#" * filled + "-" * (30 - filled)
    click.echo(f"\r  [{bar}] {report.done:4.0%}  {report.messages:>9,} messages, {report.samples:>10,} samples",
               nl=False, err=True)  # fmt: skip


def _simulate_load(mqtt_url: str, devices: int, messages: int, samples: int, rate: float | None, seed: int,
                   connections: int = 1) -> None:  # fmt: skip
    from simulators.publisher import LoadSpec, Publisher, generate, publish_spread

    spec = LoadSpec(devices=devices, messages=messages, samples=samples, period_ms=1000, seed=seed)
    connections = max(1, min(connections, devices))
    click.echo(f"load: {spec.total_samples:,} samples from {devices} devices over {connections} connection(s) "
               f"to {mqtt_url}", err=True)  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        pubs = [stack.enter_context(Publisher(mqtt_url, f"compression-load-{tag}-{i}")) for i in range(connections)]
        report = publish_spread(pubs, generate(spec), rate=rate, progress=_progress(spec.total_samples))
    click.echo(f"\ndone: {report.messages:,} messages ({report.samples:,} samples) acknowledged in "
               f"{report.seconds:.1f} s ({report.samples / max(report.seconds, 1e-9):,.0f} samples/s)")  # fmt: skip


@cli.command()
@click.option("--days", default=14, show_default=True, help="Days of simulated history, backfilled (1..28).")
@click.option("--live-minutes", default=2.0, show_default=True, type=float,
              help="Then the fleet goes on live for this long while the monitor runs its loop (0: no live phase).")
@click.option("--data-dir", default="var/demo", show_default=True, help="Folder for the local servers' data.")
@click.option("--keep/--no-keep", default=False,
              help="Then keep the servers, the monitor's loop and the physios' workspace (registry pages and API, "
                   "http://127.0.0.1:8070/ui/) running (Ctrl-C stops).")
@click.option("--port", default=8070, show_default=True,
              help="Port of the workspace (with --keep; the e-mails link to it).")
def demo(days: int, live_minutes: float, data_dir: str, keep: bool, port: int) -> None:
    """Run the platform locally end to end and summarise what was stored, flagged and e-mailed.

    Starts Mosquitto, InfluxDB and an SMTP catcher as plain processes on free
    loopback ports under --data-dir; registers a demo clinic in a fresh
    registry (physios, one patient, garment and prescription per scenario,
    two gateways) whose accounts and ACL the broker enforces; runs the
    ingester (tagging samples with patient codes); backfills --days of one
    simulated patient per scenario (socks and boots, plus a few malformed
    messages); runs the monitor (flags, episodes, e-mails to the catcher);
    then lets the fleet go on live for --live-minutes with the monitor's loop
    running. Prints what was stored and flagged next to the ground truth, and
    where to look. With --keep (make demo) it ends with the physios' workspace
    running and prints its address and a physio's sign-in.
    """
    from compression.demo import run_demo

    if not 1 <= days <= 28:
        raise click.UsageError("--days must be between 1 and 28")
    from compression import logs

    logs.configure("WARNING")
    sys.exit(run_demo(days=days, data_dir=data_dir, keep=keep, started=time.monotonic(), live_minutes=live_minutes,
                      port=port))


@devices.command("reattribute")
@click.argument("device_id")
@click.option("--from", "valid_from", required=True, help="Start of the period (ISO 8601 with offset or Z).")
@click.option("--to", "valid_to", required=True, help="End of the period, exclusive (ISO 8601 with offset or Z).")
@click.option("--patient", required=True, help="The patient who wore the garment then (pseudonymous code).")
def reattribute(device_id: str, valid_from: str, valid_to: str, patient: str) -> None:
    """Give DEVICE_ID's readings stored from --from to --to to --patient (audited, idempotent).

    The registry's assignments are made to say the same (an assignment starting inside the period is moved back
    to its start, or one is created for it), then the stored readings are rewritten with the patient's tags in
    InfluxDB (COMPRESSION_INFLUX_*), receipts tell the monitor to recompute those days, and the request is marked
    done. Running it again after a failure finishes the job; run on a request already done, it changes nothing.
    """
    from devices.registry import schemas as s
    from devices.registry.cli import current_registry
    from ingest.reattribute import Influx, ReattributionError, targets
    from ingest.reattribute import reattribute as rewrite

    registry, actor = current_registry()
    row = registry.request_reattribution(actor, s.ReattributionIn.model_validate(
        {"device_id": device_id, "patient": patient, "valid_from": valid_from, "valid_to": valid_to}))  # fmt: skip
    if row.state == "done":
        click.echo(f"re-attribution {row.id}: already done ({row.points} readings), nothing to do")
        return
    settings = load_settings({})
    influx = Influx(settings.influx_url, settings.influx_database, settings.influx_username, settings.influx_password,
                    settings.influx_token)  # fmt: skip
    try:
        done = asyncio.run(rewrite(influx, targets([row])[0]))
    except ReattributionError as exc:
        raise click.ClickException(f"re-attribution {row.id} stays pending (run again): {exc}") from exc
    registry.finish_reattribution(actor, row.id, done.points, f"previous holders: {', '.join(sorted(done.previous))}"
                                  if done.previous else "")  # fmt: skip
    click.echo(f"re-attribution {row.id}: {done.points} readings of {device_id} from {row.valid_from.isoformat()} to "
               f"{row.valid_to.isoformat()} now {patient}'s; the monitor recomputes those days")


cli.add_command(devices)
cli.add_command(dashboards)
cli.add_command(export)
cli.add_command(report_command)
cli.add_command(workspace)


def main() -> None:
    """Console-script entry point."""
    cli()
