"""Wire models of the garment protocol, version 1 (``shared/protocol.md``).

One definition used by the ingester, the simulators and the tests. The models
are immutable :mod:`msgspec` structs: decoding a payload validates it, and the
simulators encode through the same structs, so they exercise the real parser.

Validation is strict and explains itself: every rejection carries a short,
bounded ``reason`` code (safe as a metric label and a time-series tag) and a
human-readable ``detail``. A bad sample is rejected on its own; a message that
is not JSON, or whose ``v``, ``kind`` or ``device_id`` is wrong, is rejected
whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Final, Literal, TypeVar

import msgspec

_T = TypeVar("_T")

PROTOCOL_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_SAMPLES: Final = 500
TOPIC_ROOT: Final = "garments/v1"
CHANNELS: Final = ("telemetry", "event", "status")
ZONES: Final = ("foot", "ankle", "calf", "knee", "thigh")
DEFAULT_MAX_FUTURE_MS: Final = 5 * 60 * 1000
DEFAULT_MAX_AGE_MS: Final = 30 * 24 * 3600 * 1000
# The largest integer InfluxDB (and line protocol's "i" fields) can store: a counter beyond it is not a number
# the platform can keep, so it is refused here, with its reason, rather than by the database on every write.
INT64_MAX: Final = 2**63 - 1

# \A...\Z, not ^...$: "$" also matches before a trailing newline, and a
# newline cannot be escaped in line protocol (ingest-facts, trap 8).
DEVICE_ID_PATTERN: Final = r"\A[A-Za-z0-9][A-Za-z0-9_-]{2,63}\Z"
_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)

Kind = Literal["sock", "boot"]
Zone = Literal["foot", "ankle", "calf", "knee", "thigh"]
Channel = Literal["telemetry", "event", "status"]
EventType = Literal["session_start", "session_end", "donned", "doffed", "fault"]
DeviceId = Annotated[str, msgspec.Meta(pattern=DEVICE_ID_PATTERN)]
Mmhg = Annotated[float, msgspec.Meta(ge=0.0, le=250.0)]
SkinTemp = Annotated[float, msgspec.Meta(ge=15.0, le=45.0)]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
EpochMs = Annotated[int, msgspec.Meta(ge=0)]
Counter = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
ShortText = Annotated[str, msgspec.Meta(max_length=64)]
LongText = Annotated[str, msgspec.Meta(max_length=512)]


class Sample(msgspec.Struct, frozen=True, omit_defaults=True):
    """One reading: its own timestamp, on-body state and pressure per zone."""

    t: EpochMs
    worn: bool
    pressure_mmhg: dict[Zone, Mmhg]
    skin_temp_c: SkinTemp | None = None


class Telemetry(msgspec.Struct, frozen=True, omit_defaults=True):
    """A batch of readings from one garment (topic ``.../telemetry``)."""

    v: Literal[1]
    device_id: DeviceId
    kind: Kind
    seq: Counter
    samples: Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    battery_pct: Percent | None = None


class _TelemetryEnvelope(msgspec.Struct, frozen=True):
    """Telemetry with the samples left raw, to judge each sample on its own."""

    v: Literal[1]
    device_id: DeviceId
    kind: Kind
    seq: Counter
    samples: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    battery_pct: Percent | None = None


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One discrete event (topic ``.../event``)."""

    v: Literal[1]
    device_id: DeviceId
    t: EpochMs
    type: EventType
    program: ShortText | None = None
    target_mmhg: Mmhg | None = None
    planned_s: Annotated[int, msgspec.Meta(ge=0, le=86_400)] | None = None
    duration_s: Annotated[int, msgspec.Meta(ge=0, le=86_400)] | None = None
    reason: Literal["completed", "stopped", "fault"] | None = None
    code: ShortText | None = None
    message: LongText | None = None


class Status(msgspec.Struct, frozen=True, omit_defaults=True):
    """Online/offline state of a device (topic ``.../status``, retained)."""

    v: Literal[1]
    state: Literal["online", "offline"]
    fw: ShortText | None = None
    battery_pct: Percent | None = None
    rssi_dbm: Annotated[int, msgspec.Meta(ge=-200, le=0)] | None = None
    t: EpochMs | None = None


