"""Enrichment: who held a device at a sample's own time, from the device registry, cached.

The ingester tags ``sample``, ``event`` and ``status`` points with the
pseudonymous patient code and the clinic code that held the device at the
point's timestamp (``docs/schema.md``). The answers come from an immutable
:class:`Attributions` built from one registry snapshot (codes only, never
names), looked up in O(log n) per message; a :class:`Enrichment` refresher polls
the registry every ``registry_refresh_s``, loads a new snapshot only when the
registry's version moved, and swaps the cache in one assignment. A failed
refresh keeps the last snapshot.

Two sources sit behind :class:`SnapshotSource`: the registry database read
directly (:class:`DatabaseSource`) or the registry's HTTP API
(:class:`ApiSource`). Library errors are turned into :class:`EnrichmentError`
where they enter.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import httpx
from pydantic import ValidationError

from devices.registry.schemas import Snapshot, SnapshotEntry
from ingest.encode import escape_key
from ingest.metrics import IngestMetrics

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from devices.registry.service import Registry

log = logging.getLogger(__name__)

UNREGISTERED: Final = "unregistered"
UNASSIGNED: Final = "unassigned"
# Open ends of the time line (epoch ms); every real timestamp lies strictly inside.
BEGINNING: Final = -(2**63)
FOREVER: Final = 2**63 - 1
SNAPSHOT_PATH: Final = "/api/v1/enrichment/snapshot"
# Device ids named in one summary log line, at most.
SUMMARY_DEVICES: Final = 10


class EnrichmentError(RuntimeError):
    """The registry could not be read (unreachable, refused, or an answer that makes no sense)."""


@dataclass(frozen=True, slots=True)
class Attribution:
    """The answer for one stretch of a device's time line, ``start_ms <= t < end_ms``.

    Either ``patient`` and ``clinic`` are set (an assignment), or ``reason`` is
    (``unregistered``, ``unassigned``). ``tags`` are the point's tags, keys
    sorted, values escaped for line protocol.
    """

    patient: str | None
    clinic: str | None
    reason: str | None
    start_ms: int
    end_ms: int
    tags: tuple[tuple[str, str], ...]
    # Series keys with these tags added, memoised by the encoder (a few per device).
    keys: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def holds(self, t_ms: int) -> bool:
        """True if ``t_ms`` falls in this stretch."""
        return self.start_ms <= t_ms < self.end_ms


def _held(entry: SnapshotEntry, end_ms: int) -> Attribution:
    tags = (("clinic", escape_key(entry.clinic)), ("patient", escape_key(entry.patient)))
    return Attribution(entry.patient, entry.clinic, None, entry.from_ms, end_ms, tags)


def _unassigned(start_ms: int, end_ms: int) -> Attribution:
    return Attribution(None, None, UNASSIGNED, start_ms, end_ms, (("attribution", UNASSIGNED),))


NOBODY: Final = Attribution(None, None, UNREGISTERED, BEGINNING, FOREVER, (("attribution", UNREGISTERED),))


class Attributions:
    """An immutable device -> time line cache built from one registry snapshot."""

    __slots__ = ("_lines", "assignments", "devices", "version")

    def __init__(self, snapshot: Snapshot) -> None:
        self.version = snapshot.version
        by_device: dict[str, list[SnapshotEntry]] = {device: [] for device in snapshot.devices}
        for entry in snapshot.assignments:
            by_device.setdefault(entry.device_id, []).append(entry)
        # Per device: the starts of its stretches (the first is BEGINNING) and their answers.
        self._lines: dict[str, tuple[list[int], list[Attribution]]] = {
            device: _time_line(device, entries) for device, entries in by_device.items()
        }
        self.devices = len(self._lines)
        self.assignments = len(snapshot.assignments)

    def lookup(self, device_id: str, t_ms: int) -> Attribution:
        """Who held ``device_id`` at ``t_ms``, or why nobody did (``reason``)."""
        line = self._lines.get(device_id)
        if line is None:
            return NOBODY
        starts, answers = line
        return answers[bisect.bisect_right(starts, t_ms) - 1]


def _time_line(device: str, entries: list[SnapshotEntry]) -> tuple[list[int], list[Attribution]]:
    """The device's time line: assignments, with ``unassigned`` stretches before, between and after them."""
    entries = sorted(entries, key=lambda e: e.from_ms)
    answers: list[Attribution] = []
    cursor = BEGINNING
    for i, entry in enumerate(entries):
        end = entry.to_ms if entry.to_ms is not None else FOREVER
        following = entries[i + 1].from_ms if i + 1 < len(entries) else FOREVER
        if following < end:
            # The registry refuses overlaps; should one slip through, the later assignment wins from its start.
            log.warning("registry: assignments of %s overlap at %d; the later one counts from its start",
                        device, following)  # fmt: skip
            end = following
        if entry.from_ms >= end:
            continue  # empty (or wholly overlapped) stretch
        if entry.from_ms > cursor:
            answers.append(_unassigned(cursor, entry.from_ms))
        answers.append(_held(entry, end))  # cursor <= from_ms: the previous end was cut at this start
        cursor = end
    if cursor < FOREVER:
        answers.append(_unassigned(cursor, FOREVER))
    return [a.start_ms for a in answers], answers


