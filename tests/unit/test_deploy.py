"""The Kubernetes manifests in deploy/kubernetes: core kinds against the Kubernetes schemas
(kubernetes-validate), KServe's InferenceService (a CRD) against the fields KServe reads."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
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
    assert kinds == ["ConfigMap", "HorizontalPodAutoscaler", "InferenceService", "PrometheusRule"]


CRDS = ("InferenceService", "PrometheusRule")


@pytest.mark.parametrize("name, doc", [d for d in documents() if d[1]["kind"] not in CRDS],
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


# -- alert rules ---------------------------------------------------------------------------

RULES = REPO / "deploy" / "prometheus-rules.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package "
                                    "'prometheus'; make test installs it where apt-get is available)")


def prometheus_rule() -> dict:
    (doc,) = [d for _, d in documents() if d["kind"] == "PrometheusRule"]
    return doc


def test_the_prometheus_rule_carries_the_rules_file():
    """The operator's manifest and the plain rules file hold the same groups; its metadata is a
    valid Kubernetes ObjectMeta (checked inside a core kind: the CRD has no schema here)."""
    doc = prometheus_rule()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert doc["spec"] == yaml.safe_load(RULES.read_text())
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"], "data": {}},
                                 K8S_VERSION, strict=True)
    assert yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["rule_files"] == [RULES.name]


def test_the_rules_read_only_metrics_the_handler_exports():
    from handlers.runtime import metrics as M
    exprs = " ".join(r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"])
    names = set(re.findall(r"concept_explainer_[a-z_]+", exprs))
    exported = set()
    for name, (kind, _, _) in M.METRICS.items():
        exported |= {f"{name}_sum", f"{name}_count", f"{name}_bucket"} if kind == "histogram" else {name}
    assert names and names <= exported, names - exported


@needs_promtool
def test_promtool_accepts_the_rules_and_the_manifests_groups(tmp_path):
    spec = tmp_path / "from-manifest.yml"
    spec.write_text(yaml.safe_dump(prometheus_rule()["spec"]))
    for path in (RULES, spec):
        out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("rate(concept_explainer_verify_agreement_sum", "rate(concept_explainer_verify_agreement_sum(", 1))
    assert subprocess.run([PROMTOOL, "check", "rules", str(broken)], capture_output=True).returncode != 0


def _series(model: str, live: float, offline: float, error: float, offline_error: float, per_minute: int) -> list[dict]:
    """Scraped series of one model: ``per_minute`` verified answers a minute with mean agreement
    ``live`` and mean probability error ``error``, and the offline gauges (one sample a minute for 60 minutes)."""
    labels = f'ModelName="{model}",model_version="1.0",layer="all",Hostname="h"'
    n = per_minute
    return [
        {"series": f"concept_explainer_verify_agreement_count{{{labels}}}", "values": f"0+{n}x60"},
        {"series": f"concept_explainer_verify_agreement_sum{{{labels}}}", "values": f"0+{n * live}x60"},
        {"series": f"concept_explainer_verify_probability_error_count{{{labels}}}", "values": f"0+{3 * 24 * n}x60"},
        {"series": f"concept_explainer_verify_probability_error_sum{{{labels}}}", "values": f"0+{3 * 24 * n * error}x60"},
        {"series": f"concept_explainer_verify_offline_agreement{{{labels}}}", "values": f"{offline}x60"},
        {"series": f"concept_explainer_verify_offline_probability_error{{{labels}}}", "values": f"{offline_error}x60"},
        {"series": f'concept_explainer_verify_total{{ModelName="{model}",model_version="1.0",outcome="verified",Hostname="h"}}',
         "values": f"0+{n}x60"},
    ]


@needs_promtool
def test_the_alerts_fire_on_drift_and_stay_quiet_otherwise(tmp_path):
    """promtool's rule unit tests on synthetic scrapes: a model whose live agreement sits at its
    offline figure and one whose agreement fell by 0.3 with three times the error (what
    bench.verify_drift measures on coloured backgrounds); and one with too few verified answers."""
    series = (_series("steady", 0.93, 0.94, 0.019, 0.019, 6) + _series("drifted", 0.65, 0.94, 0.047, 0.019, 6)
              + _series("sparse", 0.2, 0.94, 0.2, 0.019, 0))
    alert = {"severity": "warning", "model_version": "1.0"}
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": "45m", "alertname": "ConceptExplainerAgreementLow",
             "exp_alerts": [{"exp_labels": {**alert, "ModelName": "drifted"}}]},
            {"eval_time": "45m", "alertname": "ConceptExplainerInterventionErrorHigh",
             "exp_alerts": [{"exp_labels": {**alert, "ModelName": "drifted"}}]},
            {"eval_time": "5m", "alertname": "ConceptExplainerAgreementLow", "exp_alerts": []},
            {"eval_time": "45m", "alertname": "ConceptExplainerVerificationDropped", "exp_alerts": []},
        ]}]}
    rules = yaml.safe_load(RULES.read_text())  # the same rules without annotations (templated text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tests["rule_files"] = [str(tmp_path / "rules.yml")]
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests))
    out = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
