"""Adapters: fill the read model (:mod:`records.model`) from what the platform keeps today.

Each adapter is thin on purpose: it calls the owning component's public functions and converts, nothing more, so
the lead can re-point it when the components change (docs/records.md, "Adapters"):

- :class:`RegistrySource` -- the patient, garments, assignments and prescriptions, through the registry's service
  **as the caller** (``Actor``): a physio token of clinic A is refused clinic B's patient by the registry itself
  (404, as everywhere in the API), an ingester token is refused outright.
  *Re-point* when issue 11 lands: ``GarmentUse.leg`` from the assignment's ``leg``, ``PrescriptionVersion.leg`` and
  ``.supersedes`` from the prescription's ``legs`` and ``supersedes_id``.
- :class:`MonitorSource` -- the day figures, by the monitor's own computation (``monitor.compliance.day_stats`` and
  ``flags_for`` over the monitor's ``PatientContext``), and the episodes from the monitor's state database.
  ``day_stats`` reads the monitor's day summaries (``monitor.summaries``, kept for ever), the per-zone medians
  included, so an export of a period older than the raw samples' retention still has its figures.
- Episode actions (acknowledge, snooze, note, hand-over) are the physios' workspace's (``monitor.actions``, not
  merged yet): read from its ``episode_actions`` table when the state database has one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import MetaData, Table, inspect, select

from devices.protocol import ZONES
from devices.registry import schemas as s
from devices.registry.service import Actor, Registry
from monitor.compliance import InfluxReader, day_stats, flags_for, local_midnight_ms
from monitor.model import BootRx, DayStats, PatientContext, SockRx
from monitor.registry import load_context
from monitor.state import Episode, State
from records.model import (
    LEGS,
    DayFigures,
    EpisodeAction,
    EpisodeRecord,
    Garment,
    GarmentUse,
    Leg,
    PatientRecord,
    PatientRef,
    Period,
    PrescriptionVersion,
)
from records.settings import RecordsSettings

ACTIONS_TABLE: Final = "episode_actions"  # the workspace's table (monitor.actions.EpisodeAction), when present
MONITOR_NOTE_BY: Final = "monitor"


def _leg(value: object) -> Leg | None:
    return next((leg for leg in LEGS if leg == value), None)


# --- the registry -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistryPart:
    """What the registry says of one patient: who, the garments and their uses, the prescription versions."""

    patient: PatientRef
    garments: tuple[Garment, ...]
    uses: tuple[GarmentUse, ...]
    prescriptions: tuple[PrescriptionVersion, ...]


class RegistrySource:
    """The registry's service, asked as the caller (its clinic isolation and roles apply)."""

    def __init__(self, registry: Registry, settings: RecordsSettings) -> None:
        self.registry = registry
        self.settings = settings

    def read(self, actor: Actor, code: str, period: Period) -> RegistryPart:
        """The patient (raises the registry's ``NotFoundError``/``ForbiddenError`` for one the caller may not see)."""
        out = self.registry.get_patient(actor, code)
        clinic = self.registry.get_clinic(actor, out.clinic)
        name = out.display_name if self.settings.names_leave(out.clinic) else None
        patient = PatientRef(out.code, out.clinic, clinic.name, clinic.timezone, name)
        zone = ZoneInfo(clinic.timezone)
        start = datetime.combine(period.start, datetime.min.time(), zone)
        end = datetime.combine(period.end + timedelta(days=1), datetime.min.time(), zone)
        uses = tuple(_use(a) for a in self.registry.list_assignments(actor, patient=code)
                     if a.valid_from < end and (a.valid_to is None or a.valid_to > start))  # fmt: skip
        garments = tuple(_garment(self.registry.get_device(actor, d)) for d in sorted({u.device_id for u in uses}))
        versions = tuple(v for v in (_version(rx) for rx in self.registry.list_prescriptions(actor, patient=code))
                         if v.overlaps(period))  # fmt: skip
        return RegistryPart(patient, garments, uses, versions)


