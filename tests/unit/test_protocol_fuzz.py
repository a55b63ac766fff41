"""Bad input never crashes the decoder: every rejection is a ProtocolError with its reason."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.protocol import ProtocolError, decode_telemetry
from ingest.decode import Decoder
from tests.strategies import BAD_IDS, corpus, dumps, envelope, valid_sample

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400) | JSON.map(dumps))
def test_arbitrary_bytes_and_json_only_raise_protocol_errors(payload: bytes) -> None:
    try:
        result = decode_telemetry(payload, "sock-0001", int(time.time() * 1000))
    except ProtocolError as exc:
        assert exc.reason and exc.reason.isidentifier()
    else:
        assert result.message.device_id == "sock-0001"


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(corpus(prefix="fz", size=5))
def test_decoder_gives_each_case_its_reason(cases: list) -> None:  # type: ignore[type-arg]
    decoder = Decoder()
    for case in cases:
        topic = f"garments/v1/{case.topic_device}/telemetry"
        decoded = decoder.decode(topic, case.payload, time.time_ns())
        if case.whole_reason is not None:
            assert decoded.rejections == [case.whole_reason], case
            assert decoded.samples == 0
            assert len(decoded.lines) == 1 and decoded.lines[0].startswith("rejected,")
        else:
            assert sorted(decoded.rejections) == sorted(case.sample_reasons.values()), case
            assert decoded.samples == case.valid_samples


@given(BAD_IDS, st.lists(valid_sample(), min_size=1, max_size=3))
def test_injection_in_device_ids_never_reaches_line_protocol(bad_id: str, samples: list) -> None:  # type: ignore[type-arg]
    decoded = Decoder().decode(f"garments/v1/{bad_id}/telemetry", dumps(envelope(bad_id, samples)), time.time_ns())
    assert decoded.samples == 0
    assert decoded.rejections in (["invalid_device_id"], ["unknown_topic"])
    (line,) = decoded.lines
    assert "\n" not in line
    assert line.startswith("rejected,channel=")
