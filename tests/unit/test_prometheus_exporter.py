"""The KServe front door's metrics: samples into a prometheus_client registry under
TorchServe's names and labels, safely from several request threads."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from handlers.runtime import metrics as m


def test_samples_land_under_torchserves_names_and_labels_from_many_threads():
    registry = CollectorRegistry()
    exporter = m.PrometheusExporter("shapes", registry=registry, hostname="host-a")

    def one_batch(i: int) -> None:
        batch = m.BatchMetrics()
        batch.count(m.REQUESTS, endpoint="explanations", status="200")
        batch.observe(m.STAGE_LATENCY, 0.002, stage="causal")
        exporter.emit(batch.samples() + [m.Sample(m.CONCEPT_BASELINE, 0.25, (("concept", "layer1/c0"), ("state", "1")))])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one_batch, range(200)))
    labels = {"ModelName": "shapes", "endpoint": "explanations", "status": "200", "Hostname": "host-a"}
    assert registry.get_sample_value("concept_explainer_requests_total", labels) == 200
    assert registry.get_sample_value("concept_explainer_stage_latency_seconds_count",
                                     {"ModelName": "shapes", "stage": "causal", "Hostname": "host-a"}) == 200
    assert registry.get_sample_value("concept_explainer_concept_state_baseline_ratio",
                                     {"ModelName": "shapes", "concept": "layer1/c0", "state": "1",
                                      "Hostname": "host-a"}) == 0.25
