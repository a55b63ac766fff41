"""Line protocol: escaping, stable field types, the schema of each measurement."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.protocol import Event, Sample, Status, Telemetry
from ingest.decode import Decoder
from ingest.encode import (
    EncodeError,
    escape_key,
    escape_string,
    event_line,
    format_field,
    line,
    rejected_line,
    status_line,
    telemetry_lines,
    wear_seconds,
)


def split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped by a backslash (as InfluxDB's parser does)."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            current += text[i : i + 2]
            i += 2
            continue
        if text[i] == sep:
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    return parts


@given(st.text(min_size=1))
def test_escaped_keys_have_no_bare_separators(text: str) -> None:
    escaped = escape_key(text)
    assert "\n" not in escaped and "\r" not in escaped
    assert len(split_unescaped(escaped, ",")) == 1
    assert len(split_unescaped(escaped, " ")) == 1
    assert len(split_unescaped(escaped, "=")) == 1


@given(st.text())
def test_escaped_strings_stay_one_quoted_value(text: str) -> None:
    escaped = escape_string(text)
    assert escaped.startswith('"') and escaped.endswith('"')
    inner = escaped[1:-1]
    assert "\n" not in inner
    assert len(split_unescaped(inner, '"')) == 1


@given(st.dictionaries(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10), min_size=1, max_size=4),
       st.text(max_size=30))  # fmt: skip
def test_generic_lines_are_single_lines_with_three_sections(tags: dict[str, str], value: str) -> None:
    encoded = line("m,x y", tags, {"f": value}, 1)
    assert "\n" not in encoded
    assert len(split_unescaped(encoded.rsplit(" ", 1)[0], " ")) >= 2


def test_field_types_are_stable() -> None:
    assert format_field(True) == "true"
    assert format_field(3) == "3i"
    assert format_field(3.0) == "3.0"
    assert format_field(24) == "24i"
    assert format_field('a "b" \\c') == '"a \\"b\\" \\\\c"'
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(EncodeError):
            format_field(bad)
    with pytest.raises(EncodeError):
        escape_key("")


def test_telemetry_lines_schema() -> None:
    message = Telemetry(v=1, device_id="sock-0001", kind="sock", seq=7, battery_pct=81, samples=[
        Sample(t=1_000_060_000, worn=True, pressure_mmhg={"ankle": 24.0, "calf": 18.25}, skin_temp_c=32.5),
        Sample(t=1_000_000_000, worn=False, pressure_mmhg={"ankle": 0.0}),
    ])  # fmt: skip
    first, second = telemetry_lines(message)
    assert first == ("sample,device=sock-0001,kind=sock ankle_mmhg=0.0,worn=false,worn_s=0.0,seq=7i "
                     "1000000000000000")  # fmt: skip
    assert second == ("sample,device=sock-0001,kind=sock ankle_mmhg=24.0,calf_mmhg=18.25,worn=true,worn_s=60.0,"
                      "skin_temp_c=32.5,seq=7i,battery_pct=81i 1000060000000000")  # fmt: skip


def reference_sample_lines(message: Telemetry, max_gap_s: float = 120.0) -> list[str]:
    """The schema of a ``sample`` line written out plainly, one sample and one field at a time."""
    samples = sorted(message.samples, key=lambda s: s.t)
    spans = wear_seconds([s.t for s in samples], message.kind, max_gap_s)
    lines = []
    for i, (sample, span) in enumerate(zip(samples, spans, strict=True)):
        fields = [f"{zone}_mmhg={msgspec.json.encode(value).decode()}" for zone, value in sample.pressure_mmhg.items()]
        fields.append(
            f"worn=true,worn_s={msgspec.json.encode(span).decode()}" if sample.worn else "worn=false,worn_s=0.0"
        )
        if sample.skin_temp_c is not None:
            fields.append(f"skin_temp_c={msgspec.json.encode(sample.skin_temp_c).decode()}")
        fields.append(f"seq={message.seq}i")
        if i == len(samples) - 1 and message.battery_pct is not None:
            fields.append(f"battery_pct={message.battery_pct}i")
        lines.append(f"sample,device={message.device_id},kind={message.kind} {','.join(fields)} {sample.t * 10**6}")
    return lines


zones = st.sampled_from(["foot", "ankle", "calf", "knee", "thigh"])
mmhg = st.floats(0.0, 250.0, allow_nan=False)
samples = st.builds(
    Sample,
    t=st.integers(1, 2**40),  # 0 would be written "0000000": the same number, another text
    worn=st.booleans(),
    pressure_mmhg=st.dictionaries(zones, mmhg, max_size=5),
    skin_temp_c=st.none() | st.floats(15.0, 45.0, allow_nan=False),
)


@given(
    st.builds(
        Telemetry,
        v=st.just(1),
        device_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{2,20}", fullmatch=True),
        kind=st.sampled_from(["sock", "boot"]),
        seq=st.integers(0, 2**63 - 1),
        samples=st.lists(samples, min_size=1, max_size=12),
        battery_pct=st.none() | st.integers(0, 100),
    )
)
def test_telemetry_lines_are_the_schema_written_out_sample_by_sample(message: Telemetry) -> None:
    assert telemetry_lines(message) == reference_sample_lines(message)


def test_wear_seconds_caps_gaps_and_uses_nominal_period() -> None:
    assert wear_seconds([0, 60_000, 120_000], "sock", 120.0) == [60.0, 60.0, 60.0]
    assert wear_seconds([0, 3_600_000], "sock", 120.0) == [120.0, 120.0]  # a missing hour is not worn
    assert wear_seconds([0], "sock", 120.0) == [60.0]
    assert wear_seconds([0], "boot", 120.0) == [2.0]
    assert wear_seconds([0, 0, 2000], "boot", 120.0) == [0.0, 2.0, 2.0]


def test_event_status_and_dead_letter_lines() -> None:
    event = Event(v=1, device_id="boot-0007", t=5, type="session_end", duration_s=600, reason="completed")
    assert (
        event_line(event)
        == 'event,device=boot-0007,type=session_end count=1i,duration_s=600i,reason="completed" 5000000'
    )
    status = Status(v=1, state="online", fw="1.4.2", battery_pct=80)
    assert (
        status_line("boot-0007", status, 9)
        == 'status,device=boot-0007 state="online",online=true,fw="1.4.2",battery_pct=80i 9000000'
    )
    dead = rejected_line(device="_invalid", channel="unknown", reason="not_json", detail='bad "x"\n',
                         raw=b"\xff\n{", ts_ns=3)  # fmt: skip
    assert "\n" not in dead
    assert dead.startswith("rejected,channel=unknown,device=_invalid,reason=not_json ")
    assert "raw_bytes=3i" in dead


def test_a_retained_status_without_t_is_kept_apart_from_status() -> None:
    """The broker's retained copy says nothing about when the device spoke: never a fresh ``status`` point."""
    now_ns = 1_764_144_000_000_000_000
    decoder = Decoder()
    topic = "garments/v1/sock-0001/status"
    live = decoder.decode(topic, b'{"v":1,"state":"online"}', now_ns)
    retained = decoder.decode(topic, b'{"v":1,"state":"online"}', now_ns, retained=True)
    stamped = decoder.decode(topic, b'{"v":1,"state":"online","t":%d}' % (now_ns // 10**6 - 60_000), now_ns, True)
    assert live.lines[0].startswith("status,device=sock-0001 ")
    assert retained.lines[0].startswith("status_retained,device=sock-0001 ")
    assert stamped.lines[0].startswith("status,device=sock-0001 ") and stamped.lines[0].endswith(
        f" {now_ns - 60_000 * 10**6}"
    )
