"""Every explanation carries the bundle's validity figures, read from its own reports."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from handlers.concept_handler import ConceptExplainerHandler
from handlers.runtime.validity import bundle_validity
from tests.answer_schema import assert_valid
from tests.handler.mock_context import make_context, prepare_batch, wire_request


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> ConceptExplainerHandler:
    h = ConceptExplainerHandler()
    h.initialize(make_context(model_dir))
    return h


def _bundle_report(model_dir: Path) -> dict:
    bundle = next(p for p in model_dir.rglob("concepts.json"))
    return json.loads(bundle.read_text())["report"]


def test_explanations_carry_the_bundles_validity(handler, model_dir, sample_pngs):
    ctx = make_context(model_dir)
    req = wire_request(json.dumps({"data": base64.b64encode(sample_pngs[1]).decode(), "views": ["concepts"]}),
                       "application/json", explain=True)
    body = json.loads(handler.handle(prepare_batch(ctx, [req]), ctx)[0])
    assert_valid(body, "explanations")
    v = body["validity"]
    report = _bundle_report(model_dir)
    cv = report["causal_validity"]
    assert v["concepts"]["fidelity"] == round(report["fidelity"], 4)
    assert v["concepts"]["agreement_min"] == round(min(report["agreement"].values()), 4)
    assert v["concepts"]["causal_spearman_per_layer"].keys() == cv["spearman_per_layer"].keys()
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert v["concepts"]["failed_checks"] == failed and v["passed"] is (not failed)


def test_validity_passes_only_when_every_check_passed():
    ok = {"agreement": {"l": 0.99}, "fidelity": 0.97, "causal_validity": {"spearman": 0.7},
          "checks": [{"name": "fidelity", "passed": True}]}
    assert bundle_validity(ok, None).wire()["passed"] is True
    bad = {**ok, "checks": [{"name": "fidelity", "passed": True}, {"name": "causal validity spearman", "passed": False}]}
    out = bundle_validity(bad, None).wire()
    assert out["passed"] is False and out["concepts"]["failed_checks"] == ["causal validity spearman"]
    assert bundle_validity({**ok, "checks": []}, None).wire()["passed"] is False  # never checked: not passed
    assert bundle_validity(None, None).wire() == {"passed": False}