def _use(a: s.AssignmentOut) -> GarmentUse:
    return GarmentUse(a.id, a.device_id, a.valid_from, a.valid_to, _leg(getattr(a, "leg", None)))


def _garment(d: s.DeviceOut) -> Garment:
    return Garment(d.device_id, d.kind, tuple(d.zones), d.serial, d.firmware, d.revoked)


def _version(rx: s.PrescriptionOut) -> PrescriptionVersion:
    return PrescriptionVersion(
        id=rx.id, kind=rx.garment_kind, valid_from=rx.valid_from, valid_to=rx.valid_to,
        created_at=getattr(rx, "created_at", None) or datetime.combine(rx.valid_from, datetime.min.time(), UTC),
        class_system=rx.class_system, class_name=rx.class_name, band_low_mmhg=rx.ankle_min_mmhg,
        band_high_mmhg=rx.ankle_max_mmhg, zones=tuple(rx.zones), wear_hours_per_day=rx.wear_hours_per_day,
        wear_days_per_week=rx.wear_days_per_week, sessions_per_week=rx.sessions_per_week,
        session_min_minutes=rx.session_min_minutes, session_max_minutes=rx.session_max_minutes,
        max_chamber_mmhg=rx.max_chamber_mmhg, tolerance_minutes=rx.out_of_range_tolerance_minutes,
        leg=_leg(getattr(rx, "legs", None)), supersedes=getattr(rx, "supersedes_id", None),
    )  # fmt: skip


# --- the monitor --------------------------------------------------------------------------------------------------


class MonitorSource:
    """The monitor's figures (its computation over InfluxDB) and its episodes (its state database)."""

    def __init__(self, registry: Registry, reader: InfluxReader, database: str, state: State) -> None:
        self.registry = registry
        self.reader = reader
        self.database = database
        self.state = state

    def context(self, code: str) -> PatientContext | None:
        """The monitor's own view of the patient (clinic time zone, prescription, garments), as it evaluates them."""
        return load_context(self.registry, code)

    async def days(self, ctx: PatientContext, period: Period, now: datetime) -> list[DayFigures]:
        """The figures of every complete local day of ``period`` (today and later days are left out)."""
        zone = ZoneInfo(ctx.timezone)
        last = min(period.end, now.astimezone(zone).date() - timedelta(days=1))
        if last < period.start or ctx.rx is None:
            return []
        # "Now" for the monitor's computation is the end of the last day wanted: every day of the range is complete.
        end_ms = local_midnight_ms(last + timedelta(days=1), zone)
        days_back = (last - period.start).days + 1
        stats = (await day_stats(self.reader, self.database, [ctx], days_back, now_ms=end_ms, medians=True)).get(
            ctx.patient, [])  # fmt: skip
        results = [r for r in flags_for(ctx, stats) if period.start <= r.stats.day <= last]
        socks = isinstance(ctx.rx, SockRx)
        return [_day(ctx, r.stats, r.flags or (), r.stats.zone_medians if socks else {}, zone) for r in results]

    def episodes(self, code: str) -> list[EpisodeRecord]:
        """Every episode of the patient, oldest first, with what was done about it."""
        with self.state.transaction() as session:
            query = select(Episode).where(Episode.patient == code).order_by(Episode.start_day, Episode.id)
            rows = list(session.scalars(query))
        actions = self._actions(code)
        out = []
        for e in rows:
            done = list(actions.get(e.id, ()))
            if e.note:
                done.append(EpisodeAction("monitor", e.resolved_at or e.opened_at, MONITOR_NOTE_BY, e.note))
            out.append(EpisodeRecord(e.id, e.flag, e.severity, e.start_day, e.last_day, e.end_day,
                                     tuple(sorted(done, key=lambda a: a.at))))  # fmt: skip
        return out

    def _actions(self, code: str) -> dict[int, list[EpisodeAction]]:
        """The physios' actions per episode, from the workspace's table when the state database has it."""
        engine = self.state.engine
        if not inspect(engine).has_table(ACTIONS_TABLE):
            return {}
        table = Table(ACTIONS_TABLE, MetaData(), autoload_with=engine)
        out: dict[int, list[EpisodeAction]] = {}
        with engine.connect() as connection:
            for row in connection.execute(select(table).where(table.c.patient == code)).mappings():
                out.setdefault(int(row["episode_id"]), []).append(_action(row))
        return out


