"""Payloads of a garment with buggy firmware, each with the exact reason the ingester gives.

Each corruption turns one well-formed telemetry batch into the bytes a buggy
firmware would send instead. Whole-message faults lose the batch; a bad
sample is rejected on its own and the rest of its batch is kept (the
protocol's rule), so the ground truth counts exactly the survivors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from devices.protocol import MAX_PAYLOAD_BYTES, Telemetry, encode
from simulators.garments import Item

Builtin = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Corruption:
    """One firmware bug: what it does to a batch and what the ingester answers."""

    label: str
    reason: str
    whole: bool
    change: Callable[[Builtin], None]
    description: str


def _set(key: str, value: Any) -> Callable[[Builtin], None]:
    def change(doc: Builtin) -> None:
        doc[key] = value

    return change


def _drop(key: str) -> Callable[[Builtin], None]:
    def change(doc: Builtin) -> None:
        del doc[key]

    return change


def _sample(change_one: Callable[[Builtin], None]) -> Callable[[Builtin], None]:
    # The bad sample is the second one: a batch has at least two, so a good
    # one stays on each side of it whenever the batch is long enough.
    def change(doc: Builtin) -> None:
        change_one(doc["samples"][BAD_INDEX])

    return change


def _pressure(value: float) -> Callable[[Builtin], None]:
    def change(sample: Builtin) -> None:
        sample["pressure_mmhg"]["ankle"] = value

    return change


def _scale_t(factor: float) -> Callable[[Builtin], None]:
    def change(sample: Builtin) -> None:
        sample["t"] = int(sample["t"] * factor)

    return change


def _heel(sample: Builtin) -> None:
    sample["pressure_mmhg"]["heel"] = sample["pressure_mmhg"].pop("ankle")


def _keep(doc: Builtin) -> None:
    """The truncated payload is cut from the encoded bytes, not changed as a document."""


def _pad(doc: Builtin) -> None:
    doc["debug_dump"] = "x" * (MAX_PAYLOAD_BYTES + 1)


def _device(doc: Builtin) -> None:
    doc["device_id"] = doc["device_id"] + "-clone"


BAD_INDEX: Final = 1

CATALOGUE: Final[tuple[Corruption, ...]] = (
    Corruption("truncated", "not_json", True, _keep, "payload cut off mid-object"),
    Corruption("version_2", "unsupported_version", True, _set("v", 2), "v is 2"),
    Corruption("kind_stocking", "invalid_kind", True, _set("kind", "stocking"), "kind outside sock|boot"),
    Corruption("foreign_device", "device_id_mismatch", True, _device, "device_id of another garment"),
    Corruption("no_seq", "missing_seq", True, _drop("seq"), "seq left out"),
    Corruption("empty_batch", "invalid_samples", True, _set("samples", []), "samples is empty"),
    Corruption("battery_140", "invalid_battery_pct", True, _set("battery_pct", 140), "battery_pct above 100"),
    Corruption("oversized", "payload_too_large", True, _pad, "a debug dump makes it larger than 64 KiB"),
    Corruption("negative_pressure", "invalid_pressure_mmhg", False, _sample(_pressure(-4.2)), "ankle -4.2 mmHg"),
    Corruption("adc_saturated", "invalid_pressure_mmhg", False, _sample(_pressure(512.0)), "ankle 512 mmHg"),
    Corruption("unknown_zone", "invalid_pressure_mmhg", False, _sample(_heel), "zone 'heel' instead of ankle"),
    Corruption("worn_string", "invalid_worn", False, _sample(_set("worn", "true")), "worn as a string"),
    Corruption("no_worn", "missing_worn", False, _sample(_drop("worn")), "worn left out"),
    Corruption("t_string", "invalid_t", False, _sample(_set("t", "2025-01-01T00:00:00Z")), "t as ISO text"),
    Corruption("skin_85c", "invalid_skin_temp_c", False, _sample(_set("skin_temp_c", 85.0)), "85 C skin"),
    Corruption("t_microseconds", "timestamp_in_future", False, _sample(_scale_t(1000)), "t in microseconds"),
    Corruption("t_seconds", "timestamp_too_old", False, _sample(_scale_t(0.001)), "t in seconds"),
)


def corrupt(message: Telemetry, bug: Corruption) -> Item:
    """The item a buggy firmware sends instead of ``message`` (``publish_at_ms`` set by the sender)."""
    doc: Builtin = msgspec.to_builtins(message)
    if bug.label == "truncated":
        raw = encode(message)[: len(encode(message)) // 2]
    else:
        bug.change(doc)
        raw = msgspec.json.encode(doc)
    if bug.whole:
        return Item(0, "telemetry", message, raw=raw, whole_reason=bug.reason, label=bug.label)
    # The time-window faults are judged later, against the receive time; the
    # rest are judged by the sample's structure.
    if bug.reason.startswith("timestamp_"):
        changed = msgspec.json.decode(msgspec.json.encode(doc["samples"][BAD_INDEX]))
        kept = list(message.samples)
        kept[BAD_INDEX] = msgspec.convert(changed, type(message.samples[0]))
        return Item(0, "telemetry", message, raw=raw, kept=kept, label=bug.label)
    kept = [s for i, s in enumerate(message.samples) if i != BAD_INDEX]
    return Item(0, "telemetry", message, raw=raw, kept=kept, sample_reasons=((BAD_INDEX, bug.reason),), label=bug.label)


def corrupter(every: int, offset: int) -> Callable[[Telemetry, int], Item | None]:
    """Corrupt every ``every``-th batch (from ``offset``), cycling through the catalogue."""

    def maybe(message: Telemetry, seq: int) -> Item | None:
        if seq % every != offset or len(message.samples) <= BAD_INDEX:
            return None
        return corrupt(message, CATALOGUE[(seq // every) % len(CATALOGUE)])

    return maybe
