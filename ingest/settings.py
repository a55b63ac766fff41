"""The ingester's settings: one place, environment variables with a ``COMPRESSION_`` prefix.

Every field is documented in ``.env.example``; CLI flags of ``compression ingest``
override the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A setting that cannot work (a malformed URL, an impossible limit)."""


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where and how to reach the broker, parsed from ``mqtt://`` or ``mqtts://``."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse ``mqtt[s]://[user[:password]@]host[:port]``; without credentials, anonymous."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise SettingsError(f"MQTT URL must start with mqtt:// or mqtts://, got {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise SettingsError(f"MQTT URL has no host: {url!r}")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise SettingsError(f"MQTT URL has a bad port: {url!r}") from exc
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return MqttEndpoint(parts.hostname, port, tls, user, password)


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class IngestSettings(BaseSettings):
    """Settings of ``compression ingest`` (see ``.env.example`` for each variable)."""

    model_config = SettingsConfigDict(env_prefix="COMPRESSION_", extra="ignore")

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_client_id: str = "compression-ingest"
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    mqtt_share_group: str | None = None
    mqtt_topic_root: str = "garments/v1"
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600)
    mqtt_session_expiry_s: int = Field(7 * 24 * 3600, ge=60)
    mqtt_tls_ca_file: str | None = None
    mqtt_tls_insecure: bool = False

    influx_url: str = "http://127.0.0.1:8086"
    influx_database: str = "compression"
    influx_retention_policy: str | None = None
    influx_username: str | None = None
    influx_password: str | None = None
    influx_token: str | None = None
    influx_create_database: bool = True
    influx_timeout_s: float = Field(30.0, gt=0)

    batch_size: int = Field(5000, ge=1, le=100_000)
    flush_interval_ms: int = Field(200, ge=1, le=60_000)
    inflight_max: int = Field(1000, ge=1, le=65_535)
    write_concurrency: int = Field(2, ge=1, le=16)
    retry_initial_s: float = Field(0.2, gt=0)
    retry_max_s: float = Field(10.0, gt=0)

    max_future_s: int = Field(300, ge=0)
    max_age_s: int = Field(30 * 24 * 3600, ge=60)
    max_wear_gap_s: float = Field(120.0, gt=0)

    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9410, ge=0, le=65_535)
    dead_letter_file: str = "var/ingest-dead-letter.jsonl"
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "console"

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    @field_validator("influx_url")
    @classmethod
    def _check_influx_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise SettingsError(f"InfluxDB URL must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @property
    def mqtt(self) -> MqttEndpoint:
        """The broker endpoint parsed from ``mqtt_url``."""
        return parse_mqtt_url(self.mqtt_url)