class ProtocolError(ValueError):
    """A payload or topic that breaks the protocol, with a bounded reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SampleRejection:
    """A sample rejected on its own; the rest of its message is kept."""

    index: int
    reason: str
    detail: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class TelemetryResult:
    """The valid samples of a telemetry message and the rejected ones."""

    message: Telemetry
    rejected: tuple[SampleRejection, ...]


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed ``{root}/{device_id}/{channel}`` topic."""

    device_id: str
    channel: Channel


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Accepted sample timestamps: ``[now - max_age, now + max_future]`` (ms)."""

    max_future_ms: int = DEFAULT_MAX_FUTURE_MS
    max_age_ms: int = DEFAULT_MAX_AGE_MS


def is_valid_device_id(device_id: str) -> bool:
    """True if ``device_id`` matches the protocol's pattern (no newline tricks)."""
    return _DEVICE_ID_RE.match(device_id) is not None


def topic_for(device_id: str, channel: Channel, root: str = TOPIC_ROOT) -> str:
    """The topic a device publishes ``channel`` on."""
    if not is_valid_device_id(device_id):
        raise ProtocolError("invalid_device_id", f"device id {device_id!r} breaks the pattern")
    return f"{root}/{device_id}/{channel}"


def parse_topic(topic: str, root: str = TOPIC_ROOT) -> Topic:
    """Split a topic into device id and channel, or raise :class:`ProtocolError`."""
    prefix = root + "/"
    if not topic.startswith(prefix):
        raise ProtocolError("unknown_topic", f"topic outside {root}/")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2 or parts[1] not in CHANNELS:
        raise ProtocolError("unknown_topic", "expected {device_id}/telemetry|event|status")
    if not is_valid_device_id(parts[0]):
        raise ProtocolError("invalid_device_id", "device id in topic breaks the pattern")
    channel: Channel = parts[1]  # type: ignore[assignment]
    return Topic(device_id=parts[0], channel=channel)


_PATH_RE: Final = re.compile(r"`\$(?:\.samples\[\d+\])?\.([a-z_]+)")
_MISSING_RE: Final = re.compile(r"missing required field `([a-z_]+)`")
_KNOWN_FIELDS: Final = frozenset(
    {
        "v", "device_id", "kind", "seq", "samples", "battery_pct", "t", "worn",
        "pressure_mmhg", "skin_temp_c", "type", "state", "fw", "rssi_dbm", "program",
        "target_mmhg", "planned_s", "duration_s", "reason", "code", "message",
    }
)  # fmt: skip
_FIELD_REASONS: Final = {"v": "unsupported_version", "device_id": "invalid_device_id"}


def reason_for(error: msgspec.ValidationError) -> str:
    """Map a msgspec validation error to a bounded reason code."""
    text = str(error)
    missing = _MISSING_RE.search(text)
    if missing and missing.group(1) in _KNOWN_FIELDS:
        return f"missing_{missing.group(1)}"
    found = _PATH_RE.search(text)
    if found is None:
        return "invalid_structure"
    field = found.group(1)
    if field not in _KNOWN_FIELDS:
        return "invalid_structure"
    return _FIELD_REASONS.get(field, f"invalid_{field}")


def _check_size(payload: bytes) -> None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("payload_too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")


# JSON nested deeper than the parser's recursion limit (about 1,000 levels with Python's default limit; the
# protocol's own payloads nest 4 deep) cannot be read at all, not even to skip an unknown field or to split the
# samples: the message is rejected whole with this reason (msgspec raises RecursionError, not a DecodeError).
TOO_DEEP: Final = "too_deep"


def _decode(payload: bytes, decoder: msgspec.json.Decoder[_T]) -> _T:
    _check_size(payload)
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ProtocolError(reason_for(exc), str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise ProtocolError("not_json", str(exc)) from exc
    except RecursionError as exc:
        raise ProtocolError(TOO_DEEP, "JSON nested deeper than the parser allows") from exc


_TELEMETRY_DECODER: Final = msgspec.json.Decoder(Telemetry)
_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_TelemetryEnvelope)
_SAMPLE_DECODER: Final = msgspec.json.Decoder(Sample)
_EVENT_DECODER: Final = msgspec.json.Decoder(Event)
_STATUS_DECODER: Final = msgspec.json.Decoder(Status)
_ENCODER: Final = msgspec.json.Encoder()


def _time_reason(t: int, now_ms: int, window: TimeWindow) -> str | None:
    if t > now_ms + window.max_future_ms:
        return "timestamp_in_future"
    if t < now_ms - window.max_age_ms:
        return "timestamp_too_old"
    return None


