"""Broker URLs (``mqtt[s]://[user[:password]@]host[:port]``), shared by the device client, the simulators and the
ingester: here, in ``devices/`` (which depends on no other component), so that none reaches into another's settings."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


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
