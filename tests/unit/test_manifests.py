"""Deployment artefacts checked offline: k8s manifests, compose file, Dockerfile, dashboard, alerts.

How each kind of file is validated:
- Core Kubernetes manifests (k8s/*.yaml, and everything ``kubectl kustomize k8s`` renders) against
  the Kubernetes OpenAPI schemas shipped by kubernetes-validate, for K8S_VERSION, in strict mode
  (unknown fields are errors).
- CRDs (ServiceMonitor, PrometheusRule) have no schema there: a hand-written structural check, and
  the PrometheusRule must equal k8s/monitoring/alerts.rules.yml, which promtool checks and tests.
- docker-compose.yml against the Compose Specification's JSON schema, vendored under
  tests/data/compose-spec (see its README for origin and licence).
- Env var names set for the worker (ConfigMap, Deployment, compose) must be Settings fields, and
  the values must parse as Settings.
- Every ``chat_worker_*`` name in the dashboard and the alert rules must be exported by
  WorkerMetrics (collected from a fresh registry).
- promtool (Debian package ``prometheus``) checks the rules, runs their unit tests and checks the
  compose Prometheus config; kubectl renders the kustomization. Without the tool, those tests skip
  outside CI and fail in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from worker.config import Settings
from worker.metrics import WorkerMetrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
MONITORING = K8S / "monitoring"
DASHBOARD = MONITORING / "vapi-stream-worker.json"
RULES = MONITORING / "alerts.rules.yml"
RULE_TESTS = MONITORING / "alerts.test.yml"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"

#: The Kubernetes version whose schemas the manifests must satisfy (the oldest we support).
K8S_VERSION = "1.31.0"

#: Files under k8s/ that are not kustomize resources, and what checks them.
NON_RESOURCES = {
    "kustomization.yaml": "test_kustomization_*",
    "secret.example.yaml": "test_example_secret_is_only_comments_and_valid_once_uncommented",
    "monitoring/alerts.rules.yml": "promtool tests",
    "monitoring/alerts.test.yml": "test_promtool_runs_the_alert_rule_unit_tests",
    "monitoring/vapi-stream-worker.json": "dashboard tests",
}

#: Minimum seconds between the end of the worker's drain (WORKER_SHUTDOWN_GRACE_S, then at most
#: WORKER_FINISH_TIMEOUT_S for final steps under way) and the SIGKILL.
SHUTDOWN_MARGIN_S = 10

APT_HINT = "apt-get install -y --no-install-recommends prometheus"
METRIC_NAME = re.compile(r"\bchat_worker_[A-Za-z0-9_]+")


# ---------------------------------------------------------------------------------------------
# helpers


def require_tool(name: str, install: str) -> str:
    """The tool's path; skip when missing outside CI, fail when missing in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(f"{message}; CI installs it")
    return path