# -- sources ---------------------------------------------------------------------------------------


class SnapshotSource(Protocol):
    """Where snapshots come from: the registry database or the registry API."""

    def describe(self) -> str:
        """Where, for logs (no secrets)."""
        ...

    async def load(self, known: int | None) -> Snapshot | None:
        """A new snapshot, or None when the registry is still at version ``known``.

        Raises :class:`EnrichmentError` when the registry cannot be read.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class DatabaseSource:
    """Reads the registry database directly (``sqlite:///...``, ``postgresql://...``), read only.

    The registry's calls are synchronous SQLAlchemy; they run in a worker thread.
    The ingester never creates or migrates the database: a missing SQLite file or
    a missing table is an error (retried at the next refresh).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: Engine | None = None
        self._registry: Registry | None = None

    def describe(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self._url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - only for a log line; the load itself reports a bad URL
            return "the registry database (unparseable URL)"

    async def load(self, known: int | None) -> Snapshot | None:
        return await asyncio.to_thread(self._load, known)

    def _load(self, known: int | None) -> Snapshot | None:
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError

        from devices.registry.errors import RegistryError
        from devices.registry.service import SYSTEM, Registry

        try:
            if self._registry is None:
                self._registry = Registry(self._sessions())
            registry = self._registry
            if known is not None and registry.version() == known:
                return None
            return registry.snapshot(SYSTEM)
        except (SQLAlchemyError, ArgumentError) as exc:
            raise EnrichmentError(f"registry database {self.describe()}: {type(exc).__name__}: {exc}") from exc
        except (RegistryError, ValidationError) as exc:
            raise EnrichmentError(f"registry database {self.describe()}: {exc}") from exc

    def _sessions(self) -> sessionmaker[Session]:
        from sqlalchemy.engine import make_url

        from devices.registry.db import make_engine, session_factory

        url = make_url(self._url)
        local = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
        # make_engine would create an empty file (and its folder): the ingester only reads.
        if local and url.database is not None and not os.path.exists(url.database):
            raise EnrichmentError(f"registry database file {url.database} does not exist")
        self._engine = make_engine(self._url)
        return session_factory(self._engine)

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
            self._engine = None
            self._registry = None


class ApiSource:
    """Reads ``GET {base}/api/v1/enrichment/snapshot`` with a bearer token.

    The API sends ``ETag: "<version>"`` and answers 304 to a matching
    ``If-None-Match``, so an unchanged registry costs one small request.
    """

    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self._base = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self._base, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
        )

    def describe(self) -> str:
        return self._base + SNAPSHOT_PATH

    async def load(self, known: int | None) -> Snapshot | None:
        headers = {"If-None-Match": f'"{known}"'} if known is not None else {}
        try:
            response = await self._client.get(SNAPSHOT_PATH, headers=headers)
        except httpx.HTTPError as exc:
            raise EnrichmentError(f"registry API {self.describe()}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 304 and known is not None:
            return None
        if response.status_code != 200:
            raise EnrichmentError(
                f"registry API {self.describe()} answered HTTP {response.status_code}: {response.text[:300]}"
            )
        try:
            return await asyncio.to_thread(Snapshot.model_validate_json, response.content)
        except ValidationError as exc:
            raise EnrichmentError(f"registry API {self.describe()} sent an invalid snapshot: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()


def source_for(url: str, token: str | None) -> SnapshotSource:
    """The source a ``registry_url`` names: http(s):// is the API, anything else a database URL."""
    if url.startswith(("http://", "https://")):
        if not token:
            raise EnrichmentError("the registry API needs a token (COMPRESSION_REGISTRY_TOKEN)")
        return ApiSource(url, token)
    return DatabaseSource(url)


# -- the refresher ---------------------------------------------------------------------------------


class Enrichment:
    """The current :class:`Attributions`, kept fresh, and the count of what could not be attributed."""

    def __init__(
        self,
        source: SnapshotSource,
        refresh_s: float,
        metrics: IngestMetrics,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 10.0,
    ) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.attributions: Attributions | None = None
        self._metrics = metrics
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._failures = 0
        self._counters = {
            (measurement, reason): metrics.unattributed.labels(measurement, reason)
            for measurement in ("sample", "event", "status")
            for reason in (UNREGISTERED, UNASSIGNED)
        }
        self._tally: Counter[str] = Counter()
        self._devices: dict[str, set[str]] = {UNREGISTERED: set(), UNASSIGNED: set()}

    async def start(self) -> None:
        """Wait for the first snapshot, retrying with capped backoff (cancel to give up)."""
        attempt = 0
        while not await self.refresh():
            attempt += 1
            delay = min(self._retry_max_s, self._retry_initial_s * 2 ** min(attempt - 1, 30))
            if attempt in (1, 10) or attempt % 50 == 0:
                log.warning("waiting for the first registry snapshot from %s (attempt %d); retrying in %.1f s",
                            self.source.describe(), attempt, delay)  # fmt: skip
            await asyncio.sleep(delay)

    async def run(self) -> None:
        """Refresh every ``refresh_s`` until cancelled; log what went unattributed since the last refresh."""
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()
            self.summarise()

    async def refresh(self) -> bool:
        """Load a new snapshot if the registry changed; False (last snapshot kept) if it could not be read."""
        current = self.attributions
        started = time.monotonic()
        try:
            snapshot = await asyncio.wait_for(
                self.source.load(current.version if current is not None else None),
                timeout=max(30.0, self.refresh_s),
            )
        except (EnrichmentError, TimeoutError) as exc:
            self._failures += 1
            self._metrics.registry_refresh_failures.inc()
            if self._failures in (1, 10) or self._failures % 50 == 0:
                kept = f"keeping version {current.version}" if current is not None else "no snapshot yet"
                log.warning("registry refresh failed (%d in a row; %s): %s",
                            self._failures, kept, str(exc) or type(exc).__name__)  # fmt: skip
            return False
        if self._failures:
            log.info("registry refresh works again after %d failure(s)", self._failures)
            self._failures = 0
        self._metrics.registry_checked.set(time.time())
        if snapshot is None:
            return True
        try:
            # Off the event loop: for 10,000 devices this takes a good part of a second of CPU.
            fresh = await asyncio.to_thread(Attributions, snapshot)
        except Exception:  # a snapshot we cannot use must not stop the ingester
            self._metrics.registry_refresh_failures.inc()
            log.exception("registry snapshot version %d could not be used; keeping the last one", snapshot.version)
            return current is not None
        self.attributions = fresh  # one assignment: the message path sees the old cache or the new one
        self._metrics.registry_version.set(fresh.version)
        log.info("registry snapshot version %d: %d devices, %d assignments (loaded in %.0f ms from %s)",
                 fresh.version, fresh.devices, fresh.assignments, (time.monotonic() - started) * 1000,
                 self.source.describe())  # fmt: skip
        return True

    def unattributed(self, measurement: str, device: str, reason: str, count: int) -> None:
        """Count points stored without a patient (the metric, and the next summary)."""
        self._counters[measurement, reason].inc(count)
        self._tally[reason] += count
        devices = self._devices[reason]
        if len(devices) < SUMMARY_DEVICES:
            devices.add(device)

    def summarise(self) -> None:
        """Log what was stored unattributed since the last summary, once (nothing if nothing was)."""
        if not self._tally:
            return
        parts = [f"{reason} {count} ({_names(self._devices[reason])})" for reason, count in sorted(self._tally.items())]
        log.info("stored without a patient since the last refresh: %s", "; ".join(parts))
        self._tally.clear()
        for devices in self._devices.values():
            devices.clear()

    async def close(self) -> None:
        """Release the source's connections."""
        await self.source.close()


def _names(devices: Iterable[str]) -> str:
    names = sorted(devices)
    more = ", ..." if len(names) >= SUMMARY_DEVICES else ""
    return ", ".join(names) + more
