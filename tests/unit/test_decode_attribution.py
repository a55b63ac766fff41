"""Telemetry tagged while it is encoded (``Decoder.decode(..., attributions)``) is what tagging the encoded lines
afterwards (:func:`ingest.encode.attribute`) makes of it: the same lines, the same unattributed counts, the same
receipts, for messages inside one stretch of a device's history, across a reassignment, and for unknown devices."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from devices.protocol import Sample, Telemetry, encode
from devices.registry.schemas import Snapshot, SnapshotEntry
from ingest.decode import Decoder
from ingest.encode import attribute, receipt_lines
from ingest.enrich import Attributions

T = 1_780_000_000_000  # epoch ms, a reassignment
HOUR = 3_600_000
NOW_NS = (T + 24 * HOUR) * 1_000_000

SNAPSHOT = Snapshot(
    version=1,
    devices=["sock-a", "sock-b", "sock-idle"],
    assignments=[
        SnapshotEntry(device_id="sock-a", patient="P-0001", clinic="bowvalley", from_ms=T - 10 * HOUR, to_ms=T),
        SnapshotEntry(device_id="sock-a", patient="P-0002", clinic="bowvalley", from_ms=T, to_ms=None),
        SnapshotEntry(device_id="sock-b", patient="P-0003", clinic="canmore", from_ms=T - HOUR, to_ms=T + HOUR),
    ],
)


def payload(device: str, times: list[int], battery: int | None) -> bytes:
    samples = [Sample(t=t, worn=True, pressure_mmhg={"ankle": 20.5, "calf": 15.0}, skin_temp_c=31.0) for t in times]
    return encode(Telemetry(v=1, device_id=device, kind="sock", seq=3, samples=samples, battery_pct=battery))


@given(
    st.sampled_from(["sock-a", "sock-b", "sock-idle", "sock-nobody"]),
    st.lists(st.integers(T - 12 * HOUR, T + 12 * HOUR), min_size=1, max_size=12),
    st.none() | st.integers(0, 100),
)
def test_tagging_while_encoding_is_tagging_afterwards(device: str, times: list[int], battery: int | None) -> None:
    cache = Attributions(SNAPSHOT)
    decoder = Decoder()
    topic = f"garments/v1/{device}/telemetry"
    body = payload(device, times, battery)

    early = decoder.decode(topic, body, NOW_NS, attributions=cache)
    late = decoder.decode(topic, body, NOW_NS)
    late_unattributed = attribute(late.lines, late.samples, cache)
    if early.attributed:
        assert early.unattributed == late_unattributed
    else:  # a reassignment falls inside the message: the ingester tags the encoded lines
        assert early.unattributed == () and attribute(early.lines, early.samples, cache) == late_unattributed
    assert early.lines == late.lines
    assert receipt_lines(early.lines, early.samples, 5) == receipt_lines(late.lines, late.samples, 5)


def test_the_usual_message_is_tagged_while_encoding() -> None:
    decoded = Decoder().decode(
        "garments/v1/sock-a/telemetry",
        payload("sock-a", [T + 1, T + 2], 80),
        NOW_NS,
        attributions=Attributions(SNAPSHOT),
    )
    assert decoded.attributed and decoded.unattributed == ()
    assert all(
        line.startswith("sample,clinic=bowvalley,device=sock-a,kind=sock,patient=P-0002 ") for line in decoded.lines
    )
