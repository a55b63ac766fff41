"""Day summaries without a server: the line format round trip, when a summary is stale, the rebuild limit."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

from monitor import summaries
from monitor.compliance import day_flags, judged_flags
from monitor.model import DayStats, Garment, LegStats, PatientContext, SockRx
from monitor.summaries import DEFERRED, FRESH, STALE, Report, Stored, basis, staleness

DAY = date(2026, 3, 8)
START, END = 1_772_953_200_000, 1_773_036_000_000  # a 23-hour local day (daylight saving) is fine too
RX = SockRx(20.0, 30.0, 8.0, 7, ("ankle", "calf"))
CTX = PatientContext("P-1", "bow", "America/Edmonton", "sock", RX, "ann@bow.example", "Ann",
                     garments=(Garment("sock-l", "left", 0, None), Garment("sock-r", "right", 0, None)))  # fmt: skip


def two_legs() -> DayStats:
    s = DayStats(DAY, START, END, True, points=2890, samples=2880, worn_samples=840, wear_s=25_380.0,
                 wear_sum_s=50_400.0, ankle_samples=840, above_range_s=120.0, below_range_s=0.5,
                 reversed_gradient_s=1860.0, below_samples=3, below_max_mmhg=19.75, not_below_min_mmhg=20.01,
                 ankle_median_mmhg=None, battery_min_pct=41.0, worn_devices={"sock-l", "sock-r"},
                 zone_medians={"ankle": 24.5, "calf": 18.25})  # fmt: skip
    s.legs = {"left": LegStats(1440, 420, 25_200.0, 420, 120.0, 0.5, 0.0, 3, 19.75, 20.01, 24.5),
              "right": LegStats(1440, 420, 25_200.0, 420, 0.0, 0.0, 1860.0, 0, None, 21.0, 24.75)}  # fmt: skip
    return s


def parse(lines: list[str]) -> dict[str, dict[str, object]]:
    """Line protocol back to rows by leg (what InfluxDB would answer), enough for these fields."""
    rows: dict[str, dict[str, object]] = {}
    for line in lines:
        key, values, _ = line.rsplit(" ", 2) if line.count(" ") >= 2 and '"' not in line else _split(line)
        leg = key.split("leg=")[1]
        row: dict[str, object] = {}
        for part in _fields(values):
            name, value = part.split("=", 1)
            if value.startswith('"'):
                row[name] = value[1:-1]
            elif value.endswith("i"):
                row[name] = int(value[:-1])
            elif value in ("true", "false"):
                row[name] = value == "true"
            else:
                row[name] = float(value)
        rows[leg] = row
    return rows


def _split(line: str) -> tuple[str, str, str]:
    key, rest = line.split(" ", 1)
    values, time = rest.rsplit(" ", 1)
    return key, values, time


def _fields(values: str) -> list[str]:
    out, current, quoted = [], "", False
    for ch in values:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(current)
            current = ""
        else:
            current += ch
    return [*out, current]


def test_a_summary_reads_back_as_the_day_it_was_made_from() -> None:
    s = two_legs()
    rows = parse(summaries.lines_for(CTX, s, 1_773_040_000_000))
    assert set(rows) == {"all", "left", "right"}
    stored = summaries.from_rows(DAY, START, END, END + 1, rows["all"], rows)
    assert stored.stats == s
    assert stored.summarised_ms == 1_773_040_000_000 and stored.format == summaries.FORMAT
    assert stored.basis == basis(CTX, DAY, START, END) == "20-30|sock-l:left,sock-r:right"


def test_staleness_follows_receipts_band_and_legs() -> None:
    day = (DAY, START, END)
    made = Stored(two_legs(), 1_773_040_000_000, basis(CTX, DAY, START, END), summaries.FORMAT)
    now = END + 3_600_000
    assert staleness(CTX, day, None, None, now, 0, None) == FRESH  # no readings, no summary: an empty day
    assert staleness(CTX, day, None, START + 5, now, 0, None) == STALE
    assert staleness(CTX, day, made, made.summarised_ms - summaries.MARGIN_MS - 1, now, 0, None) == FRESH
    assert staleness(CTX, day, made, made.summarised_ms - 1000, now, 0, None) == STALE  # within the margin
    other_band = replace(CTX, rx=SockRx(15.0, 21.0, 8.0, 7, ("ankle",)))  # a prescription changed in the registry
    assert staleness(other_band, day, made, None, now, 0, None) == STALE
    one_leg = replace(CTX, garments=CTX.garments[:1])  # an assignment changed
    assert staleness(one_leg, day, made, None, now, 0, None) == STALE
    assert staleness(CTX, day, made, made.summarised_ms + 1, now, 0, horizon_ms=END) == FRESH  # past retention
    today = (DAY, START, now + 3_600_000)
    young = Stored(made.stats, now - 60_000, made.basis, summaries.FORMAT)
    assert staleness(CTX, today, young, now - 1000, now, 900_000, None) == DEFERRED
    assert staleness(CTX, today, young, now - 1000, now, 30_000, None) == STALE


def test_the_rebuild_limit_takes_finished_days_first_and_leaves_the_rest_pending() -> None:
    old, new = date(2026, 3, 1), date(2026, 3, 9)
    out = {"A": {new: DayStats(new, 0, 1, False)},
           "B": {old: DayStats(old, 0, 1, True), new: DayStats(new, 0, 1, False)},
           "C": {old: DayStats(old, 0, 1, True), new: DayStats(new, 0, 1, False)}}  # fmt: skip
    report = Report()
    chosen = summaries._within({"A": new, "B": old, "C": old}, out, 1, report)
    assert chosen == {"B": old}
    assert report.deferred == {"A": new, "C": old}
    assert out["C"][old].pending and not out["B"][old].pending
    assert day_flags(CTX, out["C"][old]) is None and judged_flags(CTX, out["C"][old]) == frozenset()
