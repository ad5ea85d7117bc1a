"""Handler metrics: what a batch reports, and that it reaches TorchServe's metrics cache."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.concept_handler import ConceptExplainerHandler
from handlers.runtime import metrics as M
from tests.answer_schema import assert_answer, assert_valid, is_explain
from tests.handler.mock_context import make_context, prepare_batch, wire_request

REPO = Path(__file__).resolve().parents[2]


class RecordingCache:
    """Wraps TorchServe's yaml metrics cache and records every update made through it."""

    def __init__(self) -> None:
        self.cache = MetricsCacheYamlImpl(str(REPO / "metrics.yaml"))
        self.cache.initialize_cache()
        self.updates: list[tuple[str, float, list[str]]] = []

    def get_metric(self, name, metric_type):
        metric = self.cache.get_metric(name, metric_type)
        updates = self.updates

        class Recorder:
            def add_or_update(self, value, dims, request_id=""):
                updates.append((name, value, list(dims)))
                metric.add_or_update(value, dims, request_id)  # TorchServe validates names and dims
        return Recorder()


def test_metric_declarations_match_metrics_yaml():
    import yaml
    doc = yaml.safe_load((REPO / "metrics.yaml").read_text())
    declared = {m["name"]: (kind, tuple(m["dimensions"])) for kind, ms in doc["model_metrics"].items() for m in ms}
    for name, (kind, _, labels) in M.METRICS.items():
        assert declared[name] == (kind, ("ModelName", *labels)), name


def test_batch_reports_counts_and_reaches_torchserve_cache(model_dir, sample_pngs):
    h = ConceptExplainerHandler()
    ctx = make_context(model_dir, {"monitor_fraction": 1.0})
    ctx.metrics = RecordingCache()
    h.initialize(ctx)
    baseline = [u for u in ctx.metrics.updates if u[0] == M.CONCEPT_BASELINE]
    assert len(baseline) == 12 * 3 and all(0 <= v <= 1 for _, v, _ in baseline)
    ctx.metrics.updates.clear()
    batch = [wire_request(sample_pngs[0], idx=0), wire_request(sample_pngs[1], explain=True, idx=1),
             wire_request(b"junk", idx=2),
             wire_request(json.dumps({"data": base64.b64encode(sample_pngs[2]).decode()}), "application/json", idx=3)]
    bodies = h.handle(prepare_batch(ctx, batch), ctx)
    for i, (req, body) in enumerate(zip(batch, bodies)):
        assert_answer(ctx.get_response_status(i)[0], json.loads(body), is_explain(req))
    updates = ctx.metrics.updates

    def total(name, **labels):
        names = M.METRICS[name][2]
        return sum(v for n, v, dims in updates if n == name
                   and all(dims[1 + names.index(k)] == val for k, val in labels.items()))

    assert total(M.REQUESTS, endpoint="predictions", status="200") == 2
    assert total(M.REQUESTS, endpoint="explanations", status="200") == 1
    assert total(M.REQUESTS, endpoint="predictions", status="400") == 1
    assert total(M.ERRORS, error_type="InvalidImage") == 1
    assert total(M.PREDICTED_CLASS) == 3
    assert total(M.CONCEPT_STATE, concept="layer1/c0") == 3  # 2 monitored predictions + 1 explanation
    assert total(M.RESPONSE_BYTES) == sum(len(b) for b in bodies)
    stages = {dims[1] for n, _, dims in updates if n == M.STAGE_LATENCY}
    assert {"decode", "classifier", "concepts", "causal", "cladec", "features", "encode"} == stages
    assert all(v < 5 for n, v, _ in updates if n == M.STAGE_LATENCY)  # seconds, not milliseconds
    assert all(dims[0] == "tiny" for _, _, dims in updates)


def test_metrics_failure_never_fails_requests(model_dir, sample_pngs):
    class Broken:
        def get_metric(self, *a):
            raise RuntimeError("metrics backend down")

        def add_metric_to_cache(self, *a):
            raise RuntimeError("metrics backend down")

    h = ConceptExplainerHandler()
    ctx = make_context(model_dir)
    ctx.metrics = Broken()
    h.initialize(ctx)
    bodies = h.handle(prepare_batch(ctx, [wire_request(sample_pngs[0])]), ctx)
    assert ctx.get_response_status(0)[0] == 200 and json.loads(bodies[0])["predictions"]
    assert_valid(json.loads(bodies[0]), "predictions")
