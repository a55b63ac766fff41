"""Checks of a generated dashboard's JSON: what Grafana needs to import it and run every panel.

- ``schemaVersion`` is the one of the Grafana the compose file runs (11.6: 41);
- panel ids are unique (rows and the panels inside collapsed rows included);
- every data source reference (panels, targets, variables, annotations)
  resolves to a provisioned data source uid (or Grafana's built-in one);
- every template variable a query, a variable or an annotation uses is
  defined, and defined before the variables that use it;
- every panel other than a row has at least one query;
- every "config from query results" (``configFromData``) mapping names a handler Grafana 11.6 has.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from dashboards.influx import INFLUX_UID, PROMETHEUS_UID
from dashboards.render import used_variables

SCHEMA_VERSION: Final = 41
BUILTIN_UIDS: Final = frozenset({"-- Grafana --", "grafana"})
# The data sources deploy/grafana/provisioning/datasources/influxdb.yaml defines (a unit test checks the file).
PROVISIONED_UIDS: Final = frozenset({INFLUX_UID, PROMETHEUS_UID})
# The handler keys of Grafana 11.6's "config from query results" transformation: configMapHandlers in
# public/app/features/transformers/fieldToConfigMapping/fieldToConfigMapping.ts (read in grafana/grafana's source
# of that time, the 12.0.0-pre main branch 11.6 was cut from). An unknown key is silently ignored by Grafana (no
# handler: the field sets nothing), which is how a band's upper line mapped to "threshold2" never drew. There is
# one threshold handler: each field mapped to threshold1 adds a step (colour: handlerArguments.threshold.color,
# default red) after a green base step of Grafana's own.
CONFIG_FROM_QUERY_HANDLERS: Final = frozenset({
    "field.name", "field.value", "field.label", "__ignore", "max", "min", "unit", "decimals", "displayName", "color",
    "threshold1", "mappings.value", "mappings.color", "mappings.text",
})  # fmt: skip


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def query_text(target: Mapping[str, Any]) -> str:
    """A target's query (InfluxQL ``query`` or PromQL ``expr``)."""
    return str(target.get("query") or target.get("expr") or "")


def problems(dashboard: Mapping[str, Any], uids: set[str] | None = None) -> list[str]:
    """What is wrong with ``dashboard`` (empty: nothing)."""
    uids = set(PROVISIONED_UIDS) if uids is None else uids
    known = uids | BUILTIN_UIDS
    out: list[str] = []
    if dashboard.get("schemaVersion") != SCHEMA_VERSION:
        out.append(f"schemaVersion {dashboard.get('schemaVersion')} is not {SCHEMA_VERSION}")
    if not dashboard.get("uid"):
        out.append("no uid")
    ids = [p.get("id") for p in panels(dashboard)]
    dupes = sorted({i for i in ids if ids.count(i) > 1 or i is None}, key=str)
    if dupes:
        out.append(f"panel ids not unique: {dupes}")
    variables = (dashboard.get("templating") or {}).get("list") or []
    defined: list[str] = []
    texts: list[tuple[str, str]] = []

    def ref(where: str, ds: Any) -> None:
        if ds is None:
            return
        if not isinstance(ds, dict) or ds.get("uid") not in known:
            out.append(f"{where}: data source {ds!r} is not provisioned ({sorted(uids)})")

    for v in variables:
        ref(f"variable {v.get('name')}", v.get("datasource"))
        query = v.get("query") if isinstance(v.get("query"), str) else ""
        missing = used_variables(query or "") - set(defined)
        if missing:
            out.append(f"variable {v.get('name')} uses {sorted(missing)} not defined before it")
        defined.append(str(v.get("name")))
    for a in (dashboard.get("annotations") or {}).get("list") or []:
        ref(f"annotation {a.get('name')}", a.get("datasource"))
        if a.get("builtIn"):
            continue
        target = a.get("target") or {}
        if not query_text(target):
            out.append(f"annotation {a.get('name')} has no query")
        texts.append((f"annotation {a.get('name')}", query_text(target)))
    for p in panels(dashboard):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        ref(where, p.get("datasource"))
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets or not all(query_text(t) for t in targets):
            out.append(f"{where} has a target without a query")
        for t in targets:
            ref(f"{where} target {t.get('refId')}", t.get("datasource"))
            texts.append((where, query_text(t)))
    for where, text in texts:
        missing = used_variables(text) - set(defined)
        if missing:
            out.append(f"{where} uses undefined variables {sorted(missing)}")
    out += [f"panel {p.get('id')} {p.get('title')!r}: {problem}" for p in panels(dashboard)
            for problem in config_mapping_problems(p)]  # fmt: skip
    return out


def config_mapping_problems(panel: Mapping[str, Any]) -> list[str]:
    """Mappings of the panel's "config from query results" transformations to handlers Grafana 11.6 lacks."""
    out = []
    for t in panel.get("transformations") or []:
        if t.get("id") != "configFromData":
            continue
        for m in (t.get("options") or {}).get("mappings") or []:
            if m.get("handlerKey") not in CONFIG_FROM_QUERY_HANDLERS:
                out.append(f"field {m.get('fieldName')!r} is mapped to {m.get('handlerKey')!r}, which Grafana 11.6's "
                           "config from query results does not have (use threshold1 for every line)")
    return out
