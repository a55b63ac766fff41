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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import msgspec

from devices.protocol import Event, Sample, Status, Telemetry

if TYPE_CHECKING:
    from ingest.enrich import Attribution, Attributions

SAMPLE: Final = "sample"
EVENT: Final = "event"
STATUS: Final = "status"
# A retained status without its own t, delivered by the broker to a new subscription: kept, but apart from
# ``status``, because its receive time is not when the device spoke.
STATUS_RETAINED: Final = "status_retained"
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


# msgspec writes the shortest round-tripping form of a float, like repr(), but for a whole message in one C
# call: about a quarter of repr()'s cost here.
_JSON: Final = msgspec.json.Encoder()


def telemetry_lines(
    message: Telemetry, max_gap_s: float = DEFAULT_MAX_WEAR_GAP_S, series: str | None = None
) -> list[str]:
    """One ``sample`` point per valid sample of a telemetry message (the hot path).

    Device ids and zones were validated against the protocol's patterns, so
    they need no escaping here. Values are finite (validated ranges).
    ``series``: the series key to write instead of ``sample,device=...,kind=...``
    (the same with the registry's tags, from :func:`attribute_telemetry`).

    The text is made per message, not per value: one msgspec call writes every
    sample's pressures as JSON objects (``{"ankle":22.8,"calf":17.1}``), which
    two replacements and a split turn into each sample's fields
    (``ankle_mmhg=22.8,calf_mmhg=17.1``: zone names are the protocol's
    literals, and a float's text has no quote, brace or comma); another call
    writes the wear spans and skin temperatures (``null`` for none).
    """
    samples = message.samples
    if not samples:
        return []
    times = [s.t for s in samples]
    if any(a > b for a, b in itertools.pairwise(times)):
        samples = sorted(samples, key=_sample_time)
        times = [s.t for s in samples]
    spans = wear_seconds(times, message.kind, max_gap_s)
    pressures = _JSON.encode([s.pressure_mmhg for s in samples]).decode()[2:-2]
    fields = pressures.replace('":', "_mmhg=").replace('"', "").split("},{")
    texts = _JSON.encode(spans + [s.skin_temp_c for s in samples]).decode()[1:-1].split(",")
    n = len(samples)
    head = f"{series or _sample_series(message)} "
    tail = f",seq={message.seq}i "
    lines = [
        f"{head}{zones}{',' if zones else ''}worn={'true,worn_s=' + span if sample.worn else 'false,worn_s=0.0'}"
        f"{'' if skin == 'null' else ',skin_temp_c=' + skin}{tail}{t}000000"
        for zones, sample, span, skin, t in zip(fields, samples, texts[:n], texts[n:], times, strict=True)
    ]
    if message.battery_pct is not None:
        last = lines[-1]
        cut = last.rindex(" ")
        lines[-1] = f"{last[:cut]},battery_pct={message.battery_pct}i{last[cut:]}"
    return lines


def _sample_time(sample: Sample) -> int:
    return sample.t


def _sample_series(message: Telemetry) -> str:
    return f"{SAMPLE},device={message.device_id},kind={message.kind}"


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


def status_line(device_id: str, status: Status, received_ms: int, measurement: str = STATUS) -> str:
    """One ``status`` point (or ``status_retained``), at the status's own ``t`` or else when it was received."""
    fields: dict[str, bool | int | float | str] = {
        "state": status.state,
        "online": status.state == "online",
    }
    for name in ("fw", "battery_pct", "rssi_dbm"):
        value = getattr(status, name)
        if value is not None:
            fields[name] = value
    when = status.t if status.t is not None else received_ms
    return line(measurement, {"device": device_id}, fields, when * 1_000_000)


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


# -- enrichment: who held the device at the point's time -------------------------------------------

# (measurement, device, reason, points) of the points a message stored without a patient.
Unattributed = tuple[tuple[str, str, str, int], ...]
_NONE: Final[Unattributed] = ()
_SAMPLE_DEVICE: Final = len(f"{SAMPLE},device=")
_KEYS_MEMO: Final = 64


def attribute(lines: list[str], samples: int, attributions: Attributions) -> Unattributed:
    """Tag one message's ``sample``, ``event`` or ``status`` points, in place, with who held the device.

    ``lines`` is one message's output of the decoder: first its ``samples``
    sample points (from :func:`telemetry_lines`, so one device, one series key
    head and ascending times), then any dead letters, which are left alone; or
    one event or status point. Each point gets ``clinic`` and ``patient`` of the
    assignment valid at its own timestamp, or ``attribution=unregistered`` /
    ``unassigned``. One lookup per message when all its samples fall in one
    stretch of the device's history (the usual case); sample by sample only when
    a boundary falls inside the message. Returns what went unattributed.
    """
    if samples:
        return _attribute_samples(lines, samples, attributions)
    if lines and lines[0].startswith((EVENT + ",", STATUS + ",")):
        return _attribute_point(lines, attributions)
    return _NONE


