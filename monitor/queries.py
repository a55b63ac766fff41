"""The compliance queries, as InfluxQL text: one place for the monitor and the dashboards (``docs/compliance.md``).

Every query aggregates inside InfluxDB, per patient and local day of the
clinic (``GROUP BY time(1d), patient tz('<zone>')``): the monitor never
downloads samples. One statement covers every patient of a time zone at once
(``patient =~ /^(A|B|...)$/``); the pressure-band statements cover every
patient sharing the same band. Buckets start at local midnight, so
daylight-saving days have 23 or 25 hours (InfluxDB 1.6 handles this).

What InfluxDB 1.6's InfluxQL does that these rely on (each tried against
the real server in ``tests/integration/test_compliance_graded.py``):

- field arithmetic in ``WHERE``: ``calf_mmhg - ankle_mmhg > 3``;
- boolean fields in ``WHERE``: ``worn = true``;
- ``sum``, ``count``, ``min``, ``max`` and ``median`` together in one
  statement with ``GROUP BY time(1d), patient tz(...) fill(none)``;
- a regular expression or an ``OR`` list on the ``patient`` tag;
- several statements in one request, separated by ``;``.

What it does not do: a sliding 7-day median (``GROUP BY time(7d)`` gives
fixed weeks). The monitor composes the weekly median test from daily counts
instead (see ``monitor.compliance.with_windows``); :func:`ankle_median` gives
the exact median of one window for display.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from devices.protocol import ZONES

# The rules' constants (docs/ground-truth.md).
GRADIENT_MMHG: Final = 3.0
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_ZONE = re.compile(r"^[A-Za-z_/][A-Za-z0-9_/+-]{0,99}$")
DAY: Final = "1d"


def patient_filter(patients: Iterable[str]) -> str:
    """``patient =~ /^(A|B)$/`` for these codes (validated: codes are ``[A-Za-z0-9_.:-]``)."""
    codes = sorted(set(patients))
    if not codes:
        raise ValueError("no patients")
    for code in codes:
        if not _CODE.match(code):
            raise ValueError(f"not a patient code: {code!r}")
    return "patient =~ /^(" + "|".join(re.escape(c).replace("/", r"\/") for c in codes) + ")$/"


def time_range(start_ms: int, end_ms: int) -> str:
    """``time >= start AND time < end`` (epoch milliseconds)."""
    return f"time >= {int(start_ms)}ms AND time < {int(end_ms)}ms"


def tz_clause(timezone: str) -> str:
    """``tz('America/Edmonton')`` (the zone name validated)."""
    if not _ZONE.match(timezone):
        raise ValueError(f"not a time zone name: {timezone!r}")
    return f"tz('{timezone}')"


def _number(value: float) -> str:
    return repr(float(value))


def _daily(select: str, measurement: str, where: list[str], timezone: str, extra_group: str = "") -> str:
    return (f"SELECT {select} FROM {measurement} WHERE {' AND '.join(where)} "
            f"GROUP BY time({DAY}), patient{extra_group} fill(none) {tz_clause(timezone)}")  # fmt: skip


def _by(per_device: bool) -> str:
    """The monitor groups by garment too (``, device``): legs are judged apart and wear is their union."""
    return ", device" if per_device else ""


def daily_samples(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int, *,
                  per_device: bool = False) -> str:  # fmt: skip
    """Per patient and local day: stored samples, seconds worn (``sum(worn_s)``), lowest battery.

    ``worn_s`` is 0 on a sample not worn and at most 120 s on a worn one (a gap
    in the data is not wear), so the sum needs no ``worn = true`` filter.
    """
    return _daily('count(worn) AS samples, sum(worn_s) AS wear_s, min(battery_pct) AS battery_min_pct', "sample",
                  [patient_filter(patients), time_range(start_ms, end_ms)], timezone, _by(per_device))  # fmt: skip


def daily_worn(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int, median: bool = False,
               per_device: bool = False) -> str:  # fmt: skip
    """Per patient and local day: worn samples, how many carry an ankle pressure (and their median ankle pressure).

    The median is the costliest aggregate (InfluxDB keeps every value of the
    bucket): it is for display only, the flags never need it.
    """
    select = "count(worn) AS worn_samples, count(ankle_mmhg) AS ankle_samples"
    if median:
        select += ", median(ankle_mmhg) AS ankle_median_mmhg"
    return _daily(select, "sample", ["worn = true", patient_filter(patients), time_range(start_ms, end_ms)],
                  timezone, _by(per_device))  # fmt: skip


def daily_above(patients: Iterable[str], high_mmhg: float, timezone: str, start_ms: int, end_ms: int, *,
                per_device: bool = False) -> str:  # fmt: skip
    """Per patient and local day: seconds worn with the ankle strictly above the band (``too_tight``)."""
    return _daily("sum(worn_s) AS above_range_s", "sample",
                  ["worn = true", f"ankle_mmhg > {_number(high_mmhg)}", patient_filter(patients),
                   time_range(start_ms, end_ms)], timezone, _by(per_device))  # fmt: skip


def daily_below(patients: Iterable[str], low_mmhg: float, timezone: str, start_ms: int, end_ms: int, *,
                per_device: bool = False) -> str:  # fmt: skip
    """Per patient and local day, worn with the ankle strictly below the band: seconds (``too_loose``), samples
    and the highest such pressure (the weekly median test of ``worn_out``)."""
    return _daily("sum(worn_s) AS below_range_s, count(ankle_mmhg) AS below_samples, "
                  "max(ankle_mmhg) AS below_max_mmhg", "sample",
                  ["worn = true", f"ankle_mmhg < {_number(low_mmhg)}", patient_filter(patients),
                   time_range(start_ms, end_ms)], timezone, _by(per_device))  # fmt: skip


def daily_not_below(patients: Iterable[str], low_mmhg: float, timezone: str, start_ms: int, end_ms: int, *,
                    per_device: bool = False) -> str:  # fmt: skip
    """Per patient and local day: the lowest worn ankle pressure at or above the band's low bound (the median
    test's other neighbour)."""
    return _daily("min(ankle_mmhg) AS not_below_min_mmhg", "sample",
                  ["worn = true", f"ankle_mmhg >= {_number(low_mmhg)}", patient_filter(patients),
                   time_range(start_ms, end_ms)], timezone, _by(per_device))  # fmt: skip


