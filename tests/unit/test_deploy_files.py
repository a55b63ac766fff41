"""The deployment files stay in step with the code they deploy.

.env.example documents every setting of the ingester, the registry and the
monitor with its default, and every variable docker-compose.yml uses;
docker-compose.yml wires the platform's services with health checks and
``depends_on`` conditions and passes each service its settings; the broker
configuration keeps the limits an ack-after-write consumer needs; Grafana's
provisioning (deploy/grafana, written with the dashboards) gets what it expands. No server and no Docker engine are
needed: docker-compose.yml is parsed with PyYAML when this environment has it,
otherwise with the ``docker-compose`` binary (``docker-compose config``, which
works offline), and those tests are skipped, saying why, when neither exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from compression.localservers import mosquitto_config
from devices.protocol import DEVICE_ID_PATTERN
from devices.registry import brokerconf
from devices.registry.broker import device_block
from devices.registry.settings import RegistrySettings
from ingest.settings import IngestSettings
from monitor.settings import MonitorSettings
from records.settings import RecordsSettings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
MOSQUITTO_DIR = ROOT / "deploy" / "mosquitto"
MOSQUITTO_CONF = MOSQUITTO_DIR / "mosquitto.conf"
SERVICES_ACL = MOSQUITTO_DIR / "services.acl"
MAKE_PASSWD = MOSQUITTO_DIR / "make-passwd.sh"

FIELDS = IngestSettings.model_fields
SETTING_VARS = {f"COMPRESSION_{name.upper()}": name for name in FIELDS}
REGISTRY_FIELDS = RegistrySettings.model_fields
REGISTRY_VARS = {f"COMPRESSION_REGISTRY_{name.upper()}": name for name in REGISTRY_FIELDS}
MONITOR_FIELDS = MonitorSettings.model_fields
MONITOR_VARS = {f"COMPRESSION_MONITOR_{name.upper()}": name for name in MONITOR_FIELDS}
RECORDS_VARS = {f"COMPRESSION_RECORDS_{name.upper()}": name for name in RecordsSettings.model_fields}
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# The secrets that docker-compose.yml requires (${VAR:?...}) and .env.example leaves empty.
REQUIRED_SECRETS = (
    "MQTT_INGEST_PASSWORD",
    "INFLUXDB_ADMIN_PASSWORD",
    "INFLUXDB_INGEST_PASSWORD",
    "INFLUXDB_MONITOR_PASSWORD",
    "INFLUXDB_GRAFANA_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "REGISTRY_ADMIN_TOKEN",
    "REGISTRY_INGEST_TOKEN",
)
INGEST_ACCOUNT = "svc.ingest"
# The long-running services (health check, restart unless-stopped) and the demo profile's jobs.
SERVICES = ("mosquitto", "influxdb", "registry", "ingest", "monitor", "grafana", "mailpit")
DEMO_SERVICES = ("registry-seed", "simulator")
APP_SERVICES = ("registry", "ingest", "monitor", "registry-seed", "simulator")

ASSIGNMENT = re.compile(r"^(?P<commented>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


# -- .env.example ---------------------------------------------------------------


def env_example() -> dict[str, tuple[bool, str, str]]:
    """Each variable of .env.example: (commented out, value, the comment line above it)."""
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    found: dict[str, tuple[bool, str, str]] = {}
    for i, line in enumerate(lines):
        match = ASSIGNMENT.match(line)
        if match is None:
            continue
        name = match["name"]
        assert name not in found, f"{name} appears twice in .env.example"
        above = lines[i - 1] if i > 0 else ""
        found[name] = (match["commented"] is not None, match["value"], above)
    return found


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No COMPRESSION_* variable of the developer's shell or CI leaks into the settings."""
    for name in list(os.environ):
        if name.startswith("COMPRESSION_"):
            monkeypatch.delenv(name)


