"""A small synchronous InfluxQL client (``/query``) for the demo, tests and benchmark."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any


class QueryError(RuntimeError):
    """InfluxDB answered a query with an error."""


def query(url: str, database: str, q: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Run ``q`` and return its series: ``[{"name", "tags", "columns", "values"}]``."""
    params = urllib.parse.urlencode({"db": database, "q": q, "epoch": "ms"})
    request = urllib.request.Request(f"{url}/query?{params}", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body = json.loads(resp.read())
    series: list[dict[str, Any]] = []
    for result in body.get("results", []):
        if "error" in result:
            raise QueryError(result["error"])
        series.extend(result.get("series", []))
    return series


def rows(url: str, database: str, q: str) -> list[dict[str, Any]]:
    """The query's points as dicts (column -> value), tags merged in."""
    out: list[dict[str, Any]] = []
    for s in query(url, database, q):
        tags = s.get("tags") or {}
        out.extend({**tags, **dict(zip(s["columns"], values, strict=True))} for values in s["values"])
    return out


def scalar(url: str, database: str, q: str) -> float:
    """The first value of the first row's second column (e.g. a count); 0 if none."""
    found = rows(url, database, q)
    if not found:
        return 0.0
    value = list(found[0].values())[1 if "time" in found[0] else 0]
    return float(value or 0)
