"""The generated dashboards: committed JSON in step with the generator, valid for Grafana 11.6, provisioning files
in Grafana's documented format, the macro expansion, and the request plan of ``compression dashboards push``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from compression.cli import cli
from dashboards import build
from dashboards.push import plan
from dashboards.render import ALL, Context, Variable, escape_regex, expand, used_variables
from dashboards.validate import PROVISIONED_UIDS, SCHEMA_VERSION, panels, problems
from ingest.metrics import IngestMetrics

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


@pytest.fixture(scope="module")
def generated() -> dict[str, dict[str, Any]]:
    return {name: make() for name, make in build.DASHBOARDS.items()}


def test_committed_json_is_the_generators_output() -> None:
    assert build.stale() == [], "run: compression dashboards generate"
    for name, text in build.generate().items():
        assert (build.JSON_DIR / name).read_text(encoding="utf-8") == text


def test_generate_check_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["dashboards", "generate", "--check"]).exit_code == 0
    assert runner.invoke(cli, ["dashboards", "generate", "--check", "--out", str(tmp_path)]).exit_code == 1
    assert runner.invoke(cli, ["dashboards", "generate", "--out", str(tmp_path)]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clinic-overview.json", "fleet.json", "patient.json"]
    (tmp_path / "patient.json").write_text("{}")
    assert runner.invoke(cli, ["dashboards", "generate", "--check", "--out", str(tmp_path)]).exit_code == 1


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_dashboard_validates(generated: dict[str, dict[str, Any]], name: str) -> None:
    d = generated[name]
    assert problems(d, set(PROVISIONED_UIDS)) == []
    assert d["schemaVersion"] == SCHEMA_VERSION == 41
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    defined = {v["name"] for v in d["templating"]["list"]}
    assert "clinic" in defined
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] in PROVISIONED_UIDS
            text = t.get("query") or t["expr"]
            assert used_variables(text) <= defined, (p["title"], text)
    uids = {d["uid"] for d in generated.values()}
    assert len(uids) == len(generated)


def test_validation_finds_what_is_wrong(generated: dict[str, dict[str, Any]]) -> None:
    d = json.loads(json.dumps(generated["patient"]))
    d["schemaVersion"] = 39
    d["panels"][1]["id"] = d["panels"][0]["id"]
    d["panels"][2]["targets"][0]["datasource"] = {"type": "influxdb", "uid": "somewhere-else"}
    d["panels"][3]["targets"][0]["query"] += " AND device =~ /^$device$/"
    d["panels"][4]["targets"] = []
    found = "\n".join(problems(d, set(PROVISIONED_UIDS)))
    for words in ("schemaVersion 39", "not unique", "somewhere-else", "['device']", "without a query"):
        assert words in found


def test_variables_clinic_physio_patient(generated: dict[str, dict[str, Any]]) -> None:
    for name in ("clinic-overview", "patient"):
        variables = {v["name"]: v for v in generated[name]["templating"]["list"]}
        assert list(variables)[:3] == ["clinic", "physio", "patient"]
        assert 'FROM "patient_info" WITH KEY = "clinic"' in variables["clinic"]["query"]
        assert "physio =~ /^$physio$/" in variables["patient"]["query"]
        assert "clinic =~ /^$clinic$/" in variables["physio"]["query"]
        assert variables["tz"]["hide"] == 2
    assert generated["patient"]["templating"]["list"][2]["multi"] is False


def test_queries_are_derived_from_the_monitors() -> None:
    """The wear panels use monitor.queries' statement over the day summaries (the union of the legs' wear, as the
    monitor judges it), with Grafana's macros in place of its concrete values."""
    from monitor import queries as q

    patient = build.patient()
    (wear,) = [p for p in panels(patient) if p["title"].startswith("Wear per local day")]
    text = wear["targets"][0]["query"]
    concrete = q.summary_wear(["PT-1"], 1000, 2000)
    assert text.split(" FROM ")[1].replace("patient =~ /^$patient$/", "patient =~ /^(PT\\-1)$/").replace(
        "$timeFilter", "time >= 1000ms AND time < 2000ms") == concrete.split(" FROM ")[1]  # fmt: skip
    assert f'FROM "{q.SUMMARY_RP}"."{q.SUMMARY}" WHERE leg = \'all\'' in text
    assert "FROM sample" not in text and "sum(" not in text, "the summaries, never a sum over raw samples"


