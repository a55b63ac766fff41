"""The scenario library: named, seeded patients and garments, their messages and their ground truth.

Typical use (the CLI wires this)::

    fleet = build_fleet(socks=20, boots=5, seed=7, days=14, end=now)
    for message in fleet.messages():        # time-ordered by publish_at_ms
        publish(message.topic, message.payload, retain=message.retain)
    fleet.write_ground_truth("truth.json")  # what the monitor must conclude

Everything is a pure function of (scenario, seed, days, end, time zone): the
same arguments give byte-identical payloads and the same truth.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

from devices.protocol import Channel, Kind, Telemetry, encode, topic_for
from simulators.badfirmware import CATALOGUE, corrupter
from simulators.garments import (
    BootPlan,
    Item,
    Period,
    SockPlan,
    Transport,
    boot_items,
    plan_sessions,
    sock_items,
)
from simulators.groundtruth import (
    FORMAT,
    MODES,
    Mode,
    Stored,
    emails,
    episodes,
    evaluate_days,
    evaluate_legs,
    flags_as_of,
    rules,
    store,
    stored_from,
)
from simulators.physiology import (
    DAY_MS,
    Battery,
    BootPrescription,
    Interval,
    SockPrescription,
    WearDay,
    fit_in_class,
    local_midnight_ms,
    local_wall_ms,
    plan_wear_day,
)
from simulators.publisher import Outgoing

DEFAULT_TZ: Final = "America/Edmonton"
CLOCK_SKEW_MS: Final = 390_000
OFFLINE_MS: Final = 2 * DAY_MS
BAD_EVERY: Final = 97

Plan = SockPlan | BootPlan


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named clinical or transport situation for one patient: one garment, or one per leg (``legs``).

    ``build`` returns the patient's plan, or one plan per entry of ``legs`` (``("left", "right")``: a stocking
    on each leg). ``legs`` ``None``: one garment whose leg is not recorded in the registry.
    """

    name: str
    kind: Kind
    description: str
    build: Callable[[random.Random, Period], Plan | tuple[Plan, ...]]
    legs: tuple[str, ...] | None = None
    # The garment's assignment is recorded only from local midnight of this day of the period (0: before it):
    # what it sent before is stored unassigned until re-attributed.
    assigned_from_day: int = 0


# --- socks ----------------------------------------------------------------------------------------------------------


def _sock_rx(rng: random.Random) -> SockPrescription:
    # Class 2 is what most clinics prescribe; the others keep every band honest.
    cls = rng.choice(("RAL2", "RAL2", "US2", "US2", "RAL1", "RAL3", "US1", "US3"))
    return SockPrescription(cls, rng.choice(("knee_high", "thigh_high")), 8.0)


def _complete_days(period: Period) -> list[date]:
    return [d for d in period.days if period.day_bounds(d).end_ms <= period.end_ms] or list(period.days)


def _wear(
    rng: random.Random, period: Period, hours: Callable[[], float], rolled: Callable[[], float] = lambda: 0.0
) -> tuple[WearDay, ...]:
    return tuple(plan_wear_day(rng, day, period.tz, hours(), rng.randint(0, 2), rolled()) for day in period.days)


def _sock(
    rng: random.Random,
    period: Period,
    *,
    offset_widths: float = 0.0,
    loss_per_day: float | None = None,
    hours: tuple[float, float] = (8.75, 10.5),
    rolled: Callable[[], float] = lambda: 0.0,
    battery: Battery | None = None,
    charge_until_ms: int | None = None,
    transport: Transport | None = None,
) -> SockPlan:
    rx = _sock_rx(rng)
    fit = fit_in_class(rng, rx.pressure_class, offset_widths)
    if loss_per_day is not None:
        fit = type(fit)(**{**_asdict(fit), "loss_per_day": loss_per_day})
    wear = _wear(rng, period, lambda: rng.uniform(*hours), rolled)
    return SockPlan(rx, fit, wear, battery or Battery(level=rng.uniform(60, 100)), charge_until_ms,
                    transport or Transport())  # fmt: skip


