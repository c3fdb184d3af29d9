"""The deployment files, checked without Docker or a cluster: every Kubernetes manifest against the
API schemas of KUBERNETES_VERSIONS (unknown fields refused), and the promises the files make to each
other and to the code (labels, ports, probes, names of settings and secrets, the image's user and
health check). And `credits-healthcheck`, the image's health check, against a real server."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from processes import free_port, spawn_server, wait_serving

from billing import config as billing_config
from billing import main as billing_main
from server import config as server_config
from server import healthcheck
from server.app import CLOSE_TIMEOUT_SECONDS

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests target (native gRPC probes, PDB unhealthyPodEvictionPolicy,
# CronJob timeZone) and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
NAMESPACE = "credits"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
PLACEHOLDER = "REPLACE_ME"

# What the server may take beyond CREDITS_SHUTDOWN_GRACE_SECONDS to stop (CreditsApp.stop):
# flushing traces, then closing the reserve batches, the cache and the database pool, each
# bounded by CLOSE_TIMEOUT_SECONDS. Count a new bounded step here.
SHUTDOWN_CLOSE_STEPS = 4


# ---- reading the files ---------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    path: pathlib.Path
    document: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.document["kind"])

    @property
    def name(self) -> str:
        return str(self.document["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}: {self.kind}/{self.name}"


def yaml_documents(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def kustomizations() -> list[pathlib.Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def manifests() -> list[Manifest]:
    return [
        Manifest(path, document)
        for path in sorted(K8S.rglob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml_documents(path)
    ]


def of_kind(kind: str) -> list[Manifest]:
    return [m for m in manifests() if m.kind == kind]


def one(kind: str, name: str) -> Manifest:
    found = [m for m in of_kind(kind) if m.name == name]
    assert len(found) == 1, f"expected one {kind}/{name} under deploy/k8s, found {len(found)}"
    return found[0]


def pod_templates() -> list[tuple[Manifest, dict[str, Any]]]:
    """Every pod template: of the Deployments, the Jobs and the CronJobs."""
    templates = []
    for m in manifests():
        spec = m.document.get("spec", {})
        if m.kind in ("Deployment", "Job"):
            templates.append((m, spec["template"]))
        elif m.kind == "CronJob":
            templates.append((m, spec["jobTemplate"]["spec"]["template"]))
    assert templates, "no workload found under deploy/k8s"
    return templates


def containers() -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for m, template in pod_templates():
        for container in template["spec"]["containers"]:
            yield m, container


def program(container: dict[str, Any]) -> str:
    """credits-server (the image's entrypoint) or credits-listener."""
    command = container.get("command")
    assert command in (None, ["credits-listener"]), f"unexpected command {command}"
    return "credits-server" if command is None else "credits-listener"


def string_constants(folder: pathlib.Path, pattern: str) -> set[str]:
    """Every string literal of the package's modules that matches `pattern` in full."""
    names: set[str] = set()
    for module in folder.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and re.fullmatch(pattern, value):
                names.add(value)
    return names


def server_env_names() -> set[str]:
    """The environment variables credits-server reads (its flags' defaults, src/server)."""
    return string_constants(ROOT / "src" / "server", r"(CREDITS|OTEL)_[A-Z0-9_]+")


def listener_env_names() -> set[str]:
    return string_constants(ROOT / "src" / "billing", r"(CREDITS_LISTENER|STRIPE)_[A-Z0-9_]+")


def known_env(program_name: str) -> set[str]:
    if program_name == "credits-server":
        return server_env_names()
    return listener_env_names()


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def config_map_data(name: str) -> dict[str, str]:
    return dict(one("ConfigMap", name).document["data"])


def example_secrets() -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: dict(d["stringData"])
        for d in yaml_documents(SECRETS_EXAMPLE)
        if d["kind"] == "Secret"
    }


