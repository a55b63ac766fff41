"""Encode stage: wire models to InfluxDB line protocol (the storage schema).

The schema is documented in ``docs/schema.md``; this module is its single
implementation. Timestamps are written with nanosecond precision. Telemetry,
events and status with a device timestamp keep that timestamp, so a redelivered
message rewrites exactly the same points (same series, same time): at-least-once
delivery never double-counts.

Field types are stable: pressures, temperatures and durations are always floats,
counters and percentages always integers (``i`` suffix), flags booleans.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Final

import msgspec

from devices.protocol import Event, Sample, Status, Telemetry

SAMPLE: Final = "sample"
EVENT: Final = "event"
STATUS: Final = "status"
REJECTED: Final = "rejected"

# A sample's wear stands for the time until the next sample, but never more
# than this: a gap in the data is not wear time.
DEFAULT_MAX_WEAR_GAP_S: Final = 120.0
# What one sample stands for when a message holds a single sample.
NOMINAL_PERIOD_S: Final = {"sock": 60.0, "boot": 2.0}
RAW_LIMIT: Final = 2048

_MEASUREMENT_ESCAPES: Final = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\r": r"\r"})
_KEY_ESCAPES: Final = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\r": r"\r", "\\": "\\\\"})
_STRING_ESCAPES: Final = str.maketrans({'"': r"\"", "\\": "\\\\", "\n": r"\n", "\r": r"\r"})


class EncodeError(ValueError):
    """A value that line protocol cannot carry (NaN, infinity, an empty tag)."""


def escape_measurement(name: str) -> str:
    """Escape a measurement name (commas, spaces; newlines made visible)."""
    return name.translate(_MEASUREMENT_ESCAPES)


def escape_key(text: str) -> str:
    """Escape a tag key, tag value or field key.

    Newlines cannot be escaped in line protocol; they are written as the two
    characters ``\\n`` so that no input can start a new line.
    """
    if not text:
        raise EncodeError("empty tag or field key")
    return text.translate(_KEY_ESCAPES)


def escape_string(text: str) -> str:
    """Escape and quote a string field value."""
    return '"' + text.translate(_STRING_ESCAPES) + '"'


def format_float(value: float) -> str:
    """A float field value; NaN and infinity are refused (InfluxDB cannot store them)."""
    if not math.isfinite(value):
        raise EncodeError(f"non-finite float {value!r}")
    return repr(float(value))


def format_field(value: bool | int | float | str) -> str:
    """Format one field value with its line-protocol type marker."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return format_float(value)
    return escape_string(value)


def line(measurement: str, tags: dict[str, str], fields: dict[str, bool | int | float | str], ts_ns: int) -> str:
    """Encode one point generically, escaping every part (slow path for rare points)."""
    if not fields:
        raise EncodeError("a point needs at least one field")
    tag_part = "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags.items()))
    field_part = ",".join(f"{escape_key(k)}={format_field(v)}" for k, v in fields.items())
    return f"{escape_measurement(measurement)}{tag_part} {field_part} {ts_ns}"


def wear_seconds(times_ms: Sequence[int], kind: str, max_gap_s: float) -> list[float]:
    """Seconds of wear each sample stands for: the gap to the next, capped.

    The last sample of a message repeats the previous gap; a lone sample gets
    the kind's nominal period. Deterministic per message, so a redelivery
    rewrites the same values.
    """
    n = len(times_ms)
    if n == 1:
        return [min(NOMINAL_PERIOD_S[kind], max_gap_s)]
    gaps = [min((times_ms[i + 1] - times_ms[i]) / 1000.0, max_gap_s) for i in range(n - 1)]
    gaps = [g if g > 0.0 else 0.0 for g in gaps]
    gaps.append(gaps[-1])
    return gaps


_ZONE_KEYS: Final = {zone: f"{zone}_mmhg=" for zone in ("foot", "ankle", "calf", "knee", "thigh")}
# msgspec writes the shortest round-tripping form of a float, like repr(), but
# for a whole message in one C call: about a quarter of repr()'s cost here.
_FLOATS: Final = msgspec.json.Encoder()


