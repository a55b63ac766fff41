"""The wire models of protocol v1: what is accepted, and the reason for what is not."""

from __future__ import annotations

import json
import time

import pytest

from devices.protocol import (
    INT64_MAX,
    MAX_PAYLOAD_BYTES,
    ProtocolError,
    Sample,
    Status,
    Telemetry,
    TimeWindow,
    decode_event,
    decode_status,
    decode_telemetry,
    encode,
    is_valid_device_id,
    parse_topic,
    topic_for,
)

NOW = int(time.time() * 1000)


def telemetry(**changes: object) -> bytes:
    body: dict[str, object] = {
        "v": 1, "device_id": "sock-0001", "kind": "sock", "seq": 4182, "battery_pct": 81,
        "samples": [
            {"t": NOW - 60_000, "worn": True, "pressure_mmhg": {"ankle": 24.5, "calf": 18.2}, "skin_temp_c": 32.4},
            {"t": NOW, "worn": True, "pressure_mmhg": {"ankle": 24.1, "calf": 18.0}, "skin_temp_c": 32.5},
        ],
    }  # fmt: skip
    body.update(changes)
    return json.dumps(body).encode()


def reason_of(payload: bytes, device: str = "sock-0001") -> str:
    with pytest.raises(ProtocolError) as caught:
        decode_telemetry(payload, device, NOW)
    return caught.value.reason


def test_the_protocol_example_decodes() -> None:
    result = decode_telemetry(telemetry(), "sock-0001", NOW)
    assert result.rejected == ()
    message = result.message
    assert (message.device_id, message.kind, message.seq, message.battery_pct) == ("sock-0001", "sock", 4182, 81)
    assert message.samples[0] == Sample(t=NOW - 60_000, worn=True, pressure_mmhg={"ankle": 24.5, "calf": 18.2},
                                        skin_temp_c=32.4)  # fmt: skip


def test_unknown_fields_are_ignored() -> None:
    payload = telemetry(firmware_note="new", samples=[{"t": NOW, "worn": False, "pressure_mmhg": {}, "extra": 1}])
    result = decode_telemetry(payload, "sock-0001", NOW)
    assert len(result.message.samples) == 1 and result.rejected == ()


@pytest.mark.parametrize(
    ("device_id", "valid"),
    [("sock-0001", True), ("abc", True), ("A_b-9", True), ("x" * 64, True), ("ab", False), ("x" * 65, False),
     ("-sock", False), ("_sock", False), ("sock 1", False), ("sock,1", False), ("sock=1", False),
     ("sock-0001\n", False), ("sock\n0001", False), ("söck", False), ("sock/1", False), ("", False)],
)  # fmt: skip
def test_device_id_rules(device_id: str, valid: bool) -> None:
    assert is_valid_device_id(device_id) is valid


def test_topics_round_trip_and_reject_strangers() -> None:
    topic = topic_for("boot-0007", "event")
    assert topic == "garments/v1/boot-0007/event"
    parsed = parse_topic(topic)
    assert (parsed.device_id, parsed.channel) == ("boot-0007", "event")
    for bad, reason in [("garments/v2/sock-0001/telemetry", "unknown_topic"),
                        ("garments/v1/sock-0001/other", "unknown_topic"),
                        ("garments/v1/sock-0001/telemetry/extra", "unknown_topic"),
                        ("garments/v1/so/telemetry", "invalid_device_id"),
                        ("garments/v1/a b c/telemetry", "invalid_device_id")]:  # fmt: skip
        with pytest.raises(ProtocolError) as caught:
            parse_topic(bad)
        assert caught.value.reason == reason
    with pytest.raises(ProtocolError):
        topic_for("sock-0001\n", "telemetry")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"v": 2}, "unsupported_version"), ({"kind": "glove"}, "invalid_kind"), ({"device_id": "sock-0002"},
      "device_id_mismatch"), ({"device_id": "a,b"}, "invalid_device_id"), ({"samples": []}, "invalid_samples"),
     ({"seq": "1"}, "invalid_seq"), ({"battery_pct": 101}, "invalid_battery_pct"), ({"samples": "x"},
      "invalid_samples")],
)  # fmt: skip
def test_whole_message_rejections(changes: dict[str, object], reason: str) -> None:
    assert reason_of(telemetry(**changes)) == reason


def test_not_json_and_too_large() -> None:
    assert reason_of(b"{not json") == "not_json"
    assert reason_of(b'{"v":1,"samples":[{"t":1,"pressure_mmhg":{"ankle":NaN}}]}') == "not_json"
    assert reason_of(telemetry(pad="x" * MAX_PAYLOAD_BYTES)) == "payload_too_large"
    assert reason_of(telemetry(samples=[{"t": NOW, "worn": True, "pressure_mmhg": {}}] * 501)) == "invalid_samples"


def test_bad_samples_are_rejected_alone_with_reasons() -> None:
    good = {"t": NOW, "worn": True, "pressure_mmhg": {"ankle": 22.0}}
    samples = [
        good,
        {**good, "pressure_mmhg": {"ankle": 251}},
        {**good, "pressure_mmhg": {"shin": 20}},
        {**good, "worn": "yes"},
        {**good, "t": NOW + 10 * 60_000},
        {**good, "t": NOW - 31 * 86_400_000},
        {**good, "skin_temp_c": 10},
        {"t": NOW, "pressure_mmhg": {}},
        {**good, "t": NOW - 1},
    ]
    payload = telemetry(samples=samples)
    result = decode_telemetry(payload, "sock-0001", NOW)
    assert [s.t for s in result.message.samples] == [NOW, NOW - 1]
    assert [(r.index, r.reason) for r in result.rejected] == [
        (1, "invalid_pressure_mmhg"), (2, "invalid_pressure_mmhg"), (3, "invalid_worn"),
        (4, "timestamp_in_future"), (5, "timestamp_too_old"), (6, "invalid_skin_temp_c"), (7, "missing_worn"),
    ]  # fmt: skip
    assert all(r.raw.startswith(b"{") for r in result.rejected)


