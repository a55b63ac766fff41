"""Signal models: class bands, gradient, on-body detection, routine across DST, boot cycles, battery."""

from __future__ import annotations

import random
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest

from devices.protocol import Zone
from simulators.physiology import (
    BOOT_GRADIENT,
    CLASSES,
    HOUR_MS,
    Battery,
    LegState,
    boot_chamber,
    boot_sample,
    fit_in_class,
    local_midnight_ms,
    local_wall_ms,
    plan_wear_day,
    sock_sample,
)

EDMONTON = ZoneInfo("America/Edmonton")
THIGH_HIGH: tuple[Zone, ...] = ("ankle", "calf", "thigh")


def worn_state(rng: random.Random, age_days: float) -> LegState:
    return LegState(True, 600.0, 22.0, age_days, walking=rng.random() < 0.5)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_well_fitting_garment_stays_in_its_class_while_worn(name: str) -> None:
    band = CLASSES[name]
    for seed in range(5):
        rng = random.Random(seed)
        fit = fit_in_class(rng, band)
        for i in range(2000):
            sample = sock_sample(rng, i, fit, THIGH_HIGH, worn_state(rng, age_days=i % 15))
            assert sample.worn
            assert band.low_mmhg <= sample.pressure_mmhg["ankle"] <= band.high_mmhg


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_pressure_is_graduated_ankle_calf_thigh(name: str) -> None:
    rng = random.Random(7)
    fit = fit_in_class(rng, CLASSES[name])
    for i in range(2000):
        p = sock_sample(rng, i, fit, THIGH_HIGH, worn_state(rng, 3.0)).pressure_mmhg
        assert p["ankle"] > p["calf"] > p["thigh"]
        assert 0.65 <= p["calf"] / p["ankle"] <= 0.85
        assert 0.35 <= p["thigh"] / p["ankle"] <= 0.55


def test_walking_swings_pressure_by_a_few_mmhg() -> None:
    rng = random.Random(3)
    fit = fit_in_class(rng, CLASSES["RAL2"])
    walking = [sock_sample(rng, i, fit, THIGH_HIGH, LegState(True, 600, 22, 0, True)) for i in range(500)]
    ankles = [s.pressure_mmhg["ankle"] for s in walking]
    assert 2.0 < max(ankles) - min(ankles) < 6.0


def test_a_rolled_down_top_puts_calf_above_ankle() -> None:
    rng = random.Random(3)
    fit = fit_in_class(rng, CLASSES["RAL2"])
    for i in range(500):
        p = sock_sample(rng, i, fit, THIGH_HIGH, LegState(True, 600, 22, 0, False, True)).pressure_mmhg
        assert p["calf"] - p["ankle"] > 3.0


def test_the_garment_loses_pressure_as_it_ages() -> None:
    fit = fit_in_class(random.Random(1), CLASSES["RAL2"])
    assert fit.ankle_nominal(30) < fit.ankle_nominal(0)
    worn = fit_in_class(random.Random(1), CLASSES["RAL2"])
    assert worn.ankle_nominal(0) - worn.ankle_nominal(14) < 0.5


def test_off_the_leg_the_sensor_reads_room_temperature_and_no_pressure() -> None:
    rng = random.Random(2)
    fit = fit_in_class(rng, CLASSES["RAL2"])
    sample = sock_sample(rng, 0, fit, THIGH_HIGH, LegState(False, 1800.0, 21.5, 0))
    assert not sample.worn
    assert sample.skin_temp_c is not None and 20.0 <= sample.skin_temp_c <= 25.0
    assert all(v < 0.5 for v in sample.pressure_mmhg.values())


def test_on_body_detection_follows_skin_warming_after_donning() -> None:
    rng = random.Random(2)
    fit = fit_in_class(rng, CLASSES["RAL2"])
    temps = [sock_sample(rng, 0, fit, THIGH_HIGH, LegState(True, s, 22.0, 0)) for s in (0.0, 60.0, 180.0, 600.0)]
    assert [s.worn for s in temps] == [False, False, True, True]
    assert temps[-1].skin_temp_c is not None and 31.0 <= temps[-1].skin_temp_c <= 34.0
    doffed = sock_sample(rng, 0, fit, THIGH_HIGH, LegState(False, 60.0, 22.0, 0))
    assert not doffed.worn  # no contact pressure, however warm the sensor still is


@pytest.mark.parametrize("day", [date(2025, 3, 9), date(2025, 6, 10), date(2025, 11, 2)])
def test_a_wear_day_is_the_prescribed_hours_from_a_morning_don(day: date) -> None:
    rng = random.Random(day.toordinal())
    plan = plan_wear_day(rng, day, EDMONTON, 8.5, gaps=2, rolled_minutes=60)
    on = sum(s.end_ms - s.start_ms for s in plan.on)
    assert on == pytest.approx(8.5 * HOUR_MS, abs=10)
    don = datetime.fromtimestamp(plan.on[0].start_ms / 1000, EDMONTON)
    assert don.date() == day and 6 <= don.hour < 8
    assert len(plan.rolled) == 1
    assert any(plan.rolled[0].start_ms >= s.start_ms and plan.rolled[0].end_ms <= s.end_ms for s in plan.on)


def test_local_times_are_wall_clock_times_across_dst() -> None:
    spring, fall = date(2025, 3, 9), date(2025, 11, 2)
    for day, hours in ((spring, 23), (fall, 25)):
        length = local_midnight_ms(date.fromordinal(day.toordinal() + 1), EDMONTON) - local_midnight_ms(day, EDMONTON)
        assert length == hours * HOUR_MS
        seven = datetime.fromtimestamp(local_wall_ms(day, 7 * 60, EDMONTON) / 1000, EDMONTON)
        assert (seven.hour, seven.minute) == (7, 0)


def test_boot_chambers_inflate_from_the_foot_up_hold_and_release() -> None:
    target = 60.0
    foot_first = [boot_chamber(2.0, i, target) for i in range(5)]
    assert foot_first[0] > 0 and all(v == 0 for v in foot_first[1:])
    holding = [boot_chamber(30.0, i, target) for i in range(5)]
    assert holding == [target * g for g in BOOT_GRADIENT]
    assert all(boot_chamber(55.0, i, target) < 1.0 for i in range(5))


def test_boot_samples_stay_under_target_plus_noise() -> None:
    rng = random.Random(5)
    chambers: tuple[Zone, ...] = ("foot", "ankle", "calf", "knee", "thigh")
    peak = 0.0
    for k in range(900):
        sample = boot_sample(rng, k * 2000, k * 2.0, chambers, 80.0, 32.0)
        assert sample.worn and list(sample.pressure_mmhg) == list(chambers)
        peak = max(peak, *sample.pressure_mmhg.values())
    assert 79.0 <= peak <= 81.0


def test_battery_drains_with_use_and_charges_full() -> None:
    battery = Battery(level=50.0, use_per_h=1.0, idle_per_h=0.1)
    battery.drain(10, in_use=True)
    battery.drain(10, in_use=False)
    assert battery.level == pytest.approx(39.0)
    battery.drain(100, in_use=True)
    assert battery.dead and battery.pct == 0
    battery.charge()
    assert battery.pct == 100
