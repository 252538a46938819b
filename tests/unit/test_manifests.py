"""Deployment artefacts checked offline: k8s manifests, compose file, Dockerfile, dashboard, alerts.

How each kind of file is validated:
- Core Kubernetes manifests (every resource file of the base k8s/ and of k8s/components/*, and
  everything ``kubectl kustomize`` renders for the base, each overlay and each component on the
  base) against the Kubernetes OpenAPI schemas shipped by kubernetes-validate, for K8S_VERSION, in
  strict mode (unknown fields are errors).
- KEDA's ScaledObject and TriggerAuthentication against KEDA's CRD schemas, vendored under
  tests/data/keda (see its README for origin and licence), unknown fields rejected.
- Prometheus Operator CRDs (ServiceMonitor, PrometheusRule): a hand-written structural check, and
  the PrometheusRule must equal k8s/monitoring/alerts.rules.yml, which promtool checks and tests.
- docker-compose.yml against the Compose Specification's JSON schema, vendored under
  tests/data/compose-spec (see its README for origin and licence).
- Env var names set for the worker (ConfigMap, Deployment, compose) must be Settings fields, and
  the values must parse as Settings.
- Every ``chat_worker_*`` name in the dashboard and the alert rules must be exported by
  WorkerMetrics (collected from a fresh registry).
- promtool (Debian package ``prometheus``) checks the rules, runs their unit tests and checks the
  compose Prometheus config; kubectl renders the kustomizations. Without the tool, those tests
  skip outside CI and fail in CI.
"""

from __future__ import annotations

import inspect
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
from worker.topics import ensure_topics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPONENTS = K8S / "components"
OVERLAYS = ROOT / "deploy" / "k8s"
KEDA_SCHEMAS = ROOT / "tests" / "data" / "keda"
README = ROOT / "README.md"
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

#: Files under k8s/ that are neither kustomize resources nor kustomization files, and their tests.
NON_RESOURCES = {
    "secret.example.yaml": "test_example_secret_is_only_comments_and_valid_once_uncommented",
    "components/keda/triggerauthentication.example.yaml": (
        "test_example_trigger_authentication_is_only_comments_and_valid_once_uncommented"
    ),
    "monitoring/alerts.rules.yml": "promtool tests",
    "monitoring/alerts.test.yml": "test_promtool_runs_the_alert_rule_unit_tests",
    "monitoring/vapi-stream-worker.json": "dashboard tests",
}

#: Each kustomize component: the kind it adds, and the cluster prerequisite the README must name.
COMPONENTS_NEED = {
    "keda": ("ScaledObject", "KEDA"),
    "hpa": ("HorizontalPodAutoscaler", "prometheus-adapter"),
    "prometheus-operator": ("ServiceMonitor", "Prometheus Operator"),
}

#: What the base applies on any cluster: core kinds only.
BASE_KINDS = ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]

#: Each shipped kustomization directory, the base and the overlays (which kustomize cannot nest
#: inside their base), relative to the repository, and the kinds it renders.
BUILDS = {
    "k8s": BASE_KINDS,
    "deploy/k8s/keda": [*BASE_KINDS, "ScaledObject"],
    "deploy/k8s/keda-prometheus-operator": [
        *BASE_KINDS,
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
    ],
    "deploy/k8s/hpa-prometheus-operator": [
        *BASE_KINDS,
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
    ],
}

#: The overlay the README gives as the way to deploy.
DEFAULT_OVERLAY = "deploy/k8s/keda"

#: KEDA's CRD schemas by (apiVersion, kind).
KEDA_CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): KEDA_SCHEMAS / "scaledobject.schema.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): KEDA_SCHEMAS
    / "triggerauthentication.schema.yaml",
}

#: Minimum seconds between the end of the worker's drain (WORKER_SHUTDOWN_GRACE_S, then at most
#: WORKER_FINISH_TIMEOUT_S for final steps under way) and the SIGKILL.
SHUTDOWN_MARGIN_S = 10