def test_time_window_is_configurable() -> None:
    payload = telemetry(samples=[{"t": NOW - 2 * 3_600_000, "worn": True, "pressure_mmhg": {}}])
    tight = TimeWindow(max_future_ms=0, max_age_ms=3_600_000)
    assert decode_telemetry(payload, "sock-0001", NOW, tight).rejected[0].reason == "timestamp_too_old"
    assert decode_telemetry(payload, "sock-0001", NOW).rejected == ()


def test_all_samples_bad_keeps_the_envelope() -> None:
    result = decode_telemetry(telemetry(samples=[{"t": "x", "worn": True, "pressure_mmhg": {}}]), "sock-0001", NOW)
    assert result.message.samples == [] and [r.reason for r in result.rejected] == ["invalid_t"]


def test_events_and_status() -> None:
    event = decode_event(json.dumps({"v": 1, "device_id": "boot-0007", "t": NOW, "type": "session_start",
                                     "program": "recovery", "target_mmhg": 60, "planned_s": 1200}).encode(),
                         "boot-0007", NOW)  # fmt: skip
    assert (event.type, event.target_mmhg, event.planned_s) == ("session_start", 60.0, 1200)
    for body, reason in [
        ({"type": "explode"}, "invalid_type"),
        ({"device_id": "boot-0008"}, "device_id_mismatch"),
        ({"t": NOW + 3_600_000}, "timestamp_in_future"),
        ({"target_mmhg": 300}, "invalid_target_mmhg"),
    ]:
        payload = {"v": 1, "device_id": "boot-0007", "t": NOW, "type": "fault", **body}
        with pytest.raises(ProtocolError) as caught:
            decode_event(json.dumps(payload).encode(), "boot-0007", NOW)
        assert caught.value.reason == reason
    assert decode_status(b'{"v":1,"state":"offline"}') == Status(v=1, state="offline")
    with pytest.raises(ProtocolError) as caught:
        decode_status(b'{"v":1,"state":"asleep"}')
    assert caught.value.reason == "invalid_state"


@pytest.mark.parametrize(("t", "reason"), [
    (0, "timestamp_too_old"), (NOW - 31 * 86_400_000, "timestamp_too_old"), (NOW + 3_600_000, "timestamp_in_future"),
    (7_258_118_400_000, "timestamp_in_future"), (10**20, "timestamp_in_future"), (-1, "invalid_t"), (1.5, "invalid_t"),
])  # fmt: skip
def test_status_time_has_the_samples_window(t: object, reason: str) -> None:
    payload = json.dumps({"v": 1, "state": "online", "t": t}).encode()
    with pytest.raises(ProtocolError) as caught:
        decode_status(payload, NOW)
    assert caught.value.reason == reason
    ok = decode_status(json.dumps({"v": 1, "state": "online", "t": NOW - 86_400_000}).encode(), NOW)
    assert ok.t == NOW - 86_400_000
    assert decode_status(b'{"v":1,"state":"offline"}', NOW).t is None  # a last will has no t: nothing to check


@pytest.mark.parametrize(("seq", "ok"), [(INT64_MAX, True), (INT64_MAX + 1, False), (2**64, False), (10**30, False)])
def test_counters_fit_in_int64(seq: int, ok: bool) -> None:
    if ok:
        assert decode_telemetry(telemetry(seq=seq), "sock-0001", NOW).message.seq == seq
    else:
        assert reason_of(telemetry(seq=seq)) == "invalid_seq"


@pytest.mark.parametrize("where", ["top", "unknown_field", "sample", "zone"])
def test_too_deep_json_is_a_rejection_not_a_crash(where: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    sample = f'{{"t":{NOW},"worn":true,"pressure_mmhg":{{}}}}'
    head = '{"v":1,"device_id":"sock-0001","kind":"sock","seq":1,"samples":'
    payload = {
        "top": f'{{"v":1,"x":{deep}}}',
        "unknown_field": f'{head}[{sample}],"x":{deep}}}',
        "sample": f'{head}[{sample},{sample[:-1]},"x":{deep}}}]}}',
        "zone": f'{head}[{{"t":{NOW},"worn":true,"pressure_mmhg":{{"ankle":{deep}}}}}]}}',
    }[where].encode()
    assert reason_of(payload) == "too_deep"
    for decode in (lambda p: decode_event(p, "sock-0001", NOW), lambda p: decode_status(p, NOW)):
        with pytest.raises(ProtocolError) as caught:
            decode(payload)
        assert caught.value.reason in ("too_deep", "invalid_structure")


def test_encode_round_trips_through_the_parser() -> None:
    message = Telemetry(v=1, device_id="sock-0042", kind="sock", seq=0,
                        samples=[Sample(t=NOW, worn=False, pressure_mmhg={"thigh": 9.5})])  # fmt: skip
    payload = encode(message)
    assert b"skin_temp_c" not in payload and b"battery_pct" not in payload  # optional fields omitted
    assert decode_telemetry(payload, "sock-0042", NOW).message == message
