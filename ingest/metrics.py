"""The ingester's own health, as Prometheus metrics served on ``/metrics``.

Each ingester owns a registry (several can run in one process in tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "compression_ingest"


class IngestMetrics:
    """Counters, gauges and histograms of one ingester."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(f"{PREFIX}_messages_received", "MQTT messages received, by channel",
                                ["channel"], registry=r)  # fmt: skip
        self.samples_written = Counter(f"{PREFIX}_samples_written", "Telemetry samples durably written", registry=r)
        self.lines_written = Counter(
            f"{PREFIX}_lines_written", "Line-protocol points written (data and dead letters)", registry=r
        )
        self.rejected = Counter(f"{PREFIX}_rejected", "Messages or samples rejected, by reason",
                                ["reason"], registry=r)  # fmt: skip
        self.acked = Counter(f"{PREFIX}_messages_acked", "Messages acknowledged after their write", registry=r)
        self.ack_skipped = Counter(
            f"{PREFIX}_acks_skipped",
            "Acks not sent: the message came on a connection that is gone (the broker redelivers it)",
            registry=r,
        )
        self.inflight = Gauge(f"{PREFIX}_inflight_messages", "Messages received and not yet acknowledged", registry=r)
        self.inflight_limit = Gauge(
            f"{PREFIX}_inflight_limit", "The in-flight window (MQTT Receive Maximum)", registry=r
        )
        self.paused = Counter(
            f"{PREFIX}_backpressure_pauses", "Times reading stopped because the window was full", registry=r
        )
        self.batch_latency = Histogram(f"{PREFIX}_batch_write_seconds", "Time to write one batch, retries included",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                       registry=r)  # fmt: skip
        self.batch_lines = Histogram(f"{PREFIX}_batch_lines", "Lines per written batch",
                                     buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 20000), registry=r)  # fmt: skip
        self.write_errors = Counter(f"{PREFIX}_write_errors", "Failed write attempts, by kind (connection, server, client)",
                                    ["kind"], registry=r)  # fmt: skip
        self.reconnects = Counter(
            f"{PREFIX}_broker_reconnects", "Connections to the broker after the first", registry=r
        )
        self.connected = Gauge(f"{PREFIX}_broker_connected", "1 while connected to the broker", registry=r)
        self.dead_letter_fallback = Counter(
            f"{PREFIX}_dead_letter_fallback", "Dead letters InfluxDB refused, kept in the local file", registry=r
        )
        self.lag = Gauge(
            f"{PREFIX}_last_sample_lag_seconds",
            "Receive time minus sample time of the newest written batch's last sample",
            registry=r,
        )

        self.unattributed = Counter(
            f"{PREFIX}_unattributed_points",
            "Points stored without a patient, by measurement and reason (unregistered device, device assigned to nobody at the point's time)",
            ["measurement", "reason"],
            registry=r,
        )
        self.registry_refresh_failures = Counter(
            f"{PREFIX}_registry_refresh_failures",
            "Registry refreshes that failed (the last snapshot was kept)",
            registry=r,
        )
        self.registry_version = Gauge(
            f"{PREFIX}_registry_version", "Version of the registry snapshot in use (0: none yet)", registry=r
        )
        self.registry_checked = Gauge(
            f"{PREFIX}_registry_checked_timestamp_seconds",
            "Unix time of the last successful registry check (alert when it falls behind)",
            registry=r,
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (for tests and summaries); 0 if absent."""
        got = self.registry.get_sample_value(name, labels or None)
        return float(got) if got is not None else 0.0
