"""Settings of the registry (``compression devices ...``): environment variables prefixed ``COMPRESSION_REGISTRY_``.

Every field is documented in ``.env.example``; CLI options override the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from devices.registry.db import DEFAULT_URL


class RegistrySettings(BaseSettings):
    """Where the registry keeps its data, where it listens, and which broker files it maintains."""

    model_config = SettingsConfigDict(env_prefix="COMPRESSION_REGISTRY_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default=DEFAULT_URL,
        description="SQLAlchemy URL of the registry database: a SQLite file (default) or postgresql://user:pass@host/db.",
    )
    host: str = Field(default="127.0.0.1", description="Address the registry API and web page listen on.")
    port: int = Field(default=8070, ge=1, le=65535, description="Port the registry API and web page listen on.")
    broker_dir: Path | None = Field(
        default=None,
        description="Folder where the registry rewrites Mosquitto's account files whenever MQTT accounts change: devices.passwd and devices.acl (garments and gateways, the device listeners), services.passwd and services.acl (service accounts, the services' listener). Unset: not maintained.",
    )
    broker_pid_file: Path | None = Field(
        default=None,
        description="PID file of the Mosquitto process, sent SIGHUP after the files change so it reloads them (unset: no reload).",
    )
    bootstrap_admin_token: str | None = Field(
        default=None,
        description="If set and no admin token exists yet, this token becomes the first admin token (for automated set-ups).",
    )
    public_url: str = Field(
        default="http://127.0.0.1:8070",
        description="Base URL people use to reach the registry's web page (used in links).",
    )
