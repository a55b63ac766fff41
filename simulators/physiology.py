"""Signal models of compression garments on a real leg: pressures, skin temperature, routine, battery.

Pure functions of their inputs and of a caller-owned :class:`random.Random`, so
a seed reproduces every value; nothing here reads the wall clock (times are
epoch milliseconds handed in by the caller).

Socks and stockings are static, graduated garments: the ankle carries the
prescribed class, the calf about 70-80 % of it and the thigh 40-50 %. Walking
moves all zones together by a few mmHg (the calf muscle pump), the garment
loses pressure slowly as its fibres age, and the sensor adds a little noise.
The device decides it is worn from skin temperature and contact pressure.

Pneumatic boots inflate their chambers from the foot upwards to the
session's target, hold, release and rest, in cycles, during sessions of
10-30 minutes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Final, Literal, NamedTuple
from zoneinfo import ZoneInfo

from devices.protocol import Sample, Zone

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000

# The device calls itself worn only when the skin is warm and the garment
# presses on it: temperature alone is fooled by a warm room, pressure alone
# by a sock lying under a bag.
WORN_MIN_SKIN_C: Final = 28.0
WORN_MIN_CONTACT_MMHG: Final = 5.0
# Skin warms the sensor with this time constant after donning, and the
# sensor cools to the room's temperature after doffing.
WARM_UP_TAU_S: Final = 90.0
COOL_DOWN_TAU_S: Final = 120.0

GarmentLength = Literal["knee_high", "thigh_high"]


@dataclass(frozen=True, slots=True)
class PressureClass:
    """A compression class: the ankle pressure band a garment must deliver (mmHg)."""

    name: str
    low_mmhg: float
    high_mmhg: float

    @property
    def width(self) -> float:
        """Width of the band in mmHg."""
        return self.high_mmhg - self.low_mmhg

    @property
    def mid(self) -> float:
        """Middle of the band in mmHg."""
        return (self.low_mmhg + self.high_mmhg) / 2.0


CLASSES: Final[dict[str, PressureClass]] = {
    c.name: c
    for c in (
        PressureClass("RAL1", 18.0, 21.0),
        PressureClass("RAL2", 23.0, 32.0),
        PressureClass("RAL3", 34.0, 46.0),
        PressureClass("US1", 15.0, 20.0),
        PressureClass("US2", 20.0, 30.0),
        PressureClass("US3", 30.0, 40.0),
    )
}


@dataclass(frozen=True, slots=True)
class SockPrescription:
    """What the clinic prescribed for a sock or stocking."""

    compression_class: str
    garment: GarmentLength
    wear_hours_per_day: float
    # Every scenario prescribes daily wear; the field exists so the rule
    # (under-use is judged on every day) is explicit in the ground truth.
    wear_days_per_week: int = 7

    @property
    def pressure_class(self) -> PressureClass:
        """The class's ankle band."""
        return CLASSES[self.compression_class]

    @property
    def zones(self) -> tuple[Zone, ...]:
        """The zones the garment's sensors cover."""
        return ("ankle", "calf", "thigh") if self.garment == "thigh_high" else ("ankle", "calf")


@dataclass(frozen=True, slots=True)
class BootPrescription:
    """What the clinic prescribed for a pneumatic boot."""

    program: str
    target_mmhg: float
    max_mmhg: float
    sessions_per_week: int
    session_min_s: int
    session_max_s: int
    chambers: tuple[Zone, ...]


@dataclass(frozen=True, slots=True)
class SockFit:
    """How one garment sits on one leg: its pressures and how they change."""

    ankle_new_mmhg: float
    age_days_at_start: float
    loss_per_day: float
    calf_ratio: float
    thigh_ratio: float
    walk_amp_mmhg: float
    noise_mmhg: float
    skin_c: float

    def ankle_nominal(self, age_days: float) -> float:
        """Resting ankle pressure after ``age_days`` of the simulation (fibres lose tension)."""
        return self.ankle_new_mmhg * max(0.0, 1.0 - self.loss_per_day * (self.age_days_at_start + age_days))


def fit_in_class(rng: random.Random, pclass: PressureClass, offset_widths: float = 0.0) -> SockFit:
    """A garment delivering its class: nominal ankle near the middle (``offset_widths`` shifts it).

    The walking swing and the noise are scaled to the band's width so that a
    well-fitting garment of any class stays inside its band while worn.
    """
    w = pclass.width
    return SockFit(
        ankle_new_mmhg=pclass.mid + w * (offset_widths + rng.uniform(-0.05, 0.05)),
        age_days_at_start=0.0,
        loss_per_day=0.001,
        calf_ratio=rng.uniform(0.72, 0.78),
        thigh_ratio=rng.uniform(0.42, 0.48),
        walk_amp_mmhg=0.25 * w,
        noise_mmhg=0.05 * w,
        skin_c=rng.uniform(31.5, 33.5),
    )


