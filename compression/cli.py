"""The ``compression`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import asyncio
import sys
import time
import typing
import uuid
from collections.abc import Callable
from typing import Any

import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from compression import logs
from ingest.settings import IngestSettings, SettingsError
from simulators.publisher import LoadSpec, Publisher, PublishReport, generate

F = typing.TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="compression-telemetry")
def cli() -> None:
    """Telemetry platform for connected compression garments.

    Garments publish over MQTT (protocol v1); `ingest` stores every reading in
    InfluxDB and acknowledges it only once stored. Settings come from
    COMPRESSION_* environment variables (see .env.example); flags override them.
    """


def _click_type(info: FieldInfo) -> Any:
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    base = args[0] if args else annotation
    return {int: int, float: float}.get(base, str)  # type: ignore[arg-type]


def settings_options(model: type[IngestSettings]) -> Callable[[F], F]:
    """One CLI flag per settings field, documented by the field's description."""

    def decorate(func: F) -> F:
        for name, info in reversed(list(model.model_fields.items())):
            flag = "--" + name.replace("_", "-")
            env = f"COMPRESSION_{name.upper()}"
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

    Subscribes to garments/v1/+/telemetry, /event and /status at QoS 1 with a
    persistent session; acknowledges each message only after its samples (or
    its dead letter) are written. Serves Prometheus metrics on /metrics.
    Stops cleanly on SIGTERM/SIGINT: what was received is written and acked.
    """
    from ingest.app import run_ingester

    settings = load_settings(overrides)
    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(run_ingester(settings))


def _progress(total: int) -> Callable[[PublishReport], None]:
    def show(report: PublishReport) -> None:
        click.echo(f"\r  published {report.samples:>9,}/{total:,} samples, broker acked {report.acked:,} messages",
                   nl=False, err=True)  # fmt: skip

    return show


@cli.command()
@click.option("--mqtt-url", envvar="COMPRESSION_MQTT_URL", default="mqtt://127.0.0.1:1883", show_default=True,
              help="Broker URL (env COMPRESSION_MQTT_URL).")  # fmt: skip
@click.option("--devices", default=10, show_default=True, help="Number of simulated socks.")
@click.option("--messages", default=10, show_default=True, help="Telemetry messages per device.")
@click.option("--samples", default=10, show_default=True, help="Samples per message (1..500).")
@click.option("--prefix", default="sock", show_default=True, help="Device id prefix: ids are PREFIX-0000, ...")
@click.option("--period-ms", default=60_000, show_default=True, help="Time between samples of one device.")
@click.option("--rate", type=float, default=None,
              help="Pace publishing at this many samples/s (default: as fast as possible).")  # fmt: skip
@click.option("--window", default=1000, show_default=True, help="Messages in flight to the broker at most.")
@click.option("--seed", default=1, show_default=True, help="Random seed (same seed, same readings).")
def simulate(mqtt_url: str, devices: int, messages: int, samples: int, prefix: str, period_ms: int,
             rate: float | None, window: int, seed: int) -> None:  # fmt: skip
    """Publish protocol-v1 sock telemetry at QoS 1 (the built-in load publisher).

    Timestamps are historical, ending now, one sample every --period-ms per
    device. Waits until the broker has acknowledged every message.
    """
    spec = LoadSpec(devices=devices, messages=messages, samples=samples, prefix=prefix, period_ms=period_ms, seed=seed)
    click.echo(f"publishing {spec.total_samples:,} samples from {devices} devices to {mqtt_url}", err=True)
    with Publisher(mqtt_url, f"compression-simulate-{uuid.uuid4().hex[:8]}", window=window) as pub:
        report = pub.publish_all(generate(spec), rate=rate, progress=_progress(spec.total_samples))
    click.echo(f"\ndone: {report.messages:,} messages ({report.samples:,} samples) acknowledged in "
               f"{report.seconds:.1f} s ({report.samples / max(report.seconds, 1e-9):,.0f} samples/s)")  # fmt: skip


@cli.command()
@click.option("--devices", default=20, show_default=True, help="Simulated socks.")
@click.option("--messages", default=30, show_default=True, help="Telemetry messages per sock.")
@click.option("--data-dir", default="var/demo", show_default=True, help="Folder for the local servers' data.")
@click.option("--keep/--no-keep", default=False, help="Keep the servers running after the summary (Ctrl-C stops).")
def demo(devices: int, messages: int, data_dir: str, keep: bool) -> None:
    """Run the platform locally end to end and summarise what was stored.

    Starts Mosquitto and InfluxDB as plain processes on free loopback ports
    under --data-dir, runs the ingester, publishes simulated sock telemetry
    (plus a few malformed messages, to show rejections) and prints what
    InfluxDB holds.
    """
    from compression.demo import run_demo

    logs.configure("WARNING")
    sys.exit(run_demo(devices=devices, messages=messages, data_dir=data_dir, keep=keep, started=time.monotonic()))


def main() -> None:
    """Console-script entry point."""
    cli()
