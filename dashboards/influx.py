"""InfluxQL targets for the dashboards, and the data sources they point at.

The foundation SDK's 11.6 build ships query types for Prometheus, Loki and
others but none for InfluxDB, so this module adds one: a raw InfluxQL target
(``rawQuery: true``) as Grafana's InfluxDB data source saves it, and a
builder in the SDK's style. Every query text is derived from
``monitor/queries.py`` where the monitor has a statement for the same
question (:func:`derive` swaps its concrete patients, time range and time
zone for Grafana's template variables and macros).
"""

from __future__ import annotations

import re
import typing
from typing import Final, Literal

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.dashboard import DataSourceRef

INFLUX_UID: Final = "compression-influxdb"
INFLUX_TYPE: Final = "influxdb"
PROMETHEUS_UID: Final = "compression-prometheus"
PROMETHEUS_TYPE: Final = "prometheus"


def influx_ref() -> DataSourceRef:
    """The provisioned InfluxDB data source (``deploy/grafana/provisioning/datasources/influxdb.yaml``)."""
    return DataSourceRef(type_val=INFLUX_TYPE, uid=INFLUX_UID)


def prometheus_ref() -> DataSourceRef:
    """The provisioned Prometheus data source (the ingester's own metrics)."""
    return DataSourceRef(type_val=PROMETHEUS_TYPE, uid=PROMETHEUS_UID)


ResultFormat = Literal["time_series", "table"]


class InfluxQLQuery(cogvariants.Dataquery):
    """A raw InfluxQL target of Grafana's InfluxDB data source."""

    def __init__(
        self,
        ref_id: str = "A",
        query: str = "",
        result_format: ResultFormat = "time_series",
        alias: str | None = None,
        hide: bool | None = None,
    ) -> None:
        self.ref_id = ref_id
        self.query = query
        self.result_format = result_format
        self.alias = alias
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "refId": self.ref_id,
            "datasource": influx_ref().to_json(),
            "query": self.query,
            "rawQuery": True,
            "resultFormat": self.result_format,
        }
        if self.alias is not None:
            payload["alias"] = self.alias
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload


class InfluxQL(cogbuilder.Builder[cogvariants.Dataquery]):
    """Builder of :class:`InfluxQLQuery`."""

    def __init__(self, query: str, ref_id: str = "A") -> None:
        self._internal = InfluxQLQuery(ref_id=ref_id, query=query)

    def build(self) -> InfluxQLQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> typing.Self:
        self._internal.ref_id = ref_id
        return self

    def table(self) -> typing.Self:
        """``resultFormat: table``: one row per point, tags as columns."""
        self._internal.result_format = "table"
        return self

    def alias(self, alias: str) -> typing.Self:
        self._internal.alias = alias
        return self


# Placeholders handed to monitor.queries (they pass its validation), then swapped for Grafana's variables.
_PATIENT: Final = "GRAFANAPATIENT"
_ZONE: Final = "Grafana/Zone"
_START: Final = 1_111_111_111_111
_END: Final = 2_222_222_222_222


def derive(
    make: typing.Callable[..., str],
    *args: object,
    patient: str = "$patient",
    tz: str = "$tz",
    select: str | None = None,
    where: str | None = None,
) -> str:
    """A ``monitor.queries`` statement for Grafana: ``make(patients, [zone,] start_ms, end_ms, *args)`` with its
    patient filter, time range and ``tz()`` replaced by ``patient =~ /^$patient$/``, ``$timeFilter`` and
    ``tz('$tz')``; ``select`` replaces the selected expressions, ``where`` adds a condition."""
    import inspect

    params = list(inspect.signature(make).parameters)
    call: list[object] = [[_PATIENT]]
    if "timezone" in params:
        call.append(_ZONE)
    call += [_START, _END, *args]
    text = make(*call)
    swaps = [
        (f"patient =~ /^({_PATIENT})$/", f"patient =~ /^{patient}$/"),
        (f"time >= {_START}ms AND time < {_END}ms", "$timeFilter"),
    ]
    if "timezone" in params:
        swaps.append((f"tz('{_ZONE}')", f"tz('{tz}')"))
    for old, new in swaps:
        if text.count(old) != 1:
            raise ValueError(f"monitor.queries.{make.__name__} no longer has {old!r}: {text}")
        text = text.replace(old, new)
    if select is not None:
        text, n = re.subn(r"^SELECT .*? FROM ", f"SELECT {select} FROM ", text, count=1)
        if n != 1:
            raise ValueError(f"no SELECT ... FROM in {text}")
    if where is not None:
        text = text.replace(" WHERE ", f" WHERE {where} AND ", 1)
    return text
