"""The answer models: the published JSON Schemas, and the wire format (rounding, base64, left-out parts)."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from handlers.runtime import answer as A
from tests.answer_schema import SCHEMA_DIR, assert_valid, kind_of


def test_committed_schemas_equal_the_models():
    """docs/schema is generated from the models; regenerate with
    ``python -m handlers.runtime.answer --write docs/schema`` after changing an answer."""
    files = A.schema_files()
    assert sorted(files) == sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json"))
    for name, text in files.items():
        committed = (SCHEMA_DIR / name).read_text()
        assert json.loads(committed) == json.loads(text), f"{name} is stale"
        assert committed == text, f"{name} is not formatted by the generator"
    assert A.main(["--check", str(SCHEMA_DIR)]) == 0


def test_check_reports_a_stale_schema(tmp_path):
    assert A.main(["--write", str(tmp_path)]) == 0
    assert A.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "error.schema.json").write_text("{}\n")
    assert A.main(["--check", str(tmp_path)]) == 1


def _explanation(**parts) -> A.Explanation:
    concept = A.Concept(id="layer1/c0", layer="layer1", channel=0, name="shape", name_bits=1.25,
                        activation=8.769084321, state=2, effect=0.46759812345, sensitivity=-0.0000004, source="network",
                        interventions=[A.Intervention(state=s, probability=p)
                                       for s, p in enumerate([0.1, 0.1000004, 0.99863049])],
                        heatmap_png=b"\x89PNG")
    contribution = A.Contribution(index=3, contribution=0.1234567, share=None)
    outside = A.OutsideSubset(features=4, positive=0.4, negative=-8.0000004, total=-7.6000004)
    features = A.Features(layer="avgpool", subset_size=1, decomposed_agrees=False, decomposed_prediction=1,
                          decomposed_prediction_logit=3.0, target_logit=2.0, decomposed_target_logit=1.0,
                          target_bias=0.5, contributions=[contribution], outside_subset=outside,
                          runner_up=A.RunnerUp(index=1, label=None, logit=-5.0, decomposed_logit=3.0, bias=0.0,
                                               subset_size=2, contributions=[contribution], outside_subset=outside),
                          decomposed_agreement_held_out=None, decomposed_agreement_held_out_class=0.75,
                          held_out_images=None)
    fields = dict(
        predictions=A.Prediction.top(np.array([0.2, 0.7999996, 4e-7]), ["a", "b", "c"], 2),
        target=A.Target(index=1, label="b"), concepts=[concept], features=features,
        validity=A.Validity(features=A.FeaturesValidity(decomposed_agreement=0.723456), passed=False),
        model=A.ModelInfo(name="m", version="1.0", artifact_sha256="0" * 64, device="cpu",
                          providers=["CPUExecutionProvider"]),
        timings_ms=A.Timings(decode=0.39412, classifier=0.7, batch_size=2, concepts=0.0004, causal=1.4715,
                             encode=None, features=None, cladec=5.0),
        cladec=[A.ClaDecImage(layer="layer2", alpha=0.001, reconstruction_png=b"rec", reference_png=None)])
    fields.update(parts)
    return A.Explanation(**fields)


def test_wire_rounds_encodes_and_leaves_out_absent_parts():
    body = _explanation().wire()
    assert list(body) == ["predictions", "target", "concepts", "features", "validity", "model", "timings_ms",
                          "cladec"]
    assert body["predictions"] == [{"index": 1, "label": "b", "probability": 0.8},
                                   {"index": 0, "label": "a", "probability": 0.2}]
    c = body["concepts"][0]
    assert (c["activation"], c["effect"], c["sensitivity"]) == (8.76908, 0.467598, -0.0)
    assert [i["probability"] for i in c["interventions"]] == [0.1, 0.1, 0.99863]
    assert base64.b64decode(c["heatmap_png"]) == b"\x89PNG"
    assert body["timings_ms"] == {"decode": 0.394, "classifier": 0.7, "batch_size": 2, "concepts": 0.0,
                                  "causal": 1.472, "cladec": 5.0}
    assert body["cladec"] == [{"layer": "layer2", "alpha": 0.001, "reconstruction_png": "cmVj"}]
    assert body["validity"] == {"features": {"decomposed_agreement": 0.7235}, "passed": False}
    f = body["features"]  # nulls that carry meaning stay
    assert f["contributions"][0] == {"index": 3, "contribution": 0.123457, "share": None}
    assert f["runner_up"]["label"] is None and f["decomposed_agreement_held_out"] is None
    assert f["held_out_images"] is None and f["decomposed_agreement_held_out_class"] == 0.75
    assert f["outside_subset"] == {"features": 4, "positive": 0.4, "negative": -8.0, "total": -7.6}
    assert_valid(body, "explanations")
    lean = _explanation(concepts=None, features=None, cladec=None).wire()
    assert list(lean) == ["predictions", "target", "validity", "model", "timings_ms"]
    assert_valid(lean, "explanations")


def test_wire_json_is_compact_ascii_json():
    err = A.ErrorAnswer(error=A.ErrorDetail(type="InvalidOption", message="unknown target 'é'"))
    assert err.wire_json() == b'{"error":{"type":"InvalidOption","message":"unknown target \'\\u00e9\'"}}'
    assert json.loads(err.wire_json()) == err.wire()
    assert_valid(err.wire(), "error")
    preds = A.PredictionsAnswer(predictions=A.Prediction.top(np.array([0.25, 0.75]), ["x", "y"], 2))
    assert preds.wire_json() == (b'{"predictions":[{"index":1,"label":"y","probability":0.75},'
                                 b'{"index":0,"label":"x","probability":0.25}]}')


def test_the_schema_rejects_what_the_contract_does_not_allow():
    good = _explanation().wire()
    for broken in ({**good, "extra": 1},  # unknown field
                   {k: v for k, v in good.items() if k != "validity"},  # missing block
                   {**good, "concepts": None},  # left out, never null
                   {**good, "timings_ms": {**good["timings_ms"], "features": None}},
                   {**good, "predictions": [{"index": 0, "label": "a", "probability": 1.5}]}):
        with pytest.raises(AssertionError):
            assert_valid(broken, "explanations")
    with pytest.raises(AssertionError):
        assert_valid(good, "predictions")
    with pytest.raises(AssertionError):
        assert_valid({"error": {"type": "X"}}, "error")
    assert [kind_of(s, e) for s, e in [(200, False), (200, True), (400, True), (500, False)]] == [
        "predictions", "explanations", "error", "error"]


def test_models_are_strict_and_immutable():
    with pytest.raises(ValidationError):
        A.Target(index=1, label="b", extra=True)
    with pytest.raises(ValidationError):
        A.ModelInfo(name="m", version="1", artifact_sha256="not a hash", device="cpu", providers=["CPUExecutionProvider"])
    target = A.Target(index=1, label="b")
    with pytest.raises(ValidationError):
        target.index = 2


def test_parsed_wire_bodies_round_trip_through_the_models():
    """A body the models wrote validates as the model again (base64 back to bytes aside)."""
    body = _explanation(concepts=None, cladec=None).wire()
    assert A.Explanation.model_validate(body).wire() == body
    assert A.Timings.model_validate({"decode": 1, "classifier": 2, "batch_size": 1}).stages() == {
        "decode": 1.0, "classifier": 2.0}