def run_tool(*argv: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run a command; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, cwd=cwd, timeout=60, check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{output}")
    return output


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def kustomization() -> dict[str, Any]:
    """k8s/kustomization.yaml."""
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


@cache
def resources() -> tuple[dict[str, Any], ...]:
    """Every document of every resource file the kustomization lists."""
    return tuple(doc for name in kustomization()["resources"] for doc in load_yaml_docs(K8S / name))


def resource(kind: str) -> dict[str, Any]:
    """The one resource of ``kind``."""
    (found,) = [doc for doc in resources() if doc["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    """The worker container of the Deployment."""
    (worker,) = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    return worker  # type: ignore[no-any-return]


def config_map() -> dict[str, str]:
    """The worker's settings ConfigMap data."""
    return resource("ConfigMap")["data"]  # type: ignore[no-any-return]


@cache
def compose() -> dict[str, Any]:
    """docker-compose.yml, YAML merge keys resolved."""
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def compose_workers() -> dict[str, dict[str, Any]]:
    """The compose services that run the worker."""
    services = compose()["services"]
    return {name: svc for name, svc in services.items() if svc.get("command") == ["run"]}


def settings_env_names() -> set[str]:
    """Every environment variable Settings reads: its field names, upper-cased."""
    return {name.upper() for name in Settings.model_fields}


def parse_settings(env: dict[str, str]) -> Settings:
    """Settings built from environment-style names and string values."""
    return Settings.model_validate({name.lower(): value for name, value in env.items()})


def exported_metric_names() -> set[str]:
    """Every sample name WorkerMetrics can expose, from a fresh registry."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def metric_family_names() -> set[str]:
    """The names of WorkerMetrics' families as prose refers to them (histograms unsuffixed)."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    return {family.name for family in registry.collect()} | exported_metric_names()


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of every non-row panel."""
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            for target in panel.get("targets", []):
                yield panel["title"], target


def check_crd_service_monitor(doc: dict[str, Any]) -> None:
    """Structural check of a ServiceMonitor (no schema available offline)."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def check_crd_prometheus_rule(doc: dict[str, Any]) -> None:
    """Structural check of a PrometheusRule (no schema available offline)."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["metadata"]["name"]
    assert set(doc["spec"]) == {"groups"}
    for group in doc["spec"]["groups"]:
        assert group["name"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule)
            assert isinstance(rule["expr"], str)
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"warning", "critical"}
                assert rule["annotations"]["summary"]


CRD_CHECKS: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_crd_service_monitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_crd_prometheus_rule,
}


def validate_manifest(doc: dict[str, Any]) -> None:
    """Schema-validate a core resource, or structure-check a known CRD; anything else fails."""
    check = CRD_CHECKS.get((doc["apiVersion"], doc["kind"]))
    if check is not None:
        check(doc)
        return
    problem = None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        problem = f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        problem = f"no schema and no CRD check for {doc['kind']}: {exc.message}"
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    """The Dockerfile's instructions from its last FROM on."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def drain_s(env: dict[str, Any]) -> float:
    """The longest drain on SIGTERM with these settings: grace period, then finish timeout."""
    settings = parse_settings({**env, "VAPI_API_KEY": "stand-in"})
    return settings.worker_shutdown_grace_s + settings.worker_finish_timeout_s


# ---------------------------------------------------------------------------------------------
# Kubernetes: schemas


def test_every_file_under_k8s_is_a_resource_or_accounted_for() -> None:
    """No manifest escapes the checks: each file is a kustomize resource or listed with its test."""
    on_disk = {
        str(path.relative_to(K8S))
        for path in K8S.rglob("*")
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json"}
    }
    assert on_disk == set(kustomization()["resources"]) | set(NON_RESOURCES)


@pytest.mark.parametrize("name", kustomization()["resources"])
def test_each_resource_file_validates(name: str) -> None:
    """Each resource file validates against the Kubernetes schemas (CRDs: structural check)."""
    docs = load_yaml_docs(K8S / name)
    assert docs, f"{name} holds no resource"
    for doc in docs:
        validate_manifest(doc)


def test_kustomization_renders_and_every_output_validates() -> None:
    """``kubectl kustomize k8s`` succeeds and each rendered object validates as above."""
    kubectl = require_tool("kubectl", "kubectl with built-in kustomize")
    rendered = [doc for doc in yaml.safe_load_all(run_tool(kubectl, "kustomize", str(K8S))) if doc]
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceMonitor",
        ]
    )
    for doc in rendered:
        validate_manifest(doc)


def test_kustomization_generates_the_dashboard_from_the_compose_file() -> None:
    """The dashboard ConfigMap is generated from the same JSON file compose mounts into Grafana."""
    (generator,) = kustomization()["configMapGenerator"]
    assert generator["files"] == [str(DASHBOARD.relative_to(K8S))]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    grafana_mounts = compose()["services"]["grafana"]["volumes"]
    assert any(m.startswith(f"./{DASHBOARD.relative_to(ROOT)}:") for m in grafana_mounts)


def test_example_secret_is_only_comments_and_valid_once_uncommented() -> None:
    """The example Secret ships no key, yet uncommented it is the Secret the Deployment reads."""
    text = (K8S / "secret.example.yaml").read_text()
    assert not load_yaml_docs(K8S / "secret.example.yaml")
    lines = text.splitlines()
    start = lines.index("# apiVersion: v1")
    secret = yaml.safe_load("\n".join(line.removeprefix("# ") for line in lines[start:]))
    validate_manifest(secret)
    ref = container()["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret["metadata"]["name"] == ref["name"]
    assert ref["key"] in secret["stringData"]


# ---------------------------------------------------------------------------------------------
# Kubernetes: settings and the relations between objects


def test_configmap_and_deployment_env_names_are_settings_fields() -> None:
    """Every env var the Deployment sets (directly or from the ConfigMap) is a Settings field."""
    names = set(config_map()) | {env["name"] for env in container()["env"]}
    assert names - settings_env_names() == set()


def test_k8s_sets_what_the_worker_needs() -> None:
    """Bootstrap servers, assistant, partitions, port, grace and JSON logs are set explicitly."""
    required = {
        "KAFKA_BOOTSTRAP_SERVERS",
        "VAPI_ASSISTANT_ID",
        "TOPIC_PARTITIONS",
        "WORKER_HTTP_PORT",
        "WORKER_SHUTDOWN_GRACE_S",
        "WORKER_FINISH_TIMEOUT_S",
        "LOG_FORMAT",
    }
    assert required <= set(config_map())
    assert config_map()["LOG_FORMAT"] == "json"


def test_api_key_comes_from_a_secret_only() -> None:
    """VAPI_API_KEY is a secretKeyRef in the Deployment and absent from the ConfigMap."""
    assert "VAPI_API_KEY" not in config_map()
    (key,) = [env for env in container()["env"] if env["name"] == "VAPI_API_KEY"]
    assert set(key) == {"name", "valueFrom"}
    assert key["valueFrom"]["secretKeyRef"]["key"] == "VAPI_API_KEY"
    (source,) = container()["envFrom"]
    assert source["configMapRef"]["name"] == resource("ConfigMap")["metadata"]["name"]


def test_configmap_values_parse_as_settings() -> None:
    """The ConfigMap's values (plus a stand-in key) are valid Settings."""
    settings = parse_settings({**config_map(), "VAPI_API_KEY": "stand-in"})
    assert settings.log_format == "json"
    assert not settings.uses_embedded_simulator


def test_grace_period_covers_the_shutdown_drain() -> None:
    """terminationGracePeriodSeconds ≥ shutdown grace + finish timeout + margin: no drain is cut."""
    pod = resource("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= drain_s(config_map()) + SHUTDOWN_MARGIN_S


def test_probes_hit_the_ops_port() -> None:
    """Liveness/startup probe /healthz and readiness probe /readyz on WORKER_HTTP_PORT."""
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports["http-ops"] == int(config_map()["WORKER_HTTP_PORT"])
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container()[probe]["httpGet"] == {"path": path, "port": "http-ops"}


def test_container_is_locked_down() -> None:
    """Non-root, read-only root filesystem, no privilege escalation, every capability dropped."""
    pod = resource("Deployment")["spec"]["template"]["spec"]
    ctx = container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert "limits" in container()["resources"]
    assert "requests" in container()["resources"]


def test_writable_paths_are_empty_dirs() -> None:
    """/tmp and the image's WORKDIR (Faust's data directory) are emptyDir volumes."""
    volumes = {v["name"]: v for v in resource("Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    workdir = [args for keyword, args in final_stage() if keyword == "WORKDIR"][-1]
    for path in ("/tmp", workdir):
        assert "emptyDir" in volumes[mounts[path]]


def test_selectors_match_the_pods() -> None:
    """Service, PDB and ServiceMonitor select the Deployment's pods and the Service's port."""
    deployment = resource("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = resource("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb_selector = resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert pdb_selector.items() <= pod_labels.items()
    monitor = resource("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= service_ports
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {
        p["name"] for p in container()["ports"]
    }


def test_autoscaler_never_exceeds_the_partition_count() -> None:
    """maxReplicas ≤ TOPIC_PARTITIONS (extra consumers would idle) and it targets the Deployment."""
    hpa = resource("HorizontalPodAutoscaler")["spec"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] <= int(config_map()["TOPIC_PARTITIONS"])
    assert hpa["scaleTargetRef"]["name"] == resource("Deployment")["metadata"]["name"]
    external = [m["external"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "External"]
    assert external == ["chat_worker_consumer_lag"]
    pods = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert set(external + pods) <= exported_metric_names()


# ---------------------------------------------------------------------------------------------
# docker compose


def test_compose_file_matches_the_compose_specification() -> None:
    """docker-compose.yml validates against the Compose Specification's JSON schema."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(compose())
    ]
    assert errors == []


def test_compose_schema_rejects_a_misspelt_key() -> None:
    """The vendored schema is strict enough to catch a typo, so the test above means something."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = {"services": {"kafka": {"imagee": "apache/kafka"}}}
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(broken)


def test_compose_runs_two_workers_a_simulator_and_monitoring() -> None:
    """Two worker replicas, the simulator, Kafka, the topic job, Prometheus and Grafana."""
    services = compose()["services"]
    assert len(compose_workers()) == 2
    assert {"kafka", "topics", "simulator", "prometheus", "grafana"} <= set(services)
    assert services["simulator"]["command"][:5] == [
        "simulator",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["topics"]["image"] == services["kafka"]["image"]


def test_compose_worker_env_names_are_settings_fields_and_parse() -> None:
    """Every env var compose gives the worker and simulator is a Settings field; values parse."""
    services = compose()["services"]
    for name, service in {**compose_workers(), "simulator": services["simulator"]}.items():
        env = service.get("environment", {})
        assert set(env) - settings_env_names() == set(), name
        parse_settings({key: str(value) for key, value in env.items()})
    for service in compose_workers().values():
        env = service["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["VAPI_BASE_URL"] == "http://simulator:8080"
        assert env["VAPI_API_KEY"] == "sim-key"


def test_compose_topics_match_the_worker_settings() -> None:
    """The topic job creates the four topics with TOPIC_PARTITIONS partitions."""
    script = compose()["services"]["topics"]["command"][0]
    defaults = Settings()
    for topic in (
        defaults.topic_requests,
        defaults.topic_deltas,
        defaults.topic_responses,
        defaults.topic_dlq,
    ):
        assert topic in script
    (partitions,) = re.findall(r"--partitions (\d+)", script)
    for service in compose_workers().values():
        assert service["environment"]["TOPIC_PARTITIONS"] == partitions


def test_compose_stop_grace_covers_the_shutdown_drain() -> None:
    """Compose waits as long as Kubernetes does before killing a worker."""
    for service in compose_workers().values():
        drain = drain_s(service["environment"])
        assert float(service["stop_grace_period"].removesuffix("s")) >= drain + SHUTDOWN_MARGIN_S


def test_compose_prometheus_scrapes_both_workers() -> None:
    """Prometheus scrapes every compose worker on the ops port, under the ServiceMonitor's job."""
    config = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    targets = set(job["static_configs"][0]["targets"])
    assert targets == {f"{name}:6066" for name in compose_workers()}
    assert job["job_name"] == resource("Service")["metadata"]["name"]


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_is_multi_stage_slim_non_root() -> None:
    """A builder stage, then python:3.11-slim running vapi-worker as a non-root user."""
    instructions = dockerfile_instructions()
    assert sum(1 for keyword, _ in instructions if keyword == "FROM") == 2
    final = dict(final_stage())
    args = dict(a.split("=", 1) for keyword, a in instructions if keyword == "ARG" and "=" in a)
    assert final["FROM"] == "${PYTHON_IMAGE}"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert json.loads(final["ENTRYPOINT"]) == ["vapi-worker"]
    assert json.loads(final["CMD"]) == ["run"]
    assert final["EXPOSE"] == str(Settings.model_fields["worker_http_port"].default)
    user = final["USER"].split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    pod = resource("Deployment")["spec"]["template"]["spec"]
    assert int(user) == pod["securityContext"]["runAsUser"]


def test_final_image_has_no_build_tools() -> None:
    """Compilers are installed in the builder stage only."""
    final_text = " ".join(args for _, args in final_stage())
    assert "build-essential" not in final_text
    assert "gcc" not in final_text


def test_entrypoint_is_a_project_script() -> None:
    """The image's ENTRYPOINT is the console script pyproject.toml installs."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "vapi-worker" in scripts


def test_dockerignore_keeps_only_the_build_inputs() -> None:
    """The build context is pyproject.toml, README.md and worker/ — no venv, git or tests."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!worker"} <= set(lines)


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


def test_every_dashboard_query_names_exported_metrics() -> None:
    """Each panel query uses a chat_worker_ metric, and only ones that WorkerMetrics exports."""
    exported = exported_metric_names()
    for title, target in dashboard_targets():
        names = set(METRIC_NAME.findall(target["expr"]))
        assert names, f"{title}: no chat_worker_ metric in {target['expr']!r}"
        assert names <= exported, f"{title}: unknown {names - exported}"


def test_dashboard_text_mentions_only_exported_metrics() -> None:
    """Descriptions and variables name no metric that does not exist either."""
    assert set(METRIC_NAME.findall(DASHBOARD.read_text())) <= metric_family_names()


def test_dashboard_has_the_required_panels() -> None:
    """Outcomes, deltas, in flight, latency quantiles, statuses, retries, lag and DLQ are shown."""
    used = {
        name for _, target in dashboard_targets() for name in METRIC_NAME.findall(target["expr"])
    }
    assert {
        "chat_worker_requests_total",
        "chat_worker_deltas_total",
        "chat_worker_in_flight",
        "chat_worker_time_to_first_delta_seconds_bucket",
        "chat_worker_request_duration_seconds_bucket",
        "chat_worker_vapi_responses_total",
        "chat_worker_retries_total",
        "chat_worker_consumer_lag",
        "chat_worker_dlq_total",
    } <= used
    quantiles = {
        target["legendFormat"]
        for title, target in dashboard_targets()
        if title in {"Time to first delta", "Request duration"}
    }
    assert quantiles == {"p50", "p95", "p99"}


def test_dashboard_panels_use_the_datasource_variable() -> None:
    """Panels query ${datasource}, so the dashboard works in any Grafana, compose or cluster."""
    board = dashboard()
    assert board["uid"] == "vapi-stream-worker"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# Alert rules


def test_prometheus_rule_equals_the_plain_rules_file() -> None:
    """The PrometheusRule CR carries exactly the groups of alerts.rules.yml."""
    plain = yaml.safe_load(RULES.read_text())
    assert resource("PrometheusRule")["spec"]["groups"] == plain["groups"]


def test_alert_rules_cover_the_required_conditions() -> None:
    """Failure ratio, DLQ, growing lag, Vapi not ready and stalled streams each have an alert."""
    plain = yaml.safe_load(RULES.read_text())
    alerts = {
        rule["alert"] for group in plain["groups"] for rule in group["rules"] if "alert" in rule
    }
    assert {
        "ChatWorkerHighFailureRatio",
        "ChatWorkerDeadLetters",
        "ChatWorkerConsumerLagGrowing",
        "ChatWorkerVapiNotReady",
        "ChatWorkerNoDeltasWhileInFlight",
    } <= alerts


def test_alert_rules_name_only_exported_metrics() -> None:
    """Rule expressions use exported sample names; their texts name existing metrics."""
    plain = yaml.safe_load(RULES.read_text())
    exprs = " ".join(rule["expr"] for group in plain["groups"] for rule in group["rules"])
    assert set(METRIC_NAME.findall(exprs)) <= exported_metric_names()
    assert set(METRIC_NAME.findall(RULES.read_text())) <= metric_family_names()


def test_promtool_checks_the_rules() -> None:
    """``promtool check rules`` accepts the plain rules file."""
    promtool = require_tool("promtool", APT_HINT)
    run_tool(promtool, "check", "rules", str(RULES))


def test_promtool_runs_the_alert_rule_unit_tests() -> None:
    """``promtool test rules`` passes: the alerts fire on the series they should, and only those."""
    promtool = require_tool("promtool", APT_HINT)
    run_tool(promtool, "test", "rules", RULE_TESTS.name, cwd=MONITORING)


def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path) -> None:
    """The compose Prometheus config is valid with the rules file beside it, as mounted."""
    promtool = require_tool("promtool", APT_HINT)
    shutil.copy(COMPOSE_PROMETHEUS, tmp_path / "prometheus.yml")
    shutil.copy(RULES, tmp_path / RULES.name)
    run_tool(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
