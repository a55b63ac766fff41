"""Retention: raw samples go after the raw retention, a day's summary, flags and dashboard figures stay.

A dedicated InfluxDB (its retention service checks every second; the shared one checks every 30 minutes) and a
database whose default retention policy has one-hour shards. A patient's 12 past days are stored raw (2 h worn
a day against 8 h prescribed: under-use), the monitor evaluates (day summaries and ``flag_day`` written to the
``forever`` retention policy), then the raw retention is cut to one hour: InfluxDB drops every raw sample and
receipt. The summaries, the flags and the dashboard's wear panel still give the same figures for those days, and
a new monitor replica judges those days exactly as before, from the summaries alone.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from compression.influxql import rows
from compression.localservers import INFLUXD_BIN, InfluxDB, free_port, influxdb_config, server_folder
from dashboards import build
from dashboards.validate import panels
from monitor import queries as q
from monitor.app import Monitor
from monitor.settings import MonitorSettings
from tests.integration.test_dashboards_queries import flat, resolve
from tests.integration.test_monitor_incremental import registry_url, worn_minutes  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration
TZ = ZoneInfo("America/Edmonton")
DATABASE = "retention"
DAYS = 12


@dataclass
class Server:
    """What ``resolve`` in test_dashboards_queries reads: the server and the database."""

    influx: InfluxDB
    database: str


@pytest.fixture
def quick_influx(tmp_path: Path) -> Iterator[InfluxDB]:
    port = free_port()
    folder = server_folder(tmp_path, f"influxdb-{port}")
    conf = influxdb_config(folder, port, free_port()).replace(
        "[retention]\n  enabled = true\n", '[retention]\n  enabled = true\n  check-interval = "1s"\n')  # fmt: skip
    (folder / "influxdb.conf").write_text(conf)
    server = InfluxDB("influxdb", folder, port, [INFLUXD_BIN, "-config", str(folder / "influxdb.conf")])
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


def influxql(influx: InfluxDB, statement: str) -> None:
    data = urllib.parse.urlencode({"q": statement}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{influx.url}/query", data=data), timeout=30) as resp:
        assert resp.status == 200, resp.read()


def write(influx: InfluxDB, lines: list[str]) -> None:
    request = urllib.request.Request(f"{influx.url}/write?db={DATABASE}&precision=ns", data="\n".join(lines).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 204


def monitor(influx: InfluxDB, registry: str, state: Path) -> Monitor:
    settings = MonitorSettings(influx_url=influx.url, influx_database=DATABASE, registry_database_url=registry,
                               state_database_url=f"sqlite:///{state}", smtp_port=1, raw_retention_days=0,
                               _env_file=None)  # fmt: skip
    mon = Monitor(settings)
    assert mon.state.acquire_lease(mon.replica, 60)
    return mon


def wear_panel(server: Server, start_ms: int) -> dict[int, float]:
    """The patient dashboard's wear panel as Grafana runs it: hours per local day (by the day's start)."""
    dashboard = build.patient()
    (panel,) = [p for p in panels(dashboard) if p["title"].startswith("Wear per local day")]
    ctx = resolve(server, dashboard, start_ms, {"patient": ["PT-INC1"]})  # type: ignore[arg-type]
    from dashboards.render import expand

    return {r["time"]: r["wear_h"] for r in flat(rows_of(server, expand(panel["targets"][0]["query"], ctx)))}


def rows_of(server: Server, text: str) -> list[dict[str, object]]:
    from compression.influxql import query

    return query(server.influx.url, server.database, text)


async def test_a_day_past_the_raw_retention_keeps_its_summary_flags_and_dashboard_figures(
    quick_influx: InfluxDB, registry_url: str, tmp_path: Path  # noqa: F811
) -> None:
    influxql(quick_influx, f'CREATE DATABASE "{DATABASE}" WITH DURATION INF SHARD DURATION 1h NAME "raw"')
    today = datetime.now(TZ).replace(hour=0, minute=0, second=0, microsecond=0)
    received = int(time.time() * 1000) - 3_600_000
    lines = []
    for back in range(1, DAYS + 1):
        lines += worn_minutes(today - timedelta(days=back), 9, 120, 27.0, received)
    write(quick_influx, lines)
    first = monitor(quick_influx, registry_url, tmp_path / "first.db")
    assert await first.evaluate_once()
    before = {r.stats.day: (r.flags, r.stats.wear_s) for r in first._results["PT-INC1"] if r.stats.points}
    assert len(before) == DAYS and all(flags == ("under_use",) for flags, _ in before.values())
    server = Server(quick_influx, DATABASE)
    start = int((today - timedelta(days=DAYS + 1)).timestamp() * 1000)
    panel = wear_panel(server, start)
    assert sorted(panel.values()) == [2.0] * DAYS

    # The raw retention cut to an hour: InfluxDB drops every shard of raw samples and receipts.
    influxql(quick_influx, f'ALTER RETENTION POLICY "raw" ON "{DATABASE}" DURATION 1h')
    deadline = time.monotonic() + 60
    while rows(quick_influx.url, DATABASE, "SELECT count(worn) AS n FROM sample") or rows(
            quick_influx.url, DATABASE, "SELECT count(received_ms) AS n FROM receipt"):  # fmt: skip
        assert time.monotonic() < deadline, "the raw samples were not dropped"
        await asyncio.sleep(0.5)

    kept = rows(quick_influx.url, DATABASE, f'SELECT count(wear_s) AS n FROM "{q.SUMMARY_RP}"."{q.SUMMARY}"')
    assert kept[0]["n"] >= DAYS
    first_day = int((today - timedelta(days=DAYS)).timestamp() * 1000)
    flagged = rows(quick_influx.url, DATABASE,
                   f'SELECT flags FROM "{q.SUMMARY_RP}".flag_day WHERE time >= {first_day}ms')  # fmt: skip
    assert [r["flags"] for r in flagged if r["flags"] != "compliant"] == ["under_use"] * DAYS
    second = monitor(quick_influx, registry_url, tmp_path / "second.db")  # a new replica: summaries only
    assert await second.evaluate_once()
    after = {r.stats.day: (r.flags, r.stats.wear_s) for r in second._results["PT-INC1"] if r.stats.points}
    assert after == before and second.counters.last_rebuilt == 0
    assert wear_panel(server, start) == panel
    first.state.close()
    second.state.close()
