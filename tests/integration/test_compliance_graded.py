"""The compliance core graded against the simulators' ground truth, through the real broker, ingester and InfluxDB.

One 14-day backfill of every scenario is shared by the module (it is the
slow part): the fleet is registered in a registry SQLite file, so the
ingester tags every sample with its patient, and the monitor's contexts come
from that registry (``monitor.registry.load_contexts``). It is published in
two parts: first everything sent before the offline scenario's reconnection
(the monitor's view at that moment is taken), then the rest.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from compression.influxql import rows, scalar
from compression.localservers import InfluxDB, Mosquitto
from devices.protocol import ProtocolError, decode_event, decode_telemetry
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import Registry
from monitor import queries as q
from monitor.compliance import InfluxReader, day_stats, flags_for
from monitor.model import DayStats, PatientContext, SockRx
from monitor.registry import load_contexts
from simulators.registration import register_fleet
from simulators.run import RunOptions, gateway_plan, run_fleet
from simulators.scenarios import Fleet, SimMessage, build_fleet, every_scenario
from tests.integration.conftest import Names, running, settings_for

pytestmark = pytest.mark.integration

TZ = "America/Edmonton"
DAYS = 14


@dataclass
class Part:
    """Some of a fleet's messages (run_fleet publishes ``messages()`` in order)."""

    fleet: Fleet
    keep: Callable[[SimMessage], bool]

    @property
    def devices(self) -> Any:
        return self.fleet.devices

    @property
    def seed(self) -> int:
        return self.fleet.seed

    @property
    def period(self) -> Any:
        return self.fleet.period

    def messages(self) -> Iterator[SimMessage]:
        return (m for m in self.fleet.messages() if self.keep(m))


def stored_counts(messages: Iterator[SimMessage], now_ms: int) -> tuple[int, int]:
    """Samples and events the ingester keeps of ``messages`` when it receives them at ``now_ms``."""
    samples = events = 0
    for m in messages:
        try:
            if m.channel == "telemetry":
                samples += len(decode_telemetry(m.payload, m.device_id, now_ms).message.samples)
            elif m.channel == "event":
                decode_event(m.payload, m.device_id, now_ms)
                events += 1
        except ProtocolError:
            pass
    return samples, events


def new_names(tag: str) -> Names:
    token = uuid.uuid4().hex[:8]
    return Names(database=f"t_compliance_{tag}_{token}", topic_root=f"test-{token}/garments/v1",
                 client_id=f"ingest.{token}", prefix=f"cmp{token[:4]}")  # fmt: skip


def registry_for(path: Path, fleet: Fleet, options: RunOptions) -> str:
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrate(engine)
    register_fleet(Registry(session_factory(engine)), fleet, gateway_plan(fleet, options))
    engine.dispose()
    return url


def contexts_of(url: str, now: datetime) -> list[PatientContext]:
    engine = make_engine(url)
    try:
        return load_contexts(Registry(session_factory(engine)), now)
    finally:
        engine.dispose()


async def publish(part: Part, options: RunOptions, influx: InfluxDB, database: str, now_ms: int,
                  before: tuple[int, int]) -> tuple[int, int]:  # fmt: skip
    """Publish ``part`` and wait until InfluxDB holds what the ingester keeps of it; the new totals."""
    samples, events = stored_counts(part.messages(), now_ms)
    want = (before[0] + samples, before[1] + events)
    report = await asyncio.to_thread(run_fleet, part, options)  # type: ignore[arg-type]
    assert report.acked == report.messages and report.dropped == 0
    deadline = time.monotonic() + 120
    got = (-1, -1)
    while time.monotonic() < deadline:
        got = (int(scalar(influx.url, database, "SELECT count(worn) FROM sample")),
               int(scalar(influx.url, database, 'SELECT count("count") FROM event')))  # fmt: skip
        if got == want:
            break
        await asyncio.sleep(0.1)
    assert got == want
    return got


@dataclass
class Backfill:
    fleet: Fleet
    truth: dict[str, Any]
    database: str
    contexts: list[PatientContext]
    before_upload: dict[str, list[DayStats]]
    upload_at_ms: int
    seconds: float


def local_midnight(now: datetime, tz: str) -> datetime:
    local = now.astimezone(ZoneInfo(tz))
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