def test_every_promql_metric_exists_in_the_ingester() -> None:
    exported = {line.split()[2] for line in IngestMetrics().render().decode().splitlines()
                if line.startswith("# TYPE")}  # fmt: skip
    names = set()
    for family in exported:
        names |= {family, f"{family}_total", f"{family}_bucket", f"{family}_count", f"{family}_sum"}
    fleet = build.fleet()
    exprs = [t["expr"] for p in panels(fleet) for t in p.get("targets") or [] if "expr" in t]
    assert len(exprs) == len(build.PROMETHEUS_PANELS) >= 4
    for expr in exprs:
        for metric in re.findall(r"compression_ingest_\w+", expr):
            assert metric in names, metric


# --- provisioning --------------------------------------------------------------------------------------------------


def test_datasource_provisioning_format() -> None:
    doc = yaml.safe_load((PROVISIONING / "datasources" / "influxdb.yaml").read_text())
    assert doc["apiVersion"] == 1
    allowed = {"name", "uid", "type", "access", "url", "user", "database", "basicAuth", "basicAuthUser",
               "withCredentials", "isDefault", "jsonData", "secureJsonData", "version", "editable",
               "orgId"}  # fmt: skip
    by_uid = {ds["uid"]: ds for ds in doc["datasources"]}
    assert set(by_uid) == set(PROVISIONED_UIDS)
    for ds in doc["datasources"]:
        assert set(ds) <= allowed and {"name", "type", "access", "url"} <= set(ds)
        assert ds["access"] == "proxy"
    influx = by_uid["compression-influxdb"]
    assert influx["type"] == "influxdb" and influx["jsonData"]["version"] == "InfluxQL"
    assert influx["url"] == "${INFLUXDB_URL}" and influx["user"] == "${INFLUXDB_READ_USER}"
    assert influx["secureJsonData"]["password"] == "${INFLUXDB_READ_PASSWORD}"
    assert influx["jsonData"]["dbName"] == "${COMPRESSION_INFLUX_DATABASE}"
    assert by_uid["compression-prometheus"]["type"] == "prometheus"
    # The 2.x/3.x variant, commented out: the same uid, a token in the Authorization header.
    text = (PROVISIONING / "datasources" / "influxdb.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("  # - name: Compression InfluxDB")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(line.removeprefix("  # "))
    alternative = yaml.safe_load("\n".join(block))
    (variant,) = alternative
    assert variant["uid"] == "compression-influxdb" and variant["jsonData"]["httpHeaderName1"] == "Authorization"
    assert variant["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUXDB_READ_TOKEN}"


def test_dashboard_provider_format() -> None:
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "compression.yaml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    allowed = {"name", "orgId", "folder", "folderUid", "type", "disableDeletion", "updateIntervalSeconds",
               "allowUiUpdates", "options"}  # fmt: skip
    assert set(provider) <= allowed
    assert provider["type"] == "file" and provider["folder"] == "Compression"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/compression"


# --- macro expansion -----------------------------------------------------------------------------------------------


def ctx(**variables: Variable) -> Context:
    return Context(start="now-30d", end="now", now_ms=1_700_000_000_000, max_data_points=1000, variables=variables)


def test_time_filter_and_intervals() -> None:
    c = ctx()
    assert expand("WHERE $timeFilter", c) == "WHERE time >= now() - 30d and time <= now()"
    c.start, c.end = 1_600_000_000_000, 1_600_086_400_000
    assert expand("WHERE $timeFilter", c) == "WHERE time >= 1600000000000ms and time <= 1600086400000ms"
    # 1 day over 1000 points: 86.4 s, rounded like Grafana to 1m.
    assert expand("GROUP BY time($__interval) -- $__interval_ms", c) == "GROUP BY time(1m) -- 60000"
    c.start, c.end = "now-30d", "now"
    assert expand("time($__interval)", c) == "time(30m)"  # 2,592 s -> 30m


def test_variables_like_grafanas_influxql() -> None:
    multi = Variable("patient", ["PT-1", "PT.2"], ["PT-1", "PT.2", "PT-3"], multi=True, include_all=True)
    assert expand("patient =~ /^$patient$/", ctx(patient=multi)) == r"patient =~ /^(PT-1|PT\.2)$/"
    multi.current = [ALL]
    assert expand("patient =~ /^${patient}$/", ctx(patient=multi)) == r"patient =~ /^(PT-1|PT\.2|PT-3)$/"
    clinic = Variable("clinic", [ALL], ["a", "b"], multi=True, include_all=True, all_value=".*")
    assert expand("clinic =~ /^$clinic$/", ctx(clinic=clinic)) == "clinic =~ /^.*$/"
    single = Variable("tz", ["America/Edmonton"], ["America/Edmonton"])
    assert expand("tz('$tz') x =~ /^[[tz]]$/", ctx(tz=single)) == r"tz('America/Edmonton') x =~ /^America\/Edmonton$/"
    assert escape_regex("a.b@c/d") == r"a\.b@c\/d"
    assert used_variables("$timeFilter $__interval $clinic ${physio} [[patient]]") == {"clinic", "physio", "patient"}


# --- push ----------------------------------------------------------------------------------------------------------


def test_push_plan(generated: dict[str, dict[str, Any]]) -> None:
    steps = plan(generated, folder_title="Physio dashboards")
    assert [s.action for s in steps] == ["ensure_folder", "dashboard", "dashboard", "dashboard", "folder_permissions"]
    assert steps[0].body == {"title": "Physio dashboards", "uid": "compression"}
    for step in steps[1:4]:
        assert step.path == "/dashboards/db" and step.body["overwrite"] is True
        assert step.body["folderUid"] == "compression" and "id" not in step.body["dashboard"]
        assert step.body["dashboard"]["uid"] in {d["uid"] for d in generated.values()}
    assert steps[-1].path == "/folders/compression/permissions"
    assert steps[-1].body == {"items": [{"role": "Viewer", "permission": 1}, {"role": "Editor", "permission": 1}]}


def test_push_sends_the_plan_over_grafanas_http_api(generated: dict[str, dict[str, Any]]) -> None:
    """The HTTP requests apply() sends (recorded by an in-process transport: no Grafana server here)."""
    import httpx

    from dashboards.push import apply, client, ensure_datasource

    sent: list[tuple[str, str, Any]] = []

    def grafana(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        sent.append((request.method, request.url.path, body))
        assert request.headers["Authorization"] == "Bearer t0ken"
        if request.method == "GET":
            return httpx.Response(404, json={"message": "not found"})
        if request.url.path == "/api/dashboards/db":
            return httpx.Response(200, json={"status": "success", "url": "/d/" + body["dashboard"]["uid"]})
        return httpx.Response(200, json={})

    with client("http://grafana.example:3000", token="t0ken", transport=httpx.MockTransport(grafana)) as http:
        lines = apply(http, plan(generated))
        assert ensure_datasource(http, {"uid": "compression-influxdb", "type": "influxdb"}).endswith("created")
    assert [(m, p) for m, p, _ in sent] == [
        ("GET", "/api/folders/compression"), ("POST", "/api/folders"),
        ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db"),
        ("POST", "/api/folders/compression/permissions"),
        ("GET", "/api/datasources/uid/compression-influxdb"), ("POST", "/api/datasources"),
    ]  # fmt: skip
    assert sent[1][2] == {"title": "Compression", "uid": "compression"}
    assert all(body["overwrite"] is True for _, path, body in sent if path == "/api/dashboards/db")
    assert "created" in lines[0] and lines[-1].startswith("folder permissions")


def test_push_reports_a_refusal() -> None:
    import httpx

    from dashboards.push import PushError, apply, client

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"message": "permissions needed"})

    http = client("http://grafana.example", token="x", transport=httpx.MockTransport(refuse))
    with http, pytest.raises(PushError, match="403"):
        apply(http, plan({}))