def _asdict(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def _compliant(rng: random.Random, period: Period) -> Plan:
    return _sock(rng, period)


def _under_use(rng: random.Random, period: Period) -> Plan:
    return _sock(rng, period, hours=(4.5, 5.5))


def _worn_out(rng: random.Random, period: Period) -> Plan:
    # About 2.5 % of its pressure a day: below the class within a week or two.
    return _sock(rng, period, offset_widths=-0.1, loss_per_day=0.025)


def _too_tight(rng: random.Random, period: Period) -> Plan:
    # A size too small: the whole worn signal sits above the band.
    return _sock(rng, period, offset_widths=0.9)


def _rolled_down(rng: random.Random, period: Period) -> Plan:
    return _sock(rng, period, rolled=lambda: rng.uniform(45, 150) if rng.random() < 0.8 else 0.0)


def _silent(rng: random.Random, period: Period) -> Plan:
    days = _complete_days(period)
    stop = local_midnight_ms(days[max(0, len(days) - 6)], period.tz)
    # An old cell drains in about two days once the patient stops charging it.
    return _sock(rng, period, battery=Battery(level=rng.uniform(80, 100), use_per_h=3.0, idle_per_h=1.5),
                 charge_until_ms=stop)  # fmt: skip


def _rolled_then_silent(rng: random.Random, period: Period) -> Plan:
    # Rolled down every day, then at 14:00 six days before the end the garment stops sending for good.
    days = _complete_days(period)
    stop = local_wall_ms(days[max(0, len(days) - 6)], 14 * 60, period.tz)
    plan = _sock(rng, period, rolled=lambda: rng.uniform(60, 150))
    return replace(plan, stop_ms=stop)


def _stops_sending(rng: random.Random, period: Period) -> Plan:
    # Worn as prescribed, then from local noon five days before the end nothing arrives (holidays, a lost charger).
    days = _complete_days(period)
    return replace(_sock(rng, period), stop_ms=local_wall_ms(days[max(0, len(days) - 5)], 12 * 60, period.tz))


def _rx_lowered(rng: random.Random, period: Period) -> Plan:
    # Worn 4.5-5.5 h of 8 h; a week in, the physio lowers the target to 4 h (the client changes nothing).
    plan = _sock(rng, period, hours=(4.5, 5.5))
    return replace(plan, changes=((7, replace(plan.prescription, wear_hours_per_day=4.0)),))


def _rx_raised(rng: random.Random, period: Period) -> Plan:
    # Worn 8.75-10.5 h of 8 h; on day 9 the physio raises the target to 10 h: under-use from then on only.
    plan = _sock(rng, period)
    return replace(plan, changes=((9, replace(plan.prescription, wear_hours_per_day=10.0)),))


def _shifted(day: WearDay, rng: random.Random) -> WearDay:
    """The other leg's stocking: donned and doffed a minute or three after the first."""
    def move(span: Interval) -> Interval:
        return Interval(span.start_ms + rng.randrange(60_000, 180_000), span.end_ms + rng.randrange(0, 180_000))
    return WearDay(tuple(move(span) for span in day.on), ())


def _bilateral(rng: random.Random, period: Period) -> tuple[Plan, Plan]:
    # A stocking on each leg, both worn 6.5-7.5 h a day (8 h prescribed: under-use, however the legs add up);
    # the right one's top rolls down on most days.
    left = _sock(rng, period, hours=(6.5, 7.5))
    rolled = [rng.uniform(45, 120) if rng.random() < 0.6 else 0.0 for _ in period.days]
    right_days = []
    for day, minutes in zip(left.wear, rolled, strict=True):
        moved = _shifted(day, rng)
        right_days.append(WearDay(moved.on, _rolled_in(rng, moved, minutes)))
    fit = fit_in_class(rng, left.prescription.pressure_class)
    right = SockPlan(left.prescription, fit, tuple(right_days), Battery(level=rng.uniform(60, 100)))
    return left, right


def _rolled_in(rng: random.Random, day: WearDay, minutes: float) -> tuple[Interval, ...]:
    if minutes <= 0:
        return ()
    spans = sorted(day.on, key=lambda s: s.start_ms - s.end_ms)
    for span in spans:
        room = span.end_ms - span.start_ms - int(minutes * 60_000) - 600_000
        if room > 0:
            begin = span.start_ms + 300_000 + int(rng.uniform(0.3, 1.0) * room)
            return (Interval(begin, begin + int(minutes * 60_000)),)
    return ()


def _boot_three_a_week(rng: random.Random, period: Period) -> Plan:
    # Three sessions a week (days 0, 2 and 4 of each week) and no status between them: the protocol asks none.
    plan = _boot(rng, period, on_day=lambda rx, i: i % 7 in (0, 2, 4))
    assert isinstance(plan, BootPlan)
    rx = replace(plan.prescription, sessions_per_week=3)
    return replace(plan, prescription=rx, heartbeat=False)


def _offline_backfill(rng: random.Random, period: Period) -> Plan:
    days = _complete_days(period)
    start = local_wall_ms(days[max(0, len(days) - 4)], 12 * 60, period.tz)
    return _sock(rng, period, transport=Transport(offline=Interval(start, start + OFFLINE_MS)))


def _clock_skew(rng: random.Random, period: Period) -> Plan:
    days = _complete_days(period)
    resync = local_wall_ms(days[max(0, len(days) - 2)], 3 * 60, period.tz)
    return _sock(rng, period, transport=Transport(skew_ms=CLOCK_SKEW_MS, skew_until_ms=resync))


def _bad_firmware(rng: random.Random, period: Period) -> Plan:
    return _sock(rng, period, transport=Transport(corrupt=corrupter(BAD_EVERY, rng.randrange(BAD_EVERY))))


# --- boots ----------------------------------------------------------------------------------------------------------


def _boot_rx(rng: random.Random) -> BootPrescription:
    target = float(rng.choice((40, 50, 60, 70, 80)))
    chambers = rng.choice((("foot", "ankle", "calf", "thigh"), ("foot", "ankle", "calf", "knee", "thigh")))
    return BootPrescription(program=rng.choice(("recovery", "lymphedema")), target_mmhg=target,
                            max_mmhg=min(110.0, target + 10.0), sessions_per_week=7, session_min_s=1200,
                            session_max_s=1800, chambers=chambers)  # type: ignore[arg-type]  # fmt: skip


def _boot(
    rng: random.Random,
    period: Period,
    on_day: Callable[[BootPrescription, int], bool] = lambda rx, i: True,
    length_s: Callable[[BootPrescription, int], int] = lambda rx, i: 0,
    pressure: Callable[[BootPrescription, int], float] = lambda rx, i: rx.target_mmhg,
) -> Plan:
    rx = _boot_rx(rng)
    sessions = plan_sessions(rng, period, rx, lambda i: on_day(rx, i), lambda i: length_s(rx, i),
                             lambda i: pressure(rx, i))  # fmt: skip
    return BootPlan(rx, sessions, rng.uniform(31.0, 33.0))


def _boot_compliant(rng: random.Random, period: Period) -> Plan:
    return _boot(rng, period)


def _boot_overpressure(rng: random.Random, period: Period) -> Plan:
    def pressure(rx: BootPrescription, i: int) -> float:
        # A leaking pressure sensor makes the pump overshoot well past the maximum.
        return rx.max_mmhg + rng.uniform(8, 20) if i == 1 or rng.random() < 0.35 else rx.target_mmhg

    return _boot(rng, period, pressure=pressure)


def _boot_short(rng: random.Random, period: Period) -> Plan:
    def length(rx: BootPrescription, i: int) -> int:
        return rng.randrange(240, 660, 2) if i == 0 or rng.random() < 0.7 else 0

    return _boot(rng, period, length_s=length)


def _boot_missed(rng: random.Random, period: Period) -> Plan:
    return _boot(rng, period, on_day=lambda rx, i: i != 1 and rng.random() < 0.45)


SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario("compliant", "sock", "sock worn 8.75-10.5 h a day at its class's pressure (8 h prescribed)",
                 _compliant),
        Scenario("under_use", "sock", "sock worn 4.5-5.5 h a day of 8 h prescribed", _under_use),
        Scenario("worn_out", "sock", "ankle pressure loses 2.5 %/day and drifts below the class", _worn_out),
        Scenario("too_tight", "sock", "a size too small: ankle pressure above the class all day", _too_tight),
        Scenario("rolled_down", "sock", "most days the top rolls down for 45-150 min: calf above ankle",
                 _rolled_down),
        Scenario("silent", "sock", "patient stops charging ~6 days before the end; the battery dies, then nothing",
                 _silent),
        Scenario("offline_backfill", "sock", "compliant, offline 2 days from noon 4 days before the end, "
                 "then uploads the backlog late", _offline_backfill),
        Scenario("clock_skew", "sock", "compliant, device clock 6.5 min fast until 03:00 the day before the "
                 "last day", _clock_skew),
        Scenario("bad_firmware", "sock", f"compliant, every {BAD_EVERY}th batch malformed or out of range "
                 f"({len(CATALOGUE)} kinds of bug)", _bad_firmware),
        Scenario("boot_compliant", "boot", "one 20-30 min session a day at the prescribed target", _boot_compliant),
        Scenario("boot_overpressure", "boot", "daily sessions; on about a third of days the pump overshoots "
                 "the maximum by 8-20 mmHg", _boot_overpressure),
        Scenario("boot_short_sessions", "boot", "daily sessions, most stopped after 4-11 min (20 min minimum)",
                 _boot_short),
        Scenario("boot_missed_sessions", "boot", "sessions on under half of the days (7 a week prescribed)",
                 _boot_missed),
    )
}  # fmt: skip
# Situations the first library did not cover (issue 11); graded by tests/integration/test_clinical_graded.py.
CLINICAL_SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario("rolled_then_silent", "sock", "rolled down every day, then nothing from 14:00 six days before "
                 "the end (a problem followed by silence)", _rolled_then_silent),
        Scenario("stops_sending", "sock", "worn as prescribed, then nothing from noon five days before the end",
                 _stops_sending),
        Scenario("rx_lowered", "sock", "worn 4.5-5.5 h of 8 h; from day 7 the prescription asks 4 h (a new "
                 "version): the under-use episode ends by the change, not by the client", _rx_lowered),
        Scenario("rx_raised", "sock", "worn 8.75-10.5 h of 8 h; from day 9 the prescription asks 10 h: "
                 "under-use only on days judged against the new version", _rx_raised),
        Scenario("registered_late", "sock", "worn as prescribed from the first day, but its assignment was "
                 "recorded from day 4: the first days' readings are unassigned until re-attributed", _compliant,
                 assigned_from_day=4),
        Scenario("boot_three_a_week", "boot", "three sessions a week and no status message between them: the "
                 "days between are rest days, not silence", _boot_three_a_week),
        Scenario("bilateral", "sock", "a stocking on each leg, both worn 6.5-7.5 h a day of 8 h (wear is their "
                 "union, not the sum); the right one rolls down on most days", _bilateral, ("left", "right")),
    )
}  # fmt: skip
ALL_SCENARIOS: Final[dict[str, Scenario]] = {**SCENARIOS, **CLINICAL_SCENARIOS}

