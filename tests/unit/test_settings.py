"""Settings: environment with the COMPRESSION_ prefix, CLI flags on top, clear errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from compression.cli import cli, load_settings
from ingest.settings import IngestSettings, SettingsError, parse_mqtt_url, redact_url


def test_mqtt_urls() -> None:
    anon = parse_mqtt_url("mqtt://127.0.0.1")
    assert (anon.host, anon.port, anon.tls, anon.username, anon.password) == ("127.0.0.1", 1883, False, None, None)
    tls = parse_mqtt_url("mqtts://ingest:p%40ss@broker.example:9883")
    assert (tls.host, tls.port, tls.tls, tls.username, tls.password) == ("broker.example", 9883, True, "ingest", "p@ss")
    assert parse_mqtt_url("mqtts://broker").port == 8883
    for bad in ("http://broker", "mqtt://", "mqtt://host:notaport"):
        with pytest.raises(SettingsError):
            parse_mqtt_url(bad)
    assert redact_url("mqtt://u:secret@h:1") == "mqtt://u:***@h:1"


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESSION_BATCH_SIZE", "1234")
    monkeypatch.setenv("COMPRESSION_INFLUX_DATABASE", "from_env")
    settings = load_settings({"influx_database": "from_flag", "inflight_max": None})
    assert settings.batch_size == 1234
    assert settings.influx_database == "from_flag"
    assert settings.inflight_max == IngestSettings.model_fields["inflight_max"].default


def test_invalid_settings_are_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESSION_MQTT_URL", "ftp://nope")
    result = CliRunner().invoke(cli, ["ingest"])
    assert result.exit_code == 2
    assert "mqtt://" in result.output


def test_help_documents_every_setting() -> None:
    result = CliRunner().invoke(cli, ["ingest", "--help"])
    assert result.exit_code == 0
    for name in IngestSettings.model_fields:
        assert "--" + name.replace("_", "-") in result.output
        assert f"COMPRESSION_{name.upper()}" in result.output.replace("\n", "").replace(" ", "")


def test_the_ingesters_client_id_can_never_be_a_device_id() -> None:
    # Client ids are global to the broker, and a device's is its device id: one that could be a device id could be
    # taken over by a garment registered under that name (issue 10, finding 1).
    default = IngestSettings()
    assert default.mqtt_client_id == "compression.ingest" and default.mqtt_topic_root == "fleet/garments/v1"
    for taken in ("compression-ingest", "ingest-1", "sock-0001"):
        with pytest.raises(ValidationError, match="could be a device id"):
            IngestSettings(mqtt_client_id=taken)
    assert IngestSettings(mqtt_client_id="ingest.replica-2").mqtt_client_id == "ingest.replica-2"
