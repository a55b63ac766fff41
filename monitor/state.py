"""The monitor's durable state in SQL: day flags, episodes, the e-mail outbox and the replicas' lease.

Why each table exists:

- ``day_flags``: what each patient-day was last judged, so a change (late
  store-and-forward data) is noticed and reported in the digest.
- ``episodes``: a flag's run over days with its start, end and severity. At
  most one open episode per patient and flag: ``open_key`` is unique and set
  only while open, so two replicas cannot both open it.
- ``outbox``: every e-mail is queued in the same transaction as the episode
  change that causes it, with a unique ``dedupe_key`` (``opened:<episode>``,
  ``resolved:<episode>``, ``digest:<physio>:<date>``): a restart or a second
  replica can never queue it twice, and a queued e-mail is retried until sent.
- ``leases``: the replica holding the lease evaluates and sends; the others
  wait and take over when it lapses.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    Float,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from devices.registry.db import make_engine
from devices.registry.models import NAMING, UTCDateTime, utcnow


class Base(DeclarativeBase):
    """The monitor's tables (created with ``create_all``: internal state, no migrations yet)."""

    metadata = MetaData(naming_convention=NAMING)


class DayFlags(Base):
    """A patient-day as last judged."""

    __tablename__ = "day_flags"
    patient: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    flags: Mapped[list[str]] = mapped_column(JSON)
    wear_s: Mapped[float] = mapped_column(Float, default=0.0)
    computed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Episode(Base):
    """A flag held by a patient from ``start_day`` until it resolved (``end_day``: the first clear day)."""

    __tablename__ = "episodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient: Mapped[str] = mapped_column(String(64), index=True)
    clinic: Mapped[str] = mapped_column(String(64))
    flag: Mapped[str] = mapped_column(String(40))
    severity: Mapped[str] = mapped_column(String(16))
    start_day: Mapped[date] = mapped_column(Date)
    last_day: Mapped[date] = mapped_column(Date)
    end_day: Mapped[date | None] = mapped_column(Date, default=None)
    open_key: Mapped[str | None] = mapped_column(String(120), unique=True, default=None)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    notified: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str] = mapped_column(Text, default="")


class Outbox(Base):
    """An e-mail to send: its data (composed at send time), attempts, and when it was sent."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("dedupe_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dedupe_key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(String(254))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(200), default=None)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None, index=True)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_error: Mapped[str] = mapped_column(Text, default="")


class Lease(Base):
    """Who does the work now, until when."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


def shard_lease(shard: int, shards: int) -> str:
    """The lease of one shard of the clinics: ``monitor`` when there is one shard (the single-lease layout)."""
    return "monitor" if shards == 1 else f"monitor:{shard}"


def shard_of(clinic: str, shards: int) -> int:
    """The shard a clinic belongs to: a stable hash of its code (every replica computes the same)."""
    return zlib.crc32(clinic.encode()) % shards


