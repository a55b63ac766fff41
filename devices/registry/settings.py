"""Settings of the registry (``compression devices ...``): environment variables prefixed ``COMPRESSION_REGISTRY_``.

Every field is documented in ``.env.example``; CLI options override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from devices.registry.db import DEFAULT_URL
from devices.registry.logins import LoginLimits
from devices.registry.secrets import TOKEN_ADVICE, token_problem

HTTPS: Final = "https://"


class RegistrySettings(BaseSettings):
    """Where the registry keeps its data, where it listens, and which broker files it maintains."""

    # hide_input_in_errors: a refused secret is never printed back in the error.
    model_config = SettingsConfigDict(env_prefix="COMPRESSION_REGISTRY_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)  # fmt: skip

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
        description="If set, this token is the bootstrap admin token (automated set-ups): at start-up it replaces the previous bootstrap token, which stops working. At least 32 random bytes (openssl rand -hex 32); placeholders and short or patterned values are refused at start.",
    )
    bootstrap_ingester_token: str | None = Field(
        default=None,
        description="If set, this token is the bootstrap ingester token: it may read only the enrichment snapshot (patient codes and clinics, never names or notes), which is all the ingester needs (COMPRESSION_REGISTRY_TOKEN of the ingester). At start-up it replaces the previous bootstrap ingester token. At least 32 random bytes (openssl rand -hex 32).",
    )
    public_url: str = Field(
        default="http://127.0.0.1:8070",
        description="Base URL people use to reach the registry's web page (used in links). With https:// the session cookie is always Secure and HSTS is sent, whatever the hop from the TLS proxy.",
    )
    trusted_proxies: str | None = Field(
        default=None,
        description="Addresses (comma-separated IPs or CIDR ranges) of the TLS reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are believed: the client address counted by the sign-in throttle and the scheme (Secure cookie, HSTS). Unset by default: nobody's.",
    )
    api_docs: bool = Field(
        default=False,
        description="Serve the OpenAPI page and schema (/docs, /redoc, /openapi.json). Off by default: in production they show every route to anyone.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, le=64 * 1_048_576,
        description="Largest request body accepted, in bytes; larger is refused with 413 before it is read (an unauthenticated API request is refused with 401 before its body is read at all).",
    )
    login_free_failures_per_account: int = Field(
        default=5, ge=1, le=10_000,
        description="Wrong passwords for one e-mail before each further one locks it for a while (30 s, doubling up to login_max_lock_s); not applied from an address the physio signed in from.",
    )
    login_free_failures_per_address: int = Field(
        default=20, ge=1, le=100_000,
        description="Wrong passwords from one client address (any e-mail) before each further one locks that address for a while.",
    )
    login_max_lock_s: float = Field(
        default=900.0, ge=30.0, le=86_400.0,
        description="Longest lock after wrong passwords, in seconds.",
    )

    @field_validator("bootstrap_admin_token", "bootstrap_ingester_token")
    @classmethod
    def _random_enough(cls, token: str | None, info: ValidationInfo) -> str | None:
        problem = token_problem(token) if token else None
        if problem is not None:
            raise ValueError(f"COMPRESSION_REGISTRY_{str(info.field_name).upper()} {problem}; {TOKEN_ADVICE}")
        return token

    @property
    def always_https(self) -> bool:
        """People reach the registry over https (its public URL says so), whatever the proxy's hop."""
        return self.public_url.startswith(HTTPS)

    def login_limits(self) -> LoginLimits:
        """The sign-in throttle's limits."""
        return LoginLimits(self.login_free_failures_per_account, self.login_free_failures_per_address,
                           self.login_max_lock_s)  # fmt: skip
