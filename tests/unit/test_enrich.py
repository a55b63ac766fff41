"""Enrichment: who held a device at a point's own time, and the tags that says so."""

from __future__ import annotations

import asyncio
import time

import pytest

from devices.protocol import Event, Sample, Status, Telemetry
from devices.registry.schemas import Snapshot, SnapshotEntry
from ingest.encode import attribute, event_line, rejected_line, status_line, telemetry_lines
from ingest.enrich import (
    UNASSIGNED,
    UNREGISTERED,
    Attributions,
    DatabaseSource,
    Enrichment,
    EnrichmentError,
    source_for,
)
from ingest.metrics import IngestMetrics

T = 1_780_000_000_000  # the reassignment, epoch ms
HOUR = 3_600_000


def entry(device: str, patient: str, from_ms: int, to_ms: int | None, clinic: str = "bowvalley") -> SnapshotEntry:
    return SnapshotEntry(device_id=device, patient=patient, clinic=clinic, from_ms=from_ms, to_ms=to_ms)


def snapshot(version: int = 7) -> Snapshot:
    return Snapshot(
        version=version,
        devices=["sock-a", "sock-b", "sock-idle", "sock-gap"],
        assignments=[
            entry("sock-a", "P-0001", T - 10 * HOUR, T),
            entry("sock-a", "P-0002", T, None),
            entry("sock-b", "P-0003", T - HOUR, T + HOUR, clinic="canmore"),
            entry("sock-gap", "P-0001", T - 3 * HOUR, T - 2 * HOUR),
            entry("sock-gap", "P-0004", T, None),
        ],
    )


@pytest.fixture
def cache() -> Attributions:
    return Attributions(snapshot())


def test_reassignment_boundary_goes_to_the_new_holder(cache: Attributions) -> None:
    assert cache.lookup("sock-a", T - 1).patient == "P-0001"
    at = cache.lookup("sock-a", T)  # valid_from of the new one, valid_to of the old one
    assert (at.patient, at.clinic, at.reason) == ("P-0002", "bowvalley", None)
    assert cache.lookup("sock-a", T - 10 * HOUR).patient == "P-0001"  # exactly at the first valid_from


def test_open_ended_assignment_lasts(cache: Attributions) -> None:
    assert cache.lookup("sock-a", T + 10_000 * HOUR).patient == "P-0002"


def test_before_the_first_and_after_the_last_assignment_is_unassigned(cache: Attributions) -> None:
    assert cache.lookup("sock-a", T - 10 * HOUR - 1).reason == UNASSIGNED
    assert cache.lookup("sock-b", T + HOUR).reason == UNASSIGNED  # at valid_to: no longer held
    assert cache.lookup("sock-b", T + HOUR - 1).patient == "P-0003"
    assert cache.lookup("sock-b", T).clinic == "canmore"


def test_gap_between_assignments_is_unassigned(cache: Attributions) -> None:
    gap = cache.lookup("sock-gap", T - HOUR)
    assert gap.reason == UNASSIGNED and gap.patient is None and gap.clinic is None
    assert (gap.start_ms, gap.end_ms) == (T - 2 * HOUR, T)
    assert cache.lookup("sock-gap", T).patient == "P-0004"


def test_unregistered_versus_unassigned(cache: Attributions) -> None:
    assert cache.lookup("sock-idle", T).reason == UNASSIGNED  # registered, never assigned
    assert cache.lookup("sock-nobody", T).reason == UNREGISTERED
    assert cache.lookup("sock-nobody", T).tags == (("attribution", UNREGISTERED),)


def test_overlapping_assignments_do_not_break_the_time_line() -> None:
    odd = Snapshot(
        version=1, devices=["d1"], assignments=[entry("d1", "P-0001", 0, 100), entry("d1", "P-0002", 50, None)]
    )
    cache = Attributions(odd)
    assert cache.lookup("d1", 49).patient == "P-0001"
    assert cache.lookup("d1", 50).patient == "P-0002"


