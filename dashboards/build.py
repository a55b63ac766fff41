"""The Grafana dashboards, generated with grafana-foundation-sdk (the 11.6 build, for Grafana 11.6).

One function per dashboard; :func:`generate` gives each as the JSON Grafana
imports, written to ``dashboards/json/`` by ``compression dashboards
generate`` (a unit test keeps the committed files equal to this output).
Every panel queries the provisioned InfluxDB data source in InfluxQL,
except the fleet dashboard's "Ingester metrics" row (Prometheus, the
ingester's own ``/metrics``). Where the monitor has a statement for the same
question, the panel's query is derived from it (``monitor/queries.py``, via
:func:`dashboards.influx.derive`); the rest read the measurements the monitor
writes for the dashboards (``flag_day``, ``flag_episode``, ``patient_info``,
``registry_problem``, see docs/schema.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    StackingConfig,
    TableSortByFieldState,
    VizLegendOptions,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.dashboard import (
    DashboardRangeMapOptions,
    DataTransformerConfig,
    DynamicConfigValue,
    RangeMap,
    Threshold,
    ThresholdsMode,
    ValueMappingResult,
    VariableHide,
    VariableRefresh,
    VariableSort,
)

from dashboards.influx import InfluxQL, derive, influx_ref, prometheus_ref
from monitor import queries as q

JSON_DIR: Final = Path(__file__).resolve().parent / "json"
TAGS: Final = ["compression"]
# Colours of "who needs attention": the monitor's attention score (100 per open critical episode, 10 per warning
# or registry problem, 1 per info; docs/monitor.md).
ATTENTION_STEPS: Final[list[tuple[float | None, str]]] = [(None, "green"), (1, "yellow"), (10, "orange"), (100, "red")]
NEEDS_ATTENTION: Final = 10


# --- small helpers --------------------------------------------------------------------------------------------------


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> dash.ThresholdsConfig:
    return dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])


def _transform(id_: str, options: dict[str, Any]) -> DataTransformerConfig:
    return DataTransformerConfig(id_val=id_, options=options)


def _threshold(field: str, colour: str) -> dict[str, Any]:
    """A "config from query results" mapping: ``field``'s value becomes a threshold step (a line) in ``colour``."""
    return {"fieldName": field, "handlerKey": "threshold1", "handlerArguments": {"threshold": {"color": colour}}}


def _cell(kind: str) -> DynamicConfigValue:
    return DynamicConfigValue(id_val="custom.cellOptions", value={"type": kind})


def _prop(id_: str, value: object) -> DynamicConfigValue:
    return DynamicConfigValue(id_val=id_, value=value)