DEFAULT_MIX: Final[dict[str, float]] = {
    "compliant": 4, "under_use": 1, "worn_out": 1, "too_tight": 1, "rolled_down": 1, "silent": 1,
    "offline_backfill": 1, "clock_skew": 1, "bad_firmware": 1,
    "boot_compliant": 3, "boot_overpressure": 1, "boot_short_sessions": 1, "boot_missed_sessions": 1,
}  # fmt: skip


# --- messages -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimMessage:
    """One message to publish, with when a live device would send it.

    ``first_t_ms``/``last_t_ms`` span the samples' timestamps as the device
    stamped them (``None`` for events and status). ``expected_reason`` is
    the reason the ingester rejects the whole message with, if it does.
    """

    device_id: str
    patient: str
    scenario: str
    channel: Channel
    topic: str
    payload: bytes
    samples: int
    first_t_ms: int | None
    last_t_ms: int | None
    publish_at_ms: int
    retain: bool
    expected_reason: str | None

    def outgoing(self) -> Outgoing:
        """The message in the load publisher's form."""
        return Outgoing(self.topic, self.payload, self.samples)


def period_for(end: datetime | int, days: int, tz: str = DEFAULT_TZ) -> Period:
    """The local days of ``tz`` covering the ``days`` full days before ``end``'s day, and that day up to ``end``.

    ``end`` is an aware datetime or epoch ms. When ``end`` is a local
    midnight the period holds exactly ``days`` complete days.
    """
    if days < 1 or days > 28:
        raise ValueError("days must be 1..28 (the ingester keeps samples up to 30 days old)")
    zone = ZoneInfo(tz)
    end_ms = _epoch_ms(end)
    end_day = datetime.fromtimestamp(end_ms / 1000, zone).date()
    first = end_day - timedelta(days=days)
    count = days + (1 if local_midnight_ms(end_day, zone) < end_ms else 0)
    span = tuple(first + timedelta(days=i) for i in range(count))
    return Period(zone, span, local_midnight_ms(first, zone), end_ms)