def container_port(container: dict[str, Any], port: int | str) -> int | None:
    """The number of a container port given by number or name; None if it is not declared."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    return None


def container_of(kind: str, name: str) -> dict[str, Any]:
    found = [c for m, c in containers() if (m.kind, m.name) == (kind, name)]
    assert len(found) == 1, f"expected one container in {kind}/{name}"
    return found[0]


# ---- Kubernetes: schema and structure ------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", manifests(), ids=str)
def test_every_manifest_is_valid_for_the_kubernetes_api(manifest: Manifest, version: str) -> None:
    try:
        kubernetes_validate.validate(manifest.document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(p) for p in error.path)
        pytest.fail(f"{manifest}: {where}: {error.message} (Kubernetes {version})")


def test_every_manifest_is_in_one_kustomization_except_the_secret_example() -> None:
    listed: list[pathlib.Path] = []
    images = []
    for kustomization in kustomizations():
        document = yaml_documents(kustomization)[0]
        for resource in document["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.is_file(), f"{kustomization} lists {resource}, which does not exist"
            listed.append(path)
        images.append(document["images"])
    on_disk = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert len(listed) == len(set(listed)), "a manifest is listed twice"
    assert set(listed) == on_disk - {SECRETS_EXAMPLE.resolve()}
    assert len(images) == 2 and images[0] == images[1], "both kustomizations pin one image"


def test_every_object_is_in_the_credits_namespace() -> None:
    for m in manifests():
        if m.kind == "Namespace":
            assert m.name == NAMESPACE
        else:
            assert m.document["metadata"].get("namespace") == NAMESPACE, str(m)


def test_deployment_selectors_match_their_pod_labels() -> None:
    for m in of_kind("Deployment"):
        selector = m.document["spec"]["selector"]["matchLabels"]
        labels = m.document["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{m}: selector {selector} misses its pods"
        for constraint in m.document["spec"]["template"]["spec"].get(
            "topologySpreadConstraints", []
        ):
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items(), str(m)


def test_services_select_pods_and_target_their_declared_ports() -> None:
    for service in of_kind("Service"):
        selector = service.document["spec"]["selector"]
        selected = [
            m
            for m in of_kind("Deployment")
            if selector.items() <= m.document["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, f"{service} selects no pods"
        for deployment in selected:
            pod_containers = deployment.document["spec"]["template"]["spec"]["containers"]
            for port in service.document["spec"]["ports"]:
                assert any(container_port(c, port["targetPort"]) for c in pod_containers), (
                    f"{service}: targetPort {port['targetPort']} is not a port of {deployment}"
                )


def test_probes_point_at_declared_ports() -> None:
    probed = 0
    for m, container in containers():
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
            assert handler is not None, f"{m}: {kind} has no grpc, httpGet or tcpSocket handler"
            assert container_port(container, handler["port"]), (
                f"{m}: {kind} port {handler['port']} is not declared"
            )
            probed += 1
    assert probed >= 5


def test_long_running_containers_have_readiness_and_liveness_probes() -> None:
    server = container_of("Deployment", "credits-server")
    assert server["readinessProbe"]["grpc"]["port"] == container_port(server, "grpc")
    assert server["livenessProbe"]["grpc"]["port"] == container_port(server, "grpc")
    listener = container_of("Deployment", "credits-listener")
    for kind in ("readinessProbe", "livenessProbe"):
        assert listener[kind]["httpGet"]["path"] == "/healthz"


def test_config_and_secret_references_resolve() -> None:
    config_maps = {m.name: m.document.get("data", {}) for m in of_kind("ConfigMap")}
    secrets = example_secrets()
    for m, template in pod_templates():
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, str(m)
                else:
                    assert source["secretRef"]["name"] in secrets, str(m)
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                    assert key in secrets.get(name, {}), f"{m}: secret {name}/{key} undocumented"
                if "configMapKeyRef" in ref:
                    name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
                    assert key in config_maps.get(name, {}), f"{m}: config {name}/{key} missing"
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, str(m)


def test_pdb_and_hpa_target_the_server_deployment() -> None:
    server = one("Deployment", "credits-server").document
    labels = server["spec"]["template"]["metadata"]["labels"]
    pdb = one("PodDisruptionBudget", "credits-server").document
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one("HorizontalPodAutoscaler", "credits-server").document
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "credits-server")
    # The autoscaler owns the replica count; a PDB must leave replicas to serve.
    assert "replicas" not in server["spec"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    # CPU utilisation is measured against the request.
    for container in server["spec"]["template"]["spec"]["containers"]:
        assert container["resources"]["requests"]["cpu"]


def test_pods_run_unprivileged_as_the_image_user() -> None:
    uid = int(dockerfile_user().split(":")[0])
    for m, template in pod_templates():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, str(m)
        assert spec["securityContext"]["runAsUser"] == uid, str(m)
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", str(m)
        assert spec["automountServiceAccountToken"] is False, str(m)
        # Service links would add CREDITS_*_PORT variables to the settings' namespace.
        assert spec["enableServiceLinks"] is False, str(m)
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, str(m)
            assert context["allowPrivilegeEscalation"] is False, str(m)
            assert context["readOnlyRootFilesystem"] is True, str(m)
            assert context["capabilities"]["drop"] == ["ALL"], str(m)
            assert container["resources"]["limits"]["memory"], str(m)


def test_every_container_runs_the_pinned_image() -> None:
    images = {container["image"] for _, container in containers()}
    assert len(images) == 1, f"one image for every workload, found {images}"
    image = images.pop()
    name, _, tag = image.rpartition(":")
    assert tag and tag != "latest", image
    for kustomization in kustomizations():
        pinned = yaml_documents(kustomization)[0]["images"]
        assert [entry["name"] for entry in pinned] == [name]


def test_containers_run_real_commands_with_known_settings() -> None:
    parsers = {"credits-server": server_config.parser(), "credits-listener": billing_main.parser()}
    for m, container in containers():
        program_name = program(container)
        # Exits (SystemExit) on an unknown command or flag.
        parsers[program_name].parse_args(container.get("args", []))
        names = {variable["name"] for variable in container.get("env", [])}
        for source in container.get("envFrom", []):
            names |= set(config_map_data(source["configMapRef"]["name"]))
        unknown = names - known_env(program_name)
        assert not unknown, f"{m}: {program_name} reads no {sorted(unknown)}"


def test_server_ports_agree_across_config_image_pods_and_services() -> None:
    config = config_map_data("credits-server")
    server = container_of("Deployment", "credits-server")
    grpc_port = port_of(config["CREDITS_LISTEN"])
    metrics_port = port_of(config["CREDITS_METRICS_LISTEN"])
    assert container_port(server, "grpc") == grpc_port
    assert container_port(server, "metrics") == metrics_port
    assert dockerfile_exposed_ports() == {grpc_port, metrics_port}
    annotations = one("Deployment", "credits-server").document["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert int(annotations["prometheus.io/port"]) == metrics_port
    service_ports = {
        p["name"]: p["port"] for p in one("Service", "credits-server").document["spec"]["ports"]
    }
    assert service_ports == {"grpc": grpc_port, "metrics": metrics_port}
    # The listener reaches the server through that Service.
    address = config_map_data("credits-listener")["CREDITS_LISTENER_CREDITS_ADDRESS"]
    host = address.rpartition(":")[0]
    assert host.split(".")[:2] == ["credits-server", NAMESPACE]
    assert port_of(address) == grpc_port


def test_prometheus_annotations_name_a_declared_port() -> None:
    annotated = 0
    for m, template in pod_templates():
        annotations = template["metadata"].get("annotations", {})
        if "prometheus.io/scrape" not in annotations:
            continue
        annotated += 1
        assert annotations["prometheus.io/scrape"] == "true", str(m)
        assert annotations["prometheus.io/path"] == "/metrics", str(m)
        port = int(annotations["prometheus.io/port"])
        assert any(container_port(c, port) for c in template["spec"]["containers"]), str(m)
    assert annotated == 2, "the server and the listener serve /metrics"


def test_listener_port_agrees_with_its_pod_and_service() -> None:
    port = port_of(config_map_data("credits-listener")["CREDITS_LISTENER_LISTEN"])
    assert container_port(container_of("Deployment", "credits-listener"), "http") == port
    ports = one("Service", "credits-listener").document["spec"]["ports"]
    assert [p["port"] for p in ports] == [port]


def test_server_termination_outlasts_its_graceful_shutdown() -> None:
    spec = one("Deployment", "credits-server").document["spec"]["template"]["spec"]
    server = container_of("Deployment", "credits-server")
    sleep_command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_command[0] == "/bin/sleep"
    pause_seconds = float(sleep_command[1])
    grace_seconds = float(config_map_data("credits-server")["CREDITS_SHUTDOWN_GRACE_SECONDS"])
    assert pause_seconds > 0
    needed_seconds = pause_seconds + grace_seconds + SHUTDOWN_CLOSE_STEPS * CLOSE_TIMEOUT_SECONDS
    assert spec["terminationGracePeriodSeconds"] > needed_seconds
    # docker compose stop: no preStop pause there.
    server_service = compose()["services"]["server"]
    compose_grace = float(server_service["environment"]["CREDITS_SHUTDOWN_GRACE_SECONDS"])
    stop_seconds = float(server_service["stop_grace_period"].removesuffix("s"))
    assert stop_seconds > compose_grace + SHUTDOWN_CLOSE_STEPS * CLOSE_TIMEOUT_SECONDS


def test_listener_never_runs_two_workers_on_one_inbox() -> None:
    spec = one("Deployment", "credits-listener").document["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    targets = {
        h.document["spec"]["scaleTargetRef"]["name"] for h in of_kind("HorizontalPodAutoscaler")
    }
    assert "credits-listener" not in targets


def test_listener_config_file_is_mounted_and_valid(tmp_path: pathlib.Path) -> None:
    config_path = pathlib.PurePosixPath(
        config_map_data("credits-listener")["CREDITS_LISTENER_CONFIG"]
    )
    files = config_map_data("credits-listener-billing")
    assert config_path.name in files
    (tmp_path / config_path.name).write_text(files[config_path.name], encoding="utf-8")
    # Raises ConfigError listing every problem; secrets come from the (empty) environment.
    loaded = billing_config.load(tmp_path / config_path.name, {})
    assert loaded.packs and loaded.plans
    for kind, name in (("Deployment", "credits-listener"), ("Job", "credits-listener-migrate")):
        template = one(kind, name).document["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in template["volumes"]}
        mounts = [
            mount
            for container in template["containers"]
            for mount in container["volumeMounts"]
            if volumes[mount["name"]].get("configMap", {}).get("name") == "credits-listener-billing"
        ]
        assert [m["mountPath"] for m in mounts] == [str(config_path.parent)], name


def test_migration_jobs_run_each_programs_migrate() -> None:
    commands = {
        (program(container), tuple(container["args"]))
        for m, container in containers()
        if m.kind == "Job"
    }
    assert commands == {("credits-server", ("migrate",)), ("credits-listener", ("migrate",))}


def test_example_secrets_hold_only_placeholders_and_are_documented() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for name, data in example_secrets().items():
        for key, value in data.items():
            assert PLACEHOLDER in value, f"{name}/{key} must be a placeholder, never a real value"
            assert key in readme, f"deploy/README.md does not say how to set {name}/{key}"


# ---- Dockerfile and .dockerignore ------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per stage (ARGs before the first FROM first)."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[Instruction]] = [[]]
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), " ".join(arguments.split())))
    return stages


def runtime_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def instructions(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.arguments for i in stage if i.keyword == keyword]


def dockerfile_user() -> str:
    users = instructions(runtime_stage(), "USER")
    assert len(users) == 1
    return users[0]


def dockerfile_exposed_ports() -> set[int]:
    return {
        int(p.split("/")[0]) for e in instructions(runtime_stage(), "EXPOSE") for p in e.split()
    }


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in instructions(runtime_stage(), "ENV"):
        for pair in shlex.split(arguments):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def test_dockerfile_builds_in_one_stage_and_runs_on_a_slim_python() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and the runtime"
    args = dict(arg.partition("=")[::2] for arg in instructions(preamble, "ARG"))
    bases = [instructions(stage, "FROM")[0] for stage in stages]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base) for base in bases]
    assert resolved[0] == "python:3.11-slim AS builder"
    assert resolved[-1] == "python:3.11-slim AS runtime"
    # The runtime takes the virtualenv from the builder and nothing from the build context.
    copies = instructions(stages[-1], "COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not instructions(stages[-1], "ADD")


def test_dockerfile_installs_the_pinned_dependencies_from_what_it_copies() -> None:
    builder = dockerfile_stages()[1]
    sources = {
        source
        for arguments in instructions(builder, "COPY")
        for source in arguments.split()[:-1]
        if not source.startswith("--")
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"constraints.txt", "pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["setuptools"]["packages"]["find"]["where"])
    assert needed <= sources, f"the builder must copy {sorted(needed - sources)}"
    assert any("pip install -c constraints.txt ." in run for run in instructions(builder, "RUN"))


def test_dockerfile_runs_credits_server_as_a_numeric_non_root_user() -> None:
    user = dockerfile_user()
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), f"USER {user}: numeric and not root"
    assert instructions(runtime_stage(), "ENTRYPOINT") == ['["credits-server"]']
    health = instructions(runtime_stage(), "HEALTHCHECK")
    assert len(health) == 1
    command = json.loads(health[0].split(" CMD ", 1)[1])
    assert command[0] == "credits-healthcheck"
    assert dockerfile_env()["CREDITS_LISTEN"] == "0.0.0.0:50051"
    unknown = {
        name
        for name in dockerfile_env()
        if name.startswith(("CREDITS_", "STRIPE_", "OTEL_"))
        and name not in known_env("credits-server") | known_env("credits-listener")
    }
    assert not unknown, f"the image sets settings nothing reads: {sorted(unknown)}"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last pattern matching
    the path or one of its parent folders decides (Docker's rule)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        parts = path.split("/")
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    for path in (
        "constraints.txt",
        "pyproject.toml",
        "README.md",
        "src/server/healthcheck.py",
        "src/store/migrations/versions/0001_initial_schema.py",
        "src/credits/v1/credits_descriptor_set.binpb",
        "clients/credits_client/client.py",
    ):
        assert (ROOT / path).exists(), path
        assert not dockerignored(path), f"{path} must reach the build"
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "deploy/.env",
        "var/credits.db",
        "src/server/__pycache__/app.cpython-311.pyc",
        "tests/test_deploy.py",
    ):
        assert dockerignored(path), f"{path} must stay out of the build context"


# ---- docker compose --------------------------------------------------------------------------

# docker compose refuses keys outside the Compose Specification; with no Docker here, this subset of
# its service properties catches a misspelt one. Add a key when a service needs it.
COMPOSE_SERVICE_KEYS = frozenset(
    [
        "build",
        "cap_drop",
        "command",
        "container_name",
        "depends_on",
        "entrypoint",
        "environment",
        "healthcheck",
        "image",
        "ports",
        "read_only",
        "restart",
        "security_opt",
        "stop_grace_period",
        "tmpfs",
        "user",
        "volumes",
    ]
)
CREDITS_IMAGE = "${CREDITS_IMAGE:-credits-service:dev}"


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def compose_credits_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if s.get("image") == CREDITS_IMAGE}


def compose_program(service: dict[str, Any]) -> str:
    entrypoint = service.get("entrypoint")
    assert entrypoint in (None, ["credits-listener"])
    return "credits-server" if entrypoint is None else "credits-listener"


def test_compose_services_use_known_keys_and_existing_dependencies() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "listener-migrate", "server", "listener"} <= set(
        services
    )
    for name, service in services.items():
        assert set(service) <= COMPOSE_SERVICE_KEYS, (
            f"{name}: {set(service) - COMPOSE_SERVICE_KEYS}"
        )
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    assert services["server"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    assert services["listener"]["depends_on"]["listener-migrate"] == {
        "condition": "service_completed_successfully"
    }
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"


def test_compose_runs_real_commands_with_known_settings_and_ports() -> None:
    services = compose_credits_services()
    assert set(services) == {"migrate", "listener-migrate", "server", "listener"}
    parsers = {"credits-server": server_config.parser(), "credits-listener": billing_main.parser()}
    for name, service in services.items():
        program_name = compose_program(service)
        parsers[program_name].parse_args(service["command"])
        unknown = set(service["environment"]) - known_env(program_name)
        assert not unknown, f"compose {name}: {program_name} reads no {sorted(unknown)}"
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert (DEPLOY / source).exists(), f"compose {name} mounts missing {source}"
    server, listener = services["server"], services["listener"]
    published = {int(port.rpartition(":")[2]) for port in server["ports"]}
    assert published == dockerfile_exposed_ports()
    assert port_of(server["environment"]["CREDITS_LISTEN"]) in published
    assert port_of(server["environment"]["CREDITS_METRICS_LISTEN"]) in published
    assert server["healthcheck"]["test"][1] == "credits-healthcheck"
    assert [int(p.rpartition(":")[2]) for p in listener["ports"]] == [
        port_of(listener["environment"]["CREDITS_LISTENER_LISTEN"])
    ]
    assert listener["environment"]["CREDITS_LISTENER_CREDITS_ADDRESS"] == (
        f"server:{port_of(server['environment']['CREDITS_LISTEN'])}"
    )


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_compose_reads_only_variables_of_the_env_example_which_holds_no_secret() -> None:
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    assert not re.search(r"\$[A-Za-z_]", text), "use ${NAME}, not $NAME"
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    example = env_example()
    assert used == set(example), f"compose and .env.example differ: {used ^ set(example)}"
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|KEY|TOKEN", key):
            assert value == "" or PLACEHOLDER in value, f".env.example {key} must be a placeholder"
    assert (DEPLOY / ".gitignore").read_text(encoding="utf-8").split().count(".env") == 1


# ---- credits-healthcheck ---------------------------------------------------------------------


def run_healthcheck(
    *args: str, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(environ or {})},
    )


def test_healthcheck_is_the_declared_console_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["credits-healthcheck"] == "server.healthcheck:main"
    assert callable(healthcheck.main)


def test_healthcheck_asks_this_host_when_the_server_listens_everywhere() -> None:
    assert healthcheck.local_address("0.0.0.0:50051") == "127.0.0.1:50051"
    assert healthcheck.local_address("[::]:50051") == "[::1]:50051"
    assert healthcheck.local_address("10.0.0.7:6000") == "10.0.0.7:6000"


@pytest.mark.slow
def test_healthcheck_exits_0_only_for_a_serving_service(tmp_path: pathlib.Path) -> None:
    server = spawn_server(f"sqlite:///{tmp_path / 'credits.db'}", "--migrate")
    try:
        asyncio.run(wait_serving(server.address, server.process))
        for service in ("", "credits.v1.CreditsService"):
            done = run_healthcheck("--address", server.address, "--service", service)
            assert (done.returncode, done.stderr) == (0, "")
        # As in the image: no flags, the port of CREDITS_LISTEN on the loopback address.
        port = server.address.rpartition(":")[2]
        done = run_healthcheck(environ={"CREDITS_LISTEN": f"0.0.0.0:{port}"})
        assert (done.returncode, done.stderr) == (0, "")
        unknown = run_healthcheck("--address", server.address, "--service", "no.such.Service")
        assert unknown.returncode == 1
        assert "NOT_FOUND" in unknown.stderr
    finally:
        assert server.terminate() == 0


def openssl(folder: pathlib.Path, *arguments: str) -> None:
    subprocess.run(["openssl", *arguments], cwd=folder, check=True, capture_output=True, timeout=30)


def issue(folder: pathlib.Path, name: str, subject: str, san: str) -> None:
    """name.key and name.pem, signed by ca.pem of `folder`."""
    openssl(
        folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n", encoding="utf-8")
    openssl(
        folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.mark.slow
def test_healthcheck_speaks_mutual_tls(tmp_path: pathlib.Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    openssl(
        tmp_path, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA",
    )  # fmt: skip
    issue(tmp_path, "server", "/CN=localhost", "DNS:localhost")
    issue(tmp_path, "probe", "/CN=probe", "DNS:probe")
    server = spawn_server(
        f"sqlite:///{tmp_path / 'credits.db'}",
        "--migrate",
        *("--tls-cert-file", str(tmp_path / "server.pem")),
        *("--tls-key-file", str(tmp_path / "server.key")),
        *("--tls-client-ca-file", str(tmp_path / "ca.pem")),
    )
    tls = ("--tls-ca-file", str(tmp_path / "ca.pem"), "--tls-server-name", "localhost")
    client = (
        "--tls-cert-file",
        str(tmp_path / "probe.pem"),
        "--tls-key-file",
        str(tmp_path / "probe.key"),
    )
    files = healthcheck.TlsFiles(
        *(str(tmp_path / f) for f in ("ca.pem", "probe.pem", "probe.key")), "localhost"
    )
    try:
        deadline = time.monotonic() + 30
        while healthcheck.check(server.address, "", 1, files) is not None:
            assert server.process.poll() is None and time.monotonic() < deadline, "not serving"
            time.sleep(0.1)
        assert run_healthcheck("--address", server.address, *tls, *client).returncode == 0
        # Without a client certificate there is no handshake; plaintext meets a TLS listener.
        for refused in (tls, ()):
            done = run_healthcheck("--address", server.address, *refused)
            assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
    finally:
        assert server.terminate() == 0


def test_healthcheck_reports_a_server_that_is_not_serving() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        problem = healthcheck.check(f"127.0.0.1:{port}", "", timeout_seconds=5)
    finally:
        server.stop(grace=None)
    assert problem == f"127.0.0.1:{port} reports NOT_SERVING for service ''"


def test_healthcheck_exits_1_when_nothing_listens() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = run_healthcheck("--address", address, "--timeout-seconds", "5")
    assert done.returncode == 1
    assert address in done.stderr and "UNAVAILABLE" in done.stderr
