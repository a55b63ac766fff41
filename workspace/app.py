"""One web app for the physios: the registry's API and pages with the workspace mounted beside them.

Why one app: the physio signs in once (the registry's sign-in, session cookie and CSRF token, unchanged) and moves
between Today, a patient's page and the registry's prescription and garment pages without a second login; the
workspace's routes are plain routes of the same FastAPI app, behind the same security headers and body limit.
``compression workspace serve`` runs it; ``compression devices serve`` still runs the registry alone.

Settings: the registry's (``COMPRESSION_REGISTRY_*``: database, listen address, public URL, proxies, sign-in
limits) and, for the monitor's state database and InfluxDB, the monitor's own (``COMPRESSION_MONITOR_STATE_
DATABASE_URL``, ``COMPRESSION_MONITOR_INFLUX_*``): the workspace reads what the monitor writes.
"""

from __future__ import annotations

from fastapi import FastAPI

from devices.registry.api import app_from_settings, create_app
from devices.registry.service import Registry
from devices.registry.settings import RegistrySettings
from monitor import actions, figures
from monitor.compliance import InfluxReader
from monitor.settings import MonitorSettings
from monitor.state import State
from workspace import web
from workspace.patient import PatientPages
from workspace.readmodel import Sources


def reader_of(settings: MonitorSettings) -> InfluxReader:
    """The InfluxDB reader the monitor itself uses (same URL, database, credentials)."""
    return InfluxReader(settings.influx_url, settings.influx_username, settings.influx_password,
                        settings.influx_token)  # fmt: skip


def open_state(url: str) -> State:
    """The monitor's state database, with the workspace's tables (actions, figures) present."""
    state = State(url)
    actions.ensure_tables(state)
    figures.ensure_tables(state)
    return state


def add_workspace(app: FastAPI, registry: Registry, state: State, reader: InfluxReader | None,
                  database: str) -> FastAPI:  # fmt: skip
    """Mount the workspace on a registry app (``devices.registry.api.create_app``); returns ``app``."""
    sources = Sources(registry, state)
    web.mount(app, web.Workspace(sources, PatientPages(sources, reader, database)))
    return app


def create(registry: Registry, state: State, reader: InfluxReader | None, database: str,
           settings: RegistrySettings | None = None) -> FastAPI:  # fmt: skip
    """The registry's app over ``registry`` with the workspace mounted (tests, the demo)."""
    return add_workspace(create_app(registry, settings), registry, state, reader, database)


def app_from_settings_(registry_settings: RegistrySettings | None = None,
                       monitor_settings: MonitorSettings | None = None) -> FastAPI:  # fmt: skip
    """Everything from the environment: the registry (migrated, broker files wired) and the workspace."""
    monitor_settings = monitor_settings or MonitorSettings()
    app = app_from_settings(registry_settings)
    registry = app.state.registry
    assert isinstance(registry, Registry)
    return add_workspace(app, registry, open_state(monitor_settings.state_database_url), reader_of(monitor_settings),
                         monitor_settings.influx_database)  # fmt: skip
