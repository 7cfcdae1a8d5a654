"""deploy/kubernetes: every rendered manifest validates against the Kubernetes schemas
(kubernetes-validate, strict) or its CRD's schema (vendored in deploy/kubernetes/crds), and
the pieces fit together: probes, ports, drain timing, autoscaling metric, KServe wiring.

Kustomizations are rendered with `kubectl kustomize` where kubectl exists, else by a small
renderer here that reads resources, images and JSON patches (checked against kubectl when
both are there).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT

from server import cli, metrics

KUBE = ROOT / "deploy" / "kubernetes"
CRDS = KUBE / "crds"
KUSTOMIZATIONS = {"base": KUBE, "gpu": KUBE / "gpu", "kserve": KUBE / "kserve"}
# The oldest Kubernetes these manifests target (sleep-free preStop, autoscaling/v2) and the
# newest schema set kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"):
        "serving.kserve.io_v1alpha1_servingruntime.json",
    ("serving.kserve.io/v1beta1", "InferenceService"):
        "serving.kserve.io_v1beta1_inferenceservice.json",
}  # fmt: skip
Manifest = dict[str, Any]


# --- rendering ----------------------------------------------------------------------------------


def kubectl_render(folder: Path) -> list[Manifest]:
    """`kubectl kustomize folder`, parsed."""
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _json_patch(doc: Manifest, ops: list[dict]) -> None:
    """Apply RFC 6902 `add` / `replace` operations in place."""
    for op in ops:
        *parents, leaf = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert op["op"] in ("add", "replace"), op
        if not isinstance(node, list):
            node[leaf] = op["value"]
        elif op["op"] == "add":
            node.insert(len(node) if leaf == "-" else int(leaf), op["value"])
        else:
            node[int(leaf)] = op["value"]


def local_render(folder: Path) -> list[Manifest]:
    """What `kubectl kustomize` makes of the features these kustomizations use."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[Manifest] = []
    for resource in spec.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():
            docs += local_render(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for label in spec.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in spec.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for patch in spec.get("patches", []):
        target = patch["target"]
        for doc in docs:
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]:
                _json_patch(doc, yaml.safe_load(patch["patch"]))
    return docs


def render(folder: Path) -> list[Manifest]:
    return kubectl_render(folder) if shutil.which("kubectl") else local_render(folder)


def _containers(doc: Manifest) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)  # Deployment, or ServingRuntime's spec
    return pod.get("containers", []) if isinstance(pod, dict) else []