def _variable_query(
    name: str, query: str, label: str, *, multi: bool = True, all_value: str | None = None, hide: bool = False
) -> dash.QueryVariable:
    v = (
        dash.QueryVariable(name)
        .label(label)
        .datasource(influx_ref())
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    if multi:
        v = v.multi(True).include_all(True).current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    if all_value is not None:
        v = v.all_value(all_value)
    if hide:
        v = v.hide(VariableHide.HIDE_VARIABLE)
    return v


CLINIC_VAR: Final = 'SHOW TAG VALUES FROM "patient_info" WITH KEY = "clinic"'
PHYSIO_VAR: Final = 'SHOW TAG VALUES FROM "patient_info" WITH KEY = "physio" WHERE clinic =~ /^$clinic$/'
PATIENT_VAR: Final = (
    'SHOW TAG VALUES FROM "patient_info" WITH KEY = "patient" WHERE clinic =~ /^$clinic$/ AND physio =~ /^$physio$/'
)


def _clinic_physio_vars(patient_multi: bool) -> list[cogbuilder.Builder[model.VariableModel]]:
    tz_where = "clinic =~ /^$clinic$/" if patient_multi else "patient =~ /^$patient$/"
    return [
        _variable_query("clinic", CLINIC_VAR, "Clinic", all_value=".*"),
        _variable_query("physio", PHYSIO_VAR, "Physio", all_value=".*"),
        _variable_query("patient", PATIENT_VAR, "Patient", multi=patient_multi),
        # The clinic's time zone (a tag of patient_info): days are local days, as the monitor's.
        _variable_query(
            "tz",
            f'SHOW TAG VALUES FROM "patient_info" WITH KEY = "timezone" WHERE {tz_where}',
            "Time zone",
            multi=False,
            hide=True,
        ),
    ]


class _Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def _dashboard(uid: str, title: str, description: str, time_from: str) -> dash.Dashboard:
    return (
        dash.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .time(time_from, "now")
        .timezone("browser")
        .refresh("1m")
        .editable()
    )


# --- the clinic overview --------------------------------------------------------------------------------------------

_INFO_WHERE: Final = "clinic =~ /^$clinic$/ AND physio =~ /^$physio$/ AND patient =~ /^$patient$/ AND $timeFilter"
_PATIENTS_WHERE: Final = "clinic =~ /^$clinic$/ AND patient =~ /^$patient$/ AND $timeFilter"

OVERVIEW_COLUMNS: Final = [
    "patient",
    "kind",
    "physio",
    "attention",
    "today_h",
    "mean_7d_h",
    "target_h",
    "covered_7d",
    "data_days_30d",
    "in_range_30d",
    "critical",
    "warning",
    "info",
    "flags",
    "last_received_ms",
    "battery_pct",
]


def clinic_overview() -> dict[str, Any]:
    """Every patient of the selected clinic and physio, who needs attention first."""
    ids = _Ids()
    d = _dashboard(
        "compression-clinic",
        "Compression — clinic overview",
        "Every patient of the selected clinic/physio: wear against target, coverage, data days, time in "
        "range, open flags by severity, last seen and battery; sorted by who needs attention.",
        "now-7d",
    )
    d = d.variables(_clinic_physio_vars(patient_multi=True))
    info = (
        f"SELECT last(attention) AS attention, last(wear_today_h) AS today_h, "
        f"last(wear_hours_mean_7d) AS mean_7d_h, last(wear_target_h) AS target_h, last(covered_7d) AS covered_7d, "
        f"last(data_days_30d) AS data_days_30d, last(in_range_share_30d) AS in_range_30d, "
        f"last(open_critical) AS critical, last(open_warning) AS warning, last(open_info) AS info, "
        f"last(open_flags) AS flags FROM patient_info WHERE {_INFO_WHERE} GROUP BY patient, kind, physio"
    )
    seen = f"SELECT max(received_ms) AS last_received_ms FROM receipt WHERE {_PATIENTS_WHERE} GROUP BY patient"
    battery = f"SELECT last(battery_pct) AS battery_pct FROM sample WHERE {_PATIENTS_WHERE} GROUP BY patient"
    ratio = [(None, "red"), (0.5, "orange"), (0.85, "green")]
    patients = (
        table.Panel()
        .id(ids())
        .title("Patients — who needs attention first")
        .height(14)
        .span(24)
        .description(
            "One row per patient (the monitor's patient_info, written every evaluation; last heard from "
            "the ingester's receipts; battery from the samples). 'attention' = 100 per open critical "
            "episode, 10 per warning or registry problem, 1 per info; red and orange rows first."
        )
        .datasource(influx_ref())
        .targets([InfluxQL(info, "A").table(), InfluxQL(seen, "B").table(), InfluxQL(battery, "C").table()])
        .transformations(
            [
                _transform("joinByField", {"byField": "patient", "mode": "outer"}),
                _transform("filterFieldsByName", {"include": {"names": OVERVIEW_COLUMNS}}),
                _transform(
                    "calculateField",
                    {
                        "mode": "binary",
                        "alias": "7d vs target",
                        "replaceFields": False,
                        "binary": {"left": "mean_7d_h", "operator": "/", "right": "target_h"},
                    },
                ),
                _transform(
                    "calculateField",
                    {
                        "mode": "binary",
                        "alias": "today vs target",
                        "replaceFields": False,
                        "binary": {"left": "today_h", "operator": "/", "right": "target_h"},
                    },
                ),
                _transform("sortBy", {"sort": [{"field": "attention", "desc": True}]}),
                _transform(
                    "organize",
                    {
                        "renameByName": {
                            "today_h": "today (h)",
                            "mean_7d_h": "7-day mean (h)",
                            "target_h": "target (h)",
                            "covered_7d": "days covered (7 d)",
                            "data_days_30d": "days with data (30)",
                            "in_range_30d": "time in range (30 d)",
                            "last_received_ms": "last heard from",
                            "battery_pct": "battery",
                        }
                    },
                ),
            ]
        )
        .sort_by([TableSortByFieldState().display_name("attention").desc(True)])
        .cell_height(common.TableCellHeight.SM)
        .override_by_name(
            "attention",
            [
                _prop("thresholds", _thresholds(ATTENTION_STEPS).build()),
                _cell("color-background"),
                _prop(
                    "mappings",
                    [
                        RangeMap(DashboardRangeMapOptions(0, 0, ValueMappingResult("fine"))),
                        RangeMap(DashboardRangeMapOptions(1, 9, ValueMappingResult("note"))),
                        RangeMap(DashboardRangeMapOptions(10, 99, ValueMappingResult("attention"))),
                        RangeMap(DashboardRangeMapOptions(100, None, ValueMappingResult("urgent"))),
                    ],
                ),
            ],
        )
        .override_by_name(
            "covered_7d",
            [_prop("unit", "percentunit"), _prop("thresholds", _thresholds(ratio).build()), _cell("color-background")],
        )
        .override_by_name(
            "7d vs target",
            [
                _prop("unit", "percentunit"),
                _cell("color-background"),
                _prop("thresholds", _thresholds([(None, "red"), (0.8, "orange"), (1, "green")]).build()),
            ],
        )
        .override_by_name(
            "today vs target",
            [
                _prop("unit", "percentunit"),
                _cell("color-text"),
                _prop("thresholds", _thresholds([(None, "orange"), (1, "green")]).build()),
            ],
        )
        .override_by_name(
            "in_range_30d",
            [
                _prop("unit", "percentunit"),
                _cell("color-background"),
                _prop("thresholds", _thresholds([(None, "red"), (0.8, "orange"), (0.95, "green")]).build()),
            ],
        )
        .override_by_name(
            "data_days_30d",
            [_cell("color-text"), _prop("thresholds", _thresholds([(None, "orange"), (16, "green")]).build())],
        )
        .override_by_name(
            "critical", [_cell("color-text"), _prop("thresholds", _thresholds([(None, "text"), (1, "red")]).build())]
        )
        .override_by_name(
            "warning", [_cell("color-text"), _prop("thresholds", _thresholds([(None, "text"), (1, "orange")]).build())]
        )
        .override_by_name("last_received_ms", [_prop("unit", "dateTimeFromNow")])
        .override_by_name(
            "battery_pct",
            [
                _prop("unit", "percent"),
                _cell("color-text"),
                _prop("thresholds", _thresholds([(None, "red"), (15, "orange"), (30, "green")]).build()),
            ],
        )
        .override_by_name("today_h", [_prop("decimals", 1)])
        .override_by_name("mean_7d_h", [_prop("decimals", 1)])
    )
    severities = (
        bargauge.Panel()
        .id(ids())
        .title("Open flags by severity")
        .height(7)
        .span(8)
        .datasource(influx_ref())
        .description("Open episodes of the selected patients (the monitor's patient_info).")
        .with_target(
            InfluxQL(
                "SELECT sum(critical) AS critical, sum(warning) AS warning, sum(info) AS info FROM "
                "(SELECT last(open_critical) AS critical, last(open_warning) AS warning, "
                f"last(open_info) AS info FROM patient_info WHERE {_INFO_WHERE} GROUP BY patient)",
                "A",
            ).table()
        )
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .thresholds(_thresholds([(None, "green"), (1, "orange")]))
        .override_by_name("critical", [_prop("color", {"mode": "fixed", "fixedColor": "red"})])
        .override_by_name("warning", [_prop("color", {"mode": "fixed", "fixedColor": "orange"})])
        .override_by_name("info", [_prop("color", {"mode": "fixed", "fixedColor": "blue"})])
    )
    coverage = (
        bargauge.Panel()
        .id(ids())
        .title("Days on target, last 7 complete days")
        .height(7)
        .span(8)
        .datasource(influx_ref())
        .unit("percentunit")
        .min(0)
        .max(1)
        .with_target(
            InfluxQL(
                f"SELECT last(covered_7d) AS covered FROM patient_info WHERE {_INFO_WHERE} GROUP BY patient", "A"
            ).alias("$tag_patient")
        )
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .display_mode(common.BarGaugeDisplayMode.LCD)
        .thresholds(_thresholds(ratio))
    )
    problems = (
        table.Panel()
        .id(ids())
        .title("Registry problems (cannot be monitored fully)")
        .height(7)
        .span(8)
        .datasource(influx_ref())
        .with_target(
            InfluxQL(
                f"SELECT last(problems) AS problems FROM registry_problem WHERE {_PATIENTS_WHERE} GROUP BY patient", "A"
            ).table()
        )
        .with_transformation(_transform("organize", {"excludeByName": {"Time": True}}))
    )
    wear = (
        timeseries.Panel()
        .id(ids())
        .title("Wear per local day (h)")
        .height(9)
        .span(24)
        .datasource(influx_ref())
        .description(
            "The monitor's wear per patient and local day of the clinic, from its day summaries: the union of the "
            "garments' worn time, never their sum (monitor.queries.summary_wear)."
        )
        .with_target(
            InfluxQL(
                derive(q.summary_wear, select="wear_s / 3600 AS wear_h", where="clinic =~ /^$clinic$/"), "A"
            ).alias("$tag_patient")
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(60)
        .unit("h")
        .min(0)
        .legend(
            VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT)
            .calcs(["mean", "min"])
        )
    )
    d = d.with_panel(patients).with_panel(severities).with_panel(coverage).with_panel(problems).with_panel(wear)
    return _json(d)


# --- one patient ------------------------------------------------------------------------------------------------------

_ONE: Final = "patient =~ /^$patient$/"


def patient() -> dict[str, Any]:
    """One patient: pressure per zone within the band, gradient, wear against target, boot sessions, flags, device."""
    ids = _Ids()
    d = _dashboard(
        "compression-patient",
        "Compression — patient",
        "One patient: pressure per zone with the prescribed band, gradient, wear hours per local day "
        "against the target, boot sessions, flags (annotations) and device status.",
        "now-14d",
    )
    d = d.variables(_clinic_physio_vars(patient_multi=False))
    d = d.annotations(
        [
            dash.AnnotationQuery()
            .name("Annotations & Alerts")
            .built_in(1)
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
            .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --")),
            _influx_annotation(
                "Flagged days",
                "red",
                f'SELECT flags FROM "{q.SUMMARY_RP}".flag_day WHERE {_ONE} '
                "AND flags != 'compliant' AND flags != '' AND $timeFilter",
                text="flags",
            ),
            _influx_annotation(
                "Episodes started",
                "orange",
                f'SELECT "id", "open", last_day FROM "{q.SUMMARY_RP}".flag_episode WHERE {_ONE} AND $timeFilter '
                'GROUP BY "flag", "severity"',
                text="last_day",
                tags="flag,severity",
            ),
        ]
    )
    # Grafana's "config from query results" knows one threshold handler, threshold1 (each field mapped to it
    # adds a step, in its own colour); see dashboards/validate.py for the handler names of Grafana 11.6.
    config = _transform(
        "configFromData",
        {
            "configRefId": "BAND",
            "applyTo": {"id": "byFrameRefID", "options": "A"},
            "mappings": [
                _threshold("band_low", "orange"),
                _threshold("band_high", "red"),
                _threshold("max_chamber_mmhg", "red"),
            ],
        },
    )
    zones = ", ".join(f"mean({z}_mmhg) AS {z}" for z in ("foot", "ankle", "calf", "knee", "thigh"))
    pressure = (
        timeseries.Panel()
        .id(ids())
        .title("Pressure per zone while worn (mmHg), prescribed band")
        .height(10)
        .span(24)
        .datasource(influx_ref())
        .unit("suffix: mmHg")
        .description(
            "Mean pressure per zone over each interval, worn samples only; the dashed lines are the "
            "prescription's ankle band (socks: orange its lower, red its upper bound) or maximum chamber pressure "
            "(boots, red), from patient_info."
        )
        .targets(
            [
                InfluxQL(
                    f"SELECT {zones} FROM sample WHERE worn = true AND {_ONE} AND $timeFilter "
                    "GROUP BY time($__interval) fill(none)",
                    "A",
                ),
                InfluxQL(
                    "SELECT last(band_low) AS band_low, last(band_high) AS band_high, "
                    f"last(max_chamber_mmhg) AS max_chamber_mmhg FROM patient_info WHERE {_ONE} AND $timeFilter",
                    "BAND",
                ).table(),
            ]
        )
        .with_transformation(config)
        .thresholds(_thresholds([(None, "transparent")]))  # replaced by the query's steps (no line without them)
        .thresholds_style(GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
        # Set, so that thresholds coming from the data do not turn the zones' colours to threshold colours
        # (Grafana colours a field by its thresholds when it has thresholds and no colour mode).
        .color_scheme(dash.FieldColor().mode(model.FieldColorModeId.PALETTE_CLASSIC))
        .span_nulls(False)
        .line_width(1)
    )
    gradient = (
        timeseries.Panel()
        .id(ids())
        .title("Gradient: calf − ankle (mmHg); above 3 is reversed")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .unit("suffix: mmHg")
        .with_target(
            InfluxQL(
                f"SELECT mean(calf_mmhg) - mean(ankle_mmhg) AS calf_minus_ankle FROM sample "
                f"WHERE worn = true AND {_ONE} AND $timeFilter GROUP BY time($__interval) fill(none)",
                "A",
            )
        )
        .thresholds(_thresholds([(None, "green"), (q.GRADIENT_MMHG, "red")]))
        .thresholds_style(GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED_AND_AREA))
    )
    reversed_ = (
        timeseries.Panel()
        .id(ids())
        .title("Reversed gradient per local day (min); over 30 is rolled down")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .unit("m")
        .min(0)
        .description("Per leg, from the day summaries (monitor.queries.summary_legs): worn minutes with calf − ankle "
                     "> 3 mmHg.")
        .with_target(
            InfluxQL(derive(q.summary_legs, select="reversed_gradient_s / 60 AS reversed_min"), "A").alias("$tag_leg")
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(70)
        .thresholds(_thresholds([(None, "green"), (30, "red")]))
        .thresholds_style(GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
    )
    wear = (
        timeseries.Panel()
        .id(ids())
        .title("Wear per local day (h) against the target")
        .height(9)
        .span(24)
        .datasource(influx_ref())
        .unit("h")
        .min(0)
        .description(
            "monitor.queries.summary_wear: the monitor's wear per local day of the clinic from its day summaries (the "
            "union of both stockings' worn time, never their sum); the dashed line is the prescribed hours a day "
            "(patient_info)."
        )
        .targets(
            [
                InfluxQL(derive(q.summary_wear, select="wear_s / 3600 AS wear_h"), "A"),
                InfluxQL(
                    f"SELECT last(wear_target_h) AS wear_target_h FROM patient_info WHERE {_ONE} AND $timeFilter",
                    "TARGET",
                ).table(),
            ]
        )
        .with_transformation(
            _transform(
                "configFromData",
                {
                    "configRefId": "TARGET",
                    "applyTo": {"id": "byFrameRefID", "options": "A"},
                    "mappings": [_threshold("wear_target_h", "dark-blue")],
                },
            )
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(80)
        # Bars in one colour: the query's thresholds always start with Grafana's own green base step (11.6), so
        # colouring by them could not make the days under the target stand out; the dashed line shows it.
        .color_scheme(dash.FieldColor().mode(model.FieldColorModeId.FIXED).fixed_color("green"))
        .thresholds(_thresholds([(None, "transparent")]))
        .thresholds_style(GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
    )
    sessions = (
        timeseries.Panel()
        .id(ids())
        .title("Boot sessions started per local day")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .min(0)
        .decimals(0)
        .description("monitor.queries.summary_sessions: sessions started per local day, from the day summaries.")
        .with_target(InfluxQL(derive(q.summary_sessions, select="sessions_started AS sessions"), "A").alias("sessions"))
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(70)
    )
    lengths = (
        table.Panel()
        .id(ids())
        .title("Boot sessions: length and end")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .description("monitor.queries.session_ends: each session_end with the device's duration.")
        .with_target(InfluxQL(derive(q.session_ends), "A").table())
        .override_by_name("duration_s", [_prop("unit", "s")])
    )
    episodes = (
        table.Panel()
        .id(ids())
        .title("Flag episodes")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .description("flag_episode, written by the monitor: open episodes first.")
        .with_target(
            InfluxQL(
                f'SELECT "open", start_day, last_day, end_day FROM "{q.SUMMARY_RP}".flag_episode WHERE {_ONE} '
                'AND $timeFilter GROUP BY "flag", "severity"',
                "A",
            ).table()
        )
        .sort_by([TableSortByFieldState().display_name("open").desc(True)])
        .override_by_name("severity", [_cell("color-text"), _prop("mappings", _severity_colours())])
    )
    device = (
        table.Panel()
        .id(ids())
        .title("Device status")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .description("Last status message of each of the patient's devices (state, firmware, battery, signal).")
        .with_target(
            InfluxQL(
                "SELECT last(state) AS state, last(fw) AS fw, last(battery_pct) AS battery_pct, "
                f"last(rssi_dbm) AS rssi_dbm FROM status WHERE {_ONE} AND $timeFilter GROUP BY device",
                "A",
            ).table()
        )
        .with_transformation(_transform("organize", {"excludeByName": {"Time": True}}))
        .override_by_name("battery_pct", [_prop("unit", "percent")])
    )
    battery = (
        stat.Panel()
        .id(ids())
        .title("Battery and last sample")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .with_target(InfluxQL(f"SELECT last(battery_pct) AS battery FROM sample WHERE {_ONE} AND $timeFilter", "A"))
        .unit("percent")
        .thresholds(_thresholds([(None, "red"), (15, "orange"), (30, "green")]))
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    for panel in (pressure, gradient, reversed_, wear, sessions, lengths, episodes, device, battery):
        d = d.with_panel(panel)
    return _json(d)


def _severity_colours() -> list[model.ValueMapping]:
    return [
        model.ValueMap({sev: ValueMappingResult(color=colour, text=sev)})
        for sev, colour in (("critical", "red"), ("warning", "orange"), ("info", "blue"))
    ]


class _InfluxAnnotationTarget(model.AnnotationTarget):
    """An InfluxQL annotation query (the SDK's AnnotationTarget only knows the built-in Grafana one)."""

    def __init__(self, query: str, text: str, tags: str | None) -> None:
        super().__init__()
        self.query, self.text, self.tag_columns = query, text, tags

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "refId": "Anno",
            "query": self.query,
            "rawQuery": True,
            "resultFormat": "table",
            "fromAnnotations": True,
            "textEditor": True,
            "textColumn": self.text,
        }
        if self.tag_columns:
            out["tagsColumn"] = self.tag_columns
        return out


class _InfluxAnnotation(dash.AnnotationQuery):
    def __init__(self, target: _InfluxAnnotationTarget) -> None:
        super().__init__()
        self._target = target
        self._internal.target = target

    def build(self) -> model.AnnotationQuery:
        built = super().build()
        built.target = self._target
        return built


def _influx_annotation(name: str, colour: str, query: str, text: str, tags: str | None = None) -> dash.AnnotationQuery:
    return (
        _InfluxAnnotation(_InfluxAnnotationTarget(query, text, tags))
        .name(name)
        .enable(True)
        .icon_color(colour)
        .datasource(influx_ref())
    )


# --- fleet and pipeline --------------------------------------------------------------------------------------------

_FLEET_WHERE: Final = "clinic =~ /^$clinic$/ AND $timeFilter"


def fleet() -> dict[str, Any]:
    """Devices (online, last seen, battery, firmware) and the ingest pipeline (rate, rejects, lag, write errors)."""
    ids = _Ids()
    d = _dashboard(
        "compression-fleet",
        "Compression — fleet and pipeline",
        "Devices online, last seen, battery and firmware; the ingester's rate, rejects by reason, "
        "lag and write errors.",
        "now-24h",
    )
    d = d.variables([_variable_query("clinic", CLINIC_VAR, "Clinic", all_value=".*")])
    online = (
        stat.Panel()
        .id(ids())
        .title("Devices online")
        .height(5)
        .span(6)
        .datasource(influx_ref())
        .description("Devices whose last status message in the range says online.")
        .with_target(
            InfluxQL(
                "SELECT count(online) AS online FROM (SELECT last(online) AS online FROM status "
                f"WHERE {_FLEET_WHERE} GROUP BY device) WHERE online = true",
                "A",
            )
        )
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .color_mode(common.BigValueColorMode.VALUE)
    )
    sending = (
        stat.Panel()
        .id(ids())
        .title("Devices sending (samples in the range)")
        .height(5)
        .span(6)
        .datasource(influx_ref())
        .with_target(
            InfluxQL(
                "SELECT count(n) AS devices FROM (SELECT count(worn) AS n FROM sample "
                f"WHERE {_FLEET_WHERE} GROUP BY device)",
                "A",
            )
        )
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
    )
    low = (
        stat.Panel()
        .id(ids())
        .title("Devices below 15 % battery")
        .height(5)
        .span(6)
        .datasource(influx_ref())
        .with_target(
            InfluxQL(
                "SELECT count(b) AS low FROM (SELECT last(battery_pct) AS b FROM sample "
                f"WHERE {_FLEET_WHERE} GROUP BY device) WHERE b < 15",
                "A",
            )
        )
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(_thresholds([(None, "green"), (1, "orange")]))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    unattributed = (
        stat.Panel()
        .id(ids())
        .title("Samples without a patient")
        .height(5)
        .span(6)
        .datasource(influx_ref())
        .description("Samples of devices nobody held (attribution unregistered / unassigned): check the registry.")
        .with_target(InfluxQL("SELECT count(worn) AS samples FROM sample WHERE attribution != '' AND $timeFilter", "A"))
        .reduce_options(ReduceDataOptions().calcs(["sum"]))
        .thresholds(_thresholds([(None, "green"), (1, "orange")]))
        .color_mode(common.BigValueColorMode.BACKGROUND)
    )
    devices = (
        table.Panel()
        .id(ids())
        .title("Devices: last sample, battery")
        .height(10)
        .span(14)
        .datasource(influx_ref())
        .description("Time = the device's newest sample in the range (last seen).")
        .with_target(
            InfluxQL(
                "SELECT last(battery_pct) AS battery_pct FROM sample "
                f"WHERE {_FLEET_WHERE} GROUP BY device, kind, patient",
                "A",
            ).table()
        )
        .with_transformation(_transform("organize", {"renameByName": {"Time": "last seen"}}))
        .sort_by([TableSortByFieldState().display_name("last seen").desc(False)])
        .override_by_name(
            "battery_pct",
            [
                _prop("unit", "percent"),
                _cell("color-background"),
                _prop("thresholds", _thresholds([(None, "red"), (15, "orange"), (30, "green")]).build()),
            ],
        )
    )
    firmware = (
        table.Panel()
        .id(ids())
        .title("Firmware versions")
        .height(10)
        .span(10)
        .datasource(influx_ref())
        .description("Last status of each device: state and firmware; grouped by firmware version.")
        .with_target(
            InfluxQL(
                f"SELECT last(state) AS state, last(fw) AS fw FROM status WHERE {_FLEET_WHERE} GROUP BY device", "A"
            ).table()
        )
        .with_transformation(
            _transform(
                "groupBy",
                {
                    "fields": {
                        "fw": {"aggregations": [], "operation": "groupby"},
                        "device": {"aggregations": ["count", "allValues"], "operation": "aggregate"},
                    }
                },
            )
        )
    )
    rate = (
        timeseries.Panel()
        .id(ids())
        .title("Samples stored per interval (by sample time)")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .with_target(
            InfluxQL(
                f"SELECT count(worn) AS samples FROM sample WHERE {_FLEET_WHERE} GROUP BY time($__interval) fill(0)",
                "A",
            ).alias("samples")
        )
    )
    rejects = (
        timeseries.Panel()
        .id(ids())
        .title("Rejected by reason (the ingester's dead letters)")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .description(
            "One 'rejected' point per rejected message or sample; the reasons are those of "
            "compression_ingest_rejected_total."
        )
        .with_target(
            InfluxQL(
                "SELECT count(raw_bytes) AS rejected FROM rejected WHERE $timeFilter "
                "GROUP BY time($__interval), reason fill(none)",
                "A",
            ).alias("$tag_reason")
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .stacking(StackingConfig().mode(common.StackingMode.NORMAL))
    )
    refused = (
        timeseries.Panel()
        .id(ids())
        .title("Lines InfluxDB refused (stored as dead letters)")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .with_target(
            InfluxQL(
                "SELECT count(raw_bytes) AS refused FROM rejected WHERE channel = 'write' AND "
                "$timeFilter GROUP BY time($__interval) fill(0)",
                "A",
            ).alias("refused")
        )
        .draw_style(common.GraphDrawStyle.BARS)
    )
    receipts = (
        timeseries.Panel()
        .id(ids())
        .title("Patients heard from per interval (receipts)")
        .height(8)
        .span(12)
        .datasource(influx_ref())
        .with_target(
            InfluxQL(
                f"SELECT count(received_ms) AS patient_hours FROM receipt WHERE {_FLEET_WHERE} "
                "GROUP BY time($__interval) fill(0)",
                "A",
            ).alias("patient-hours with data")
        )
    )
    d = d.with_row(dash.Row("Devices").id(ids()))
    first: list[cogbuilder.Builder[model.Panel]] = [online, sending, low, unattributed, devices, firmware]
    for panel in first:
        d = d.with_panel(panel)
    d = d.with_row(dash.Row("Pipeline (InfluxDB)").id(ids()))
    for series in (rate, rejects, refused, receipts):
        d = d.with_panel(series)
    d = d.with_row(dash.Row("Ingester metrics (Prometheus scraping the ingester's /metrics)").id(ids()))
    for title, expr, unit, legend in PROMETHEUS_PANELS:
        d = d.with_panel(
            timeseries.Panel()
            .id(ids())
            .title(title)
            .height(8)
            .span(12)
            .datasource(prometheus_ref())
            .unit(unit)
            .with_target(
                prom.Dataquery().expr(expr).legend_format(legend).range().ref_id("A").datasource(prometheus_ref())
            )
        )
    return _json(d)


# (title, PromQL, unit, legend) of the ingester's own metrics (ingest/metrics.py).
PROMETHEUS_PANELS: Final = [
    (
        "Ingest rate (samples/s written)",
        "sum(rate(compression_ingest_samples_written_total[$__rate_interval]))",
        "short",
        "samples/s",
    ),
    (
        "Rejects by reason (/s)",
        "sum by (reason) (rate(compression_ingest_rejected_total[$__rate_interval]))",
        "short",
        "{{reason}}",
    ),
    (
        "Lag: receive time − sample time of the newest batch",
        "max(compression_ingest_last_sample_lag_seconds)",
        "s",
        "lag",
    ),
    (
        "Write errors by kind (/s)",
        "sum by (kind) (rate(compression_ingest_write_errors_total[$__rate_interval]))",
        "short",
        "{{kind}}",
    ),
    (
        "Messages in flight and broker connection",
        "sum(compression_ingest_inflight_messages) or sum(compression_ingest_broker_connected)",
        "short",
        "in flight",
    ),
    (
        "Batch write time (p95)",
        "histogram_quantile(0.95, sum by (le) (rate(compression_ingest_batch_write_seconds_bucket[$__rate_interval])))",
        "s",
        "p95",
    ),
]


# --- output ---------------------------------------------------------------------------------------------------------


def _json(d: dash.Dashboard) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    return data


DASHBOARDS: Final[dict[str, Callable[[], dict[str, Any]]]] = {
    "clinic-overview": clinic_overview,
    "patient": patient,
    "fleet": fleet,
}


def generate() -> dict[str, str]:
    """File name -> JSON text of every dashboard (stable: sorted keys, two-space indent, final newline)."""
    return {
        f"{name}.json": json.dumps(make(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, make in DASHBOARDS.items()
    }


def write(directory: Path = JSON_DIR) -> list[Path]:
    """Write every dashboard's JSON to ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out


def stale(directory: Path = JSON_DIR) -> list[str]:
    """The dashboards whose committed JSON differs from the generator's output (or is missing / extra)."""
    wanted = generate()
    found = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.json")} if directory.exists() else {}
    return sorted({n for n in wanted if found.get(n) != wanted[n]} | (set(found) - set(wanted)))
