"""``compression dashboards``: generate the dashboards' JSON, check it, push it to a Grafana."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dashboards import build


@click.group()
def dashboards() -> None:
    """Grafana dashboards generated from code (dashboards/build.py; docs/dashboards.md)."""


@dashboards.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=build.JSON_DIR,
    show_default=True,
    help="Folder for the JSON files (the provisioning mounts dashboards/json).",
)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if the files differ from the generator's output.")
def generate(out: Path, check: bool) -> None:
    """Write each dashboard's JSON (clinic-overview, patient, fleet), or --check they are up to date."""
    from dashboards.validate import problems

    for name, make in build.DASHBOARDS.items():
        found = problems(make())
        if found:
            raise click.ClickException(f"{name}: " + "; ".join(found))
    if check:
        stale = build.stale(out)
        if stale:
            raise click.ClickException(f"out of date in {out}: {', '.join(stale)} (compression dashboards generate)")
        click.echo(f"{out}: up to date")
        return
    for path in build.write(out):
        click.echo(f"wrote {path}")


@dashboards.command()
@click.option("--url", envvar="GRAFANA_URL", required=True, help="Grafana base URL, e.g. http://127.0.0.1:3000.")
@click.option("--token", envvar="GRAFANA_TOKEN", default=None, help="A service account token (Admin role).")
@click.option("--user", envvar="GRAFANA_USER", default=None, help="Or an admin user name ...")
@click.option("--password", envvar="GRAFANA_PASSWORD", default=None, help="... and password.")
@click.option("--folder", default="Compression", show_default=True, help="Folder title (uid 'compression').")
@click.option("--dry-run", is_flag=True, help="Print the requests that would be sent, send nothing.")
def push(url: str, token: str | None, user: str | None, password: str | None, folder: str, dry_run: bool) -> None:
    """Upload the dashboards to an existing Grafana (its HTTP API): folder, dashboards (overwrite), and
    folder permissions so the Viewer role (physios) can view and nobody but admins can edit."""
    from dashboards.push import apply, plan

    steps = plan({name: make() for name, make in build.DASHBOARDS.items()}, folder_title=folder)
    if dry_run:
        for step in steps:
            click.echo(f"{step.method} /api{step.path} {json.dumps(step.body)[:200]}")
        return
    if not token and not (user and password):
        raise click.UsageError("give --token, or --user and --password")
    from dashboards.push import PushError, client

    try:
        with client(url, token, user, password) as http:
            for line in apply(http, steps):
                click.echo(line)
    except PushError as exc:
        raise click.ClickException(str(exc)) from exc