def _judge_raw_sample(index: int, raw: msgspec.Raw) -> Sample | SampleRejection:
    try:
        return _SAMPLE_DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        return SampleRejection(index, reason_for(exc), str(exc), bytes(raw))
    except RecursionError:  # the envelope could be read, so this does not happen; judged like the envelope if it did
        return SampleRejection(index, TOO_DEEP, "JSON nested deeper than the parser allows", bytes(raw))


def _split_slow(payload: bytes) -> tuple[_TelemetryEnvelope, list[Sample | SampleRejection]]:
    envelope = _decode(payload, _ENVELOPE_DECODER)
    return envelope, [_judge_raw_sample(i, raw) for i, raw in enumerate(envelope.samples)]


def decode_telemetry(
    payload: bytes, expected_device_id: str, now_ms: int, window: TimeWindow = TimeWindow()
) -> TelemetryResult:
    """Decode and validate a telemetry payload published by ``expected_device_id``.

    Raises :class:`ProtocolError` when the whole message is rejected; otherwise
    returns the valid samples (possibly none) and a rejection per bad sample.
    """
    judged: list[Sample | SampleRejection] | None = None
    try:
        message = _decode(payload, _TELEMETRY_DECODER)
    except ProtocolError as whole:
        if whole.reason in ("not_json", "payload_too_large", TOO_DEEP):
            raise
        # The fast path failed; find out whether the envelope or a sample is bad.
        envelope, judged = _split_slow(payload)
        message = Telemetry(envelope.v, envelope.device_id, envelope.kind, envelope.seq,
                            [s for s in judged if isinstance(s, Sample)] or _NO_SAMPLES,
                            envelope.battery_pct)  # fmt: skip
    if message.device_id != expected_device_id:
        raise ProtocolError("device_id_mismatch", "payload device_id differs from the topic's")
    if judged is None:
        times = [sample.t for sample in message.samples]
        if min(times) >= now_ms - window.max_age_ms and max(times) <= now_ms + window.max_future_ms:
            return TelemetryResult(message=message, rejected=())  # the usual case: every sample in the window
        judged = list(message.samples)
    return _apply_time_window(message, judged, now_ms, window)


# msgspec would refuse an empty list at decode time; a message whose every
# sample was rejected still needs a Telemetry to carry its envelope.
_NO_SAMPLES: Final[list[Sample]] = []


def _apply_time_window(
    message: Telemetry, judged: list[Sample | SampleRejection], now_ms: int, window: TimeWindow
) -> TelemetryResult:
    kept: list[Sample] = []
    rejected: list[SampleRejection] = []
    for index, item in enumerate(judged):
        if isinstance(item, SampleRejection):
            rejected.append(item)
            continue
        late = _time_reason(item.t, now_ms, window)
        if late is None:
            kept.append(item)
        else:
            rejected.append(SampleRejection(index, late, _window_detail(item.t, window), _ENCODER.encode(item)))
    if len(kept) != len(message.samples):
        message = msgspec.structs.replace(message, samples=kept)
    return TelemetryResult(message=message, rejected=tuple(rejected))


def decode_event(payload: bytes, expected_device_id: str, now_ms: int, window: TimeWindow = TimeWindow()) -> Event:
    """Decode and validate an event payload, or raise :class:`ProtocolError`."""
    event = _decode(payload, _EVENT_DECODER)
    if event.device_id != expected_device_id:
        raise ProtocolError("device_id_mismatch", "payload device_id differs from the topic's")
    late = _time_reason(event.t, now_ms, window)
    if late is not None:
        raise ProtocolError(late, _window_detail(event.t, window))
    return event


def decode_status(payload: bytes, now_ms: int | None = None, window: TimeWindow = TimeWindow()) -> Status:
    """Decode and validate a status payload, or raise :class:`ProtocolError`.

    With ``now_ms`` (the ingester always gives it), a status's own ``t`` must fall in the same window as a
    sample's: a status dated 1970 or 2200 is refused (``timestamp_too_old``, ``timestamp_in_future``) instead of
    being stored at that time. A status without ``t`` (a last will) has nothing to check.
    """
    status = _decode(payload, _STATUS_DECODER)
    if now_ms is not None and status.t is not None:
        late = _time_reason(status.t, now_ms, window)
        if late is not None:
            raise ProtocolError(late, _window_detail(status.t, window))
    return status


def _window_detail(t: int, window: TimeWindow) -> str:
    return f"t={t} outside [now-{window.max_age_ms}ms, now+{window.max_future_ms}ms]"


def encode(message: Telemetry | Event | Status) -> bytes:
    """Serialise a wire model to its JSON payload."""
    return _ENCODER.encode(message)