def test_every_setting_is_in_env_example_and_nothing_else() -> None:
    documented = {name for name in env_example() if name.startswith("COMPRESSION_")}
    assert len(SETTING_VARS) >= 30, "IngestSettings lost its fields?"
    assert sorted(set(SETTING_VARS) - documented) == [], "settings missing from .env.example"
    assert sorted(set(REGISTRY_VARS) - documented) == [], "registry settings missing from .env.example"
    assert sorted(set(MONITOR_VARS) - documented) == [], "monitor settings missing from .env.example"
    assert sorted(set(RECORDS_VARS) - documented) == [], "records settings missing from .env.example"
    unread = documented - set(SETTING_VARS) - set(REGISTRY_VARS) - set(MONITOR_VARS) - set(RECORDS_VARS)
    assert sorted(unread) == [], "variables that no setting reads"
    assert not set(SETTING_VARS) & set(REGISTRY_VARS), "one variable read by two settings classes"
    assert not (set(SETTING_VARS) | set(REGISTRY_VARS)) & set(MONITOR_VARS), "one variable read by two classes"


@pytest.mark.parametrize("settings", [RegistrySettings, MonitorSettings])
def test_env_example_gives_each_service_setting_its_default(clean_environ: None, settings: Any) -> None:
    entries = env_example()
    prefix = settings.model_config["env_prefix"]
    for name, field in settings.model_fields.items():
        var = f"{prefix}{name.upper()}"
        commented, value, _ = entries[var]
        if field.default is None:
            assert commented, f"{var} has no default: its line must be commented out"
        else:
            assert not commented and TypeAdapter(field.annotation).validate_python(value) == field.default, var
    assert settings(_env_file=ENV_EXAMPLE).model_dump() == settings().model_dump()


def test_env_example_gives_each_setting_its_default() -> None:
    entries = env_example()
    for var, name in SETTING_VARS.items():
        field = FIELDS[name]
        commented, value, _ = entries[var]
        adapter: TypeAdapter[Any] = TypeAdapter(field.annotation)
        if field.default is None:
            # Set but empty would be the string "", not "unset".
            assert commented, f"{var} has no default: its line must be commented out"
            if value:
                adapter.validate_python(value)  # the example must be a valid value
        else:
            assert not commented, f"{var} must be set to its default {field.default!r}"
            assert adapter.validate_python(value) == field.default, f"{var}={value} is not the default"


def test_env_example_read_by_the_settings_is_the_defaults(clean_environ: None, tmp_path: Path) -> None:
    from_file = IngestSettings(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    assert from_file.model_dump() == IngestSettings().model_dump()
    # ...and the file is really read (the comparison above is not vacuous).
    changed = tmp_path / "changed.env"
    changed.write_text(ENV_EXAMPLE.read_text().replace("COMPRESSION_BATCH_SIZE=5000", "COMPRESSION_BATCH_SIZE=1234"))
    assert IngestSettings(_env_file=changed).batch_size == 1234  # type: ignore[call-arg]


def test_env_example_comments_every_variable() -> None:
    entries = env_example()
    for name, (commented, value, above) in entries.items():
        assert above.startswith("# ") and ASSIGNMENT.match(above) is None, f"{name} has no comment above it"
        assert above.rstrip().endswith("."), f"the comment of {name} is not a full sentence: {above!r}"
        if commented:
            continue
        if value:
            assert f"Default: {value}" in above, f"the comment of {name} does not state its default {value}"
        else:
            assert name in REQUIRED_SECRETS, f"{name} is set but empty"
            assert above.startswith("# Required:"), f"{name} is empty: its comment must say it is required"


# -- docker-compose.yml ---------------------------------------------------------------


def filled_env_file(tmp_path: Path, leave_empty: str | None = None) -> Path:
    """.env.example with the required secrets filled in (but ``leave_empty``)."""
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    for secret in REQUIRED_SECRETS:
        if secret != leave_empty:
            text = re.sub(rf"^{secret}=$", f"{secret}=test-{secret.lower().replace('_', '-')}", text, flags=re.M)
    path = tmp_path / f"filled-{leave_empty or 'all'}.env"
    path.write_text(text, encoding="utf-8")
    return path


def compose_binary() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose): cannot run `config`")
    return exe


