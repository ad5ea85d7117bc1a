"""Handler metrics through TorchServe's Prometheus endpoint, scraped by a real Prometheus.

The test starts TorchServe (a tiny archive with ``monitor_fraction: 1`` so every prediction
is monitored) and Debian's Prometheus on free loopback ports, sends known traffic, waits
for a scrape, and checks Prometheus' query API against that traffic — including the
dashboard's concept-drift (PSI) query against a PSI computed here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from export.pipeline import ArchiveStep, archive
from tests.integration.prometheus import Prometheus, query, wait_for
from tests.integration.server import REPO, TorchServe, post

pytestmark = pytest.mark.integration
DASHBOARD = REPO / "deploy" / "grafana" / "concept-explainer-dashboard.json"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """TorchServe's metrics text as {(sample name, sorted labels without Hostname): value}."""
    out = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "Hostname"))
            out[(s.name, labels)] = s.value
    return out


def total(samples: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == val for k, val in match.items()))


@pytest.fixture(scope="module")
def monitored_server(tiny_full_bundle: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    cfg = yaml.safe_load((REPO / "export" / "model-config.yaml").read_text())
    cfg["handler"]["monitor_fraction"] = 1.0
    (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp / "store"
    archive(ArchiveStep(bundle=tiny_full_bundle, name="tinym", version="0.1", model_store=store,
                        model_config=tmp / "model-config.yaml", accept_failed_checks=True))
    with TorchServe(tmp / "ts", store, {"tinym": "tinym.mar"}) as ts:
        yield ts


@pytest.fixture(scope="module")
def prometheus(monitored_server, tmp_path_factory):
    target = monitored_server.metrics_url.split("//")[1].split("/")[0]
    with Prometheus(tmp_path_factory.mktemp("prometheus"), [target]) as url:
        yield url


def test_handler_metrics_reach_prometheus(monitored_server, prometheus, sample_pngs, tiny_full_bundle):
    ts = monitored_server
    # Prometheus must see the counters (zero-initialised at model load) before the traffic,
    # so that increase() over a window measures exactly the traffic.
    deadline = time.monotonic() + 30
    while not query(prometheus, 'concept_explainer_concept_state_total{ModelName="tinym"}'):
        assert time.monotonic() < deadline, "Prometheus never scraped the concept counters"
        time.sleep(0.3)
    before = scrape(ts.metrics_url)
    n_pred, n_expl, n_bad = 6, 4, 3
    for i in range(n_pred):
        assert post(ts, sample_pngs[i % len(sample_pngs)], model="tinym").status_code == 200
    for i in range(n_expl):
        assert post(ts, sample_pngs[i], endpoint="explanations", model="tinym").status_code == 200
    for _ in range(n_bad):
        assert post(ts, b"not an image", model="tinym").status_code == 400
    time.sleep(1.0)
    after = scrape(ts.metrics_url)

    def delta(name: str, **m: str) -> float:
        return total(after, name, **m) - total(before, name, **m)

    assert delta("concept_explainer_requests_total", endpoint="predictions", status="200") == n_pred
    assert delta("concept_explainer_requests_total", endpoint="explanations", status="200") == n_expl
    assert delta("concept_explainer_requests_total", endpoint="predictions", status="400") == n_bad
    assert delta("concept_explainer_errors_total", error_type="InvalidImage") == n_bad
    assert delta("concept_explainer_predicted_class_total") == n_pred + n_expl
    assert delta("concept_explainer_stage_latency_seconds_count", stage="causal") == n_expl
    assert delta("concept_explainer_stage_latency_seconds_count", stage="classifier") == n_expl
    assert delta("concept_explainer_response_bytes_total", endpoint="explanations") > 10_000 * n_expl
    concepts = json.loads((tiny_full_bundle / "concepts.json").read_text())
    ids = [f"{l['layer']}/c{c}" for l in concepts["layers"] for c in range(len(l["edges"]))]
    for cid in ids[:3]:  # every monitored or explained request counts one state per concept
        assert delta("concept_explainer_concept_state_total", concept=cid) == n_pred + n_expl

    # Prometheus scraped the same numbers
    m = 'ModelName="tinym"'
    wait_for(prometheus, f'sum(concept_explainer_requests_total{{{m},endpoint="explanations",status="200"}})',
             total(after, "concept_explainer_requests_total", endpoint="explanations", status="200"))
    wait_for(prometheus, f'sum(concept_explainer_errors_total{{{m},error_type="InvalidImage"}})',
             total(after, "concept_explainer_errors_total", error_type="InvalidImage"))
    wait_for(prometheus, f'sum(concept_explainer_stage_latency_seconds_count{{{m},stage="causal"}})',
             total(after, "concept_explainer_stage_latency_seconds_count", stage="causal"))
    wait_for(prometheus, f'sum(concept_explainer_concept_state_total{{{m},concept="{ids[0]}"}})',
             total(after, "concept_explainer_concept_state_total", concept=ids[0]))
    buckets = {(dict(k)["le"]): v for (n, k), v in after.items()
               if n == "concept_explainer_stage_latency_seconds_bucket" and dict(k).get("stage") == "encode"}
    assert buckets["+Inf"] == total(after, "concept_explainer_stage_latency_seconds_count", stage="encode")
    assert buckets["0.005"] <= buckets["0.1"] <= buckets["+Inf"]
    wait_for(prometheus, f'sum(concept_explainer_stage_latency_seconds_bucket{{{m},stage="encode",le="0.1"}})',
             buckets["0.1"])

    # the dashboard's drift query, evaluated by Prometheus, equals PSI computed here
    psi_panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if "PSI" in p["title"])
    expr = psi_panel["targets"][0]["expr"].replace("$model", "tinym").replace("$window", "10m")
    result = {r["metric"]["concept"]: float(r["value"][1]) for r in query(prometheus, expr)}
    baseline = {f"{l['layer']}/c{c}": np.asarray(l["baseline"][c]) for l in concepts["layers"]
                for c in range(len(l["edges"]))}
    for cid in ids:
        counts = np.array([total(after, "concept_explainer_concept_state_total", concept=cid, state=str(s))
                           for s in range(3)])
        p = np.clip(counts / counts.sum(), 0.001, None)
        q = np.clip(baseline[cid], 0.001, None)
        expected = float(np.sum((p - q) * np.log(p / q)))
        assert result[cid] == pytest.approx(expected, rel=1e-6, abs=1e-9), cid


def test_dashboard_is_importable_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 30
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"] and p["gridPos"]["w"] > 0
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for word in ("latency", "throughput", "errors", "response size", "class", "drift", "faithfulness", "offline"):
        assert word in titles
