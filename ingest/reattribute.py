"""Re-attribution: a device's stored readings of a period given to the patient who really wore it.

Tags are fixed when a point is written (``docs/schema.md``), so a garment that sent before its assignment was
recorded leaves its readings ``unassigned`` (or with a previous holder's tags). InfluxDB 1.x cannot change a
point's tags: :func:`reattribute` reads the device's ``sample``, ``event`` and ``status`` points of the period,
writes them again with the patient's and clinic's tags (same measurement, time and fields), deletes the old
series' points of that period, and writes ``receipt`` points for the hours it moved so the monitor recomputes
those days (for the new patient and for any previous holder).

Idempotent and restartable: points that already carry the right tags are left alone, so running it again after
a crash finishes the job. The limit: between the write and the delete of one day's chunk both copies exist, so
an evaluation in that instant sees the readings under both tags (the old ``unassigned`` copy belongs to no
patient; a wrong previous holder would be counted once more until the delete). Done one day at a time, oldest
first, to bound memory.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from ingest.encode import RECEIPT, escape_key, escape_string, format_float
from ingest.write import auth_headers

log = logging.getLogger(__name__)

MEASUREMENTS: Final = ("sample", "event", "status")
ATTRIBUTION_TAGS: Final = frozenset({"attribution", "clinic", "patient"})
CHUNK_MS: Final = 86_400_000  # one day of a device's readings at a time
HOUR_MS: Final = 3_600_000
WRITE_BATCH: Final = 5000
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


class ReattributionError(RuntimeError):
    """InfluxDB refused or could not be reached while rewriting; the request stays pending (run it again)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Whose readings these are: ``device``'s points in ``[start_ms, end_ms)`` belong to ``patient`` of ``clinic``."""

    device: str
    patient: str
    clinic: str
    start_ms: int
    end_ms: int


@dataclass(slots=True)
class Rewritten:
    """What one re-attribution did."""

    points: int = 0
    series_deleted: int = 0
    previous: set[str] = field(default_factory=set)  # patients who held these readings before
    hours: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Influx:
    """The InfluxDB 1.x HTTP API (``/query`` and ``/write``) with basic or token auth."""

    url: str
    database: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 120.0

    def headers(self) -> dict[str, str]:
        """Authorization, if any."""
        return auth_headers(self.username, self.password, self.token)


async def reattribute(influx: Influx, target: Target, now_ms: int | None = None) -> Rewritten:
    """Give ``target.device``'s stored readings of the period to ``target.patient`` (see the module doc)."""
    for name in (target.device, target.patient, target.clinic):
        if not _SAFE.match(name):
            raise ReattributionError(f"not an identifier: {name!r}")
    done = Rewritten()
    timeout = aiohttp.ClientTimeout(total=influx.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, headers=influx.headers()) as http:
        for measurement in MEASUREMENTS:
            types = await _field_types(http, influx, measurement)
            for start in range(target.start_ms, target.end_ms, CHUNK_MS):
                end = min(target.end_ms, start + CHUNK_MS)
                await _chunk(http, influx, target, measurement, types, start, end, done)
        await _write(http, influx, _receipts(target, done, now_ms or int(time.time() * 1000)))
    log.info("re-attributed %d readings of %s to %s (%s) from %d to %d; previous holders: %s", done.points,
             target.device, target.patient, target.clinic, target.start_ms, target.end_ms,
             ", ".join(sorted(done.previous)) or "none")  # fmt: skip
    return done