def _action(row: Any) -> EpisodeAction:
    at = row["at"]
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # stored naive UTC (devices.registry.models.UTCDateTime)
    until = row.get("until")
    if isinstance(until, str):
        until = date.fromisoformat(until)
    return EpisodeAction(str(row["kind"]), at, str(row.get("by_name") or row.get("by_email") or ""),
                         str(row.get("note") or ""), until, row.get("to_name") or row.get("to_email"))  # fmt: skip


def _day(ctx: PatientContext, st: DayStats, flags: Sequence[str], medians: dict[str, float],
         zone: ZoneInfo) -> DayFigures:  # fmt: skip
    start = datetime.fromtimestamp(st.start_ms / 1000, zone)
    end = datetime.fromtimestamp(st.end_ms / 1000, zone)
    rx = ctx.rx
    if isinstance(rx, SockRx):
        # The ankle's median is the monitor's own figure; the other zones' come from the statement above.
        merged = {**medians, **({"ankle": st.ankle_median_mmhg} if st.ankle_median_mmhg is not None else {})}
        return DayFigures(st.day, start, end, st.points, st.wear_s, target_s=rx.wear_hours_per_day * 3600,
                          band_low_mmhg=rx.low_mmhg, band_high_mmhg=rx.high_mmhg,
                          median_mmhg=tuple((z, merged[z]) for z in ZONES if z in merged),
                          above_band_s=st.above_range_s, below_band_s=st.below_range_s,
                          reversed_gradient_s=st.reversed_gradient_s, flags=tuple(flags))  # fmt: skip
    max_chamber = rx.max_chamber_mmhg if isinstance(rx, BootRx) else None
    return DayFigures(st.day, start, end, st.points, st.wear_s, sessions=st.sessions_started,
                      session_durations_s=tuple(st.session_durations_s), peak_mmhg=st.peak_mmhg,
                      max_chamber_mmhg=max_chamber, flags=tuple(flags))  # fmt: skip


# --- together -----------------------------------------------------------------------------------------------------


class RecordSource:
    """One patient's record for a period, from the registry (as the caller) and the monitor."""

    def __init__(self, registry: RegistrySource, monitor: MonitorSource) -> None:
        self.registry = registry
        self.monitor = monitor

    async def record(self, actor: Actor, code: str, period: Period, now: datetime | None = None) -> PatientRecord:
        """Everything of ``code`` for ``period`` the caller may see (the registry refuses what they may not)."""
        now = now or datetime.now(UTC)
        part = await asyncio.to_thread(self.registry.read, actor, code, period)
        ctx = await asyncio.to_thread(self.monitor.context, code)
        problems = list(ctx.problems) if ctx else ["the monitor does not know this patient"]
        days = await self.monitor.days(ctx, period, now) if ctx is not None else []
        episodes = [e for e in await asyncio.to_thread(self.monitor.episodes, code) if e.touches(period)]
        return PatientRecord(part.patient, period, now, part.garments, part.uses, part.prescriptions, tuple(days),
                             tuple(episodes), tuple(problems))  # fmt: skip


def open_sources(registry: Registry, settings: RecordsSettings, reader: InfluxReader, database: str,
                 state_url: str) -> RecordSource:  # fmt: skip
    """The record source over a registry, InfluxDB (the monitor's database) and the monitor's state database."""
    return RecordSource(RegistrySource(registry, settings), MonitorSource(registry, reader, database, State(state_url)))


__all__ = ["MonitorSource", "RecordSource", "RegistryPart", "RegistrySource", "open_sources"]