def run_compose_config(env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` offline, with nothing of the caller's environment but PATH."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    argv = [compose_binary(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config", *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)


def yaml_to_json_via_compose(exe: str, text: str) -> Any:
    """Parse YAML with the PyYAML of the Python that runs docker-compose 1.x (it needs it)."""
    first = Path(exe).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
    if not (first.startswith("#!") and "python" in first):
        pytest.skip(f"{exe} is not the Python docker-compose 1.x and PyYAML is not installed here")
    interpreter = first[2:].strip().split()
    code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    done = subprocess.run([*interpreter, "-c", code], input=text, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml as a dict: PyYAML if installed here, else `docker-compose config`."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        env_file = filled_env_file(tmp_path_factory.mktemp("compose"))
        done = run_compose_config(env_file)
        assert done.returncode == 0, done.stderr
        data = yaml_to_json_via_compose(compose_binary(), done.stdout)
    else:
        data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_config_validates_offline(tmp_path: Path) -> None:
    done = run_compose_config(filled_env_file(tmp_path), "--quiet")
    assert done.returncode == 0, done.stderr
    services = run_compose_config(filled_env_file(tmp_path), "--services")
    assert services.returncode == 0, services.stderr
    assert set(SERVICES) <= set(services.stdout.split())


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
def test_compose_refuses_to_run_without_each_secret(tmp_path: Path, secret: str) -> None:
    done = run_compose_config(filled_env_file(tmp_path, leave_empty=secret), "--quiet")
    assert done.returncode != 0
    assert f"set {secret} in .env" in done.stderr + done.stdout


def test_compose_services_have_health_checks_and_wait_for_them(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == set(SERVICES) | set(DEMO_SERVICES)
    for name in SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no real health check: {test!r}"
        assert services[name]["restart"] == "unless-stopped"
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
    for name in DEMO_SERVICES:
        assert services[name]["profiles"] == ["demo"]
        assert services[name]["restart"] == "no", f"{name} is a finite job"
    healthy = {"condition": "service_healthy"}
    assert services["ingest"]["depends_on"] == {"mosquitto": healthy, "influxdb": healthy, "registry": healthy}
    assert services["monitor"]["depends_on"] == {"influxdb": healthy, "registry": healthy, "mailpit": healthy}
    assert services["grafana"]["depends_on"] == {"influxdb": healthy}
    assert services["registry-seed"]["depends_on"] == {"registry": healthy, "mosquitto": healthy}
    assert services["simulator"]["depends_on"] == {
        "mosquitto": healthy,
        "registry-seed": {"condition": "service_completed_successfully"},
    }
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert "profiles" not in services[dependency] or name in DEMO_SERVICES, f"{name} waits for a demo job"
    for name in APP_SERVICES:
        # Each can build the image, so `up --build` never tries to pull compression-telemetry:local.
        assert "build" in services[name] and services[name]["image"] == services["ingest"]["image"], name
    assert any("/healthz" in part for part in services["ingest"]["healthcheck"]["test"])
    assert any("/healthz" in part for part in services["registry"]["healthcheck"]["test"])
    assert any("/ping" in part for part in services["influxdb"]["healthcheck"]["test"])
    assert any("/api/health" in part for part in services["grafana"]["healthcheck"]["test"])


def test_compose_monitor_health_check_follows_the_lease(compose: dict[str, Any], tmp_path: Path) -> None:
    """The monitor serves no HTTP: its health check reads the lease from the state database."""
    from monitor.state import State

    test = compose["services"]["monitor"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    url = f"sqlite:///{tmp_path / 'monitor.db'}"
    env = {**os.environ, "COMPRESSION_MONITOR_STATE_DATABASE_URL": url}

    def check() -> int:
        return subprocess.run([sys.executable, "-c", test[3]], env=env, timeout=60, check=False).returncode

    state = State(url)
    assert check() == 1, "healthy before any replica held the lease"
    state.acquire_lease("replica-1", 30)
    assert check() == 0
    state.release_lease("replica-1")
    assert check() == 1, "healthy after the lease was given up"


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """The named volumes a service mounts: name -> target (short syntax)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = str(spec).split(":")[:2]
        if not source.startswith((".", "/")):
            out[source] = target
    return out


def test_compose_volumes_are_declared_and_shared_as_designed(compose: dict[str, Any]) -> None:
    services = compose["services"]
    used = {name for service in services.values() for name in named_volumes(service)}
    assert used == set(compose["volumes"]), "volumes used but not declared, or declared but unused"
    mounts = {name: named_volumes(service) for name, service in services.items()}
    # The registry writes the broker's files; mosquitto reads them read-only, outside /mosquitto
    # (the image's entrypoint chowns /mosquitto to the mosquitto user).
    assert mounts["registry"]["broker-accounts"] == "/var/lib/compression/broker"
    assert "broker-accounts:/registry:ro" in services["mosquitto"]["volumes"]
    registry_env = services["registry"]["environment"]
    assert registry_env["COMPRESSION_REGISTRY_BROKER_DIR"] == "/var/lib/compression/broker"
    assert services["registry-seed"]["environment"]["COMPRESSION_REGISTRY_BROKER_DIR"] == "/var/lib/compression/broker"
    assert "COMPRESSION_REGISTRY_BROKER_PID_FILE" not in registry_env, "no signal crosses containers"
    # The registry's SQLite database: read by the monitor, read-write (WAL needs its -shm file). The ingester never
    # sees it (names, clinical notes): it reads the enrichment snapshot over the API with the ingester token.
    database = "sqlite:////var/lib/compression/registry/registry.db"
    assert registry_env["COMPRESSION_REGISTRY_DATABASE_URL"] == database
    ingest_env = services["ingest"]["environment"]
    assert ingest_env["COMPRESSION_REGISTRY_URL"] == "http://registry:8070"
    assert ingest_env["COMPRESSION_REGISTRY_TOKEN"].startswith("${REGISTRY_INGEST_TOKEN:?")
    assert registry_env["COMPRESSION_REGISTRY_BOOTSTRAP_INGESTER_TOKEN"].startswith("${REGISTRY_INGEST_TOKEN:?")
    assert services["monitor"]["environment"]["COMPRESSION_MONITOR_REGISTRY_DATABASE_URL"] == database
    for name in ("registry", "monitor", "registry-seed"):
        assert "registry-data:/var/lib/compression/registry" in services[name]["volumes"], name
    assert not any("registry-data" in str(spec) for spec in services["ingest"]["volumes"])
    # Grafana: provisioning and dashboards at the paths the provisioning files name.
    grafana = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./dashboards/json:/var/lib/grafana/dashboards/compression:ro" in grafana
    # The CA's private key never enters a container: only the broker's folder is mounted.
    assert "./deploy/mosquitto/tls/broker:/certs:ro" in services["mosquitto"]["volumes"]
    for service in services.values():
        for spec in service.get("volumes", []):
            assert not str(spec).startswith(("./deploy/mosquitto:", "./deploy/mosquitto/tls:")), spec


def test_compose_gives_the_registry_and_the_monitor_their_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    registry = services["registry"]["environment"]
    wanted = set(REGISTRY_VARS) - {"COMPRESSION_REGISTRY_BROKER_PID_FILE"}
    assert sorted(wanted - set(registry)) == [], "registry settings that never reach the registry container"
    assert str(registry["COMPRESSION_REGISTRY_HOST"]) == "0.0.0.0"
    assert "${REGISTRY_ADMIN_TOKEN:?" in COMPOSE_FILE.read_text(encoding="utf-8")
    monitor = services["monitor"]["environment"]
    assert sorted(set(MONITOR_VARS) - set(monitor)) == [], "monitor settings that never reach the monitor container"
    assert sorted(k for k in monitor if k not in MONITOR_VARS) == []
    # The registry's container serves the workspace too: it reads the monitor's state database and InfluxDB.
    workspace = {f"COMPRESSION_MONITOR_{k}" for k in ("STATE_DATABASE_URL", "INFLUX_URL", "INFLUX_DATABASE",
                                                      "INFLUX_USERNAME", "INFLUX_PASSWORD")}  # fmt: skip
    assert sorted(set(RECORDS_VARS) - set(registry)) == [], "the FHIR export's settings never reach the registry"
    assert sorted(k for k in registry if k not in REGISTRY_VARS and k not in workspace and k not in RECORDS_VARS) == []


def test_compose_gives_no_secret_a_default() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for match in COMPOSE_VARIABLE.finditer(text):
        name = match["name"]
        if re.search(r"PASSWORD|TOKEN|SECRET", name) and match["op"] in (":-", "-"):
            assert match["arg"] == "", f"{name} has the default {match['arg']!r}: a secret must come from .env"
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if (
            re.search(r"PASSWORD|TOKEN|SECRET", key)
            and not key.endswith("_FILE")
            and value.strip()
            and "${" not in value
        ):
            pytest.fail(f"a literal secret in docker-compose.yml: {line.strip()}")


def test_grafana_gets_every_variable_its_provisioning_expands(compose: dict[str, Any]) -> None:
    files = sorted(GRAFANA_PROVISIONING.rglob("*.yaml")) + sorted(GRAFANA_PROVISIONING.rglob("*.yml"))
    if not files:
        pytest.skip("deploy/grafana/provisioning has no files yet")
    environment = compose["services"]["grafana"]["environment"]
    for path in files:
        active = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines()
                           if not line.lstrip().startswith("#"))  # fmt: skip
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", active):
            assert name in environment, f"{path.relative_to(ROOT)} expands ${{{name}}}, which grafana does not get"


def test_grafana_provisioning_follows_its_documented_format(compose: dict[str, Any]) -> None:
    """Grafana's provisioning format (apiVersion 1): data sources and a file provider at the mounted path."""
    yaml = pytest.importorskip("yaml")
    datasources = sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml"))
    providers = sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml"))
    if not datasources or not providers:
        pytest.skip("deploy/grafana/provisioning is not written yet")
    for path in datasources:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["apiVersion"] == 1, path
        for source in doc["datasources"]:
            assert {"name", "type", "access", "url"} <= set(source), f"{path.name}: {source.get('name')}"
            assert source["access"] in ("proxy", "direct")
    targets = {str(spec).split(":")[1] for spec in compose["services"]["grafana"]["volumes"]}
    for path in providers:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["apiVersion"] == 1, path
        for provider in doc["providers"]:
            assert provider["type"] == "file"
            assert provider["options"]["path"] in targets, f"{path.name}: {provider['options']['path']} is not mounted"
    dashboards = sorted((ROOT / "dashboards" / "json").glob("*.json"))
    assert dashboards, "dashboards/json has no dashboards for the provider"
    for path in dashboards:
        board = json.loads(path.read_text(encoding="utf-8"))
        assert board.get("uid") and board.get("title"), f"{path.name} has no uid or title"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "dashboards" / "json" / Path(home).name).is_file(), home


def test_compose_gives_every_setting_to_the_ingester(compose: dict[str, Any]) -> None:
    environment = compose["services"]["ingest"]["environment"]
    assert isinstance(environment, dict)
    assert sorted(set(SETTING_VARS) - set(environment)) == [], "settings that never reach the ingest container"
    assert sorted(k for k in environment if k not in SETTING_VARS) == []
    assert f"//{INGEST_ACCOUNT}:" in environment["COMPRESSION_MQTT_URL"]
    # The services' listener, with the ingester's default topic root (the garments' topics under the mount point).
    assert environment["COMPRESSION_MQTT_URL"].endswith(f"@mosquitto:{brokerconf.SERVICE_PORT}")
    assert FIELDS["mqtt_topic_root"].default == "fleet/garments/v1" and not environment["COMPRESSION_MQTT_TOPIC_ROOT"]
    assert str(environment["COMPRESSION_METRICS_HOST"]) == "0.0.0.0"


def test_compose_keeps_the_services_listener_inside_and_devices_on_theirs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    published = [str(spec).rsplit(":", 1)[-1] for spec in services["mosquitto"]["ports"]]
    assert published == [str(brokerconf.DEVICE_PORT), str(brokerconf.DEVICE_TLS_PORT)], "1884 must stay inside"
    assert f"-p {brokerconf.SERVICE_PORT} -u svc.healthcheck" in services["mosquitto"]["healthcheck"]["test"][1]
    for job in ("registry-seed", "simulator"):
        command = " ".join(str(part) for part in services[job]["command"])
        assert f"mqtt://mosquitto:{brokerconf.DEVICE_PORT}" in command, f"{job} logs in as gateways: device listener"


def test_compose_variables_are_all_documented() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    used = {m["name"]: m["op"] for m in COMPOSE_VARIABLE.finditer(text)}
    assert used, "no ${...} variable found in docker-compose.yml"
    entries = env_example()
    assert sorted(set(used) - set(entries)) == [], "variables of docker-compose.yml missing from .env.example"
    required = {name for name, op in used.items() if op and op.endswith("?")}
    assert required == set(REQUIRED_SECRETS)
    for name in REQUIRED_SECRETS:
        assert entries[name][:2] == (False, ""), f"{name} must be present and empty in .env.example"
    # Where docker-compose.yml repeats a setting's default, it is the same default.
    for match in COMPOSE_VARIABLE.finditer(text):
        name = match["name"]
        if name in SETTING_VARS and match["op"] == ":-" and name != "COMPRESSION_LOG_FORMAT":
            field = FIELDS[SETTING_VARS[name]]
            assert TypeAdapter(field.annotation).validate_python(match["arg"]) == field.default, name


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_installs_every_package_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert packages
    for folder in sorted({package.split(".")[0] for package in packages}):
        assert re.search(rf"^COPY {folder}/ {folder}/$", text, re.M), f"the Dockerfile does not copy {folder}/"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert re.search(r'^ENTRYPOINT \["compression"\]$', text, re.M)
    assert re.search(r'^CMD \["ingest"\]$', text, re.M)
    assert "/healthz" in text and "HEALTHCHECK" in text
    assert not re.search(r"^COPY \. ", text, re.M), "COPY . would put .env and .venv into the image"


# -- Mosquitto ------------------------------------------------------------------------------


def mosquitto_options(text: str) -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            options.setdefault(key, []).append(value.strip())
    return options


def duration_s(value: str) -> int:
    units = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}
    return int(value[:-1]) * units[value[-1]]


def test_mosquitto_conf_is_the_renderers_output() -> None:
    # deploy/mosquitto/mosquitto.conf and services.acl are generated: `compression devices broker-config`.
    assert brokerconf.stale(MOSQUITTO_DIR) == [], "run: compression devices broker-config"
    assert MOSQUITTO_CONF.read_text(encoding="utf-8") == brokerconf.render(brokerconf.deployed())


def listeners(text: str) -> dict[str, dict[str, list[str]]]:
    """Listener port -> its options (the lines after its ``listener`` line, up to the next one)."""
    out: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(" ")
        if key == "listener":
            current = out.setdefault(value, {})
        elif current is not None:
            current.setdefault(key, []).append(value)
    return out


def test_mosquitto_conf_keeps_what_it_acknowledged() -> None:
    options = mosquitto_options(MOSQUITTO_CONF.read_text(encoding="utf-8"))
    (queued,) = options["max_queued_messages"]
    assert int(queued) > 1000, "the stock 1000 drops a slow consumer's messages after their PUBACK"
    (queued_bytes,) = options["max_queued_bytes"]
    assert int(queued_bytes) == 0 or int(queued_bytes) >= 100 * 2**20
    (autosave,) = options["autosave_interval"]
    assert 0 < int(autosave) < 60, "a killed broker loses what arrived since the last save"
    assert options["persistence"] == ["true"]
    assert options["persistence_location"] == ["/mosquitto/data/"]
    (inflight,) = options["max_inflight_messages"]
    assert int(inflight) >= FIELDS["inflight_max"].default, "the 3.1.1 window must cover the ingester's"
    (expiration,) = options["persistent_client_expiration"]
    assert duration_s(expiration) > FIELDS["mqtt_session_expiry_s"].default
    assert options["log_dest"] == ["stdout"]
    assert options["listener"] == ["1883", "8883", "1884"]
    assert options["per_listener_settings"] == ["true"], "each listener has its own accounts and ACL"


def test_mosquitto_conf_ties_devices_to_their_ids_and_keeps_them_off_the_services_listener() -> None:
    by_port = listeners(MOSQUITTO_CONF.read_text(encoding="utf-8"))
    for port in ("1883", "8883"):  # garments and gateways, plain and TLS
        device = by_port[port]
        assert device["use_username_as_clientid"] == ["true"], "a device could take over another's session"
        assert device["mount_point"] == ["fleet/"], "a device could join a shared subscription"
        assert device["allow_anonymous"] == ["false"]
        assert device["password_file"] == ["/mosquitto/config/devices.passwd"]
        assert device["acl_file"] == ["/mosquitto/config/devices.acl"]
    tls = by_port["8883"]
    assert tls["cafile"] == ["/mosquitto/config/certs/ca.crt"]
    assert tls["certfile"] == ["/mosquitto/config/certs/server.crt"]
    assert tls["keyfile"] == ["/mosquitto/config/certs/server.key"]
    assert tls["tls_version"] == ["tlsv1.2"]
    service = by_port["1884"]
    assert "mount_point" not in service, "the services need $share and the full topics"
    assert service["allow_anonymous"] == ["false"]
    assert service["password_file"] == ["/mosquitto/config/services.passwd"]
    assert service["acl_file"] == ["/mosquitto/config/services.acl"]


def test_mosquitto_conf_explains_every_line() -> None:
    lines = MOSQUITTO_CONF.read_text(encoding="utf-8").splitlines()
    directives = [i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    assert len(directives) >= 15
    for i in directives:
        assert lines[i - 1].startswith("# "), f"no comment above line {i + 1}: {lines[i]!r}"
    tls = lines.index("listener 8883")
    assert lines.index("listener 1883") < tls < lines.index("cafile /mosquitto/config/certs/ca.crt")


def test_local_brokers_run_the_deployed_settings(tmp_path: Path) -> None:
    deployed = mosquitto_options(MOSQUITTO_CONF.read_text(encoding="utf-8"))
    local_open = mosquitto_options(mosquitto_config(tmp_path, 1883))
    local_platform = brokerconf.render(brokerconf.local_platform(tmp_path, 1883, 1884))
    for local in (local_open, mosquitto_options(local_platform)):
        for key in ("max_queued_messages", "max_inflight_messages", "persistence", "max_packet_size",
                    "per_listener_settings", "persistent_client_expiration"):  # fmt: skip
            assert local[key] == deployed[key], key
    # The platform's local broker: the deployed listeners' security settings, on loopback ports.
    local_listeners = list(listeners(local_platform).values())
    deployed_listeners = listeners(MOSQUITTO_CONF.read_text(encoding="utf-8"))
    for local, port in zip(local_listeners, ("1883", "1884"), strict=True):
        for key in ("mount_point", "use_username_as_clientid", "allow_anonymous"):
            assert local.get(key) == deployed_listeners[port].get(key), (port, key)
        for key in ("password_file", "acl_file"):
            assert Path(local[key][0]).name == Path(deployed_listeners[port][key][0]).name, (port, key)


def test_static_services_acl_lets_the_ingester_read_and_nobody_write() -> None:
    lines = [line.strip() for line in SERVICES_ACL.read_text(encoding="utf-8").splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0].startswith("user "), "rules before the first user line would apply to anonymous clients"
    start = rules.index(f"user {INGEST_ACCOUNT}")
    end = next((i for i in range(start + 1, len(rules)) if rules[i].startswith("user ")), len(rules))
    root = FIELDS["mqtt_topic_root"].default
    ingester = set(rules[start + 1 : end])
    assert ingester == {f"topic read {root}/+/{channel}" for channel in ("telemetry", "event", "status")}
    assert not [rule for rule in rules if rule.startswith(("pattern ", "topic write", "topic readwrite"))]
    device_id = re.compile(DEVICE_ID_PATTERN)
    for rule in rules:
        if rule.startswith("user "):
            assert not device_id.search(rule.split()[1]), f"{rule}: a service account must not look like a device"


def test_make_passwd_writes_the_accounts_and_refuses_bad_input(tmp_path: Path) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (Debian package mosquitto)")
    config = tmp_path / "config"
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MOSQUITTO_CONFIG_DIR": str(config)}

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        argv = ["sh", str(MAKE_PASSWD), "sh", "-c", "echo started"]
        return subprocess.run(argv, env={**base, **env}, capture_output=True, text=True, timeout=60, check=False)

    done = run(MQTT_INGEST_PASSWORD="pw-1", MQTT_DEMO_DEVICE_ID="sock-0001", MQTT_DEMO_DEVICE_PASSWORD="x y")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("started"), "the command after the options was not run"
    services = {line.split(":", 1)[0] for line in (config / "static-services.passwd").read_text().splitlines()}
    assert services == {INGEST_ACCOUNT, "svc.healthcheck"}
    devices = {line.split(":", 1)[0] for line in (config / "static-devices.passwd").read_text().splitlines()}
    assert devices == {"sock-0001"}, "the demo garment logs in on the device listeners only"
    assert (config / "static-services.acl").read_text() == SERVICES_ACL.read_text()
    # The demo garment's ACL block is the one the registry writes for a garment.
    assert (config / "static-devices.acl").read_text().splitlines()[1:] == device_block("sock-0001")
    assert re.fullmatch(r"[0-9a-f]{48}\n", (config / "healthcheck-password").read_text())
    for path in ("static-services.passwd", "static-services.acl", "static-devices.passwd", "static-devices.acl",
                 "healthcheck-password"):  # fmt: skip
        assert (config / path).stat().st_mode & 0o077 == 0, f"{path} is readable by others"

    for bad in (
        {},
        {"MQTT_INGEST_PASSWORD": "p@ss/word"},
        {"MQTT_INGEST_PASSWORD": "pw", "MQTT_DEMO_DEVICE_ID": "sock-0001"},
        {"MQTT_INGEST_PASSWORD": "pw", "MQTT_DEMO_DEVICE_ID": "sock-0001\n", "MQTT_DEMO_DEVICE_PASSWORD": "x"},
        {"MQTT_INGEST_PASSWORD": "pw", "MQTT_DEMO_DEVICE_ID": "sock/1", "MQTT_DEMO_DEVICE_PASSWORD": "x"},
    ):
        refused = run(**bad)
        assert refused.returncode != 0, f"accepted {bad}"
        assert "started" not in refused.stdout
