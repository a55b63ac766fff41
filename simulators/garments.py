"""One simulated garment over a period: the messages it sends, in the order it sends them.

A device is a walk forward in time. Socks sample once a minute around the
clock (worn or not) and send a batch of :data:`SOCK_BATCH` samples; boots
sample every :data:`BOOT_PERIOD_MS` during a session and send a batch a
minute. Each item keeps the wire model it was encoded from, so the ground
truth is computed from exactly what was sent, and ``publish_at_ms`` says when
a live device would send it (store-and-forward delays it, a clock skew does
not: the skew is in the timestamps, not in the sending).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from devices.protocol import Channel, Event, Kind, Sample, Status, Telemetry
from simulators.physiology import (
    MINUTE_MS,
    Battery,
    BootPrescription,
    Interval,
    LegState,
    SockFit,
    SockPrescription,
    WearDay,
    boot_sample,
    local_midnight_ms,
    local_wall_ms,
    sock_sample,
)

SOCK_PERIOD_MS: Final = 60_000
SOCK_BATCH: Final = 5
BOOT_PERIOD_MS: Final = 2_000
BOOT_BATCH: Final = 30
STATUS_EVERY_MS: Final = 4 * 3_600_000
# A live device sends a batch this long after its last sample.
SEND_DELAY_MS: Final = 1_000
FIRMWARE: Final = "1.4.2"


@dataclass(slots=True)
class Item:
    """One message a device sends, with what it was made from.

    ``raw`` replaces the encoded ``message`` for a corrupted payload;
    ``whole_reason`` is then the reason the ingester rejects it whole, or
    ``kept`` the samples that survive validation (before the time window)
    and ``sample_reasons`` the (index, reason) of each rejected one.
    """

    publish_at_ms: int
    channel: Channel
    message: Telemetry | Event | Status
    raw: bytes | None = None
    whole_reason: str | None = None
    kept: list[Sample] | None = None
    sample_reasons: tuple[tuple[int, str], ...] = ()
    label: str = ""

    @property
    def retain(self) -> bool:
        """Status is retained (the protocol's table)."""
        return self.channel == "status"


@dataclass(frozen=True, slots=True)
class Period:
    """The simulated span: local days ``days`` of ``tz``, data from ``start_ms`` up to ``end_ms``."""

    tz: ZoneInfo
    days: tuple[date, ...]
    start_ms: int
    end_ms: int

    def day_bounds(self, day: date) -> Interval:
        """The local day's span in epoch ms (23 or 25 hours on daylight-saving days)."""
        return Interval(local_midnight_ms(day, self.tz), local_midnight_ms(day + timedelta(days=1), self.tz))


@dataclass(frozen=True, slots=True)
class Transport:
    """What happens between the garment and the platform."""

    offline: Interval | None = None
    skew_ms: int = 0
    skew_until_ms: int = 0
    corrupt: Callable[[Telemetry, int], Item | None] | None = None


@dataclass(frozen=True, slots=True)
class SockPlan:
    """A sock's patient and garment over the period."""

    prescription: SockPrescription
    fit: SockFit
    wear: tuple[WearDay, ...]
    battery: Battery
    charge_until_ms: int | None = None
    transport: Transport = field(default_factory=Transport)
    stop_ms: int | None = None  # the garment sends nothing from then on (lost charger, taken off for good)
    # The physio's changes: from day index i of the period on, this prescription (a new version) applies.
    changes: tuple[tuple[int, SockPrescription], ...] = ()


@dataclass(frozen=True, slots=True)
class Session:
    """One planned boot session."""

    start_ms: int
    planned_s: int
    duration_s: int
    target_mmhg: float
    actual_mmhg: float

    @property
    def reason(self) -> str:
        """``completed`` when it ran as planned, else ``stopped``."""
        return "completed" if self.duration_s >= self.planned_s else "stopped"


@dataclass(frozen=True, slots=True)
class BootPlan:
    """A boot's prescription and its sessions over the period."""

    prescription: BootPrescription
    sessions: tuple[Session, ...]
    skin_c: float
    changes: tuple[tuple[int, BootPrescription], ...] = ()
    heartbeat: bool = True  # a status every 4 hours; False: the boot speaks only during sessions


class _Sender:
    """Turns device-time messages into items, applying skew and store-and-forward."""

    def __init__(self, device_id: str, kind: Kind, transport: Transport, rng: random.Random) -> None:
        self.device_id = device_id
        self.kind = kind
        self.transport = transport
        self.rng = rng
        self.seq = 0
        self.last_pub = 0
        self.queue: list[Item] = []

    def stamp(self, true_ms: int) -> int:
        """The device clock's reading at true time ``true_ms``."""
        return true_ms + self.transport.skew_ms if true_ms < self.transport.skew_until_ms else true_ms

    def send(self, item: Item, true_ms: int) -> Iterator[Item]:
        """Release ``item`` (made at true time ``true_ms``), holding it while the device is offline."""
        offline = self.transport.offline
        if offline is not None and true_ms in offline:
            self.queue.append(item)
            return
        if offline is not None and self.queue:
            # Store-and-forward: the backlog goes out first, oldest first, on reconnect.
            yield from self._release(offline.end_ms)
            yield from self._release_one(self.status(offline.end_ms, online=True), offline.end_ms)
        yield from self._release_one(item, true_ms)

    def _release(self, at_ms: int) -> Iterator[Item]:
        queued, self.queue = self.queue, []
        for item in queued:
            yield from self._release_one(item, at_ms)

    def _release_one(self, item: Item, at_ms: int) -> Iterator[Item]:
        # Never earlier than what went before: one device sends in order.
        item.publish_at_ms = max(at_ms, self.last_pub)
        self.last_pub = item.publish_at_ms
        yield item

    def telemetry(self, samples: list[Sample], battery_pct: int, true_last_ms: int) -> Iterator[Item]:
        """A batch, possibly corrupted by bad firmware."""
        message = Telemetry(v=1, device_id=self.device_id, kind=self.kind, seq=self.seq, samples=samples,
                            battery_pct=battery_pct)  # fmt: skip
        self.seq += 1
        item: Item | None = None
        if self.transport.corrupt is not None:
            item = self.transport.corrupt(message, self.seq - 1)
        if item is None:
            item = Item(0, "telemetry", message)
        yield from self.send(item, true_last_ms + SEND_DELAY_MS)

    def event(self, true_ms: int, **fields: object) -> Iterator[Item]:
        """An event at true time ``true_ms`` (stamped by the device clock)."""
        event = Event(v=1, device_id=self.device_id, t=self.stamp(true_ms), **fields)  # type: ignore[arg-type]
        yield from self.send(Item(0, "event", event), true_ms)

    def status(self, true_ms: int, online: bool = True, battery_pct: int | None = None) -> Item:
        """A status message (not yet sent)."""
        status = Status(v=1, state="online" if online else "offline", fw=FIRMWARE, battery_pct=battery_pct,
                        rssi_dbm=self.rng.randint(-85, -55), t=self.stamp(true_ms))  # fmt: skip
        return Item(0, "status", status)


def sock_items(device_id: str, plan: SockPlan, period: Period, rng: random.Random) -> Iterator[Item]:
    """Everything a sock sends over the period, in sending order."""
    sender = _Sender(device_id, "sock", plan.transport, rng)
    spans = sorted((s for day in plan.wear for s in day.on), key=lambda s: s.start_ms)
    rolled = sorted((s for day in plan.wear for s in day.rolled), key=lambda s: s.start_ms)
    ambient = {day: rng.uniform(20.5, 24.5) for day in period.days}
    walker = _SockWalker(spans, rolled)
    battery = plan.battery
    batch: list[Sample] = []
    worn_before = False
    charging = False
    t = period.start_ms + rng.randrange(0, SOCK_PERIOD_MS)
    day_index, next_midnight = 0, period.day_bounds(period.days[0]).end_ms
    walking = False
    until = period.end_ms if plan.stop_ms is None else min(period.end_ms, plan.stop_ms)
    while t < until:
        while t >= next_midnight and day_index + 1 < len(period.days):
            day_index += 1
            next_midnight = period.day_bounds(period.days[day_index]).end_ms
        on_body, since_ms = walker.at(t)
        walking = (rng.random() < 0.3) if rng.random() < 0.08 else walking
        state = LegState(on_body, since_ms / 1000.0, ambient[period.days[day_index]],
                         (t - period.start_ms) / 86_400_000, walking and on_body, walker.rolled(t))  # fmt: skip
        sample = sock_sample(rng, sender.stamp(t), plan.fit, plan.prescription.zones, state)
        battery.drain(SOCK_PERIOD_MS / 3_600_000, on_body)
        if battery.dead:
            return
        if sample.worn != worn_before:
            worn_before = sample.worn
            if sample.worn and charging:
                battery.charge()
                charging = False
            can_charge = plan.charge_until_ms is None or t < plan.charge_until_ms
            if not sample.worn and battery.level < 55 and can_charge:
                charging = True
            yield from sender.event(t, type="donned" if sample.worn else "doffed")
            yield from sender.send(sender.status(t, battery_pct=battery.pct), t)
        batch.append(sample)
        if len(batch) == SOCK_BATCH:
            yield from sender.telemetry(batch, battery.pct, t)
            batch = []
        t += SOCK_PERIOD_MS


class _SockWalker:
    """Answers 'on the leg?' and 'rolled down?' for increasing times, in O(1) per step."""

    def __init__(self, spans: list[Interval], rolled: list[Interval]) -> None:
        self.spans = spans
        self.rolled_spans = rolled
        self.i = 0
        self.j = 0

    def at(self, t: int) -> tuple[bool, int]:
        """(on the leg, ms since the last don or doff) at ``t``."""
        while self.i < len(self.spans) and self.spans[self.i].end_ms <= t:
            self.i += 1
        if self.i < len(self.spans) and t in self.spans[self.i]:
            return True, t - self.spans[self.i].start_ms
        previous_end = self.spans[self.i - 1].end_ms if self.i > 0 else None
        return False, (t - previous_end) if previous_end is not None else 10 * 3_600_000

    def rolled(self, t: int) -> bool:
        """True while the garment is rolled down."""
        while self.j < len(self.rolled_spans) and self.rolled_spans[self.j].end_ms <= t:
            self.j += 1
        return self.j < len(self.rolled_spans) and t in self.rolled_spans[self.j]


def boot_items(device_id: str, plan: BootPlan, period: Period, rng: random.Random) -> Iterator[Item]:
    """Everything a boot sends over the period: sessions with their events, and a status every 4 hours."""
    sender = _Sender(device_id, "boot", Transport(), rng)
    battery = Battery(level=rng.uniform(70, 100), use_per_h=12.0, idle_per_h=0.1)
    pending = list(plan.sessions)
    heartbeat = period.start_ms + rng.randrange(0, 30 * MINUTE_MS)
    while heartbeat < period.end_ms or pending:
        if pending and pending[0].start_ms < heartbeat:
            session = pending.pop(0)
            if session.start_ms + session.duration_s * 1000 > period.end_ms:
                continue
            yield from _session_items(sender, plan, session, battery, rng)
            continue
        if heartbeat >= period.end_ms:
            break
        battery.drain(STATUS_EVERY_MS / 3_600_000, False)
        if battery.level < 30:
            battery.charge()
        if plan.heartbeat:
            yield from sender.send(sender.status(heartbeat, battery_pct=battery.pct), heartbeat)
        heartbeat += STATUS_EVERY_MS


def _session_items(
    sender: _Sender, plan: BootPlan, session: Session, battery: Battery, rng: random.Random
) -> Iterator[Item]:
    rx = plan.prescription
    yield from sender.event(session.start_ms, type="session_start", program=rx.program,
                            target_mmhg=session.target_mmhg, planned_s=session.planned_s)  # fmt: skip
    batch: list[Sample] = []
    count = session.duration_s * 1000 // BOOT_PERIOD_MS
    for k in range(count):
        t = session.start_ms + k * BOOT_PERIOD_MS
        batch.append(boot_sample(rng, t, k * BOOT_PERIOD_MS / 1000, rx.chambers, session.actual_mmhg, plan.skin_c))
        if len(batch) == BOOT_BATCH or k == count - 1:
            battery.drain(len(batch) * BOOT_PERIOD_MS / 3_600_000, True)
            yield from sender.telemetry(batch, battery.pct, t)
            batch = []
    end = session.start_ms + session.duration_s * 1000
    yield from sender.event(end, type="session_end", duration_s=session.duration_s, reason=session.reason)


def plan_sessions(
    rng: random.Random,
    period: Period,
    rx: BootPrescription,
    on_day: Callable[[int], bool],
    length_s: Callable[[int], int],
    pressure: Callable[[int], float],
) -> tuple[Session, ...]:
    """One session on each day where ``on_day(i)``, starting 08:00-20:00 local.

    ``length_s(i)`` cuts the session short when positive (the patient stops
    it); ``pressure(i)`` is what the pump actually reaches.
    """
    sessions = []
    for i, day in enumerate(period.days):
        if not on_day(i):
            continue
        start = local_wall_ms(day, rng.uniform(8 * 60, 20 * 60), period.tz)
        planned = rng.randrange(rx.session_min_s, rx.session_max_s + 1, 60)
        cut = length_s(i)
        duration = min(planned, cut) if cut > 0 else planned
        sessions.append(Session(start, planned, duration, rx.target_mmhg, pressure(i)))
    return tuple(sessions)
