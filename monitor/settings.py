"""Settings of ``compression monitor``: environment variables prefixed ``COMPRESSION_MONITOR_``.

Every field is documented in ``.env.example`` (a test keeps the two in step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MonitorSettings(BaseSettings):
    """Where the data, the registry, the monitor's own state and the mail server are; how often to look."""

    model_config = SettingsConfigDict(env_prefix="COMPRESSION_MONITOR_", env_file=".env", extra="ignore")

    influx_url: str = Field(default="http://127.0.0.1:8086", description="InfluxDB holding the ingested telemetry (v1 /query API).")
    influx_database: str = Field(default="compression", description="InfluxDB database the ingester writes to.")
    influx_username: str | None = Field(default=None, description="InfluxDB 1.x user (basic auth).")
    influx_password: str | None = Field(default=None, description="InfluxDB 1.x password.")
    influx_token: str | None = Field(default=None, description="InfluxDB 2.x/3.x token (sent as 'Authorization: Token ...'); wins over user/password.")
    registry_database_url: str = Field(default="sqlite:///var/registry.db", description="The device registry's database: who is monitored, against which prescription, alerting which physio.")
    state_database_url: str = Field(default="sqlite:///var/monitor.db", description="The monitor's own durable state (day results, episodes, e-mail outbox, the replicas' lease); replicas share it (PostgreSQL across hosts).")
    interval_s: float = Field(default=60.0, gt=0, description="Seconds between full evaluations of every patient's last days.")
    safety_interval_s: float = Field(default=10.0, gt=0, description="Seconds between checks of the safety flags (boot over-pressure) on today's data; they alert at once.")
    full_every_s: float = Field(default=3600.0, gt=0, description="Seconds between full re-reads of every patient's window; in between, only the days that received data since the last evaluation are re-read (the ingester's receipts).")
    today_every_s: float = Field(default=900.0, ge=0, description="Seconds between rebuilds of a patient's summary of the current, unfinished day while readings keep arriving (finished days are rebuilt as soon as their readings change; the safety checks read today's boot pressures themselves).")
    rebuilds_per_evaluation: int = Field(default=0, ge=0, description="Patients whose day summaries one evaluation rebuilds from raw samples at most (0: automatic, 1.5 x patients x INTERVAL_S / TODAY_EVERY_S and at least 500); the others wait for the next evaluations, a stale finished day not judged until its rebuild.")
    raw_retention_days: int = Field(default=396, ge=0, description="Days raw samples are kept (the default retention policy of the database, set by the monitor at start; 0: for ever). Day summaries and flags are kept for ever (retention policy 'forever'); a day older than this is never rebuilt.")
    days_back: int = Field(default=30, ge=8, le=90, description="Local days evaluated each time (a past day that receives late store-and-forward data is re-read, and its flags follow).")
    resolve_after_days: int = Field(default=2, ge=1, le=14, description="Hysteresis: clear days in a row before an episode resolves (a value hovering at a threshold opens one episode, not fifty).")
    pipeline_healthy_share: float = Field(default=0.9, gt=0, le=1, description="Share of a span (a day, or the silence allowance for today) the pipeline must have been healthy in (the ingester's heartbeat or any patient's readings stored for that hour) for missing data to be the patients'; below it, silence, under-use and missed-session alerts are held back as an outage.")
    lease_s: float = Field(default=30.0, gt=1, description="Seconds a replica's lease lasts; only the holder evaluates and sends, another replica takes over when it lapses.")
    shards: int = Field(default=1, ge=1, le=256, description="Shards the clinics are divided into (by a hash of the clinic's code), each with its own lease in the state database: replicas share them (each takes its fair share) and take over a dead replica's when its leases lapse. 1: one lease, one replica works at a time.")
    replica_id: str | None = Field(default=None, description="This replica's name in the lease (default: host name and process id).")
    smtp_host: str = Field(default="127.0.0.1", description="SMTP server for alert e-mails.")
    smtp_port: int = Field(default=587, ge=1, le=65535, description="SMTP port (587 with STARTTLS, 465 with implicit TLS, 25 or a catcher's port without TLS).")
    smtp_tls: Literal["starttls", "implicit", "off"] = Field(default="starttls", description="starttls (required), implicit (TLS from the first byte) or off (only for a local catcher).")
    smtp_username: str | None = Field(default=None, description="SMTP user name (AUTH); unset: no authentication.")
    smtp_password: str | None = Field(default=None, description="SMTP password.")
    smtp_ca_file: Path | None = Field(default=None, description="CA certificate to trust for the SMTP server's TLS (a private CA); unset: the system's.")
    smtp_timeout_s: float = Field(default=30.0, gt=0, description="Seconds before an SMTP attempt is given up (and retried later).")
    mail_from: str = Field(default="Compression monitor <monitor@localhost>", description="From address of the alert e-mails.")
    dashboard_url: str = Field(default="http://127.0.0.1:3000", description="Grafana base URL for the links to a patient's dashboard in e-mails.")
    workspace_url: str = Field(default="http://127.0.0.1:8070", description="Base URL of the physios' workspace (the registry's web app, compression workspace serve): e-mails link to the patient's page there, reached after sign-in.")
    digest_hour: int = Field(default=7, ge=0, le=23, description="Local hour (clinic time) at which each physio's daily digest is sent.")
    write_flags: bool = Field(default=True, description="Write episodes and daily flags to InfluxDB (measurements flag_episode and flag_day) for the dashboards.")
    log_level: str = Field(default="INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["console", "json"] = Field(default="console", description="Log format: json (one object per line) or console.")
