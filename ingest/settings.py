"""The ingester's settings: one place, environment variables with a ``COMPRESSION_`` prefix.

Every field is documented in ``.env.example``; CLI flags of ``compression ingest``
override the environment.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from devices.mqtturl import MqttEndpoint, SettingsError, parse_mqtt_url, redact_url
from devices.protocol import is_valid_device_id

__all__ = ["IngestSettings", "MqttEndpoint", "SettingsError", "parse_mqtt_url", "redact_url"]


class IngestSettings(BaseSettings):
    """Settings of ``compression ingest`` (see ``.env.example`` for each variable)."""

    model_config = SettingsConfigDict(env_prefix="COMPRESSION_", extra="ignore")

    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="Broker URL: mqtt://[user:password@]host[:port], mqtts:// for TLS. No credentials: anonymous.",
    )
    mqtt_client_id: str = Field(
        "compression.ingest",
        description="Fixed MQTT client id; the broker keeps this ingester's persistent session under it. Give each replica its own. It must not be a valid device id (give it a '.', which device ids never have), so that no garment or gateway can ever hold it.",
    )
    mqtt_protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT protocol version. 5 sends Receive Maximum (the in-flight window) and a session expiry; 3.1.1 relies on the broker's max_inflight_messages.",
    )
    mqtt_share_group: str | None = Field(
        None, description="If set, subscribe through $share/<group>/... so several ingesters split the load."
    )
    mqtt_topic_root: str = Field(
        "fleet/garments/v1",
        description="Topic root the garments' topics have on the broker's services listener: the protocol's garments/v1 under the device listeners' mount point fleet/ (tests use their own roots).",
    )
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    mqtt_session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="MQTT 5 session expiry: how long the broker keeps queueing for this ingester while it is away.",
    )
    mqtt_tls_ca_file: str | None = Field(
        None, description="CA bundle to verify the broker's certificate (mqtts://); the system store if unset."
    )
    mqtt_tls_insecure: bool = Field(False, description="Skip the broker certificate's host-name check (testing only).")

    influx_url: str = Field(
        "http://127.0.0.1:8086",
        description="InfluxDB base URL; its v1 API (/write, /query) is used, served by InfluxDB 1.x, 2.x and 3.x.",
    )
    influx_database: str = Field(
        "compression", description="Database (1.x), or the database name mapped to a bucket (2.x DBRP, 3.x)."
    )
    influx_retention_policy: str | None = Field(
        None, description="Retention policy to write into (1.x); the database default if unset."
    )
    influx_username: str | None = Field(None, description="InfluxDB 1.x user (basic auth).")
    influx_password: str | None = Field(None, description="InfluxDB 1.x password.")
    influx_token: str | None = Field(
        None,
        description="InfluxDB 2.x/3.x API token (sent as 'Authorization: Token ...'); takes precedence over user/password.",
    )
    influx_create_database: bool = Field(
        True, description="Create the database at start-up if missing (InfluxDB 1.x; skipped with a token)."
    )
    influx_timeout_s: float = Field(30.0, gt=0, description="Timeout of one HTTP request to InfluxDB.")

    batch_size: int = Field(
        5000, ge=1, le=100_000, description="Lines per write; a batch is written when it has this many lines."
    )
    flush_interval_ms: int = Field(
        200, ge=1, le=60_000, description="...or when its oldest message has waited this long (sets latency, not CPU)."
    )
    inflight_max: int = Field(
        1000,
        ge=1,
        le=65_535,
        description="Messages received but not yet acknowledged (MQTT 5 Receive Maximum). Reading pauses beyond it; it should hold about two batches.",
    )
    write_concurrency: int = Field(
        2, ge=1, le=16, description="Batches written to InfluxDB at the same time (acks still go out in order)."
    )
    retry_initial_s: float = Field(
        0.2, gt=0, description="First retry delay after a failed write or broker connection (doubles each time)."
    )
    retry_max_s: float = Field(10.0, gt=0, description="Longest retry delay.")

    max_future_s: int = Field(
        300,
        ge=0,
        description="Samples more than this far ahead of the ingester's clock are rejected (timestamp_in_future).",
    )
    max_age_s: int = Field(
        30 * 24 * 3600, ge=60, description="Samples older than this are rejected (timestamp_too_old)."
    )
    max_wear_gap_s: float = Field(
        120.0,
        gt=0,
        description="A worn sample counts for the time to the next sample, capped at this: a gap in the data is not wear time.",
    )

    registry_url: str | None = Field(
        None,
        description="Device registry to tag each point with the patient code and clinic holding the device at the point's time: the registry database (sqlite:///path, postgresql://user:password@host/db) or the registry API (http(s)://host:port). Unset or empty: no registry, no patient or clinic tags.",
    )
    registry_token: str | None = Field(
        None,
        description="API token for the registry API (sent as 'Authorization: Bearer ...'); needed with an http(s):// registry URL, unused with a database URL.",
    )
    registry_refresh_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds between checks of the registry's version; a new snapshot is loaded only when it changed, so a registry change is applied within about this long.",
    )

    metrics_enabled: bool = Field(True, description="Serve Prometheus /metrics and /healthz.")
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics endpoint (0.0.0.0 inside a container).")
    metrics_port: int = Field(9410, ge=0, le=65_535, description="Port of the metrics endpoint (0: any free port).")
    dead_letter_file: str = Field(
        "var/ingest-dead-letter.jsonl",
        description="Local file for dead letters that InfluxDB itself refuses (last resort; normally dead letters are stored in InfluxDB).",
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["json", "console"] = Field(
        "console", description="Log format: json (one object per line) or console."
    )

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    @field_validator("mqtt_client_id")
    @classmethod
    def _check_mqtt_client_id(cls, value: str) -> str:
        # Client ids are global to the broker: one a device could use would let it take this session over.
        if is_valid_device_id(value):
            raise SettingsError(f"MQTT client id {value!r} could be a device id: give it a '.' (e.g. compression.ingest)")
        return value

    @field_validator("influx_url")
    @classmethod
    def _check_influx_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise SettingsError(f"InfluxDB URL must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @field_validator("registry_url")
    @classmethod
    def _check_registry_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        scheme = value.split("://", 1)[0].split("+", 1)[0] if "://" in value else ""
        if scheme not in ("sqlite", "postgresql", "postgres", "http", "https"):
            raise SettingsError(
                f"registry URL must start with sqlite://, postgresql://, http:// or https://, got {redact_url(value)!r}"
            )
        return value.rstrip("/") if scheme in ("http", "https") else value

    @model_validator(mode="after")
    def _check_registry_token(self) -> IngestSettings:
        if self.registry_url and self.registry_url.startswith(("http://", "https://")) and not self.registry_token:
            raise SettingsError("an http(s):// registry URL needs COMPRESSION_REGISTRY_TOKEN")
        return self

    @property
    def mqtt(self) -> MqttEndpoint:
        """The broker endpoint parsed from ``mqtt_url``."""
        return parse_mqtt_url(self.mqtt_url)