def _float_texts(values: list[float]) -> list[str]:
    return _FLOATS.encode(values).decode()[1:-1].split(",")


def telemetry_lines(message: Telemetry, max_gap_s: float = DEFAULT_MAX_WEAR_GAP_S) -> list[str]:
    """One ``sample`` point per valid sample of a telemetry message (the hot path).

    Device ids and zones were validated against the protocol's patterns, so
    they need no escaping here. Values are finite (validated ranges).
    """
    samples = message.samples
    if not samples:
        return []
    times = [s.t for s in samples]
    if any(a > b for a, b in itertools.pairwise(times)):
        samples = sorted(samples, key=_sample_time)
        times = [s.t for s in samples]
    spans = wear_seconds(times, message.kind, max_gap_s)
    values: list[float] = []
    for sample, span in zip(samples, spans, strict=True):
        values.extend(sample.pressure_mmhg.values())
        values.append(span)
        if sample.skin_temp_c is not None:
            values.append(sample.skin_temp_c)
    texts = iter(_float_texts(values))
    head = f"{SAMPLE},device={message.device_id},kind={message.kind} "
    seq = f"seq={message.seq}i "
    lines = [_sample_line(head, sample, texts, seq) for sample in samples]
    if message.battery_pct is not None:
        last = lines[-1]
        cut = last.rindex(" ")
        lines[-1] = f"{last[:cut]},battery_pct={message.battery_pct}i{last[cut:]}"
    return lines


def _sample_time(sample: Sample) -> int:
    return sample.t


def _sample_line(head: str, sample: Sample, texts: Iterator[str], seq: str) -> str:
    parts = [_ZONE_KEYS[zone] + next(texts) for zone in sample.pressure_mmhg]
    span = next(texts)
    parts.append("worn=true,worn_s=" + span if sample.worn else "worn=false,worn_s=0.0")
    if sample.skin_temp_c is not None:
        parts.append("skin_temp_c=" + next(texts))
    parts.append(seq)
    return f"{head}{','.join(parts)}{sample.t}000000"


_EVENT_FIELDS: Final = (
    "program", "target_mmhg", "planned_s", "duration_s", "reason", "code", "message",
)  # fmt: skip


def event_line(event: Event) -> str:
    """One ``event`` point at the event's own time."""
    fields: dict[str, bool | int | float | str] = {"count": 1}
    for name in _EVENT_FIELDS:
        value = getattr(event, name)
        if value is not None:
            fields[name] = float(value) if name == "target_mmhg" else value
    return line(EVENT, {"device": event.device_id, "type": event.type}, fields, event.t * 1_000_000)


def status_line(device_id: str, status: Status, received_ms: int) -> str:
    """One ``status`` point, at the status's own ``t`` or else when it was received."""
    fields: dict[str, bool | int | float | str] = {
        "state": status.state,
        "online": status.state == "online",
    }
    for name in ("fw", "battery_pct", "rssi_dbm"):
        value = getattr(status, name)
        if value is not None:
            fields[name] = value
    when = status.t if status.t is not None else received_ms
    return line(STATUS, {"device": device_id}, fields, when * 1_000_000)


def rejected_line(
    *,
    device: str,
    channel: str,
    reason: str,
    detail: str,
    raw: bytes,
    ts_ns: int,
    sample_index: int | None = None,
) -> str:
    """A dead-letter point: who sent what, why it was refused, the raw bytes (bounded)."""
    fields: dict[str, bool | int | float | str] = {
        "detail": detail[:RAW_LIMIT],
        "raw": raw[:RAW_LIMIT].decode("utf-8", errors="backslashreplace"),
        "raw_bytes": len(raw),
    }
    if sample_index is not None:
        fields["sample_index"] = sample_index
    tags = {"device": device, "channel": channel, "reason": reason}
    return line(REJECTED, tags, fields, ts_ns)
