"""Expand a dashboard query's macros and template variables the way Grafana's InfluxDB (InfluxQL) data source does.

For the tests, which run every panel's query against a real InfluxDB, and for
``compression dashboards`` users who want to try a panel's query by hand.
What Grafana 11's InfluxQL data source does, and this reproduces:

- ``$timeFilter``: ``time >= <from> and time <= <to>``, where a relative time
  of the form ``now-30d`` stays relative (``now() - 30d``), ``now`` is
  ``now()``, and anything else is epoch milliseconds (``1700000000000ms``);
- ``$__interval`` (``20m``, ``1h``, ...) and ``$__interval_ms`` (a number):
  the range divided by the panel's max data points (the panel's width in
  pixels), rounded to Grafana's "nice" intervals, never under ``min_interval``;
- ``$var``, ``${var}``, ``[[var]]``: a variable's value. A multi-value (or
  include-All) variable always becomes a regular expression:
  ``(a|b)``, each value regex-escaped; All is the variable's custom all value
  as written (e.g. ``.*``) or every option as ``(a|b|...)``. A single-value
  variable inside a ``/regex/`` is escaped, elsewhere inserted as is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ALL = "$__all"
_RELATIVE = re.compile(r"^now-(\d+)([smhdw])$")
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)\]\]")
_REGEX_LITERAL = re.compile(r"(=|!)~\s*/((?:[^/\\\n]|\\.)*)/")
# Grafana's interval rounding table (kbn.roundInterval), in ms.
_ROUND = [
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1_500, 1_000),
    (3_500, 2_000),
    (7_500, 5_000),
    (12_500, 10_000),
    (17_500, 15_000),
    (25_000, 20_000),
    (45_000, 30_000),
    (90_000, 60_000),
    (210_000, 120_000),
    (450_000, 300_000),
    (750_000, 600_000),
    (1_050_000, 900_000),
    (1_500_000, 1_200_000),
    (2_700_000, 1_800_000),
    (5_400_000, 3_600_000),
    (9_000_000, 7_200_000),
    (16_200_000, 10_800_000),
    (32_400_000, 21_600_000),
    (86_400_000, 43_200_000),
    (604_800_000, 86_400_000),
    (1_814_400_000, 604_800_000),
    (3_628_800_000, 2_592_000_000),
]
_UNITS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def escape_regex(value: str) -> str:
    """Grafana's ``escapeRegex`` (the characters it escapes, ``/`` included)."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


def round_interval(ms: float) -> int:
    """Grafana's rounding of an interval to a "nice" one."""
    for limit, nice in _ROUND:
        if ms < limit:
            return nice
    return 31_536_000_000


def interval_text(ms: int) -> str:
    """``$__interval`` as Grafana writes it: the largest whole unit (``1d``, ``20m``, ``500ms``)."""
    for unit, size in (
        ("y", 31_536_000_000),
        ("w", 604_800_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ):
        if ms % size == 0 and ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _influx_time(value: str | int) -> str:
    if isinstance(value, int):
        return f"{value}ms"
    if value == "now":
        return "now()"
    m = _RELATIVE.match(value)
    if not m:
        raise ValueError(f"not a time Grafana keeps relative: {value!r} (give epoch ms instead)")
    return f"now() - {m.group(1)}{m.group(2)}"


def _span_ms(start: str | int, end: str | int, now_ms: int) -> int:
    def absolute(v: str | int) -> int:
        if isinstance(v, int):
            return v
        if v == "now":
            return now_ms
        m = _RELATIVE.match(v)
        assert m, v
        return now_ms - int(m.group(1)) * _UNITS[m.group(2)]

    return max(1, absolute(end) - absolute(start))


@dataclass
class Variable:
    """A dashboard variable as the query needs it: its options (for All) and how it expands."""

    name: str
    current: list[str]
    options: list[str] = field(default_factory=list)
    multi: bool = False
    include_all: bool = False
    all_value: str | None = None

    @classmethod
    def from_model(cls, model: Mapping[str, Any], current: Sequence[str], options: Sequence[str]) -> Variable:
        """From a dashboard JSON variable (``templating.list[i]``), with its current values and options."""
        return cls(
            model["name"],
            list(current),
            list(options),
            bool(model.get("multi")),
            bool(model.get("includeAll")),
            model.get("allValue"),
        )


@dataclass
class Context:
    """What a query is expanded with: the time range, the interval inputs and the variables."""

    start: str | int = "now-30d"
    end: str | int = "now"
    now_ms: int = 0
    max_data_points: int = 1000
    min_interval_ms: int = 1
    variables: dict[str, Variable] = field(default_factory=dict)

    def interval_ms(self) -> int:
        """``$__interval_ms``."""
        return max(
            self.min_interval_ms, round_interval(_span_ms(self.start, self.end, self.now_ms) / self.max_data_points)
        )


def _value(var: Variable, in_regex: bool) -> str:
    values = var.current
    if values == [ALL] or ALL in values:
        if var.all_value is not None:
            return var.all_value  # a custom all value is inserted as written
        values = var.options
    if var.multi or var.include_all:
        return "(" + "|".join(escape_regex(v) for v in values) + ")"
    value = values[0] if values else ""
    return escape_regex(value) if in_regex else value


def expand(query: str, ctx: Context) -> str:
    """``query`` as Grafana sends it to InfluxDB."""
    interval = ctx.interval_ms()
    text = query.replace("$timeFilter", f"time >= {_influx_time(ctx.start)} and time <= {_influx_time(ctx.end)}")
    text = text.replace("$__interval_ms", str(interval)).replace("$__interval", interval_text(interval))
    text = text.replace("$interval", interval_text(interval))
    regex_spans = [m.span(2) for m in _REGEX_LITERAL.finditer(text)]

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name not in ctx.variables:
            return m.group(0)
        in_regex = any(a <= m.start() < b for a, b in regex_spans)
        return _value(ctx.variables[name], in_regex)

    return _VARIABLE.sub(substitute, text)


def used_variables(text: str) -> set[str]:
    """Names of the template variables ``text`` uses (not Grafana's own ``$__*`` and ``$timeFilter``)."""
    names = {m.group(1) or m.group(2) or m.group(4) for m in _VARIABLE.finditer(text)}
    return {n for n in names if not n.startswith("__") and n not in {"timeFilter", "interval"}}