@pytest.fixture(scope="module")
def backfill(mosquitto: Mosquitto, influx: InfluxDB, tmp_path_factory: pytest.TempPathFactory) -> Backfill:
    """Every scenario over the 14 complete local days before today, stored in two parts (see the module doc)."""
    names = new_names("all")
    end = local_midnight(datetime.now(UTC), TZ)
    fleet = every_scenario(seed=1, days=DAYS, end=end)
    truth = fleet.ground_truth()
    options = RunOptions(mosquitto.url, connections=3, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    url = registry_for(tmp_path_factory.mktemp("registry") / "registry.db", fleet, options)
    contexts = contexts_of(url, datetime.now(UTC))
    (offline,) = [p["transport"]["offline"] for p in truth["patients"] if "offline" in p["transport"]]
    upload_at = offline["upload_at_ms"]
    (late,) = [c for c in contexts if c.patient in {p["patient"] for p in truth["patients"]
                                                    if p["scenario"] == "offline_backfill"}]  # fmt: skip

    async def go() -> tuple[dict[str, list[DayStats]], float]:
        now_ms = int(time.time() * 1000)
        async with running(settings_for(mosquitto, influx, names, registry_url=url)):
            counts = await publish(Part(fleet, lambda m: m.publish_at_ms < upload_at), options, influx,
                                   names.database, now_ms, (0, 0))  # fmt: skip
            # The monitor's view at the reconnection: days complete by then, from what had arrived.
            early = await day_stats(influx.url, names.database, [late], DAYS, upload_at)
            await publish(Part(fleet, lambda m: m.publish_at_ms >= upload_at), options, influx, names.database,
                          now_ms, counts)  # fmt: skip
        started = time.perf_counter()
        await day_stats(influx.url, names.database, contexts, DAYS, int(time.time() * 1000))
        return early, time.perf_counter() - started

    early, seconds = asyncio.run(go())
    return Backfill(fleet, truth, names.database, contexts, early, upload_at, seconds)


def graded(truth: dict[str, Any], results: dict[str, list[Any]]) -> tuple[int, float]:
    """Assert flags and wear of every patient's complete days; (days matched, largest wear difference in minutes)."""
    matched, worst = 0, 0.0
    for patient in truth["patients"]:
        got = {r.stats.day.isoformat(): r for r in results[patient["patient"]]}
        for day in patient["days"]:
            if not day["complete"]:
                continue
            r = got[day["date"]]
            where = (patient["scenario"], day["date"])
            assert r.stats.start_ms == day["start_ms"] and r.stats.end_ms == day["end_ms"], where
            assert list(r.flags) == day["flags"], where
            diff = abs(r.stats.wear_s - day["wear_s"]) / 60
            assert diff <= 1.0, where
            worst = max(worst, diff)
            matched += 1
    return matched, worst


async def test_every_scenario_flags_and_wear_match_the_ground_truth(backfill: Backfill, influx: InfluxDB) -> None:
    truth = backfill.truth
    by_code = {p["patient"]: p for p in truth["patients"]}
    assert {c.patient for c in backfill.contexts} == set(by_code)
    for ctx in backfill.contexts:  # the registry's prescription is the simulated one
        rx = by_code[ctx.patient]["prescription"]
        if isinstance(ctx.rx, SockRx):
            assert [ctx.rx.low_mmhg, ctx.rx.high_mmhg] == rx["range_mmhg"]
    stats = await day_stats(InfluxReader(influx.url), backfill.database, backfill.contexts, DAYS, medians=True)
    results = {c.patient: flags_for(c, stats[c.patient]) for c in backfill.contexts}
    for ctx in backfill.contexts:
        days = results[ctx.patient]
        assert len(days) == DAYS + 1 and not days[-1].stats.complete and days[-1].flags is None
    matched, worst = graded(truth, results)
    assert matched == len(truth["patients"]) * DAYS
    print(f"graded {len(truth['patients'])} patients x {DAYS} days = {matched} days, flags exact; "
          f"largest wear difference {worst * 60:.3f} s; day_stats {backfill.seconds:.2f} s")  # fmt: skip
    # Every daily flag the monitor can emit occurs in this fleet except boot_long_sessions (no scenario has one).
    seen = {f for rs in results.values() for r in rs for f in r.flags or ()}
    assert {"compliant", "under_use", "too_tight", "too_loose", "rolled_down", "worn_out", "silent",
            "boot_overpressure", "boot_short_sessions", "boot_missed_sessions"} <= seen  # fmt: skip
    # Statistics beyond the flags agree with the truth too.
    for patient in truth["patients"]:
        got = {r.stats.day.isoformat(): r.stats for r in results[patient["patient"]]}
        for day in patient["days"]:
            s = got[day["date"]]
            assert s.samples == day["samples"] and s.worn_samples == day["worn_samples"], patient["scenario"]
            if patient["kind"] == "sock":
                assert s.ankle_median_mmhg == pytest.approx(day["ankle_median_mmhg"], abs=1e-3)
                for name in ("above_range_s", "below_range_s", "reversed_gradient_s"):
                    assert getattr(s, name) == pytest.approx(day[name], abs=1e-3), (patient["scenario"], name)
            else:
                assert s.peak_mmhg == day["peak_mmhg"]
                assert sorted(s.session_durations_s) == sorted(x["duration_s"] for x in day["sessions"])
                if day["complete"]:
                    assert (s.sessions_in_window, s.sessions_required_in_window) == (
                        day["sessions_in_window"], day["sessions_required_in_window"])  # fmt: skip
        last = [d for d in patient["days"] if d["complete"]][-1]
        if patient["kind"] == "sock":
            assert got[last["date"]].ankle_median_7d_mmhg == pytest.approx(last["ankle_median_7d_mmhg"], abs=1e-3)


def test_offline_backfill_flags_before_and_after_the_late_upload(backfill: Backfill, influx: InfluxDB) -> None:
    (patient,) = [p for p in backfill.truth["patients"] if p["scenario"] == "offline_backfill"]
    (ctx,) = [c for c in backfill.contexts if c.patient == patient["patient"]]
    before = patient["transport"]["offline"]["flags_before_upload"]
    early = {r.stats.day.isoformat(): r.flags for r in flags_for(ctx, backfill.before_upload[ctx.patient])}
    assert {d: list(early[d] or ()) for d in before} == before
    assert ["silent"] in before.values() and any("under_use" in f for f in before.values())
    # Recomputing after the upload gives the final truth: the same days are compliant now.
    stats = asyncio.run(day_stats(influx.url, backfill.database, [ctx], DAYS))
    final = {r.stats.day.isoformat(): r.flags for r in flags_for(ctx, stats[ctx.patient])}
    for day in patient["days"]:
        if day["complete"]:
            assert list(final[day["date"]] or ()) == day["flags"] == ["compliant"]


def test_the_queries_run_on_this_influxdb(backfill: Backfill, influx: InfluxDB) -> None:
    """The InfluxQL features the queries rely on, on the real server (docs/compliance.md)."""
    codes = sorted(c.patient for c in backfill.contexts if isinstance(c.rx, SockRx))
    start, end = backfill.truth["start_ms"], backfill.truth["end_ms"]
    db = backfill.database
    # Field arithmetic in WHERE, a boolean field, a regex on the patient tag, GROUP BY time(1d) with tz().
    reversed_ = rows(influx.url, db, q.daily_reversed(codes, TZ, start, end))
    assert reversed_ and all(r["patient"] in codes for r in reversed_)
    # An OR list on the tag selects the same as the regular expression.
    either = " OR ".join(f"patient = '{c}'" for c in codes[:2])
    by_or = rows(influx.url, db, f"SELECT count(worn) AS n FROM sample WHERE ({either}) GROUP BY patient")
    by_re = rows(influx.url, db, f"SELECT count(worn) AS n FROM sample WHERE {q.patient_filter(codes[:2])} "
                                 "GROUP BY patient")  # fmt: skip
    assert by_or == by_re and len(by_re) == 2
    # Several statements in one request.
    both = rows(influx.url, db, f"{q.daily_statuses(codes, TZ, start, end)}; {q.daily_events(codes, TZ, start, end)}")
    assert {"statuses", "events"} <= {k for r in both for k in r}
    with pytest.raises(ValueError):
        q.patient_filter(["PT-1/'; DROP"])


def dst_fleet(end: datetime) -> Fleet:
    return build_fleet(seed=3, days=4, end=end, tz=TZ, scenarios=["compliant", "under_use", "boot_compliant"])


@pytest.mark.parametrize(("end", "hours"), [(datetime(2026, 3, 10, tzinfo=ZoneInfo(TZ)), 23.0),
                                            (datetime(2025, 11, 4, tzinfo=ZoneInfo(TZ)), 25.0)])  # fmt: skip
async def test_daylight_saving_days_have_the_right_totals(
    mosquitto: Mosquitto, influx: InfluxDB, names: Names, tmp_path: Path, end: datetime, hours: float
) -> None:
    fleet = dst_fleet(end)
    truth = fleet.ground_truth()
    assert hours in [d["hours"] for d in truth["patients"][0]["days"]]
    options = RunOptions(mosquitto.url, connections=1, topic_root=names.topic_root, client_prefix=f"gw-{names.prefix}")
    url = registry_for(tmp_path / "registry.db", fleet, options)
    now = datetime.fromtimestamp(truth["end_ms"] / 1000, UTC)
    contexts = contexts_of(url, now)
    async with running(settings_for(mosquitto, influx, names, registry_url=url, max_age_s=20 * 365 * 86_400)):
        # The ingester keeps these old samples (a long max age), as a decoder receiving them at the end would.
        await publish(Part(fleet, lambda m: True), options, influx, names.database, truth["end_ms"] + 60_000, (0, 0))
    # Evaluated as of the fleet's end (local midnight): every day complete.
    stats = await day_stats(influx.url, names.database, contexts, 4, truth["end_ms"] + 1)
    results = {c.patient: flags_for(c, stats[c.patient])[:-1] for c in contexts}
    matched, _ = graded(truth, results)
    assert matched == 3 * 4
    for p in truth["patients"]:
        spans = {(r.stats.end_ms - r.stats.start_ms) / 3_600_000 for r in results[p["patient"]]}
        assert spans == {24.0, hours}
    assert sorted(date.fromisoformat(d) for d in truth["days"]) == [
        r.stats.day for r in results[truth["patients"][0]["patient"]]
    ]