def find(docs: list[Manifest], kind: str) -> Manifest:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# --- validation -------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A CRD schema that also rejects unknown fields, as `kubectl apply` (server-side strict
    field validation) does: objects with `properties` and nothing else allowed get
    additionalProperties: false, except where the CRD preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
        out["additionalProperties"] = False
    return out


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    schema = json.loads((CRDS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    return jsonschema.Draft4Validator(strict(schema))


def validation_errors(doc: Manifest) -> list[str]:
    """Every schema error of one manifest (empty: valid)."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        errors = crd_validator(*key).iter_errors(doc)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    found = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"{version}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            found.append(f"{version}: no schema for {key} ({exc})")
    return found


ALL = [(name, doc) for name, folder in KUSTOMIZATIONS.items() for doc in render(folder)]


@pytest.mark.parametrize("name, doc", ALL, ids=[f"{n}-{d['kind']}" for n, d in ALL])
def test_manifest_is_valid(name: str, doc: Manifest) -> None:
    assert validation_errors(doc) == []


def test_every_kind_the_issue_asks_for_is_rendered() -> None:
    kinds = {doc["kind"] for _, doc in ALL}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor",
            "ServingRuntime", "InferenceService"} <= kinds  # fmt: skip


def test_validation_rejects_broken_manifests() -> None:
    """The validators can fail: a misspelt field and a wrong type in each kind of schema."""
    base = render(KUSTOMIZATIONS["base"])
    deployment = copy.deepcopy(find(base, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert validation_errors(deployment)
    deployment = copy.deepcopy(find(base, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    assert validation_errors(deployment)
    monitor = copy.deepcopy(find(base, "ServiceMonitor"))
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")
    assert validation_errors(monitor)
    kserve = render(KUSTOMIZATIONS["kserve"])
    service = copy.deepcopy(find(kserve, "InferenceService"))
    service["spec"]["predictor"]["model"]["modelFormat"] = "onnx"
    assert validation_errors(service)
    service = copy.deepcopy(find(kserve, "InferenceService"))
    service["spec"]["transformer"] = {"containers": []}  # pruned from the vendored schema
    assert validation_errors(service)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="no kubectl to compare with")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_local_renderer_matches_kubectl(name: str) -> None:
    def key(doc: Manifest) -> str:
        return json.dumps(doc, sort_keys=True)

    folder = KUSTOMIZATIONS[name]
    assert sorted(map(key, local_render(folder))) == sorted(map(key, kubectl_render(folder)))


# --- how the pieces fit --------------------------------------------------------------------------


def serve_args(container: dict) -> argparse.Namespace:
    """The container's args parsed by `volley serve` itself, after the image's entrypoint."""
    entrypoint = ["serve", "--model-repository", "/app/models"]  # Dockerfile ENTRYPOINT
    parser = argparse.ArgumentParser(prog="volley")
    cli._serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args([*entrypoint, *container.get("args", [])])


def test_deployment_probes_ports_and_drain() -> None:
    docs = render(KUSTOMIZATIONS["base"])
    deployment = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = serve_args(container)
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Kubernetes counts the grace period from the start of preStop: the sleep, then the drain.
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep >= 5, "endpoints need a few seconds to drop the pod before SIGTERM"
    assert pod["terminationGracePeriodSeconds"] >= sleep + args.shutdown_timeout + 5
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    service = find(docs, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000, "grpc": 8001, "metrics": 8002}  # fmt: skip
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)

    monitor = find(docs, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    budget = find(docs, "PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()


def test_autoscaler_scales_the_deployment_on_a_volley_metric_the_adapter_serves() -> None:
    docs = render(KUSTOMIZATIONS["base"])
    hpa = find(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    deployment = find(docs, "Deployment")["metadata"]["name"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load((KUBE / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name
    assert rule["seriesQuery"].startswith(name + "{")
    exported = {m.name for m in metrics.REGISTRY.collect()}
    assert name in exported, f"{name} is not a metric Volley exports"


def test_gpu_overlay_asks_for_one_gpu_and_runs_the_cuda_image() -> None:
    (container,) = find(render(KUSTOMIZATIONS["gpu"]), "Deployment")["spec"]["template"]["spec"][
        "containers"]  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-cuda")
    (cpu,) = find(render(KUSTOMIZATIONS["base"]), "Deployment")["spec"]["template"]["spec"][
        "containers"]  # fmt: skip
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_each_manifest_names_its_workers_and_fits_them_in_its_resources() -> None:
    """No manifest leaves `--workers` to `auto`, which without a CPU limit would count the
    node's CPUs: one worker per requested CPU on the CPU, one process for the GPU, and the
    memory limit holds each worker's copy of the models (about 190 MB each, with headroom)."""
    containers = {
        name: find(render(KUSTOMIZATIONS[name]), kind)["spec"]["template"]["spec"]["containers"][0]
        for name, kind in (("base", "Deployment"), ("gpu", "Deployment"))
    }
    containers["kserve"] = find(render(KUSTOMIZATIONS["kserve"]), "ServingRuntime")["spec"][
        "containers"][0]  # fmt: skip
    for name, container in containers.items():
        args = container.get("args", [])
        assert any(a.startswith("--workers") for a in args), (name, args)
        workers, resources = serve_args(container).workers, container["resources"]
        expected = 1 if name == "gpu" else int(resources["requests"]["cpu"])
        assert workers == expected, (name, workers)
        limit_gib = float(resources["limits"]["memory"].removesuffix("Gi"))
        assert 0.4 * workers + 0.2 <= limit_gib, (name, workers, limit_gib)
    assert serve_args(containers["gpu"]).shutdown_timeout == serve_args(
        containers["base"]).shutdown_timeout  # fmt: skip


def test_kserve_runtime_serves_the_inference_service_over_v2() -> None:
    docs = render(KUSTOMIZATIONS["kserve"])
    runtime, service = find(docs, "ServingRuntime"), find(docs, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["modelFormat"]["name"] in formats
    (container,) = runtime["spec"]["containers"]
    args = serve_args(container)
    assert args.model_repository == Path("/mnt/models")  # KServe's storage initializer fills it
    assert [p["containerPort"] for p in container["ports"]] == [args.http_port]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