def _bounded_noise(rng: random.Random, sd: float) -> float:
    # Triangular on [-2 sd, 2 sd]: sensor noise is bounded, and the bound is
    # what lets a compliant garment provably stay in its class. Two C calls
    # instead of gauss(): this runs for every sample of a large backfill.
    return (rng.random() + rng.random() - 1.0) * 2.0 * sd


class LegState(NamedTuple):
    """What the leg and the garment are doing at one sample (a tuple: one is made per sample)."""

    on_body: bool
    since_change_s: float
    ambient_c: float
    age_days: float
    walking: bool = False
    rolled_down: bool = False


def skin_temp(rng: random.Random, fit: SockFit, on_body: bool, since_change_s: float, ambient_c: float) -> float:
    """Sensor temperature: warming towards the skin after donning, cooling to the room after doffing."""
    warming = 1.0 - math.exp(-since_change_s / WARM_UP_TAU_S)
    frac = warming if on_body else math.exp(-since_change_s / COOL_DOWN_TAU_S)
    return round(ambient_c + (fit.skin_c - ambient_c) * frac + _bounded_noise(rng, 0.1), 2)


def sock_pressures(rng: random.Random, fit: SockFit, zones: tuple[Zone, ...], state: LegState) -> dict[Zone, float]:
    """Pressure per zone (``zones`` as in :attr:`SockPrescription.zones`): graduated on the leg, ~0 off it."""
    rand = rng.random
    if not state.on_body:
        return {zone: round(rand() * 0.4, 2) for zone in zones}
    # One swing for every zone: the calf muscle pushes the whole garment, so
    # the gradient holds during walking too. At a sample a minute the gait
    # phase is effectively random.
    swing = fit.walk_amp_mmhg * (1.0 if state.walking else 0.2) * math.sin(rand() * 6.283185307179586)
    signal = fit.ankle_nominal(state.age_days) + swing
    if state.rolled_down:
        # The top band rolled down to the calf: a tourniquet above a loose ankle.
        ankle, calf, thigh = signal * 0.8, signal * 1.05 + 4.0, signal * 0.3
    else:
        ankle, calf, thigh = signal, signal * fit.calf_ratio, signal * fit.thigh_ratio
    # Noise of the bounded kind (see _bounded_noise), inlined: the hot path.
    noise = fit.noise_mmhg
    out: dict[Zone, float] = {
        "ankle": round(max(0.0, ankle + (rand() + rand() - 1.0) * noise), 2),
        "calf": round(max(0.0, calf + (rand() + rand() - 1.0) * noise), 2),
    }
    if len(zones) > 2:
        out["thigh"] = round(max(0.0, thigh + (rand() + rand() - 1.0) * noise), 2)
    return out


def sock_sample(rng: random.Random, t: int, fit: SockFit, zones: tuple[Zone, ...], state: LegState) -> Sample:
    """One sock reading at device time ``t``, with the device's own on-body detection."""
    pressures = sock_pressures(rng, fit, zones, state)
    temp = skin_temp(rng, fit, state.on_body, state.since_change_s, state.ambient_c)
    worn = temp >= WORN_MIN_SKIN_C and pressures["ankle"] >= WORN_MIN_CONTACT_MMHG
    return Sample(t=t, worn=worn, pressure_mmhg=pressures, skin_temp_c=temp)


# --- daily routine --------------------------------------------------------------------------------------------------


def local_midnight_ms(day: date, tz: ZoneInfo) -> int:
    """Epoch ms of local midnight starting ``day`` in ``tz``."""
    return int(datetime.combine(day, time(0), tz).timestamp() * 1000)


def local_wall_ms(day: date, minutes: float, tz: ZoneInfo) -> int:
    """Epoch ms of the wall-clock time ``minutes`` after midnight on ``day`` (DST-correct)."""
    whole = int(minutes)
    wall = datetime.combine(day, time(0), tz) + timedelta(minutes=whole)
    # Aware + timedelta is wall-clock arithmetic; timestamp() applies the
    # offset in force at that wall time, so 07:00 stays 07:00 on DST days.
    return int(wall.timestamp() * 1000) + int((minutes - whole) * MINUTE_MS)


@dataclass(frozen=True, slots=True)
class Interval:
    """A half-open span of epoch ms."""

    start_ms: int
    end_ms: int

    def __contains__(self, t: object) -> bool:
        return isinstance(t, int) and self.start_ms <= t < self.end_ms


