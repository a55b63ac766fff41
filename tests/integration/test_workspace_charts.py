"""The patient page's charts show the monitor's figures for the same patient-days, and the simulators' truth.

Each chart mark carries its numbers (``data-day``, ``data-wear-h``, ``data-median``, ...). For every patient of
the simulated clinic (``tests/integration/clinic.py``) they are compared with the monitor's own day statistics
from its evaluation (wear, reversed gradient), and with the ground truth computed from the very readings the
simulators sent (wear, ankle median and range, calf above ankle, boot session lengths and peaks).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import pytest

from simulators.groundtruth import DaySlice, slice_days, store
from tests.integration.clinic import Clinic, signed_in

pytestmark = pytest.mark.integration

MARK = re.compile(r"<(?:rect|circle)\b([^>]*\bdata-day=\"[^\"]+\"[^>]*)>")
ATTR = re.compile(r'data-([a-z-]+)="([^"]*)"')


def marks(page: str, chart: str) -> list[dict[str, str]]:
    """The data attributes of each mark in the wide drawing of ``chart``."""
    found = re.search(rf'<svg class="chart-svg chart-wide"[^>]*data-chart="{chart}">(.*?)</svg>', page, re.S)
    if found is None:
        return []
    return [dict(ATTR.findall(m)) for m in MARK.findall(found.group(1))]


def slices(clinic: Clinic, code: str) -> dict[str, DaySlice]:
    """The stored readings of each day, as the ground truth sees them."""
    device = next(d for d in clinic.fleet.devices if d.patient == code)
    _, items = clinic.fleet.plan(device)
    stored = store(list(items), device.scenario.kind, "backfill", clinic.fleet.period)
    return {d.day.isoformat(): d for d in slice_days(stored, clinic.fleet.period)}


def close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance


def check_sock(page: str, monitor: dict[str, Any], truth: dict[str, Any], day_slices: dict[str, DaySlice]) -> int:
    checked = 0
    for m in marks(page, "wear"):
        day = m["day"]
        assert close(float(m["wear-h"]), monitor[day].wear_s / 3600, 1e-3), (day, m)
        if day in truth:
            assert close(float(m["wear-h"]), truth[day]["wear_s"] / 3600, 1 / 60), (day, m, truth[day]["wear_s"])
        checked += 1
    for m in marks(page, "ankle"):
        day = m["day"]
        if day not in truth or truth[day]["ankle_median_mmhg"] is None:
            continue
        ankles = day_slices[day].worn_ankles()
        assert close(float(m["median"]), truth[day]["ankle_median_mmhg"], 0.002), (day, m)
        assert close(float(m["min"]), min(ankles), 1e-6) and close(float(m["max"]), max(ankles), 1e-6), (day, m)
        checked += 1
    for m in marks(page, "gradient"):
        day = m["day"]
        assert close(float(m["reversed-min"]), monitor[day].reversed_gradient_s / 60, 1e-3), (day, m)
        if day in truth:
            assert close(float(m["reversed-min"]), truth[day]["reversed_gradient_s"] / 60, 0.01), (day, m)
        checked += 1
    return checked


def check_boot(page: str, truth: dict[str, Any]) -> int:
    lengths: dict[str, list[float]] = defaultdict(list)
    for m in marks(page, "sessions"):
        lengths[m["day"]].append(round(float(m["length-min"]) * 60))
    peaks: dict[str, float] = defaultdict(float)
    for m in marks(page, "peaks"):
        peaks[m["day"]] = max(peaks[m["day"]], float(m["peak"]))
    checked = 0
    for day, t in truth.items():
        if day not in lengths and not t["sessions"]:
            continue
        assert sorted(lengths[day]) == sorted(s["duration_s"] for s in t["sessions"]), (day, lengths[day], t)
        if t["peak_mmhg"] is not None:
            assert close(peaks[day], t["peak_mmhg"], 1e-6), (day, peaks[day], t["peak_mmhg"])
        checked += 1
    return checked


def test_every_chart_shows_the_monitors_figures_and_the_truth(clinic: Clinic) -> None:
    client = signed_in(clinic.url)
    checked: dict[str, int] = {}
    try:
        for patient in clinic.truth["patients"]:
            code = patient["patient"]
            page = client.get(f"/ui/workspace/patients/{code}?days={len(patient['days'])}")  # the whole period
            assert page.status_code == 200
            truth = {d["date"]: d for d in patient["days"]}
            monitor = {r.stats.day.isoformat(): r.stats for r in clinic.monitor._results[code]}
            if patient["kind"] == "sock":
                checked[code] = check_sock(page.text, monitor, truth, slices(clinic, code))
            else:
                checked[code] = check_boot(page.text, truth)
    finally:
        client.close()
    assert all(n > 0 for n in checked.values()), checked
