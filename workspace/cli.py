"""``compression workspace``: serve the physios' web app (registry pages and API, with the workspace)."""

from __future__ import annotations

import click

from devices.registry.cli import ServeExtras


@click.group()
def workspace() -> None:
    """The physios' workspace: Today, patient pages, actions on episodes (docs/workspace.md)."""


@workspace.command()
@click.option("--host", default=None, help="Address to listen on [default: COMPRESSION_REGISTRY_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: COMPRESSION_REGISTRY_PORT or 8070].")
def serve(host: str | None, port: int | None) -> None:
    """Run the registry's API and pages with the workspace mounted (Today at /ui/workspace/, the landing page after
    sign-in). Reads the monitor's state database and InfluxDB from the COMPRESSION_MONITOR_* settings."""
    import uvicorn

    from devices.registry.settings import RegistrySettings
    from workspace.app import app_from_settings_

    settings = RegistrySettings()
    settings = settings.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    app = app_from_settings_(settings)
    extras = click.get_current_context().find_object(ServeExtras)  # e.g. the FHIR export of records/
    for install in extras.installers if extras else ():
        install(app)
    click.echo(f"workspace on http://{settings.host}:{settings.port}/ui/ (registry API /api/v1)", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", proxy_headers=False)
