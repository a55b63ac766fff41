"""Write stage: line protocol to InfluxDB over its v1 HTTP API (``/write``, ``/query``).

The v1 API is the one InfluxDB 1.x, 2.x (2.4+, token auth with DBRP mapping)
and 3.x all serve. A write is retried with capped exponential backoff on
connection errors, 5xx and the status codes that mean "not yet" (401/403/404
while an operator fixes credentials or a database, 429); it is never dropped.
A 4xx that blames the data (400, 413, 422) is bisected down to the offending
lines, which are handed back to be dead-lettered, so one bad line never
poisons a batch. Rewriting lines that were stored already is harmless: points
are idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp

from ingest.metrics import IngestMetrics
from ingest.settings import IngestSettings

log = logging.getLogger(__name__)

DATA_ERRORS: Final = frozenset({400, 413, 422})


class WriteError(RuntimeError):
    """An InfluxDB request failed in a way a retry may fix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StoppedError(RuntimeError):
    """The writer was asked to stop while a write was still being retried."""


@dataclass(frozen=True, slots=True)
class RefusedLine:
    """A line InfluxDB refused for its content, with InfluxDB's own words."""

    line: str
    error: str


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter."""

    initial_s: float
    max_s: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        base = min(self.max_s, self.initial_s * 2 ** min(attempt - 1, 30))
        return float(base * random.uniform(0.5, 1.0))


def auth_headers(username: str | None, password: str | None, token: str | None) -> dict[str, str]:
    """InfluxDB's Authorization header: ``Token`` (2.x/3.x) when a token is given, else Basic (1.x), else none.
    The one place for it: the writer, the re-attribution and the monitor's reader all send it."""
    if token:
        return {"Authorization": f"Token {token}"}
    if username:
        credentials = f"{username}:{password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}
    return {}


class InfluxWriter:
    """Writes batches of lines to one InfluxDB database."""

    def __init__(self, settings: IngestSettings, metrics: IngestMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._backoff = Backoff(settings.retry_initial_s, settings.retry_max_s)
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        self._params = {"db": settings.influx_database, "precision": "ns"}
        if settings.influx_retention_policy:
            self._params["rp"] = settings.influx_retention_policy

    async def __aenter__(self) -> InfluxWriter:
        timeout = aiohttp.ClientTimeout(total=self._settings.influx_timeout_s)
        self._session = aiohttp.ClientSession(
            base_url=self._settings.influx_url + "/", timeout=timeout, headers=self._auth_headers()
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def stop(self) -> None:
        """Make pending retries give up (used at shutdown; nothing is acked for them)."""
        self._stopping.set()

    def _auth_headers(self) -> dict[str, str]:
        s = self._settings
        return auth_headers(s.influx_username, s.influx_password, s.influx_token)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session (inside ``async with``)."""
        if self._session is None:
            raise RuntimeError("InfluxWriter used outside 'async with'")
        return self._session

    async def ensure_database(self) -> None:
        """Create the database on InfluxDB 1.x if it does not exist (idempotent).

        InfluxDB 2.x and 3.x do not create databases through InfluxQL; a failure
        here is logged, and the writes then say whether the database is there.
        """
        query = f'CREATE DATABASE "{self._settings.influx_database}"'
        attempt = 0
        while True:
            attempt += 1
            try:
                status, text = await self._post("query", {"q": query}, b"")
            except WriteError as exc:
                await self._wait_retry(attempt, exc.kind, str(exc))
                continue
            if status < 300:
                return
            log.warning("could not create database: HTTP %s %s", status, text[:200])
            return

    async def ping(self) -> bool:
        """True if InfluxDB answers ``/ping``."""
        try:
            async with self.session.get("ping") as resp:
                return resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def write(self, lines: Sequence[str]) -> list[RefusedLine]:
        """Write ``lines`` durably; return the lines InfluxDB refused for their content.

        Retries until the write succeeds or :meth:`stop` is called (then raises
        :class:`StoppedError`).
        """
        status, text = await self._write_with_retry(lines)
        if status < 300:
            return []
        return await self._isolate(lines, text)

    async def _isolate(self, lines: Sequence[str], error: str) -> list[RefusedLine]:
        if len(lines) == 1:
            return [RefusedLine(lines[0], error)]
        mid = len(lines) // 2
        refused: list[RefusedLine] = []
        for half in (lines[:mid], lines[mid:]):
            status, text = await self._write_with_retry(half)
            if status >= 300:
                refused.extend(await self._isolate(half, text))
        return refused

    async def _write_with_retry(self, lines: Sequence[str]) -> tuple[int, str]:
        body = "\n".join(lines).encode()
        attempt = 0
        while True:
            attempt += 1
            try:
                status, text = await self._post("write", self._params, body)
            except WriteError as exc:
                await self._wait_retry(attempt, exc.kind, str(exc))
                continue
            if status < 300 or status in DATA_ERRORS:
                if status in DATA_ERRORS:
                    self._metrics.write_errors.labels("client").inc()
                return status, text
            kind = "server" if status >= 500 else "refused"
            await self._wait_retry(attempt, kind, f"HTTP {status}: {text[:300]}")

    async def _post(self, path: str, params: dict[str, str], body: bytes) -> tuple[int, str]:
        try:
            async with self.session.post(path, params=params, data=body) as resp:
                text = await resp.text() if resp.status >= 300 else ""
                return resp.status, text
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise WriteError("connection", f"{type(exc).__name__}: {exc}") from exc

    async def _wait_retry(self, attempt: int, kind: str, message: str) -> None:
        self._metrics.write_errors.labels(kind).inc()
        delay = self._backoff.delay(attempt)
        log_at = log.warning if attempt in (1, 10) or attempt % 50 == 0 else log.debug
        log_at("influx %s error (attempt %d, retry in %.2fs): %s", kind, attempt, delay, message)
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        except TimeoutError:
            return
        raise StoppedError("writer stopped during retry")