def test_assignment_of_a_device_missing_from_devices_still_counts() -> None:
    cache = Attributions(Snapshot(version=1, devices=[], assignments=[entry("d1", "P-0001", 0, None)]))
    assert cache.lookup("d1", 5).patient == "P-0001"


# -- tags on line protocol -----------------------------------------------------------------------------------------


def message(device: str, times: list[int]) -> Telemetry:
    samples = [Sample(t=t, pressure_mmhg={"ankle": 20.5, "calf": 15.0}, worn=True) for t in times]
    return Telemetry(v=1, device_id=device, seq=3, kind="sock", samples=samples, battery_pct=80)


def tags_of(line: str) -> dict[str, str]:
    key = line[: line.index(" ")]
    return dict(part.split("=", 1) for part in key.split(",")[1:])


def test_sample_points_get_the_holder_at_their_own_time(cache: Attributions) -> None:
    times = [T - 120_000, T - 60_000, T, T + 60_000]  # the reassignment falls inside the message
    lines = telemetry_lines(message("sock-a", times))
    plain = list(lines)
    assert attribute(lines, len(lines), cache) == ()
    patients = [tags_of(line)["patient"] for line in lines]
    assert patients == ["P-0001", "P-0001", "P-0002", "P-0002"]
    for before, after in zip(plain, lines, strict=True):
        assert after.split(" ", 1)[1] == before.split(" ", 1)[1]  # fields and time unchanged
        assert tags_of(after) == {**tags_of(before), "clinic": "bowvalley", "patient": tags_of(after)["patient"]}
        key = after[: after.index(" ")]
        assert key.split(",")[1:] == sorted(key.split(",")[1:])  # tags in key order


def test_one_stretch_message_is_tagged_alike(cache: Attributions) -> None:
    lines = telemetry_lines(message("sock-a", [T + 1, T + 2, T + 3]))
    assert attribute(lines, 3, cache) == ()
    assert all(line.startswith("sample,clinic=bowvalley,device=sock-a,kind=sock,patient=P-0002 ") for line in lines)


def test_unattributed_samples_are_kept_flagged_and_counted(cache: Attributions) -> None:
    lines = telemetry_lines(message("sock-nobody", [T, T + 1]))
    assert attribute(lines, 2, cache) == (("sample", "sock-nobody", UNREGISTERED, 2),)
    assert all(tags_of(line) == {"attribution": "unregistered", "device": "sock-nobody", "kind": "sock"}
               for line in lines)  # fmt: skip
    lines = telemetry_lines(message("sock-b", [T + HOUR - 1, T + HOUR]))  # held, then not
    assert attribute(lines, 2, cache) == (("sample", "sock-b", UNASSIGNED, 1),)
    assert tags_of(lines[0])["patient"] == "P-0003" and tags_of(lines[1])["attribution"] == UNASSIGNED


def test_dead_letters_are_not_tagged(cache: Attributions) -> None:
    dead = rejected_line(
        device="sock-a", channel="telemetry", reason="invalid_t", detail="x", raw=b"{}", ts_ns=T * 10**6
    )
    lines = [*telemetry_lines(message("sock-a", [T])), dead]
    attribute(lines, 1, cache)
    assert lines[1] == dead
    assert attribute([dead], 0, cache) == () and "patient" not in tags_of(dead)


def test_event_and_status_use_their_own_time(cache: Attributions) -> None:
    event = [event_line(Event(v=1, device_id="sock-a", t=T - 1, type="fault", code="E1", message="a b,c"))]
    assert attribute(event, 0, cache) == ()
    assert tags_of(event[0]) == {"clinic": "bowvalley", "device": "sock-a", "patient": "P-0001", "type": "fault"}
    assert event[0].endswith(f'message="a b,c" {(T - 1) * 1_000_000}')
    status = [status_line("sock-a", Status(v=1, state="online", t=T), T + 5)]
    assert attribute(status, 0, cache) == ()
    assert tags_of(status[0]) == {"clinic": "bowvalley", "device": "sock-a", "patient": "P-0002"}
    last_will = [status_line("sock-idle", Status(v=1, state="offline"), T)]  # no t: the receive time
    assert attribute(last_will, 0, cache) == (("status", "sock-idle", UNASSIGNED, 1),)