def _attribute_samples(lines: list[str], samples: int, attributions: Attributions) -> Unattributed:
    first = lines[0]
    cut = first.index(" ")
    head = first[:cut]
    device = head[_SAMPLE_DEVICE : head.index(",", _SAMPLE_DEVICE)]
    last = lines[samples - 1]
    who = attributions.lookup(device, int(first[first.rindex(" ") + 1 : -6]))
    if who.holds(int(last[last.rindex(" ") + 1 : -6])):
        tagged = _tagged_key(head, who)
        lines[:samples] = [tagged + text[cut:] for text in lines[:samples]]
        return _NONE if who.reason is None else ((SAMPLE, device, who.reason, samples),)
    # A boundary falls inside the message: sample by sample.
    counts: dict[str, int] = {}
    tagged = _tagged_key(head, who)
    for i in range(samples):
        text = lines[i]
        t_ms = int(text[text.rindex(" ") + 1 : -6])
        if not who.holds(t_ms):
            who = attributions.lookup(device, t_ms)
            tagged = _tagged_key(head, who)
        lines[i] = tagged + text[cut:]
        if who.reason is not None:
            counts[who.reason] = counts.get(who.reason, 0) + 1
    return tuple((SAMPLE, device, reason, n) for reason, n in counts.items())


def _attribute_point(lines: list[str], attributions: Attributions) -> Unattributed:
    text = lines[0]
    cut = text.index(" ")  # the series key (measurement and validated tags) has no spaces
    key = text[:cut]
    measurement, _, tags = key.partition(",")
    device = tags.split(",", 1)[0].removeprefix("device=")
    who = attributions.lookup(device, int(text[text.rindex(" ") + 1 :]) // 1_000_000)
    lines[0] = _tagged_key(key, who) + text[cut:]
    return _NONE if who.reason is None else ((measurement, device, who.reason, 1),)


def _tagged_key(key: str, who: Attribution) -> str:
    """A series key with ``who``'s tags added, tags in key order (as InfluxDB stores them); memoised."""
    tagged = who.keys.get(key)
    if tagged is None:
        measurement, _, tags = key.partition(",")
        parts = tags.split(",")
        parts.extend(f"{name}={value}" for name, value in who.tags)
        parts.sort(key=_tag_name)
        tagged = measurement + "," + ",".join(parts)
        if len(who.keys) < _KEYS_MEMO:  # the shared "unregistered" answer meets any device id
            who.keys[key] = tagged
    return tagged


def _tag_name(part: str) -> str:
    return part.partition("=")[0]


def attribute_telemetry(message: Telemetry, attributions: Attributions) -> tuple[str, Unattributed] | None:
    """Before encoding: the series key, with who held the device, of a message whose samples all fall in one
    stretch of its device's history (the usual case), and what went unattributed; its lines are then written
    with that key at once instead of being rewritten by :func:`attribute`. None when the message has no sample
    or a boundary falls inside it: then :func:`attribute` tags the encoded lines sample by sample.
    """
    if not message.samples:
        return None
    times = [s.t for s in message.samples]
    who = attributions.lookup(message.device_id, min(times))
    if not who.holds(max(times)):
        return None
    key = _tagged_key(_sample_series(message), who)
    return key, (_NONE if who.reason is None else ((SAMPLE, message.device_id, who.reason, len(times)),))


# --- receipts: which patient-hours got data, for the monitor's incremental evaluation --------------------------------

RECEIPT: Final = "receipt"
_HOUR_NS: Final = 3_600_000_000_000


HEALTH: Final = "ingest_health"
HEALTH_EVERY_S: Final = 60.0  # the ingester's heartbeat while connected to the broker


def health_line(ingester: str, now_ms: int) -> str:
    """The ingester's heartbeat: ``ingest_health,ingester=<client id> connected=true <now>`` (written only while it
    is connected to the broker and InfluxDB takes writes, so a gap in these points is a pipeline outage)."""
    return f"{HEALTH},ingester={escape_key(ingester)} connected=true {now_ms * 1_000_000}"


def receipt_lines(lines: list[str], samples: int, received_ms: int) -> list[str]:
    """``receipt`` points for one attributed message: the patient-hours its points fall in, stamped when received.

    One point per (clinic, patient, hour), overwritten by every later message
    of that hour, so the measurement stays small (patients x hours). The
    monitor asks which hours received data since its last evaluation and
    recomputes only those days: a store-and-forward backlog for last week is
    noticed at once without rescanning everything. Written in the same batch as
    the data, so a receipt is never visible before its points.
    """
    candidates: tuple[str, ...]
    if samples:
        candidates = (lines[0], lines[samples - 1])
    elif lines and lines[0].startswith((EVENT + ",", STATUS + ",")):
        candidates = (lines[0],)
    else:
        return []
    out: list[str] = []
    seen = tags = None
    for text in candidates:
        key = text[: text.index(" ")]
        if key != seen:  # a message's first and last sample usually share their series
            seen, tags = key, _receipt_tags(key)
        if tags is None:
            continue  # not attributed: the monitor cannot use it
        hour = int(text[text.rindex(" ") + 1 :]) // _HOUR_NS * _HOUR_NS
        line = f"{RECEIPT},{tags} received_ms={received_ms}i {hour}"
        if line not in out:
            out.append(line)
    return out


def _receipt_tags(key: str) -> str | None:
    """``clinic=...,patient=...`` of an attributed series key (None if it names no patient)."""
    at = key.find(",patient=")
    if at < 0:
        return None
    clinic = key.find(",clinic=")
    patient = key[at + 9 :].split(",", 1)[0]
    return f"clinic={key[clinic + 8 :].split(',', 1)[0]},patient={patient}" if clinic >= 0 else f"patient={patient}"
