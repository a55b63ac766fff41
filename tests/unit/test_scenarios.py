"""Scenario library: determinism, protocol validity, exact ground truth, flags per scenario, DST days."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from devices.protocol import (
    DEVICE_ID_PATTERN,
    ProtocolError,
    decode_event,
    decode_status,
    decode_telemetry,
)
from ingest.decode import Decoder
from ingest.encode import DEFAULT_MAX_WEAR_GAP_S, wear_seconds
from simulators.garments import BOOT_PERIOD_MS, SockPlan
from simulators.scenarios import (
    CLINICAL_SCENARIOS,
    CLOCK_SKEW_MS,
    SCENARIOS,
    Fleet,
    SimMessage,
    build_fleet,
    build_scenario,
    every_scenario,
    list_scenarios,
)

EDMONTON = ZoneInfo("America/Edmonton")
# Not a local midnight: the last day is partial, and the period spans the
# autumn DST change (2 Nov 2025, 25 hours).
END = datetime(2025, 11, 10, 18, 30, tzinfo=UTC)


@cache
def fleet() -> Fleet:
    return every_scenario(seed=11, days=14, end=END)


@cache
def messages() -> tuple[SimMessage, ...]:
    return tuple(fleet().messages())


@cache
def truth(mode: str = "backfill") -> dict[str, Any]:
    return fleet().ground_truth(mode)  # type: ignore[arg-type]


def patient(scenario: str, mode: str = "backfill") -> dict[str, Any]:
    return next(p for p in truth(mode)["patients"] if p["scenario"] == scenario)


def flags_of(scenario: str) -> list[list[str]]:
    return [d["flags"] for d in patient(scenario)["days"] if d["complete"]]


def test_every_scenario_has_a_one_line_description() -> None:
    listed = list_scenarios()
    assert [name for name, _, _ in listed] == list(SCENARIOS) + list(CLINICAL_SCENARIOS)
    for _, kind, description in listed:
        assert kind in ("sock", "boot") and description and "\n" not in description
    required = {"compliant", "under_use", "worn_out", "too_tight", "rolled_down", "boot_overpressure",
                "boot_short_sessions", "boot_missed_sessions", "silent", "offline_backfill", "clock_skew",
                "bad_firmware"}  # fmt: skip
    assert required <= set(SCENARIOS)


def test_same_seed_same_bytes_and_different_seeds_differ() -> None:
    for name in ("compliant", "boot_overpressure", "bad_firmware"):
        one = [(m.topic, m.payload, m.publish_at_ms) for m in build_scenario(name, seed=4, days=2, end=END).messages()]
        two = [(m.topic, m.payload, m.publish_at_ms) for m in build_scenario(name, seed=4, days=2, end=END).messages()]
        other = [(m.topic, m.payload) for m in build_scenario(name, seed=5, days=2, end=END).messages()]
        assert one == two
        assert [(t, p) for t, p, _ in one] != other
    a = build_scenario("compliant", seed=4, days=2, end=END).ground_truth()
    assert a == build_scenario("compliant", seed=4, days=2, end=END).ground_truth()


def test_messages_are_ordered_by_publish_time() -> None:
    times = [m.publish_at_ms for m in messages()]
    assert times == sorted(times)
    assert all(m.publish_at_ms <= END.timestamp() * 1000 + 1000 for m in messages())


def test_every_good_payload_decodes_with_the_protocol() -> None:
    now = int(END.timestamp() * 1000)
    for m in messages():
        if m.expected_reason is not None or m.scenario == "bad_firmware":
            continue
        if m.channel == "telemetry":
            result = decode_telemetry(m.payload, m.device_id, now)
            assert not result.rejected and len(result.message.samples) == m.samples
            assert result.message.samples[0].t == m.first_t_ms
        elif m.channel == "event":
            decode_event(m.payload, m.device_id, now)
        else:
            assert decode_status(m.payload).state == "online" and m.retain


def _stored_wear(fleet_messages: tuple[SimMessage, ...], now_of: Any) -> dict[str, dict[str, float]]:
    """Wear seconds per device and local day, recomputed from the payloads as the ingester stores them."""
    wear: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for m in fleet_messages:
        if m.channel != "telemetry":
            continue
        try:
            result = decode_telemetry(m.payload, m.device_id, now_of(m))
        except ProtocolError:
            continue
        kept = sorted(result.message.samples, key=lambda s: s.t)
        if not kept:
            continue
        spans = wear_seconds([s.t for s in kept], result.message.kind, DEFAULT_MAX_WEAR_GAP_S)
        for sample, span in zip(kept, spans, strict=True):
            if sample.worn:
                day = datetime.fromtimestamp(sample.t / 1000, EDMONTON).date().isoformat()
                wear[m.device_id][day] += span
    return wear


@pytest.mark.parametrize("mode", ["backfill", "live"])
def test_truth_wear_equals_a_recomputation_from_the_payloads(mode: str) -> None:
    end_ms = int(END.timestamp() * 1000)

    def now_of(m: SimMessage) -> int:
        return m.publish_at_ms if mode == "live" else max(end_ms, m.publish_at_ms)

    wear = _stored_wear(messages(), now_of)
    for p in truth(mode)["patients"]:
        for day in p["days"]:
            assert day["wear_s"] == pytest.approx(wear[p["device_id"]].get(day["date"], 0.0), abs=1e-6)


def test_truth_rejections_match_the_ingesters_decoder() -> None:
    decoder = Decoder()
    end_ns = int(END.timestamp() * 1000) * 1_000_000
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for m in messages():
        decoded = decoder.decode(m.topic, m.payload, max(end_ns, m.publish_at_ms * 1_000_000))
        seen[m.device_id].update(decoded.rejections)
        if m.expected_reason is not None:
            assert decoded.rejections == [m.expected_reason]
    for p in truth()["patients"]:
        assert dict(seen[p["device_id"]]) == p["rejections"], p["scenario"]


def test_bad_firmware_lists_each_bad_payload_with_its_reason() -> None:
    bad = patient("bad_firmware")
    payloads = bad["transport"]["bad_payloads"]
    reasons = {r for p in payloads for r in p["reasons"]}
    expected = {"not_json", "unsupported_version", "invalid_kind", "device_id_mismatch", "missing_seq",
                "invalid_samples", "invalid_battery_pct", "payload_too_large", "invalid_pressure_mmhg",
                "invalid_worn", "missing_worn", "invalid_t", "invalid_skin_temp_c", "timestamp_in_future",
                "timestamp_too_old"}  # fmt: skip
    assert reasons == expected
    for p in payloads:
        if p["whole_reason"]:
            assert p["samples_kept"] == 0 and p["reasons"] == [p["whole_reason"]]
        else:
            assert p["samples_kept"] == p["samples_in_payload"] - 1
    by_seq = {p["seq"]: p for p in payloads}
    decoder = Decoder()
    end_ns = int(END.timestamp() * 1000) * 1_000_000
    bad_messages = [m for m in messages() if m.scenario == "bad_firmware" and m.channel == "telemetry"]
    checked = 0
    for m in bad_messages:
        decoded = decoder.decode(m.topic, m.payload, end_ns)
        if decoded.rejections:
            checked += 1
            seq = next(p["seq"] for p in payloads if p["publish_at_ms"] == m.publish_at_ms)
            assert decoded.rejections == by_seq[seq]["reasons"]
            assert decoded.samples == by_seq[seq]["samples_kept"]
    assert checked == len(payloads)


def test_clock_skew_live_rejects_the_two_newest_samples_of_each_skewed_batch() -> None:
    skewed = patient("clock_skew", "live")
    info = skewed["transport"]["clock_skew"]
    assert info["skew_ms"] == CLOCK_SKEW_MS
    assert patient("clock_skew")["rejections"] == {}
    batches = events = 0
    for m in messages():
        if m.scenario != "clock_skew" or m.channel != "telemetry":
            continue
        result = decode_telemetry(m.payload, m.device_id, m.publish_at_ms)
        true_last = m.publish_at_ms - 1000
        if true_last + CLOCK_SKEW_MS == m.last_t_ms:
            batches += 1
            assert [r.index for r in result.rejected] == [3, 4]
            assert {r.reason for r in result.rejected} == {"timestamp_in_future"}
        else:
            assert not result.rejected
    events = sum(1 for m in messages() if m.scenario == "clock_skew" and m.channel == "event")
    assert batches > 0
    rejections = skewed["rejections"]["timestamp_in_future"]
    assert rejections == 2 * batches + events - _unskewed_events(info["skewed_until_ms"])


def _unskewed_events(until_ms: int) -> int:
    return sum(
        1 for m in messages()
        if m.scenario == "clock_skew" and m.channel == "event" and m.publish_at_ms >= until_ms
    )  # fmt: skip


def test_offline_backfill_uploads_two_days_late_with_original_timestamps() -> None:
    info = patient("offline_backfill")["transport"]["offline"]
    late = [m for m in messages() if m.scenario == "offline_backfill" and m.last_t_ms is not None
            and info["from_ms"] <= m.last_t_ms < info["until_ms"]]  # fmt: skip
    assert len(late) > 500
    assert all(m.publish_at_ms >= info["until_ms"] for m in late)
    # On reconnect the backlog (telemetry and events) goes out at once, then an online status.
    burst = [m for m in messages() if m.scenario == "offline_backfill"
             and info["until_ms"] <= m.publish_at_ms < info["until_ms"] + 10_000]  # fmt: skip
    assert len(burst) == info["late_messages"] + 1 and burst[-1].channel == "status"
    assert all(flags == ["compliant"] for flags in flags_of("offline_backfill"))
    before = info["flags_before_upload"]
    assert ["silent"] in before.values()
    assert any("under_use" in f for f in before.values())


def test_scenario_flags_over_fourteen_days() -> None:
    assert all(f == ["compliant"] for f in flags_of("compliant"))
    assert all(f == ["under_use"] for f in flags_of("under_use"))
    assert all(f == ["too_tight"] for f in flags_of("too_tight"))
    worn_out = flags_of("worn_out")
    # A worn-out stocking is also too loose (below the band) for most of each day before the weekly median follows.
    assert worn_out[0] == ["compliant"] and worn_out[-1] == ["too_loose", "worn_out"]
    # Rolled down, the ankle reads 0.8 x the signal: below the band for the same minutes.
    assert sum("rolled_down" in f for f in flags_of("rolled_down")) >= 7
    silent = flags_of("silent")
    assert silent[0] == ["compliant"] and silent[-3:] == [["silent"]] * 3
    assert all(f == ["compliant"] for f in flags_of("clock_skew"))
    assert all(f == ["compliant"] for f in flags_of("bad_firmware"))
    assert all(f == ["compliant"] for f in flags_of("boot_compliant"))
    assert ["boot_overpressure"] in flags_of("boot_overpressure")
    assert ["boot_short_sessions"] in flags_of("boot_short_sessions")
    assert ["boot_missed_sessions"] in flags_of("boot_missed_sessions")
    for p in truth()["patients"]:
        for day in p["days"]:
            assert (day["flags"] is None) == (not day["complete"])
            assert day["flags"] is None or (day["flags"] == ["compliant"]) != ("compliant" not in day["flags"])


def test_daily_wear_matches_the_routine() -> None:
    f = fleet()
    device = next(d for d in f.devices if d.scenario.name == "compliant")
    plan, _ = f.plan(device)
    assert isinstance(plan, SockPlan)
    days = {d["date"]: d["wear_minutes"] for d in patient("compliant")["days"]}
    for day, routine in zip(f.period.days, plan.wear, strict=True):
        if f.period.day_bounds(day).end_ms > f.period.end_ms:
            continue
        planned = sum(s.end_ms - s.start_ms for s in routine.on) / 60_000
        # Sampling once a minute and the sensor's warm-up lose a minute or two per don.
        assert planned - 2 * len(routine.on) - 1 <= days[day.isoformat()] <= planned + 1


def test_boot_sessions_have_prescribed_lengths_targets_and_events() -> None:
    rx = patient("boot_compliant")["prescription"]
    device = next(m.device_id for m in messages() if m.scenario == "boot_compliant")
    now = int(END.timestamp() * 1000)
    starts = ends = 0
    for m in messages():
        if m.device_id != device:
            continue
        if m.channel == "event":
            event = decode_event(m.payload, device, now)
            if event.type == "session_start":
                starts += 1
                assert event.target_mmhg == rx["target_mmhg"] and event.program == rx["program"]
                assert event.planned_s is not None and rx["session_min_s"] <= event.planned_s <= rx["session_max_s"]
            elif event.type == "session_end":
                ends += 1
                assert event.reason == "completed"
                assert event.duration_s is not None
                assert rx["session_min_s"] <= event.duration_s <= rx["session_max_s"]
        elif m.channel == "telemetry":
            samples = decode_telemetry(m.payload, device, now).message.samples
            assert all(b.t - a.t == BOOT_PERIOD_MS for a, b in itertools.pairwise(samples))
            assert max(max(s.pressure_mmhg.values()) for s in samples) <= rx["max_mmhg"]
            assert len(samples[0].pressure_mmhg) in (4, 5)
    assert starts == ends >= 14
    short = [s for d in patient("boot_short_sessions")["days"] for s in d["sessions"]]
    assert any(s["duration_s"] < rx["session_min_s"] and s["reason"] == "stopped" for s in short)


def test_dst_days_have_23_and_25_hours_of_samples() -> None:
    for end, day, hours in ((datetime(2025, 3, 12, tzinfo=UTC), date(2025, 3, 9), 23),
                            (datetime(2025, 11, 5, tzinfo=UTC), date(2025, 11, 2), 25)):  # fmt: skip
        truth_ = build_scenario("compliant", seed=2, days=5, end=end).ground_truth()
        entry = next(d for d in truth_["patients"][0]["days"] if d["date"] == day.isoformat())
        assert entry["hours"] == hours
        assert entry["samples"] == hours * 60
        assert entry["flags"] == ["compliant"]


def test_fleet_mix_ids_and_pseudonymous_patients(tmp_path: Path) -> None:
    f = build_fleet(socks=12, boots=6, seed=3, days=1, end=END)
    names = Counter(d.scenario.name for d in f.devices)
    assert names["compliant"] == 4 and names["boot_compliant"] == 3
    assert sum(1 for d in f.devices if d.scenario.kind == "sock") == 12
    assert all(re.match(DEVICE_ID_PATTERN, d.device_id) for d in f.devices)
    codes = [d.patient for d in f.devices]
    assert len(set(codes)) == len(codes) and all(re.fullmatch(r"PT-[0-9A-F]{6}", c) for c in codes)
    path = tmp_path / "truth.json"
    f.write_ground_truth(path)
    written = json.loads(path.read_text())
    assert written["format"] == "compression-ground-truth/1" and len(written["patients"]) == 18
    assert written["timezone"] == "America/Edmonton"
    with pytest.raises(ValueError, match="unknown"):
        build_fleet(mix={"nope": 1}, end=END)
    with pytest.raises(ValueError, match="end"):
        build_fleet()