def _epoch_ms(end: datetime | int) -> int:
    if isinstance(end, int):
        return end
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    return int(end.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Device:
    """One garment of the fleet and the patient wearing it (``garment``: which of the patient's, on ``leg``)."""

    device_id: str
    patient: str
    scenario: Scenario
    seed: str
    rank: int
    leg: str | None = None
    garment: int = 0


class Fleet:
    """Devices over one period: their messages (time-ordered) and their ground truth."""

    def __init__(self, devices: tuple[Device, ...], period: Period, seed: int) -> None:
        self.devices = devices
        self.period = period
        self.seed = seed

    def plan(self, device: Device) -> tuple[Plan, Iterator[Item]]:
        """The device's plan and its items, regenerated from its seed (nothing is kept in memory)."""
        rng = random.Random(device.seed)
        built = device.scenario.build(rng, self.period)
        plan = built[device.garment] if isinstance(built, tuple) else built
        if device.garment:  # the patient's other garments: their own random stream after the shared plan
            rng = random.Random(f"{device.seed}/garment{device.garment}")
        if isinstance(plan, SockPlan):
            return plan, sock_items(device.device_id, plan, self.period, rng)
        return plan, boot_items(device.device_id, plan, self.period, rng)

    def device_messages(self, device: Device) -> Iterator[SimMessage]:
        """One device's messages in sending order."""
        _, items = self.plan(device)
        for item in items:
            yield _to_message(device, item)

    def messages(self) -> Iterator[SimMessage]:
        """Every device's messages, ordered by ``publish_at_ms`` (ties: device order, then sending order)."""
        streams = [self._keyed(d) for d in self.devices]
        for _, _, _, message in heapq.merge(*streams):
            yield message

    def _keyed(self, device: Device) -> Iterator[tuple[int, int, int, SimMessage]]:
        for serial, message in enumerate(self.device_messages(device)):
            yield message.publish_at_ms, device.rank, serial, message

    def ground_truth(self, mode: Mode = "backfill") -> dict[str, Any]:
        """What the platform must conclude, per patient and day (see ``docs/ground-truth.md``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        return {
            "format": FORMAT,
            "mode": mode,
            "seed": self.seed,
            "timezone": self.period.tz.key,
            "start_ms": self.period.start_ms,
            "end_ms": self.period.end_ms,
            "days": [d.isoformat() for d in self.period.days],
            "rules": rules(),
            "patients": [self._patient_truth(group, mode) for group in self.patients()],
        }

    def patients(self) -> list[tuple[Device, ...]]:
        """Each patient's garments, in fleet order."""
        groups: dict[str, list[Device]] = {}
        for device in self.devices:
            groups.setdefault(device.patient, []).append(device)
        return [tuple(group) for group in groups.values()]

    def write_ground_truth(self, path: str | Path, mode: Mode = "backfill") -> None:
        """Write :meth:`ground_truth` as indented JSON."""
        Path(path).write_text(json.dumps(self.ground_truth(mode), indent=1) + "\n")

    def _patient_truth(self, devices: tuple[Device, ...], mode: Mode) -> dict[str, Any]:
        device = devices[0]
        plan, items_iter = self.plan(device)
        items = list(items_iter)
        stored = store(items, device.scenario.kind, mode, self.period)
        if len(devices) > 1:
            assert isinstance(plan, SockPlan)
            legs = [(device.leg or "", stored)]
            legs += [(d.leg or "", store(list(self.plan(d)[1]), d.scenario.kind, mode, self.period))
                     for d in devices[1:]]  # fmt: skip
            days = evaluate_legs(legs, self.period, plan.prescription, plan.changes)
        else:
            days = evaluate_days(stored, self.period, plan.prescription, plan.changes)
        return {
            "patient": device.patient,
            "device_id": device.device_id,
            "devices": [{"device_id": d.device_id, "leg": d.leg} for d in devices],
            "kind": device.scenario.kind,
            "scenario": device.scenario.name,
            "timezone": self.period.tz.key,
            "prescription": _prescription(plan),
            "prescriptions": [{"from": self.period.days[first].isoformat(), **_prescription_of(rx)}
                              for first, rx in ((0, plan.prescription), *plan.changes)],
            "days": days,
            "episodes": (found := episodes(days)),
            "emails": emails(found),
            "rejections": dict(sorted(stored.rejections.items())),
            "transport": self._transport(device, plan, items, stored),
        }

    def _transport(self, device: Device, plan: Plan, items: list[Item], stored: Stored) -> dict[str, Any]:
        out: dict[str, Any] = {
            "messages": len(items),
            "samples_sent": sum(len(i.message.samples) for i in items if isinstance(i.message, Telemetry)),
            "samples_stored": len(stored.samples),
            "last_sample_ms": stored.times[-1] if stored.times else None,
        }
        if not isinstance(plan, SockPlan):
            return out
        transport = plan.transport
        if transport.offline is not None:
            offline = transport.offline
            out["offline"] = {"from_ms": offline.start_ms, "until_ms": offline.end_ms, "upload_at_ms": offline.end_ms,
                              "late_messages": sum(1 for i in items if i.publish_at_ms >= offline.end_ms
                                                   and _made_at(i) < offline.end_ms),
                              "flags_before_upload": flags_as_of(items, "sock", self.period, plan.prescription,
                                                                 offline.end_ms, plan.changes)}  # fmt: skip
        if transport.skew_ms:
            out["clock_skew"] = {"skew_ms": transport.skew_ms, "skewed_until_ms": transport.skew_until_ms}
        if stored.bad_payloads:
            out["bad_payloads"] = stored.bad_payloads
        late = device.scenario.assigned_from_day
        if late:
            start = self.period.day_bounds(self.period.days[late]).start_ms
            before = evaluate_days(stored_from(stored, start), self.period, plan.prescription, plan.changes)
            out["assigned_late"] = {"assigned_from_ms": start, "flags_before_reattribution": {
                d["date"]: d["flags"] for d in before if d["complete"]}}  # fmt: skip
        return out


def _made_at(item: Item) -> int:
    message = item.message
    if isinstance(message, Telemetry):
        return max(s.t for s in message.samples)
    return message.t or 0


def _prescription(plan: Plan) -> dict[str, Any]:
    return _prescription_of(plan.prescription)


def _prescription_of(rx: SockPrescription | BootPrescription) -> dict[str, Any]:
    if isinstance(rx, SockPrescription):
        band = rx.pressure_class
        return {"garment_kind": "sock", "garment": rx.garment, "class": rx.compression_class,
                "range_mmhg": [band.low_mmhg, band.high_mmhg], "wear_hours_per_day": rx.wear_hours_per_day,
                "wear_days_per_week": rx.wear_days_per_week, "zones": list(rx.zones)}  # fmt: skip
    return {"garment_kind": "boot", "program": rx.program, "target_mmhg": rx.target_mmhg, "max_mmhg": rx.max_mmhg,
            "sessions_per_week": rx.sessions_per_week, "session_min_s": rx.session_min_s,
            "session_max_s": rx.session_max_s, "chambers": list(rx.chambers)}  # fmt: skip


def _to_message(device: Device, item: Item) -> SimMessage:
    message = item.message
    payload = item.raw if item.raw is not None else encode(message)
    times = [s.t for s in message.samples] if isinstance(message, Telemetry) else []
    return SimMessage(device_id=device.device_id, patient=device.patient, scenario=device.scenario.name,
                      channel=item.channel, topic=topic_for(device.device_id, item.channel), payload=payload,
                      samples=len(times), first_t_ms=min(times, default=None), last_t_ms=max(times, default=None),
                      publish_at_ms=item.publish_at_ms, retain=item.retain,
                      expected_reason=item.whole_reason)  # fmt: skip


# --- fleets ---------------------------------------------------------------------------------------------------------


def allocate(count: int, weights: Mapping[str, float]) -> list[str]:
    """``count`` scenario names in proportion to ``weights`` (largest remainder, deterministic)."""
    total = sum(weights.values())
    if count == 0 or total <= 0:
        return []
    exact = {name: count * w / total for name, w in weights.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(weights, key=lambda n: (-(exact[n] - counts[n]), n))
    for name in by_remainder[: count - sum(counts.values())]:
        counts[name] += 1
    return [name for name in weights for _ in range(counts[name])]


def build_fleet(
    socks: int = 10,
    boots: int = 4,
    mix: Mapping[str, float] | None = None,
    seed: int = 1,
    days: int = 14,
    end: datetime | int | None = None,
    tz: str = DEFAULT_TZ,
    scenarios: list[str] | None = None,
) -> Fleet:
    """A fleet of ``socks`` socks and ``boots`` boots with scenarios drawn by ``mix`` weights.

    ``scenarios`` instead names each device's scenario in order (its kind
    decides sock or boot). ``end`` is required (never the wall clock here):
    pass ``datetime.now(UTC)`` from the caller for a backfill that ends now.
    """
    if end is None:
        raise ValueError("end is required: the scenarios never read the clock")
    weights = dict(mix if mix is not None else DEFAULT_MIX)
    unknown = (set(weights) | set(scenarios or ())) - set(ALL_SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios: {sorted(unknown)}")
    rng = random.Random(f"fleet/{seed}")
    if scenarios is None:
        sock_names = allocate(socks, {n: w for n, w in weights.items() if ALL_SCENARIOS[n].kind == "sock"})
        boot_names = allocate(boots, {n: w for n, w in weights.items() if ALL_SCENARIOS[n].kind == "boot"})
        if len(sock_names) < socks or len(boot_names) < boots:
            raise ValueError("the mix has no scenario for one of the requested kinds")
        rng.shuffle(sock_names)
        rng.shuffle(boot_names)
        scenarios = sock_names + boot_names
    return Fleet(_devices(scenarios, rng, seed), period_for(end, days, tz), seed)


def _devices(names: list[str], rng: random.Random, seed: int) -> tuple[Device, ...]:
    numbers = {"sock": 0, "boot": 0}
    codes: set[str] = set()
    devices: list[Device] = []
    for name in names:
        scenario = ALL_SCENARIOS[name]
        code = _patient_code(rng, codes)
        seed_of: str | None = None
        for garment, leg in enumerate(scenario.legs or (None,)):
            numbers[scenario.kind] += 1
            device_id = f"{scenario.kind}-{numbers[scenario.kind]:04d}"
            seed_of = seed_of or f"{seed}/{device_id}/{name}"  # one plan for all the patient's garments
            devices.append(Device(device_id, code, scenario, seed_of, len(devices), leg, garment))
    return tuple(devices)


def _patient_code(rng: random.Random, taken: set[str]) -> str:
    # Pseudonymous by construction: random, never derived from a name.
    while True:
        code = f"PT-{rng.getrandbits(24):06X}"
        if code not in taken:
            taken.add(code)
            return code


def every_scenario(seed: int = 1, days: int = 14, end: datetime | int | None = None, tz: str = DEFAULT_TZ) -> Fleet:
    """One device per scenario, in library order."""
    return build_fleet(seed=seed, days=days, end=end, tz=tz, scenarios=list(SCENARIOS))


def small_clinic(seed: int = 1, days: int = 14, end: datetime | int | None = None, tz: str = DEFAULT_TZ) -> Fleet:
    """Twelve patients of whom seven stop sending five days before the end (holidays, a lost charger): with the
    pipeline working, each of the seven is a silence to report, however many they are."""
    return build_fleet(seed=seed, days=days, end=end, tz=tz, scenarios=["compliant"] * 5 + ["stops_sending"] * 7)


def build_scenario(
    name: str, seed: int = 1, days: int = 14, end: datetime | int | None = None, tz: str = DEFAULT_TZ
) -> Fleet:
    """A fleet of one device running scenario ``name``."""
    return build_fleet(seed=seed, days=days, end=end, tz=tz, scenarios=[name])


def list_scenarios() -> list[tuple[str, str, str]]:
    """(name, kind, one-line description) of every scenario, for ``--list-scenarios``."""
    return [(s.name, s.kind, s.description) for s in ALL_SCENARIOS.values()]