@dataclass(frozen=True, slots=True)
class WearDay:
    """One day's routine: when the garment is on the leg, and when it is rolled down."""

    on: tuple[Interval, ...]
    rolled: tuple[Interval, ...]


def plan_wear_day(
    rng: random.Random, day: date, tz: ZoneInfo, wear_hours: float, gaps: int, rolled_minutes: float = 0.0
) -> WearDay:
    """Don in the morning (local time), wear ``wear_hours`` of actual wear, ``gaps`` short breaks, doff.

    The breaks (10-25 min: shower, a rest with the legs up) lengthen the day
    so the time on the leg stays ``wear_hours``. A rolled-down episode of
    ``rolled_minutes`` starts in the afternoon of the first worn span long
    enough to hold it.
    """
    don = local_wall_ms(day, rng.uniform(6.5 * 60, 8.0 * 60), tz)
    wear_ms = int(wear_hours * HOUR_MS)
    breaks = [int(rng.uniform(10, 25) * MINUTE_MS) for _ in range(gaps)]
    cuts = sorted(int(rng.uniform(0.2, 0.8) * wear_ms) for _ in range(gaps))
    spans: list[Interval] = []
    start, done = don, 0
    for cut, pause in zip(cuts, breaks, strict=True):
        spans.append(Interval(start, start + cut - done))
        start, done = start + cut - done + pause, cut
    spans.append(Interval(start, start + wear_ms - done))
    spans = [s for s in spans if s.end_ms > s.start_ms]
    return WearDay(tuple(spans), _rolled(rng, spans, rolled_minutes))


def _rolled(rng: random.Random, spans: list[Interval], minutes: float) -> tuple[Interval, ...]:
    length = int(minutes * MINUTE_MS)
    if length <= 0:
        return ()
    for span in sorted(spans, key=lambda s: s.start_ms - s.end_ms):
        room = span.end_ms - span.start_ms - length - 10 * MINUTE_MS
        if room > 0:
            begin = span.start_ms + 5 * MINUTE_MS + int(rng.uniform(0.3, 1.0) * room)
            return (Interval(begin, begin + length),)
    return ()


# --- boots ----------------------------------------------------------------------------------------------------------

BOOT_CYCLE_S: Final = 60.0
BOOT_STAGGER_S: Final = 4.0
BOOT_HOLD_END_S: Final = 40.0
BOOT_RELEASE_TAU_S: Final = 2.0
# Distal chambers press hardest, like a graduated stocking.
BOOT_GRADIENT: Final = (1.0, 0.95, 0.9, 0.85, 0.8)


def boot_chamber(phase_s: float, index: int, target: float) -> float:
    """Pressure of chamber ``index`` (0 = foot) at ``phase_s`` into the inflate-hold-release cycle."""
    level = target * BOOT_GRADIENT[index]
    begin = index * BOOT_STAGGER_S
    if phase_s < begin:
        return 0.0
    if phase_s < begin + BOOT_STAGGER_S:
        return level * (phase_s - begin) / BOOT_STAGGER_S
    if phase_s < BOOT_HOLD_END_S:
        return level
    return level * math.exp(-(phase_s - BOOT_HOLD_END_S) / BOOT_RELEASE_TAU_S)


def boot_sample(
    rng: random.Random, t: int, since_start_s: float, chambers: tuple[Zone, ...], target: float, skin_c: float
) -> Sample:
    """One boot reading during a session: one value per chamber, 0.5 mmHg noise (clipped)."""
    phase = since_start_s % BOOT_CYCLE_S
    pressures: dict[Zone, float] = {
        zone: round(max(0.0, boot_chamber(phase, i, target) + _bounded_noise(rng, 0.5)), 2)
        for i, zone in enumerate(chambers)
    }
    return Sample(t=t, worn=True, pressure_mmhg=pressures, skin_temp_c=round(skin_c + _bounded_noise(rng, 0.1), 2))


# --- battery --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Battery:
    """A battery that drains per hour of use and idle, and is charged when the patient plugs it in."""

    level: float = 100.0
    use_per_h: float = 0.6
    idle_per_h: float = 0.15

    def drain(self, hours: float, in_use: bool) -> None:
        """Spend ``hours`` of use or idle."""
        self.level = max(0.0, self.level - hours * (self.use_per_h if in_use else self.idle_per_h))

    def charge(self) -> None:
        """A full charge (overnight)."""
        self.level = 100.0

    @property
    def pct(self) -> int:
        """The percentage the device reports (rounded up: a device at 0.4 % still runs)."""
        return min(100, math.ceil(self.level))

    @property
    def dead(self) -> bool:
        """True once nothing is left."""
        return self.level <= 0.0