def daily_reversed(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int,
                   gradient_mmhg: float = GRADIENT_MMHG, per_device: bool = False) -> str:  # fmt: skip
    """Per patient and local day: seconds worn with ``calf - ankle > 3`` mmHg (a reversed gradient, ``rolled_down``)."""
    return _daily("sum(worn_s) AS reversed_gradient_s", "sample",
                  ["worn = true", f"calf_mmhg - ankle_mmhg > {_number(gradient_mmhg)}", patient_filter(patients),
                   time_range(start_ms, end_ms)], timezone, _by(per_device))  # fmt: skip


def daily_reversed_thigh(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int,
                         gradient_mmhg: float = GRADIENT_MMHG) -> str:  # fmt: skip
    """Per patient and local day: seconds worn with ``thigh - calf > 3`` mmHg (thigh-high garments; dashboards)."""
    return _daily("sum(worn_s) AS reversed_thigh_s", "sample",
                  ["worn = true", f"thigh_mmhg - calf_mmhg > {_number(gradient_mmhg)}", patient_filter(patients),
                   time_range(start_ms, end_ms)], timezone)  # fmt: skip


def daily_peak(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int,
               zones: Iterable[str] = ZONES) -> str:  # fmt: skip
    """Per patient and local day: the highest pressure of each zone (a boot's peak is the highest of them)."""
    select = ", ".join(f"max({zone}_mmhg) AS {zone}" for zone in zones if zone in ZONES)
    return _daily(select, "sample", [patient_filter(patients), time_range(start_ms, end_ms)], timezone)


def daily_events(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int) -> str:
    """Per patient, local day and event type: stored events (``session_start`` counts sessions)."""
    return _daily('count("count") AS events', "event", [patient_filter(patients), time_range(start_ms, end_ms)],
                  timezone, ', "type"')  # fmt: skip


def daily_statuses(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int) -> str:
    """Per patient and local day: stored status messages (they count as stored points against ``silent``)."""
    return _daily("count(state) AS statuses", "status", [patient_filter(patients), time_range(start_ms, end_ms)],
                  timezone)  # fmt: skip


def session_ends(patients: Iterable[str], start_ms: int, end_ms: int) -> str:
    """Every stored ``session_end`` with its device-reported ``duration_s`` (one point per session: small)."""
    return (f"SELECT duration_s, reason FROM event WHERE \"type\" = 'session_end' AND {patient_filter(patients)} "
            f"AND {time_range(start_ms, end_ms)} GROUP BY patient")  # fmt: skip


def ankle_median(patients: Iterable[str], start_ms: int, end_ms: int, *, per_device: bool = False) -> str:
    """The exact median ankle pressure of the worn samples in one window, per patient (e.g. the last 7 days)."""
    return (f"SELECT median(ankle_mmhg) AS ankle_median_mmhg FROM sample WHERE worn = true "
            f"AND {patient_filter(patients)} AND {time_range(start_ms, end_ms)} GROUP BY patient"
            f"{_by(per_device)}")  # fmt: skip