class State:
    """The state database: sessions, the lease, and the outbox's claim/sent bookkeeping."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        for attempt in range(3):
            try:
                Base.metadata.create_all(self.engine)
                break
            except (OperationalError, ProgrammingError, IntegrityError):
                # replicas starting at once on a new database: another one created a table in between
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on error."""
        with self._factory() as session, session.begin():
            yield session

    def acquire_lease(self, holder: str, seconds: float, name: str = "monitor") -> bool:
        """Take or renew the lease; False while another live holder has it. Atomic on SQLite and PostgreSQL."""
        now = datetime.now(UTC)
        until = now + timedelta(seconds=seconds)
        try:
            with self.transaction() as session:
                taken = session.execute(
                    update(Lease)
                    .where(Lease.name == name, (Lease.holder == holder) | (Lease.expires_at < now))
                    .values(holder=holder, expires_at=until)
                )
                if getattr(taken, "rowcount", 0) == 1:
                    return True
                if session.get(Lease, name) is not None:
                    return False
                session.add(Lease(name=name, holder=holder, expires_at=until))
            return True
        except IntegrityError:
            return False  # another replica inserted the first lease at the same moment

    def share(self, holder: str, shards: int, seconds: float) -> set[int]:
        """Take this replica's share of the ``shards`` shard leases and renew them; returns the shards it holds.

        Each live replica announces itself (a ``replica:<holder>`` row renewed every round, lapsing after
        ``seconds``); each takes up to its fair share, ``ceil(shards / live replicas)``, of the free or lapsed
        shards and gives back what it holds beyond it, so a new replica gets work within a round and a dead
        one's shards are taken over once their leases lapse.
        """
        self.acquire_lease(holder, seconds, f"replica:{holder}")
        now = datetime.now(UTC)
        with self._factory() as session:
            rows = list(session.scalars(select(Lease)))
        live = {r.holder for r in rows if r.name.startswith("replica:") and r.expires_at >= now} | {holder}
        fair = -(-shards // len(live))
        mine = sorted(i for i in range(shards) for r in rows
                      if r.name == shard_lease(i, shards) and r.holder == holder and r.expires_at >= now)  # fmt: skip
        held: set[int] = set()
        for i in mine:
            if len(held) < fair and self.acquire_lease(holder, seconds, shard_lease(i, shards)):
                held.add(i)
            elif len(held) >= fair:
                self.release_lease(holder, shard_lease(i, shards))  # beyond the fair share: another replica's now
        for i in range(shards):
            if len(held) >= fair:
                break
            if i not in held and self.acquire_lease(holder, seconds, shard_lease(i, shards)):
                held.add(i)
        return held

    def release_all(self, holder: str) -> None:
        """Give up every lease of ``holder`` (its shards and its presence): the others take over at once."""
        with self.transaction() as session:
            session.execute(update(Lease).where(Lease.holder == holder)
                            .values(expires_at=datetime(1970, 1, 1, tzinfo=UTC)))  # fmt: skip

    def release_lease(self, holder: str, name: str = "monitor") -> None:
        """Give the lease up (clean shutdown), so another replica takes over at once."""
        with self.transaction() as session:
            session.execute(update(Lease).where(Lease.name == name, Lease.holder == holder)
                            .values(expires_at=datetime(1970, 1, 1, tzinfo=UTC)))  # fmt: skip

    def enqueue(self, session: Session, dedupe_key: str, kind: str, recipient: str, data: dict[str, Any]) -> bool:
        """Queue an e-mail in the caller's transaction unless its key was ever queued; True if queued now."""
        if session.scalars(select(Outbox.id).where(Outbox.dedupe_key == dedupe_key)).first() is not None:
            return False
        session.add(Outbox(dedupe_key=dedupe_key, kind=kind, recipient=recipient, data=data))
        return True

    def claim_due(self, holder: str, limit: int = 50, claim_s: float = 120.0,
                  keys: Sequence[str] | None = None) -> list[Outbox]:  # fmt: skip
        """Claim unsent e-mails whose next attempt is due (a claim keeps another replica off them); only those of
        ``keys`` (outbox keys) when given."""
        now = datetime.now(UTC)
        with self.transaction() as session:
            query = select(Outbox).where(Outbox.sent_at.is_(None), Outbox.failed_at.is_(None),
                                         Outbox.next_attempt_at <= now,
                                         (Outbox.claimed_until.is_(None)) | (Outbox.claimed_until < now))  # fmt: skip
            if keys is not None:
                query = query.where(Outbox.dedupe_key.in_(list(keys)))
            rows = list(session.scalars(query.order_by(Outbox.id).limit(limit)))
            claimed = []
            for row in rows:
                done = session.execute(
                    update(Outbox)
                    .where(Outbox.id == row.id, Outbox.sent_at.is_(None),
                           (Outbox.claimed_until.is_(None)) | (Outbox.claimed_until < now))
                    .values(claimed_by=holder, claimed_until=now + timedelta(seconds=claim_s))
                )  # fmt: skip
                if getattr(done, "rowcount", 0) == 1:
                    claimed.append(row)
            return claimed

    def mark_sent(self, row_id: int) -> None:
        """Record a delivered e-mail."""
        with self.transaction() as session:
            session.execute(update(Outbox).where(Outbox.id == row_id)
                            .values(sent_at=datetime.now(UTC), claimed_until=None))  # fmt: skip

    def mark_retry(self, row_id: int, error: str, delay_s: float, permanent: bool = False) -> None:
        """Record a failed attempt: retried after ``delay_s``; a permanent failure stops retrying (and is logged)."""
        now = datetime.now(UTC)
        with self.transaction() as session:
            row = session.get(Outbox, row_id)
            if row is None:
                return
            row.attempts += 1
            row.last_error = error[:2000]
            row.claimed_until = None
            row.next_attempt_at = now + timedelta(seconds=delay_s)
            if permanent:
                row.failed_at = now

    def pending(self) -> int:
        """E-mails not yet sent (nor failed permanently)."""
        with self._factory() as session:
            return len(session.scalars(select(Outbox.id).where(Outbox.sent_at.is_(None),
                                                              Outbox.failed_at.is_(None))).all())  # fmt: skip

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()
