"""Transport options: broker credentials, TLS (mqtts://), MQTT 3.1.1."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from compression.localservers import BrokerAccess, InfluxDB, Mosquitto, start_mosquitto
from ingest.app import Ingester
from simulators.publisher import LoadSpec, Publisher, generate
from tests.integration.conftest import Names, eventually, running, settings_for, wait_for_count

pytestmark = pytest.mark.integration

COUNT = "SELECT count(ankle_mmhg) FROM sample"


def publish(url: str, spec: LoadSpec, client_id: str, ca: Path | None = None) -> None:
    with Publisher(url, client_id, tls_ca_file=str(ca) if ca else None) as pub:
        pub.publish_all(list(generate(spec)))


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl)."""
    ca_key, ca, key, csr, cert, ext = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                            "server.crt", "san.ext"))  # fmt: skip
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
           "-days", "2", "-subj", "/CN=compression test CA"]  # fmt: skip
    subprocess.run([str(a) for a in run], check=True, capture_output=True)
    subprocess.run([str(a) for a in ("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                                     "-subj", "/CN=127.0.0.1")], check=True, capture_output=True)  # fmt: skip
    subprocess.run([str(a) for a in ("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
                                     "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)],
                   check=True, capture_output=True)  # fmt: skip
    return ca, cert, key


async def test_tls_listener_with_a_private_ca(
    influx: InfluxDB, names: Names, tmp_path: Path, servers_root: Path
) -> None:
    ca, cert, key = make_certificates(tmp_path)
    broker = start_mosquitto(servers_root, access=BrokerAccess(tls_cert=cert, tls_key=key, tls_ca=ca))
    try:
        tls_url = f"mqtts://127.0.0.1:{broker.port}"
        spec = LoadSpec(devices=5, messages=20, samples=10, prefix=names.prefix, topic_root=names.topic_root)
        settings = settings_for(broker, influx, names, mqtt_url=tls_url, mqtt_tls_ca_file=str(ca))
        async with running(settings):
            await asyncio.to_thread(publish, tls_url, spec, f"pub-{names.client_id}", ca)
            assert await wait_for_count(influx, names.database, COUNT, spec.total_samples) == spec.total_samples
    finally:
        broker.stop()


async def test_broker_credentials(influx: InfluxDB, names: Names, tmp_path: Path, servers_root: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "ingest", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "sock-pub", "pub-pw"], check=True)
    # The broker's own folder sits under var/ (pytest's tmp_path is closed to the mosquitto user).
    broker = start_mosquitto(servers_root, access=BrokerAccess(password_file=passwd))
    try:
        spec = LoadSpec(devices=3, messages=5, samples=10, prefix=names.prefix, topic_root=names.topic_root)
        good = settings_for(broker, influx, names, mqtt_url=f"mqtt://ingest:s3cret@127.0.0.1:{broker.port}")
        async with running(good):
            url = f"mqtt://sock-pub:pub-pw@127.0.0.1:{broker.port}"
            await asyncio.to_thread(publish, url, spec, f"pub-{names.client_id}")
            assert await wait_for_count(influx, names.database, COUNT, spec.total_samples) == spec.total_samples

        # Anonymous or a wrong password: refused, retried with backoff, never a crash.
        for url in (broker.url, f"mqtt://ingest:wrong@127.0.0.1:{broker.port}"):
            refused = Ingester(settings_for(broker, influx, names, mqtt_url=url, mqtt_client_id=f"{names.client_id}-x"))
            task = asyncio.create_task(refused.run())
            await asyncio.sleep(1.5)
            assert not task.done(), "a refused connection must not end the ingester"
            assert refused.metrics.value("compression_ingest_broker_connected") == 0
            refused.stop()
            await asyncio.wait_for(task, timeout=20)
    finally:
        broker.stop()


async def test_mqtt_311_with_persistent_session(mosquitto: Mosquitto, influx: InfluxDB, names: Names) -> None:
    spec = LoadSpec(devices=10, messages=20, samples=10, prefix=names.prefix, topic_root=names.topic_root)
    settings = settings_for(mosquitto, influx, names, mqtt_protocol="3.1.1")
    async with running(settings) as ingester:
        await asyncio.to_thread(publish, mosquitto.url, spec, f"pub-{names.client_id}")
        assert await wait_for_count(influx, names.database, COUNT, spec.total_samples) == spec.total_samples
        value = ingester.metrics.value
        assert await eventually(lambda: value("compression_ingest_messages_acked_total") == 200)
    # Messages published while the ingester is away wait in its session (clean_session=False).
    later = LoadSpec(devices=10, messages=5, samples=10, prefix=names.prefix, topic_root=names.topic_root,
                     start_ms=None, seed=2, period_ms=1000)  # fmt: skip
    await asyncio.to_thread(publish, mosquitto.url, later, f"pub2-{names.client_id}")
    async with running(settings):
        total = spec.total_samples + later.total_samples
        assert await wait_for_count(influx, names.database, COUNT, total) == total