def daily_zone_medians(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int) -> str:
    """Per patient and local day: the median pressure of every zone over the worn samples (display, kept in the
    day summaries)."""
    select = ", ".join(f"median({zone}_mmhg) AS {zone}" for zone in ZONES)
    return _daily(select, "sample", ["worn = true", patient_filter(patients), time_range(start_ms, end_ms)], timezone)


def worn_spans(patient: str, start_ms: int, end_ms: int) -> str:
    """Every worn sample's ``worn_s`` of one patient in a range: the spans whose union is the time in any garment
    (read only for days when several garments were worn, ``monitor.compliance``)."""
    return (f"SELECT worn_s FROM sample WHERE worn = true AND {patient_filter([patient])} AND "
            f"{time_range(start_ms, end_ms)}")  # fmt: skip


def pipeline_hours(start_ms: int, end_ms: int) -> list[str]:
    """The hours the pipeline was seen working: any patient's readings stored for the hour (the ingester's
    ``receipt`` points, at the hour of their readings) and the ingester's own heartbeat (``ingest_health``, written
    while it is connected to the broker). Every patient of the database: an outage is the deployment's, not a
    clinic's."""
    where = time_range(start_ms, end_ms)
    return [f"SELECT count(received_ms) AS n FROM receipt WHERE {where} GROUP BY time(1h) fill(none)",
            f"SELECT count(connected) AS n FROM ingest_health WHERE {where} GROUP BY time(1h) fill(none)"]  # fmt: skip


# --- day summaries (monitor.summaries): what the monitor, the dashboards and the exports read ------------------------

SUMMARY_RP: Final = "forever"  # a retention policy of infinite duration: summaries and flags outlive the raw samples
SUMMARY: Final = "day_summary"
PATIENT_ROW: Final = "all"  # the ``leg`` tag of a patient's own row; a leg's row carries the leg's name


def summary_rows(patients: Iterable[str], start_ms: int, end_ms: int, fields: Iterable[str], legs: bool) -> str:
    """The day summaries of these patients in a range: the patients' own rows (``legs`` False) or their legs'."""
    where = f"leg != '{PATIENT_ROW}'" if legs else f"leg = '{PATIENT_ROW}'"
    select = ", ".join(f'"{f}"' for f in fields)
    return (f'SELECT {select} FROM "{SUMMARY_RP}"."{SUMMARY}" WHERE {where} AND {patient_filter(patients)} AND '
            f"{time_range(start_ms, end_ms)} GROUP BY patient{', leg' if legs else ''}")  # fmt: skip


def summary_wear(patients: Iterable[str], start_ms: int, end_ms: int) -> str:
    """Per patient and local day (a point at local midnight): worn seconds, the union of the garments' worn time
    (days with samples only)."""
    return (f'SELECT wear_s FROM "{SUMMARY_RP}"."{SUMMARY}" WHERE leg = \'{PATIENT_ROW}\' AND samples > 0 AND '
            f"{patient_filter(patients)} AND {time_range(start_ms, end_ms)} GROUP BY patient")  # fmt: skip


def summary_legs(patients: Iterable[str], start_ms: int, end_ms: int) -> str:
    """Per patient, leg and local day: each leg's worn, out-of-band and reversed-gradient seconds."""
    return (f"SELECT wear_s, above_range_s, below_range_s, reversed_gradient_s FROM \"{SUMMARY_RP}\".\"{SUMMARY}\" "
            f"WHERE leg != '{PATIENT_ROW}' AND worn_samples > 0 AND {patient_filter(patients)} AND "
            f"{time_range(start_ms, end_ms)} GROUP BY patient, leg")  # fmt: skip


def summary_sessions(patients: Iterable[str], start_ms: int, end_ms: int) -> str:
    """Per patient and local day: boot sessions started and the day's peak chamber pressure."""
    return (f'SELECT sessions_started, peak_mmhg FROM "{SUMMARY_RP}"."{SUMMARY}" WHERE leg = \'{PATIENT_ROW}\' '
            f"AND points > 0 AND {patient_filter(patients)} AND {time_range(start_ms, end_ms)} "
            "GROUP BY patient")  # fmt: skip


def receipt_days(patients: Iterable[str], timezone: str, start_ms: int, end_ms: int,
                 since_ms: int | None = None) -> str:  # fmt: skip
    """Per patient and local day: when the ingester last stored a reading of that day (its ``receipt`` points);
    with ``since_ms``, only the days that received one after it."""
    where = [patient_filter(patients), time_range(start_ms, end_ms)]
    if since_ms is not None:
        where.insert(0, f"received_ms > {int(since_ms)}")
    return _daily("max(received_ms) AS received_ms", "receipt", where, timezone)