#: The README's row (in "Performance, measured") of the slowest /healthz answers measured while a
#: worker replayed its table's changelog, one figure per table size.
HEALTHZ_DURING_REPLAY_ROW = "| `/healthz` during the replay: slowest answer (p99) |"
#: Seconds the startup probe allows beyond the start's wait for the broker (imports, the app).
STARTUP_ROOM_S = 30

APT_HINT = "apt-get install -y --no-install-recommends prometheus"
METRIC_NAME = re.compile(r"\bchat_worker_[A-Za-z0-9_]+")
#: A metric name in PromQL and its label matchers, if any: ``chat_worker_x{a="b"}``.
METRIC_SELECTOR = re.compile(r"\b(chat_worker_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
#: An aggregation and its ``by (...)`` labels, if any, up to its opening parenthesis.
AGGREGATION = re.compile(r"\b(sum|min|max|avg|count|group)\s*(?:by\s*\(([^)]*)\))?\s*\(")


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
def kustomization(directory: Path = K8S) -> dict[str, Any]:
    """The kustomization.yaml of a directory, k8s/ (the base) unless told."""
    return yaml.safe_load((directory / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


def kustomization_dirs() -> list[Path]:
    """Every directory under k8s/ with a kustomization.yaml: base, components, overlays."""
    return sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


def resource_files() -> list[str]:
    """Every manifest file (not directory) some kustomization lists, relative to k8s/."""
    files = set()
    for directory in kustomization_dirs():
        for entry in kustomization(directory).get("resources", []):
            path = (directory / entry).resolve()
            if path.is_file():
                files.add(str(path.relative_to(K8S)))
    return sorted(files)


@cache
def resources() -> tuple[dict[str, Any], ...]:
    """Every document of every resource file of the base and the components."""
    return tuple(doc for name in resource_files() for doc in load_yaml_docs(K8S / name))


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


def pod_spec() -> dict[str, Any]:
    """The Deployment's pod template spec."""
    return resource("Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def render(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of a directory, as documents."""
    kubectl = require_tool("kubectl", "kubectl with built-in kustomize")
    return [
        doc for doc in yaml.safe_load_all(run_tool(kubectl, "kustomize", str(directory))) if doc
    ]


def overlay(tmp_path: Path, components: list[str]) -> Path:
    """A throw-away overlay of the base with the given components, as an operator would write."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, tmp_path)],
        "components": [os.path.relpath(COMPONENTS / name, tmp_path) for name in components],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field validation:
    an object schema that neither lists additionalProperties nor preserves unknown fields
    rejects fields it does not list."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@cache
def keda_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The strict JSON schema of a vendored KEDA CRD."""
    return strict(yaml.safe_load(KEDA_CRDS[(api_version, kind)].read_text()))  # type: ignore[no-any-return]


def keda_errors(doc: dict[str, Any]) -> list[str]:
    """Where a KEDA object breaks its CRD schema; empty when it validates."""
    schema = keda_schema(doc["apiVersion"], doc["kind"])
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def uncommented(path: Path, first_line: str) -> dict[str, Any]:
    """The YAML document a comments-only example holds once its lines from first_line on are
    uncommented; the file itself must hold no document."""
    assert not load_yaml_docs(path), f"{path.name} must be comments only"
    lines = path.read_text().splitlines()
    start = lines.index(first_line)
    text = "\n".join(line.removeprefix("# ").removeprefix("#") for line in lines[start:])
    return yaml.safe_load(text)  # type: ignore[no-any-return]


def readme_section(title: str) -> str:
    """A second-level section of README.md, without its heading."""
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


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
    """Schema-validate a core resource or a KEDA object, or structure-check a known CRD; anything
    else fails."""
    check = CRD_CHECKS.get((doc["apiVersion"], doc["kind"]))
    if check is not None:
        check(doc)
        return
    if (doc["apiVersion"], doc["kind"]) in KEDA_CRDS:
        errors = keda_errors(doc)
        if errors:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {errors}", pytrace=False)
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
    """No manifest escapes the checks: each file is a kustomize resource, a kustomization, or
    listed with its test."""
    on_disk = {
        str(path.relative_to(K8S))
        for path in K8S.rglob("*")
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json"}
    }
    kustomizations = {
        str((directory / "kustomization.yaml").relative_to(K8S))
        for directory in kustomization_dirs()
    }
    assert on_disk == set(resource_files()) | kustomizations | set(NON_RESOURCES)


@pytest.mark.parametrize("name", resource_files())
def test_each_resource_file_validates(name: str) -> None:
    """Each resource file validates against the Kubernetes or KEDA schemas (Prometheus Operator
    CRDs: structural check)."""
    docs = load_yaml_docs(K8S / name)
    assert docs, f"{name} holds no resource"
    for doc in docs:
        validate_manifest(doc)


def test_every_shipped_kustomization_is_built_by_a_test() -> None:
    """The base and each overlay are in BUILDS; each component is in COMPONENTS_NEED."""
    overlays = {str(path.relative_to(ROOT)) for path in OVERLAYS.iterdir() if path.is_dir()}
    assert {"k8s", *overlays} == set(BUILDS)
    assert {path.name for path in COMPONENTS.iterdir() if path.is_dir()} == set(COMPONENTS_NEED)
    for name in COMPONENTS_NEED:
        assert kustomization(COMPONENTS / name)["kind"] == "Component"


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_each_kustomization_renders_and_every_output_validates(build: str) -> None:
    """``kubectl kustomize`` of the base and of each overlay succeeds with the expected kinds, and
    each rendered object validates as above."""
    rendered = render(ROOT / build)
    assert sorted(doc["kind"] for doc in rendered) == sorted(BUILDS[build])
    for doc in rendered:
        validate_manifest(doc)


def test_the_base_applies_on_any_cluster() -> None:
    """``kubectl apply -k k8s/`` needs no CRD: only core API groups, which every cluster serves."""
    for doc in render(K8S):
        assert doc["apiVersion"] in {"v1", "apps/v1", "policy/v1"}, doc["kind"]


@pytest.mark.parametrize("component", sorted(COMPONENTS_NEED))
def test_each_component_on_the_base_renders_and_validates(component: str, tmp_path: Path) -> None:
    """Each component added alone to the base renders, adds its kind, and validates."""
    rendered = render(overlay(tmp_path, [component]))
    kinds = [doc["kind"] for doc in rendered]
    assert COMPONENTS_NEED[component][0] in kinds
    for doc in rendered:
        validate_manifest(doc)


def test_two_autoscalers_cannot_be_combined(tmp_path: Path) -> None:
    """KEDA and the HPA would fight over the replica count: the two components fail to build
    together (each removes the Deployment's replicas, which the second cannot find)."""
    kubectl = require_tool("kubectl", "kubectl with built-in kustomize")
    directory = overlay(tmp_path, ["keda", "hpa"])
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    assert b"replicas" in proc.stderr


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_an_autoscaler_owns_the_replica_count(build: str) -> None:
    """With an autoscaler the Deployment sets no replicas (each apply would reset the scale);
    without one it runs as many as the autoscalers' minimum."""
    rendered = render(ROOT / build)
    (deployment,) = [doc for doc in rendered if doc["kind"] == "Deployment"]
    autoscaled = {"ScaledObject", "HorizontalPodAutoscaler"} & {doc["kind"] for doc in rendered}
    if autoscaled:
        assert "replicas" not in deployment["spec"]
    else:
        assert deployment["spec"]["replicas"] == resource("ScaledObject")["spec"]["minReplicaCount"]
        assert (
            deployment["spec"]["replicas"]
            == resource("HorizontalPodAutoscaler")["spec"]["minReplicas"]
        )


def test_kustomization_generates_the_dashboard_from_the_compose_file() -> None:
    """The dashboard ConfigMap is generated from the same JSON file compose mounts into Grafana."""
    (generator,) = kustomization()["configMapGenerator"]
    assert generator["files"] == [str(DASHBOARD.relative_to(K8S))]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    grafana_mounts = compose()["services"]["grafana"]["volumes"]
    assert any(m.startswith(f"./{DASHBOARD.relative_to(ROOT)}:") for m in grafana_mounts)


def test_example_secret_is_only_comments_and_valid_once_uncommented() -> None:
    """The example Secret ships no key, yet uncommented it is the Secret the Deployment mounts."""
    secret = uncommented(K8S / "secret.example.yaml", "# apiVersion: v1")
    validate_manifest(secret)
    source = api_key_volume_source()
    assert secret["metadata"]["name"] == source["name"]
    assert {item["key"] for item in source["items"]} <= set(secret["stringData"])


def test_example_trigger_authentication_is_only_comments_and_valid_once_uncommented() -> None:
    """The SASL/TLS TriggerAuthentication for KEDA's Kafka scaler validates against KEDA's schema
    once uncommented, and gives only parameters the Kafka scaler reads."""
    path = COMPONENTS / "keda" / "triggerauthentication.example.yaml"
    auth = uncommented(path, "# apiVersion: keda.sh/v1alpha1")
    validate_manifest(auth)
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert parameters <= {"sasl", "username", "password", "tls", "ca", "cert", "key"}
    assert {"sasl", "username", "password"} <= parameters
    (secret,) = {ref["name"] for ref in auth["spec"]["secretTargetRef"]}
    assert "--from-literal=sasl=" in path.read_text()
    assert f"secret generic {secret} " in path.read_text()
    assert f"authenticationRef:\n#     name: {auth['metadata']['name']}" in path.read_text()


def test_keda_schema_rejects_a_misspelt_key() -> None:
    """The vendored schema, made strict, catches typos, so validating against it means something."""
    scaled = json.loads(json.dumps(resource("ScaledObject")))
    assert keda_errors(scaled) == []
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    assert keda_errors(scaled)
    del scaled["spec"]["minReplicas"]
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 10
    assert keda_errors(scaled), "trigger metadata values must be strings"


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


def api_key_volume_source() -> dict[str, Any]:
    """The Secret source of the projected volume VAPI_API_KEY_FILE lies on."""
    env = {item["name"]: item for item in container()["env"]}
    key_file = Path(env["VAPI_API_KEY_FILE"]["value"])
    mounts = [m for m in container()["volumeMounts"] if Path(m["mountPath"]) == key_file.parent]
    (mount,) = mounts
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    (item,) = source["secret"]["items"]
    assert item["path"] == key_file.name
    return source["secret"]  # type: ignore[no-any-return]


def test_api_key_is_a_file_on_a_projected_secret_volume() -> None:
    """The key reaches the worker as VAPI_API_KEY_FILE on a read-only projected Secret volume,
    as the README says: never as an environment variable, never in the ConfigMap."""
    assert not {"VAPI_API_KEY", "VAPI_API_KEY_FILE"} & set(config_map())
    env = {item["name"]: item for item in container()["env"]}
    assert "VAPI_API_KEY" not in env
    assert set(env["VAPI_API_KEY_FILE"]) == {"name", "value"}
    source = api_key_volume_source()
    assert source["name"] == "vapi-stream-worker"
    assert source.get("optional", False) is False
    (envfrom,) = container()["envFrom"]
    assert envfrom["configMapRef"]["name"] == resource("ConfigMap")["metadata"]["name"]


def test_the_mounted_key_file_configures_the_worker(tmp_path: Path) -> None:
    """ConfigMap values plus the key file at the Deployment's path (moved under tmp_path) parse
    as Settings that call the real Vapi with the key from the file."""
    env = {item["name"]: item for item in container()["env"]}
    key_file = tmp_path / Path(env["VAPI_API_KEY_FILE"]["value"]).name
    key_file.write_text("sk-mounted\n")
    settings = parse_settings({**config_map(), "VAPI_API_KEY_FILE": str(key_file)})
    assert settings.vapi_api_key is not None
    assert settings.vapi_api_key.get_secret_value() == "sk-mounted"
    assert not settings.uses_embedded_simulator


def test_configmap_values_parse_as_settings() -> None:
    """The ConfigMap's values (plus a stand-in key) are valid Settings."""
    settings = parse_settings({**config_map(), "VAPI_API_KEY": "stand-in"})
    assert settings.log_format == "json"
    assert not settings.uses_embedded_simulator


def test_grace_period_covers_the_shutdown_drain() -> None:
    """terminationGracePeriodSeconds ≥ shutdown grace + finish timeout + margin: no drain is cut."""
    pod = pod_spec()
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


def slowest_healthz_during_replay_ms() -> list[float]:
    """The README's slowest /healthz answers during a replay, in ms (each column's first)."""
    section = readme_section("Performance, measured")
    (row,) = [line for line in section.splitlines() if line.startswith(HEALTHZ_DURING_REPLAY_ROW)]
    cells = row.removeprefix(HEALTHZ_DURING_REPLAY_ROW).strip(" |").split("|")
    found = [re.match(r"\s*([\d,.]+) (ms|s)\b", cell) for cell in cells]
    assert all(found), f"a cell without a figure in: {row}"
    return [
        float(match.group(1).replace(",", "")) * (1000 if match.group(2) == "s" else 1)
        for match in found
        if match is not None
    ]


def test_liveness_timeout_is_twice_the_slowest_healthz_answer_during_a_replay() -> None:
    """A changelog replay runs on the event loop /healthz answers from: the liveness probe's
    timeout is at least twice the slowest answer measured during one, and a restart takes three
    misses in a row."""
    probe = container()["livenessProbe"]
    slowest = slowest_healthz_during_replay_ms()
    assert slowest
    assert probe["timeoutSeconds"] * 1000 >= 2 * max(slowest)
    assert probe["failureThreshold"] >= 3


def test_startup_probe_covers_the_broker_wait_at_start() -> None:
    """/healthz answers before the table is recovered (tests/e2e/test_probes_during_recovery.py),
    so the startup probe covers only the start: its wait for the broker, then the rest."""
    broker_wait_s = inspect.signature(ensure_topics).parameters["timeout_s"].default
    probe = container()["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= broker_wait_s + STARTUP_ROOM_S


def test_unready_pods_can_always_be_evicted() -> None:
    """The PDB counts only ready pods against its budget, so unready ones never block a drain."""
    pdb = resource("PodDisruptionBudget")["spec"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["maxUnavailable"] == 1


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


def test_the_temporary_directory_is_an_empty_dir() -> None:
    """/tmp, where the worker writes (Faust's data directory: TMPDIR is unset in the image), is
    an emptyDir volume; the image sets no working directory it would have to write to."""
    volumes = {v["name"]: v for v in resource("Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "TMPDIR" not in " ".join(args for keyword, args in final_stage() if keyword == "ENV")
    assert "TMPDIR" not in {env["name"] for env in container().get("env", [])}
    assert [args for keyword, args in final_stage() if keyword in ("WORKDIR", "VOLUME")] == []


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


def test_hpa_scales_up_to_the_partition_count_on_this_deployments_metrics() -> None:
    """maxReplicas = TOPIC_PARTITIONS (extra consumers would idle); the lag it reads is this
    deployment's (selected by job = the Service's name), and every metric is exported."""
    hpa = resource("HorizontalPodAutoscaler")["spec"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] == int(config_map()["TOPIC_PARTITIONS"])
    assert hpa["scaleTargetRef"]["name"] == resource("Deployment")["metadata"]["name"]
    (external,) = [m["external"]["metric"] for m in hpa["metrics"] if m["type"] == "External"]
    assert external["name"] == "chat_worker_consumer_lag"
    assert external["selector"]["matchLabels"] == {"job": resource("Service")["metadata"]["name"]}
    pods = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert {external["name"], *pods} <= exported_metric_names()


def test_keda_reads_the_lag_of_the_worker_group_on_the_request_topic() -> None:
    """KEDA's Kafka trigger asks the worker's broker for the lag of its consumer group
    (WORKER_APP_ID) on TOPIC_REQUESTS, scales the Deployment up to the partition count, and
    treats a partition with no commit as the worker does (auto.offset.reset earliest)."""
    scaled = resource("ScaledObject")["spec"]
    settings = config_map()
    assert scaled["scaleTargetRef"]["name"] == resource("Deployment")["metadata"]["name"]
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] == int(settings["TOPIC_PARTITIONS"])
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == settings["KAFKA_BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == settings["WORKER_APP_ID"]
    assert meta["topic"] == settings["TOPIC_REQUESTS"]
    assert meta["offsetResetPolicy"] == "earliest"
    # Lag counts records taken but not finished: scale before a replica's in-flight bound is full.
    assert 0 < int(meta["lagThreshold"]) < int(settings["WORKER_MAX_IN_FLIGHT"])


def test_both_autoscalers_scale_alike() -> None:
    """Same bounds and the same scale-up/scale-down behaviour whichever autoscaler is chosen."""
    scaled = resource("ScaledObject")["spec"]
    hpa = resource("HorizontalPodAutoscaler")["spec"]
    assert scaled["minReplicaCount"] == hpa["minReplicas"]
    assert scaled["maxReplicaCount"] == hpa["maxReplicas"]
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]


def test_readme_deploy_commands_name_shipped_kustomizations() -> None:
    """Every ``kubectl apply -k`` / ``kubectl kustomize`` path in the README is a kustomization
    this file builds, and the documented default is the KEDA overlay."""
    text = README.read_text()
    paths = re.findall(r"kubectl (?:-n \S+ )?(?:apply -k|kustomize) ([^\s`]+)", text)
    assert paths
    for path in paths:
        directory = (ROOT / path).resolve()
        assert (directory / "kustomization.yaml").is_file(), path
        assert str(directory.relative_to(ROOT)) in BUILDS, path
    assert f"apply -k {DEFAULT_OVERLAY}" in readme_section("Deploying on Kubernetes")


def test_readme_deploying_section_lists_every_prerequisite() -> None:
    """The Deploying section names each component, the cluster add-on it needs, and the Grafana
    sidecar setting the dashboard ConfigMap needs."""
    section = readme_section("Deploying on Kubernetes")
    for name, (kind, prerequisite) in COMPONENTS_NEED.items():
        assert f"k8s/components/{name}" in section, name
        assert prerequisite in section, name
        assert kind in section, name
    assert "searchNamespace" in section
    assert "secret.example.yaml" in section


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


def test_compose_publishes_ports_on_the_loopback_interface_only() -> None:
    """Every port compose publishes binds 127.0.0.1: Kafka (no auth), Grafana (admin/admin),
    Prometheus (lifecycle API on), the simulator and the workers' ops ports are local only."""
    published = [
        (name, port)
        for name, service in compose()["services"].items()
        for port in service.get("ports", [])
    ]
    assert published, "compose publishes the ports its comments point to"
    assert [(name, port) for name, port in published if not port.startswith("127.0.0.1:")] == []


def test_compose_prometheus_scrapes_both_workers() -> None:
    """Prometheus scrapes every compose worker on the ops port, under the ServiceMonitor's job."""
    config = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    targets = set(job["static_configs"][0]["targets"])
    assert targets == {f"{name}:6066" for name in compose_workers()}
    assert job["job_name"] == resource("Service")["metadata"]["name"]
    # A namespace label as in Kubernetes, so the dashboard's $namespace has a value to pick.
    assert job["static_configs"][0]["labels"]["namespace"]


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_is_multi_stage_slim_non_root() -> None:
    """A builder stage, then python:3.11-slim running vapi-worker as a non-root user."""
    instructions = dockerfile_instructions()
    assert sum(1 for keyword, _ in instructions if keyword == "FROM") == 2
    final = dict(final_stage())
    args = dict(a.split("=", 1) for keyword, a in instructions if keyword == "ARG" and "=" in a)
    assert final["FROM"] == "${PYTHON_IMAGE}"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
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
    """The build context is the lock, pyproject.toml, README.md and worker/: no venv, git, tests."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!requirements.lock", "!pyproject.toml", "!README.md", "!worker"} <= set(lines)


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
    """Outcomes, deltas, in flight, latency quantiles, statuses, retries, lag, DLQ and spend are
    shown."""
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
        "chat_worker_cost_usd_total",
        "chat_worker_tokens_total",
        "chat_worker_reply_checks_total",
    } <= used
    spend = [target["expr"] for title, target in dashboard_targets() if title.startswith("Spend")]
    assert spend == [
        'sum(rate(chat_worker_cost_usd_total{namespace="$namespace", job="$job"}'
        "[$__rate_interval])) * 60"
    ]
    quantiles = {
        target["legendFormat"]
        for title, target in dashboard_targets()
        if title in {"Time to first delta", "Request duration"}
    }
    assert quantiles == {"p50", "p95", "p99"}


def test_dashboard_variables_pick_one_deployment() -> None:
    """$namespace, then $job within it, each one value: no panel can sum two deployments."""
    variables = [v["name"] for v in dashboard()["templating"]["list"]]
    assert variables.index("namespace") < variables.index("job")
    by_name = {v["name"]: v for v in dashboard()["templating"]["list"]}
    namespace, job = by_name["namespace"], by_name["job"]
    assert namespace["definition"] == "label_values(chat_worker_in_flight, namespace)"
    assert job["definition"] == 'label_values(chat_worker_in_flight{namespace="$namespace"}, job)'
    for variable in (namespace, job):
        assert variable["query"]["query"] == variable["definition"]
        assert variable["multi"] is False
        assert variable["includeAll"] is False


def test_every_dashboard_query_is_scoped_to_the_chosen_deployment() -> None:
    """Each metric selector of each panel query matches namespace="$namespace" and job="$job"."""
    for title, target in dashboard_targets():
        selectors = METRIC_SELECTOR.findall(target["expr"])
        assert selectors, title
        for name, matchers in selectors:
            found = set(re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', matchers))
            assert {("namespace", "=", "$namespace"), ("job", "=", "$job")} <= found, (title, name)


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
        "ChatWorkerBrokerUnreachable",
        "ChatWorkerNoDeltasWhileInFlight",
    } <= alerts


def test_alert_rules_name_only_exported_metrics() -> None:
    """Rule expressions use exported sample names; their texts name existing metrics."""
    plain = yaml.safe_load(RULES.read_text())
    exprs = " ".join(rule["expr"] for group in plain["groups"] for rule in group["rules"])
    assert set(METRIC_NAME.findall(exprs)) <= exported_metric_names()
    assert set(METRIC_NAME.findall(RULES.read_text())) <= metric_family_names()


def test_every_alert_rule_aggregates_per_deployment() -> None:
    """Every aggregation in a rule keeps namespace and job, so deployments are judged apart."""
    plain = yaml.safe_load(RULES.read_text())
    for rule in (rule for group in plain["groups"] for rule in group["rules"]):
        name = rule.get("alert") or rule["record"]
        aggregations = AGGREGATION.findall(rule["expr"])
        for operator, labels in aggregations:
            kept = {label.strip() for label in labels.split(",")}
            assert {"namespace", "job"} <= kept, f"{name}: {operator} by ({labels})"
        if "record" in rule:
            assert rule["record"].startswith("namespace_job:"), name


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
