"""The Kubernetes manifests in deploy/kubernetes: core kinds against the Kubernetes schemas
(kubernetes-validate), KServe's InferenceService (a CRD) against the fields KServe reads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from handlers.kserve_model import build_parser

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
K8S_VERSION = "1.30.0"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def documents() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", d) for p in MANIFESTS for i, d in enumerate(yaml.safe_load_all(p.read_text())) if d]


def test_there_are_manifests_of_each_kind():
    kinds = sorted({d["kind"] for _, d in documents()})
    assert kinds == ["ConfigMap", "HorizontalPodAutoscaler", "InferenceService"]


@pytest.mark.parametrize("name, doc", [d for d in documents() if d[1]["kind"] != "InferenceService"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_core_kinds_validate_against_the_kubernetes_schema(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    """The validator is not a no-op: a misspelt field fails."""
    doc = next(d for _, d in documents() if d["kind"] == "HorizontalPodAutoscaler")
    broken = json.loads(json.dumps(doc))
    broken["spec"]["minReplica"] = broken["spec"].pop("minReplicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def inference_services() -> list[dict]:
    return [d for _, d in documents() if d["kind"] == "InferenceService"]


def check_inference_service(doc: dict) -> None:
    """The InferenceService fields KServe v1beta1 reads, as the CRD constrains them."""
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert DNS_1123.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    annotations = doc["metadata"].get("annotations", {})
    assert all(isinstance(v, str) for v in annotations.values()), "annotation values must be strings"
    assert annotations.get("serving.kserve.io/enable-prometheus-scraping") == "true"
    assert annotations.get("serving.kserve.io/deploymentMode") in ("RawDeployment", "Serverless", None)
    predictor = doc["spec"]["predictor"]
    assert set(predictor) <= {"minReplicas", "maxReplicas", "model", "containers", "scaleMetric", "scaleTarget",
                              "terminationGracePeriodSeconds"}
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert ("model" in predictor) != ("containers" in predictor), "a predictor is a model or containers"
    if "model" in predictor:
        model = predictor["model"]
        assert model["modelFormat"]["name"] == "pytorch"
        assert model["protocolVersion"] in ("v1", "v2", "grpc-v2")
        assert re.match(r"^(pvc|gs|s3|https?|hdfs)://", model["storageUri"])
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                      "spec": {"containers": [{"name": "c", "image": "i",
                                                               "resources": model["resources"]}]}},
                                     K8S_VERSION, strict=True)
    else:
        (container,) = predictor["containers"]
        assert container["name"] == "kserve-container"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [container]}}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        args = build_parser().parse_args(container["args"])  # the front door accepts its arguments
        assert str(args.mar).startswith("/mnt/models/") and args.host == "0.0.0.0"
        assert args.http_port == container["ports"][0]["containerPort"]
        assert any(e["name"] == "STORAGE_URI" for e in container["env"])
        # the pod waits longer than the server's own grace period, or in-flight requests are killed
        assert predictor["terminationGracePeriodSeconds"] > args.drain_seconds + args.grace_period
        assert args.grace_period > 0 and args.drain_seconds > 0


@pytest.mark.parametrize("doc", inference_services(), ids=lambda d: d["metadata"]["name"])
def test_inference_services(doc):
    check_inference_service(doc)


def test_the_check_rejects_what_kserve_rejects():
    doc = json.loads(json.dumps(inference_services()[0]))
    doc["metadata"]["name"] = "Shapes_Model"
    with pytest.raises(AssertionError):
        check_inference_service(doc)


def test_the_autoscaler_scales_a_predictor_on_the_adapters_metric():
    docs = {d["kind"]: d for _, d in documents()}
    hpa, rules = docs["HorizontalPodAutoscaler"], yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    names = {d["metadata"]["name"] for d in inference_services()}
    assert hpa["spec"]["scaleTargetRef"]["name"].removesuffix("-predictor") in names
    served = {r["name"]["as"] for r in rules["rules"]}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in served
    assert all("concept_explainer_requests_total" in r["seriesQuery"] for r in rules["rules"])


@pytest.mark.parametrize("recipe, flavour", [("Dockerfile", "kserve"), ("Dockerfile.gpu", "kserve,gpu")])
def test_the_container_recipes_run_the_front_door(recipe, flavour):
    text = (REPO / "deploy" / "kserve" / recipe).read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, flags=re.M).group(1))
    assert entry == ["concept-explainer-kserve"]
    assert 'concept-explainer-kserve = "handlers.kserve_model:main"' in (REPO / "pyproject.toml").read_text()
    build_parser().parse_args(json.loads(re.search(r"^CMD (.+)$", text, flags=re.M).group(1)))
    assert f'".[{flavour}]"' in text


def test_the_gpu_service_asks_for_a_gpu_and_gives_the_worker_its_id():
    (doc,) = [d for d in inference_services() if d["metadata"]["name"].endswith("-gpu")]
    (container,) = doc["spec"]["predictor"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert build_parser().parse_args(container["args"]).gpu_id == 0
    assert container["image"].endswith("-gpu")
