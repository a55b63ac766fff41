"""Decode stage: one MQTT message in, the lines to store (data and dead letters) out.

Never raises on bad input: every rejection becomes a ``rejected`` point (the
dead letter, stored durably in InfluxDB like the data) and is counted by reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from devices.protocol import (
    ProtocolError,
    TimeWindow,
    Topic,
    decode_event,
    decode_status,
    decode_telemetry,
    parse_topic,
)
from ingest.encode import (
    DEFAULT_MAX_WEAR_GAP_S,
    STATUS,
    STATUS_RETAINED,
    Unattributed,
    attribute_telemetry,
    event_line,
    rejected_line,
    status_line,
    telemetry_lines,
)

if TYPE_CHECKING:
    from ingest.enrich import Attributions

UNKNOWN_DEVICE: Final = "_invalid"
# Valid topics remembered with their device and channel (a fleet has a few per device); the memo is
# emptied when it reaches this size, so that no sender can make it grow without bound.
TOPIC_MEMO: Final = 50_000


@dataclass(slots=True)
class Decoded:
    """What one message turned into."""

    lines: list[str]
    samples: int = 0
    newest_ms: int = 0
    rejections: list[str] = field(default_factory=list)
    # Telemetry already written with the registry's tags (``decode(..., attributions)``), and what went unattributed.
    attributed: bool = False
    unattributed: Unattributed = ()


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Knobs of the decode stage (from the settings)."""

    topic_root: str = "garments/v1"
    window: TimeWindow = field(default_factory=TimeWindow)
    max_wear_gap_s: float = DEFAULT_MAX_WEAR_GAP_S


class Decoder:
    """Turns (topic, payload) into line protocol; stateless apart from a tie-breaker."""

    def __init__(self, config: DecodeConfig | None = None) -> None:
        self._config = config or DecodeConfig()
        # Dead letters are stamped with the receive time; a counter keeps two
        # rejections in the same nanosecond from overwriting each other.
        self._tiebreak = 0
        self._topics: dict[str, Topic] = {}

    def _where(self, topic: str) -> Topic:
        where = self._topics.get(topic)
        if where is None:
            where = parse_topic(topic, self._config.topic_root)  # raises ProtocolError: not remembered
            if len(self._topics) >= TOPIC_MEMO:
                self._topics.clear()
            self._topics[topic] = where
        return where

    def decode(
        self, topic: str, payload: bytes, received_ns: int, retained: bool = False,
        attributions: Attributions | None = None,
    ) -> Decoded:  # fmt: skip
        """Decode one message; rejections become dead-letter lines.

        ``attributions``: with the registry's cache, a telemetry message whose
        samples fall in one stretch of its device's history is written with the
        holder's tags at once (``Decoded.attributed``); anything else is left to
        :func:`ingest.encode.attribute`.

        ``retained``: the broker delivered its stored retained copy (a new subscription), so the receive time says
        nothing about when the device spoke. A status with its own ``t`` is stored at that ``t`` as always; one
        without (an online announcement, a last will) goes to ``status_retained`` instead of ``status``, so that it
        never makes a silent garment look alive ("last seen", the monitor's silence, the dashboards' state).
        """
        try:
            where = self._where(topic)
        except ProtocolError as exc:
            return self._reject(UNKNOWN_DEVICE, "unknown", exc, topic.encode(), received_ns)
        try:
            if where.channel == "telemetry":
                return self._telemetry(where.device_id, payload, received_ns, attributions)
            if where.channel == "event":
                now_ms = received_ns // 1_000_000
                event = decode_event(payload, where.device_id, now_ms, self._config.window)
                return Decoded([event_line(event)])
            status = decode_status(payload, received_ns // 1_000_000, self._config.window)
            untimed_retained = retained and status.t is None
            measurement = STATUS_RETAINED if untimed_retained else STATUS
            return Decoded([status_line(where.device_id, status, received_ns // 1_000_000, measurement)])
        except ProtocolError as exc:
            return self._reject(where.device_id, where.channel, exc, payload, received_ns)

    def _telemetry(self, device_id: str, payload: bytes, received_ns: int,
                   attributions: Attributions | None) -> Decoded:  # fmt: skip
        now_ms = received_ns // 1_000_000
        result = decode_telemetry(payload, device_id, now_ms, self._config.window)
        found = attribute_telemetry(result.message, attributions) if attributions is not None else None
        series, unattributed = found if found is not None else (None, ())
        lines = telemetry_lines(result.message, self._config.max_wear_gap_s, series)
        newest = max((sample.t for sample in result.message.samples), default=0)
        out = Decoded(lines, samples=len(lines), newest_ms=newest, attributed=found is not None,
                      unattributed=unattributed)  # fmt: skip
        for bad in result.rejected:
            out.lines.append(
                rejected_line(
                    device=device_id,
                    channel="telemetry",
                    reason=bad.reason,
                    detail=bad.detail,
                    raw=bad.raw,
                    ts_ns=self._stamp(received_ns),
                    sample_index=bad.index,
                )
            )
            out.rejections.append(bad.reason)
        return out

    def internal_error(self, topic: str, payload: bytes, received_ns: int, exc: Exception) -> Decoded:
        """Dead-letter a message the decoder itself failed on (a bug, never the sender's), under its topic's
        device and channel when the topic is valid, else under ``_invalid``."""
        error = ProtocolError("internal_error", f"{type(exc).__name__}: {exc}")
        try:
            where = parse_topic(topic, self._config.topic_root)
        except ProtocolError:
            return self._reject(UNKNOWN_DEVICE, "unknown", error, topic.encode() + b" " + payload, received_ns)
        return self._reject(where.device_id, where.channel, error, payload, received_ns)

    def _reject(self, device: str, channel: str, exc: ProtocolError, raw: bytes, received_ns: int) -> Decoded:
        dead = rejected_line(
            device=device, channel=channel, reason=exc.reason, detail=exc.detail,
            raw=raw, ts_ns=self._stamp(received_ns),
        )  # fmt: skip
        return Decoded([dead], rejections=[exc.reason])

    def _stamp(self, received_ns: int) -> int:
        self._tiebreak = (self._tiebreak + 1) % 1000
        return received_ns - received_ns % 1000 + self._tiebreak