async def _chunk(http: aiohttp.ClientSession, influx: Influx, target: Target, measurement: str,
                 types: Mapping[str, str], start: int, end: int, done: Rewritten) -> None:  # fmt: skip
    """One measurement's readings of one day: written under the patient's tags, the old series' points deleted."""
    where = f"device = '{target.device}' AND time >= {start}ms AND time < {end}ms"
    series = await _query(http, influx, f"SELECT * FROM {measurement} WHERE {where} GROUP BY *")
    lines: list[str] = []
    stale: list[dict[str, str]] = []
    for s in series:
        tags = {k: v for k, v in (s.get("tags") or {}).items() if v}
        if tags.get("patient") == target.patient and tags.get("clinic") == target.clinic:
            continue  # already the patient's: nothing to do (a second run finds everything here)
        if tags.get("patient"):
            done.previous.add(tags["patient"])
        new_tags = {k: v for k, v in tags.items() if k not in ATTRIBUTION_TAGS}
        new_tags |= {"clinic": target.clinic, "patient": target.patient}
        for values in s["values"]:
            row = dict(zip(s["columns"], values, strict=True))
            lines.append(_line(measurement, new_tags, row, types))
            done.hours.add(int(row["time"]) // 1_000_000 // HOUR_MS * HOUR_MS)
        stale.append(tags)
    await _write(http, influx, lines)
    for tags in stale:  # only after the new copies are durable
        condition = " AND ".join(f'"{k}" = \'{_quote(v)}\'' for k, v in sorted(tags.items()))
        await _query(http, influx, f"DELETE FROM {measurement} WHERE {condition} AND time >= {start}ms "
                                   f"AND time < {end}ms")  # fmt: skip
    done.points += len(lines)
    done.series_deleted += len(stale)


def _line(measurement: str, tags: Mapping[str, str], row: Mapping[str, Any], types: Mapping[str, str]) -> str:
    """A stored point as line protocol again: the same fields with their stored types, the given tags."""
    fields = [f"{escape_key(k)}={_value(v, types.get(k, 'float'))}" for k, v in sorted(row.items())
              if k != "time" and k not in tags and v is not None and k in types]  # fmt: skip
    tag_text = "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags.items()))
    return f"{measurement}{tag_text} {','.join(fields)} {int(row['time'])}"


def _value(value: Any, kind: str) -> str:
    if kind == "integer":
        return f"{int(value)}i"
    if kind == "boolean":
        return "true" if value else "false"
    if kind == "string":
        return escape_string(str(value))
    return format_float(float(value))


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _receipts(target: Target, done: Rewritten, now_ms: int) -> list[str]:
    """``receipt`` points at the moved hours for the patient and every previous holder: their days are re-read."""
    patients = {(target.clinic, target.patient)}
    lines = []
    for hour in sorted(done.hours):
        for clinic, patient in sorted(patients):
            lines.append(f"{RECEIPT},clinic={escape_key(clinic)},patient={escape_key(patient)} "
                         f"received_ms={now_ms}i {hour * 1_000_000}")  # fmt: skip
        for patient in sorted(done.previous - {target.patient}):
            lines.append(f"{RECEIPT},patient={escape_key(patient)} received_ms={now_ms}i {hour * 1_000_000}")
    return lines


async def _field_types(http: aiohttp.ClientSession, influx: Influx, measurement: str) -> dict[str, str]:
    series = await _query(http, influx, f"SHOW FIELD KEYS FROM {measurement}")
    return {str(v[0]): str(v[1]) for s in series for v in s["values"]}


async def _query(http: aiohttp.ClientSession, influx: Influx, statement: str) -> list[dict[str, Any]]:
    form = {"db": influx.database, "q": statement, "epoch": "ns"}
    try:
        async with http.post(f"{influx.url.rstrip('/')}/query", data=form) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ReattributionError(f"InfluxDB query failed: {exc!r}") from exc
    if status != 200 or not isinstance(body, dict):
        raise ReattributionError(f"InfluxDB answered {status}: {str(body)[:300]}")
    out: list[dict[str, Any]] = []
    for result in body.get("results", []):
        if "error" in result:
            raise ReattributionError(f"{result['error']} in: {statement[:200]}")
        out.extend(result.get("series", []))
    return out


async def _write(http: aiohttp.ClientSession, influx: Influx, lines: Sequence[str]) -> None:
    for i in range(0, len(lines), WRITE_BATCH):
        body = "\n".join(lines[i : i + WRITE_BATCH]).encode()
        try:
            async with http.post(f"{influx.url.rstrip('/')}/write", params={"db": influx.database,
                                                                              "precision": "ns"}, data=body) as resp:
                status, text = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ReattributionError(f"InfluxDB write failed: {exc!r}") from exc
        if status >= 300:
            raise ReattributionError(f"InfluxDB refused the rewrite: {status} {text[:300]}")


def targets(rows: Iterable[Any]) -> list[Target]:
    """Registry re-attributions (``ReattributionOut``) as :class:`Target` s."""
    return [Target(r.device_id, r.patient, r.clinic, int(r.valid_from.timestamp() * 1000),
                   int(r.valid_to.timestamp() * 1000)) for r in rows]  # fmt: skip
