"""Hypothesis strategies for garment payloads: valid ones, and bad ones with the reason they must get."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from devices.protocol import MAX_PAYLOAD_BYTES, ZONES

DEVICE_ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{2,20}\Z", fullmatch=True)
BAD_IDS = st.sampled_from(
    ["ab", "-leading", "sock 0001", "sock,kind=boot", "sock=1", "sock\n0001", "sock-0001\n", "sock\"x",
     "x" * 65, "sock\\0001", "sock#1", "ünïcödé-id", "sock\t01", "sock/0001"]
) | st.text(min_size=1, max_size=80).filter(lambda s: not s.isascii() or any(c in s for c in " ,=\n\"\\/"))  # fmt: skip


def now_ms() -> int:
    return int(time.time() * 1000)


@st.composite
def valid_sample(draw: st.DrawFn, t: int | None = None) -> dict[str, Any]:
    zones = draw(st.lists(st.sampled_from(ZONES), min_size=1, max_size=5, unique=True))
    sample: dict[str, Any] = {
        "t": t if t is not None else now_ms() - draw(st.integers(0, 86_400_000)),
        "worn": draw(st.booleans()),
        "pressure_mmhg": {z: draw(st.floats(0, 250, allow_nan=False)) for z in zones},
    }
    if draw(st.booleans()):
        sample["skin_temp_c"] = draw(st.floats(15, 45))
    return sample


# (mutation of a valid sample, the reason it must be rejected with)
BAD_SAMPLE_MUTATIONS: list[tuple[str, Any, str]] = [
    ("pressure_mmhg", {"ankle": -1.0}, "invalid_pressure_mmhg"),
    ("pressure_mmhg", {"ankle": 250.5}, "invalid_pressure_mmhg"),
    ("pressure_mmhg", {"ankle": 1e999}, "invalid_pressure_mmhg"),
    ("pressure_mmhg", {"ankle,zone=x": 20.0}, "invalid_pressure_mmhg"),
    ("pressure_mmhg", {"ankle\n": 20.0}, "invalid_pressure_mmhg"),
    ("pressure_mmhg", {"ankle": "24"}, "invalid_pressure_mmhg"),
    ("pressure_mmhg", [24.0], "invalid_pressure_mmhg"),
    ("worn", 1, "invalid_worn"),
    ("worn", "true", "invalid_worn"),
    ("t", 1.5, "invalid_t"),
    ("t", "1764144000000", "invalid_t"),
    ("t", -5, "invalid_t"),
    ("skin_temp_c", 50.0, "invalid_skin_temp_c"),
    ("skin_temp_c", "warm", "invalid_skin_temp_c"),
    ("t", "FUTURE", "timestamp_in_future"),
    ("t", "OLD", "timestamp_too_old"),
    ("worn", "DELETE", "missing_worn"),
    ("t", "DELETE", "missing_t"),
]


@dataclass
class Case:
    """One message to publish and what the ingester must make of it."""

    topic_device: str
    payload: bytes
    whole_reason: str | None = None  # the message is rejected whole with this reason
    sample_reasons: dict[int, str] = field(default_factory=dict)  # index -> reason
    valid_samples: int = 0
    bad_topic: bool = False


def _mutate(sample: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = dict(sample)
    if value == "DELETE":
        out.pop(key, None)
    elif value == "FUTURE":
        out[key] = now_ms() + 3_600_000
    elif value == "OLD":
        out[key] = now_ms() - 40 * 86_400_000
    else:
        out[key] = value
    return out


def envelope(device: str, samples: list[Any], **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "device_id": device, "kind": "sock", "seq": 1, "samples": samples}
    body.update(extra)
    return body


def dumps(body: Any) -> bytes:
    # Python writes an overflowing float as Infinity (not JSON); send the overflowing literal instead.
    return json.dumps(body, allow_nan=True).replace("Infinity", "1e999").encode()


@st.composite
def partly_bad(draw: st.DrawFn, device: str) -> Case:
    n = draw(st.integers(2, 12))
    base_t = now_ms() - 3_600_000
    samples: list[Any] = [draw(valid_sample(t=base_t + i * 60_000)) for i in range(n)]
    bad_idx = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True))
    reasons: dict[int, str] = {}
    for i in bad_idx:
        key, value, reason = draw(st.sampled_from(BAD_SAMPLE_MUTATIONS))
        samples[i] = _mutate(samples[i], key, value)
        reasons[i] = reason
    if draw(st.booleans()):
        i = draw(st.sampled_from(sorted(set(range(n)) - set(bad_idx))))
        samples[i] = {**samples[i], "unknown_future_field": {"x": 1}}  # ignored, sample kept
    return Case(device, dumps(envelope(device, samples)), sample_reasons=reasons, valid_samples=n - len(bad_idx))


@st.composite
def whole_bad(draw: st.DrawFn, device: str) -> Case:
    good = [draw(valid_sample())]
    choice = draw(st.integers(0, 13))
    other = draw(DEVICE_ID.filter(lambda d: d != device))
    table: list[tuple[Any, str]] = [
        (draw(st.binary(max_size=200).filter(_not_json)), "not_json"),
        (
            b'{"v":1,"device_id":"%s","kind":"sock","seq":1,"samples":[{"t":1,"worn":true,"pressure_mmhg":{"ankle":NaN}}]}'
            % device.encode(),
            "not_json",
        ),
        (dumps(envelope(device, good, v=2)), "unsupported_version"),
        (dumps(envelope(device, good, v="1")), "unsupported_version"),
        (
            dumps(envelope(device, good, kind=draw(st.text(max_size=10).filter(lambda k: k not in ("sock", "boot"))))),
            "invalid_kind",
        ),
        (dumps(envelope(other, good)), "device_id_mismatch"),
        (dumps(envelope(draw(BAD_IDS), good)), "invalid_device_id"),
        (dumps(envelope(device, [])), "invalid_samples"),
        (dumps(envelope(device, [{"t": now_ms(), "worn": True, "pressure_mmhg": {}}] * 501)), "invalid_samples"),
        (dumps(envelope(device, good, seq=-1)), "invalid_seq"),
        (dumps(envelope(device, good, battery_pct=101)), "invalid_battery_pct"),
        (dumps({k: v for k, v in envelope(device, good).items() if k != "samples"}), "missing_samples"),
        (dumps(envelope(device, good, padding="x" * MAX_PAYLOAD_BYTES)), "payload_too_large"),
        (dumps(draw(st.sampled_from([[], "telemetry", 42, None]))), "invalid_structure"),
    ]
    payload, reason = table[choice]
    return Case(device, payload, whole_reason=reason)


def _not_json(data: bytes) -> bool:
    # A prefix that is valid JSON of the wrong type ("0\x01") is judged by its
    # type first (invalid_structure); keep this strategy to bytes that are not JSON from the start.
    if data.lstrip()[:1] and data.lstrip()[:1] in b'{["-0123456789tfn':
        return False
    try:
        json.loads(data)
    except ValueError:
        return True
    return False


def _deliverable_topic_level(text: str) -> bool:
    return (
        not any(c in text for c in "/+#") and text.isprintable() and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    )


@st.composite
def bad_topic(draw: st.DrawFn) -> Case:
    # Only what a broker delivers: MQTT topics are UTF-8 without wildcards, and
    # Mosquitto disconnects a client that publishes control characters.
    device = draw(BAD_IDS.filter(_deliverable_topic_level))
    return Case(device, dumps(envelope("sock-0001", [draw(valid_sample())])), whole_reason="invalid_device_id",
                bad_topic=True)  # fmt: skip


@st.composite
def bad_case(draw: st.DrawFn, device: str) -> Case:
    """One bad message of any kind, for ``device`` (unless its topic itself is bad)."""
    kind = draw(st.sampled_from(["partly", "whole", "whole", "topic"]))
    if kind == "partly":
        return draw(partly_bad(device))
    if kind == "whole":
        return draw(whole_bad(device))
    return draw(bad_topic())


@st.composite
def corpus(draw: st.DrawFn, prefix: str, size: int) -> list[Case]:
    """A small list of bad cases, one device each (for in-memory property tests)."""
    return [draw(bad_case(f"{prefix}-{i:04d}")) for i in range(size)]


def collect_corpus(prefix: str, size: int) -> list[Case]:
    """``size`` independently generated bad cases, for a corpus published in one go.

    One hypothesis example per case keeps every draw small and varied (a single
    example holding hundreds of cases overruns hypothesis' buffer and
    degenerates to the simplest cases).
    """
    cases: list[Case] = []

    @settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(bad_case(device="PLACEHOLDER"))
    def draw_one(case: Case) -> None:
        cases.append(case)

    draw_one()
    for i, case in enumerate(cases):
        if not case.bad_topic:
            old, case.topic_device = case.topic_device, f"{prefix}-{i:04d}"
            case.payload = case.payload.replace(f'"{old}"'.encode(), f'"{case.topic_device}"'.encode())
    return cases