# -- sources and the refresher -------------------------------------------------------------------------------------


class FakeSource:
    def __init__(self) -> None:
        self.snapshot = snapshot(1)
        self.fail = False
        self.loads = 0

    def describe(self) -> str:
        return "fake"

    async def load(self, known: int | None) -> Snapshot | None:
        if self.fail:
            raise EnrichmentError("down")
        if known == self.snapshot.version:
            return None
        self.loads += 1
        return self.snapshot

    async def close(self) -> None:
        pass


async def test_refresh_swaps_only_on_a_new_version_and_keeps_the_last_on_error() -> None:
    source, metrics = FakeSource(), IngestMetrics()
    enrichment = Enrichment(source, 0.01, metrics, retry_initial_s=0.01)
    await asyncio.wait_for(enrichment.start(), 5)
    first = enrichment.attributions
    assert first is not None and first.version == 1 and source.loads == 1
    assert await enrichment.refresh() and enrichment.attributions is first and source.loads == 1
    source.fail = True
    assert not await enrichment.refresh()
    assert enrichment.attributions is first
    assert metrics.value("compression_ingest_registry_refresh_failures_total") == 1
    source.fail = False
    source.snapshot = snapshot(2)
    assert await enrichment.refresh()
    assert enrichment.attributions is not None and enrichment.attributions.version == 2
    assert metrics.value("compression_ingest_registry_version") == 2
    assert metrics.value("compression_ingest_registry_checked_timestamp_seconds") > time.time() - 60


async def test_start_waits_for_the_first_snapshot_and_can_be_cancelled() -> None:
    source = FakeSource()
    source.fail = True
    enrichment = Enrichment(source, 1, IngestMetrics(), retry_initial_s=0.01, retry_max_s=0.02)
    task = asyncio.create_task(enrichment.start())
    await asyncio.sleep(0.1)
    assert not task.done() and enrichment.attributions is None
    source.fail = False
    await asyncio.wait_for(task, 2)
    assert enrichment.attributions is not None
    down = FakeSource()
    down.fail = True
    stuck = Enrichment(down, 1, IngestMetrics(), retry_initial_s=0.01)
    task = asyncio.create_task(stuck.start())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_unattributed_counts_and_summary(caplog: pytest.LogCaptureFixture) -> None:
    metrics = IngestMetrics()
    enrichment = Enrichment(FakeSource(), 1, metrics)
    enrichment.unattributed("sample", "sock-x", UNREGISTERED, 10)
    enrichment.unattributed("event", "sock-y", UNASSIGNED, 1)
    labels = {"measurement": "sample", "reason": "unregistered"}
    assert metrics.value("compression_ingest_unattributed_points_total", **labels) == 10
    with caplog.at_level("INFO"):
        enrichment.summarise()
        enrichment.summarise()  # nothing new: no second line
    summaries = [r.getMessage() for r in caplog.records if "without a patient" in r.getMessage()]
    assert summaries == [
        "stored without a patient since the last refresh: unassigned 1 (sock-y); unregistered 10 (sock-x)"
    ]


async def test_database_source_errors_are_enrichment_errors(tmp_path: object) -> None:
    missing = DatabaseSource(f"sqlite:///{tmp_path}/nothing-here.db")
    with pytest.raises(EnrichmentError, match="does not exist"):
        await missing.load(None)
    with pytest.raises(EnrichmentError, match="token"):
        source_for("http://127.0.0.1:1", None)
    api = source_for("http://127.0.0.1:1", "secret")
    with pytest.raises(EnrichmentError, match="ConnectError"):
        await api.load(None)
    await api.close()