def test_push_needs_credentials() -> None:
    result = CliRunner().invoke(cli, ["dashboards", "push", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--token" in result.output
    dry = CliRunner().invoke(cli, ["dashboards", "push", "--url", "http://127.0.0.1:9", "--dry-run"])
    assert dry.exit_code == 0 and "POST /api/folders/compression/permissions" in dry.output


def test_band_maximum_and_target_lines_use_a_handler_grafana_has(generated: dict[str, dict[str, Any]]) -> None:
    """Grafana 11.6's "config from query results" has one threshold handler, threshold1: a field mapped to
    anything else (threshold2) sets nothing, and its line never draws. Each line is its own threshold1 step."""
    patient = generated["patient"]
    mappings = {m["fieldName"]: m for p in panels(patient) for t in p.get("transformations") or []
                if t["id"] == "configFromData" for m in t["options"]["mappings"]}  # fmt: skip
    assert set(mappings) == {"band_low", "band_high", "max_chamber_mmhg", "wear_target_h"}
    assert {m["handlerKey"] for m in mappings.values()} == {"threshold1"}
    colours = {name: m["handlerArguments"]["threshold"]["color"] for name, m in mappings.items()}
    assert colours == {"band_low": "orange", "band_high": "red", "max_chamber_mmhg": "red",
                       "wear_target_h": "dark-blue"}  # fmt: skip
    broken = json.loads(json.dumps(patient))
    for p in panels(broken):
        for t in p.get("transformations") or []:
            for m in t.get("options", {}).get("mappings") or []:
                if m.get("fieldName") == "band_high":
                    m["handlerKey"] = "threshold2"
    assert any("'threshold2', which Grafana 11.6's config from query results does not have" in problem
               for problem in problems(broken))  # fmt: skip
