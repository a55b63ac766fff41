"""Each patient's latest figures, as the monitor last computed them, kept in its state database for the workspace.

The physios' workspace lists hundreds of patients at once; recomputing their wear and pressure from InfluxDB on
every page load would take a minute (docs/benchmarks.md). So after every evaluation the monitor writes one row
per patient here (:func:`record`): the 7- and 30-day wear against the target, days with data, minutes outside the
pressure band and with a reversed gradient, boot sessions against the plan, last contact and battery. They are
the monitor's own numbers (``monitor.compliance``'s day statistics and :func:`monitor.compliance.adherence`), so
the workspace and the e-mails can never disagree with the flags.

Everything here is computed from complete days only (today is still running), except the last contact and battery.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Final, cast

from sqlalchemy import Date, Float, Integer, String, Table, bindparam, select, update
from sqlalchemy.orm import Mapped, mapped_column

from devices.registry.models import UTCDateTime, utcnow
from monitor.compliance import adherence
from monitor.model import COMPLIANT, BootRx, DayResult, DayStats, PatientContext, SockRx
from monitor.state import Base, State

WEEK: Final = 7


class PatientFigures(Base):
    """One patient's figures as of the monitor's last evaluation (``None``: not known, e.g. no prescription)."""

    __tablename__ = "patient_figures"
    patient: Mapped[str] = mapped_column(String(64), primary_key=True)
    clinic: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str | None] = mapped_column(String(8), default=None)
    evaluated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    judged_7d: Mapped[int] = mapped_column(Integer, default=0)
    judged_30d: Mapped[int] = mapped_column(Integer, default=0)
    clear_days_7d: Mapped[int] = mapped_column(Integer, default=0)
    target_days_7d: Mapped[int] = mapped_column(Integer, default=0)
    target_days_30d: Mapped[int] = mapped_column(Integer, default=0)
    data_days_30d: Mapped[int] = mapped_column(Integer, default=0)
    wear_mean_7d_h: Mapped[float | None] = mapped_column(Float, default=None)
    wear_mean_30d_h: Mapped[float | None] = mapped_column(Float, default=None)
    wear_target_h: Mapped[float | None] = mapped_column(Float, default=None)
    worn_7d_min: Mapped[float] = mapped_column(Float, default=0.0)
    above_7d_min: Mapped[float] = mapped_column(Float, default=0.0)
    below_7d_min: Mapped[float] = mapped_column(Float, default=0.0)
    reversed_7d_min: Mapped[float] = mapped_column(Float, default=0.0)
    band_low_mmhg: Mapped[float | None] = mapped_column(Float, default=None)
    band_high_mmhg: Mapped[float | None] = mapped_column(Float, default=None)
    sessions_7d: Mapped[int] = mapped_column(Integer, default=0)
    sessions_per_week_30d: Mapped[float | None] = mapped_column(Float, default=None)
    sessions_per_week: Mapped[int | None] = mapped_column(Integer, default=None)
    short_sessions_7d: Mapped[int] = mapped_column(Integer, default=0)
    long_sessions_7d: Mapped[int] = mapped_column(Integer, default=0)
    peak_7d_mmhg: Mapped[float | None] = mapped_column(Float, default=None)
    max_chamber_mmhg: Mapped[float | None] = mapped_column(Float, default=None)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    battery_pct: Mapped[float | None] = mapped_column(Float, default=None)
    battery_day: Mapped[date | None] = mapped_column(Date, default=None)


@dataclass(frozen=True, slots=True)
class Figures:
    """:class:`PatientFigures` as plain data (what the workspace reads)."""

    patient: str
    clinic: str
    kind: str | None
    evaluated_at: datetime
    judged_7d: int = 0
    judged_30d: int = 0
    clear_days_7d: int = 0
    target_days_7d: int = 0
    target_days_30d: int = 0
    data_days_30d: int = 0
    wear_mean_7d_h: float | None = None
    wear_mean_30d_h: float | None = None
    wear_target_h: float | None = None
    worn_7d_min: float = 0.0
    above_7d_min: float = 0.0
    below_7d_min: float = 0.0
    reversed_7d_min: float = 0.0
    band_low_mmhg: float | None = None
    band_high_mmhg: float | None = None
    sessions_7d: int = 0
    sessions_per_week_30d: float | None = None
    sessions_per_week: int | None = None
    short_sessions_7d: int = 0
    long_sessions_7d: int = 0
    peak_7d_mmhg: float | None = None
    max_chamber_mmhg: float | None = None
    last_seen_at: datetime | None = None
    battery_pct: float | None = None
    battery_day: date | None = None

    @property
    def outside_band_7d_min(self) -> float:
        """Worn minutes above or below the prescribed band over the last 7 complete days."""
        return self.above_7d_min + self.below_7d_min


def ensure_tables(state: State) -> None:
    """Create the figures table if it is missing."""
    Base.metadata.create_all(state.engine, tables=[PatientFigures.__table__])  # type: ignore[list-item]


def _complete(results: Sequence[DayResult]) -> list[DayStats]:
    return [r.stats for r in results if r.stats.complete]


def clear_days(results: Sequence[DayResult], days: int = WEEK) -> tuple[int, int]:
    """Of the last ``days`` complete days, how many carried no flag at all (``compliant``), and how many were judged."""
    judged = [r for r in results if r.stats.complete and r.flags is not None][-days:]
    return sum(1 for r in judged if r.flags == (COMPLIANT,)), len(judged)


def _battery(results: Sequence[DayResult]) -> tuple[float | None, date | None]:
    for r in reversed(results):
        if r.stats.battery_min_pct is not None:
            return r.stats.battery_min_pct, r.stats.day
    return None, None


def _sock(ctx: PatientContext, week: Sequence[DayStats]) -> dict[str, object]:
    assert isinstance(ctx.rx, SockRx)
    return {"wear_target_h": ctx.rx.wear_hours_per_day, "band_low_mmhg": ctx.rx.low_mmhg,
            "band_high_mmhg": ctx.rx.high_mmhg, "worn_7d_min": sum(d.wear_s for d in week) / 60,
            "above_7d_min": sum(d.above_range_s for d in week) / 60,
            "below_7d_min": sum(d.below_range_s for d in week) / 60,
            "reversed_7d_min": sum(d.reversed_gradient_s for d in week) / 60}  # fmt: skip


def _boot(ctx: PatientContext, week: Sequence[DayStats], per_week_30d: float | None) -> dict[str, object]:
    assert isinstance(ctx.rx, BootRx)
    lengths = [s for d in week for s in d.session_durations_s]
    peaks = [d.peak_mmhg for d in week if d.peak_mmhg is not None]
    return {"sessions_per_week": ctx.rx.sessions_per_week, "max_chamber_mmhg": ctx.rx.max_chamber_mmhg,
            "sessions_7d": sum(d.sessions_started for d in week), "sessions_per_week_30d": per_week_30d,
            "short_sessions_7d": sum(1 for s in lengths if s < ctx.rx.session_min_s),
            "long_sessions_7d": sum(1 for s in lengths if s > ctx.rx.session_max_s),
            "peak_7d_mmhg": max(peaks, default=None)}  # fmt: skip


def compute(ctx: PatientContext, results: Sequence[DayResult], now: datetime,
            last_seen_ms: int | None = None) -> Figures:  # fmt: skip
    """A patient's figures from the monitor's day results (oldest first, as ``monitor.compliance.flags_for`` gives)."""
    summary = adherence(ctx, results)
    week = _complete(results)[-WEEK:]
    clear, _ = clear_days(results)
    battery, battery_day = _battery(results)
    seen = datetime.fromtimestamp(last_seen_ms / 1000, UTC) if last_seen_ms is not None else None
    extra: dict[str, object] = {}
    if isinstance(ctx.rx, SockRx):
        extra = _sock(ctx, week)
    elif isinstance(ctx.rx, BootRx):
        extra = _boot(ctx, week, summary.sessions_per_week_30d)
    return Figures(patient=ctx.patient, clinic=ctx.clinic, kind=ctx.kind, evaluated_at=now,
                   judged_7d=summary.judged_7d, judged_30d=summary.judged_30d, clear_days_7d=clear,
                   target_days_7d=summary.target_days_7d, target_days_30d=summary.target_days_30d,
                   data_days_30d=summary.data_days_30d, wear_mean_7d_h=_mean_h(week),
                   wear_mean_30d_h=_mean_h(_complete(results)[-30:]), last_seen_at=seen, battery_pct=battery,
                   battery_day=battery_day, **extra)  # type: ignore[arg-type]  # fmt: skip


def _mean_h(days: Sequence[DayStats]) -> float | None:
    return sum(d.wear_s for d in days) / 3600 / len(days) if days else None


def record(state: State, contexts: Sequence[PatientContext], results: Mapping[str, Sequence[DayResult]],
           seen: Mapping[str, int], now: datetime | None = None) -> int:  # fmt: skip
    """Write the figures of every patient of ``contexts`` with results (one row each); returns how many.

    A last contact not known this time (the monitor only looks back as far as the silence allowance) keeps the one
    stored before.
    """
    now = now or datetime.now(UTC)
    fresh = [compute(c, results[c.patient], now, seen.get(c.patient)) for c in contexts if c.patient in results]
    with state.transaction() as session:
        codes = [f.patient for f in fresh]
        stored = {row.patient: row for start in range(0, len(codes), 500)
                  for row in session.scalars(select(PatientFigures).where(
                      PatientFigures.patient.in_(codes[start : start + 500])))}  # fmt: skip
        for figures in fresh:
            values = asdict(figures)
            row = stored.get(figures.patient)
            if row is None:
                session.add(PatientFigures(**values))
                continue
            if values["last_seen_at"] is None:
                values["last_seen_at"] = row.last_seen_at
            for key, value in values.items():
                setattr(row, key, value)
    return len(fresh)


def record_seen(state: State, seen: Mapping[str, int]) -> int:
    """Write only the last contact (epoch ms) of these patients, whose other figures are stored and unchanged: one
    statement for all of them. Returns how many."""
    if not seen:
        return 0
    table = cast(Table, PatientFigures.__table__)
    statement = update(table).where(table.c.patient == bindparam("code")).values(last_seen_at=bindparam("seen"))
    with state.transaction() as session:
        session.connection().execute(statement, [{"code": code, "seen": datetime.fromtimestamp(ms / 1000, UTC)}
                                                 for code, ms in seen.items()])  # fmt: skip
    return len(seen)


def read(state: State, patients: Sequence[str]) -> dict[str, Figures]:
    """The stored figures of these patients (absent: the monitor has not evaluated them yet)."""
    out: dict[str, Figures] = {}
    names = [c.key for c in PatientFigures.__table__.columns]
    with state.transaction() as session:
        for start in range(0, len(patients), 500):
            query = select(PatientFigures).where(PatientFigures.patient.in_(list(patients[start : start + 500])))
            for row in session.scalars(query):
                out[row.patient] = Figures(**{name: getattr(row, name) for name in names})
    return out


__all__ = ["Figures", "PatientFigures", "clear_days", "compute", "ensure_tables", "read", "record", "record_seen"]
