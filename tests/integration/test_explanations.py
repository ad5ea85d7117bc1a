"""/explanations on a real TorchServe: concepts for a batch of requests, equal to an offline computation."""
from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.answer_schema import assert_valid
from tests.integration.server import post, workers
from tests.reference import offline_evidence, offline_network_interventions

pytestmark = pytest.mark.integration


def test_batched_explanations_equal_offline_computation(server, tiny_full_bundle: Path,
                                                        tiny_classifier: Path, sample_pngs):
    pngs = sample_pngs * 2
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post(server, p, endpoint="explanations", model="tinyx"), pngs))
    for png, r in zip(pngs, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert_valid(body, "explanations")
        evidence, predicted = offline_evidence(tiny_full_bundle, png, int8=True)
        assert body["target"]["index"] == predicted
        assert len(body["concepts"]) == 8
        for c in body["concepts"][:4]:
            assert c["state"] == evidence[c["id"]] and c["source"] in ("network", "network_interpolated")
            p = offline_network_interventions(tiny_full_bundle, tiny_classifier, png, c["id"], predicted)
            served = np.array([i["probability"] for i in c["interventions"]])
            if c["source"] == "network":
                np.testing.assert_allclose(served, p, atol=1e-5)
            else:  # at least its probed states are the network's own numbers
                assert np.isclose(served, p, atol=1e-5).any()
    assert max(r.json()["timings_ms"]["batch_size"] for r in responses) > 1


def test_explanation_options_and_errors_over_http(server, sample_pngs):
    before = workers(server, "tinyx")
    data = base64.b64encode(sample_pngs[3]).decode()
    ok = post(server, json.dumps({"data": data, "top_concepts": 2, "images": False, "target": 1}).encode(),
              "application/json", endpoint="explanations", model="tinyx")
    assert ok.status_code == 200
    body = ok.json()
    assert_valid(body, "explanations")
    assert len(body["concepts"]) == 2 and body["target"]["index"] == 1
    assert "heatmap_png" not in body["concepts"][0]
    for options, etype in [({"target": "nope"}, "UnknownTarget"), ({"top_concepts": -3}, "InvalidOption"),
                           ({"views": ["x"]}, "InvalidOption")]:
        r = post(server, json.dumps({"data": data, **options}).encode(), "application/json",
                 endpoint="explanations", model="tinyx")
        assert r.status_code == 400 and r.json()["error"]["type"] == etype
        assert_valid(r.json(), "error")
    assert workers(server, "tinyx") == before


def test_all_views_named_concepts_and_small_response(server, sample_pngs, tiny_full_bundle):
    r = post(server, sample_pngs[0], endpoint="explanations", model="tinyx")
    assert r.status_code == 200
    body = r.json()
    assert_valid(body, "explanations")
    assert {"predictions", "target", "concepts", "cladec", "features", "model", "timings_ms"} <= set(body)
    # ClaDec: one entry per layer at its lowest alpha by default (2 layers); the model block names
    # the 8-bit graphs the worker opened (those the archive's quantization.json accepted)
    assert [(e["layer"], e["alpha"]) for e in body["cladec"]] == [("layer2", 0.0), ("avgpool", 0.0)]
    assert body["features"]["subset_size"] == 5
    accepted = sorted(g["source"] for g in json.loads((tiny_full_bundle / "quantization.json").read_text())["graphs"]
                      if g["accepted"])
    assert body["model"]["int8_graphs"] == accepted and accepted
    concepts = json.loads((tiny_full_bundle / "concepts.json").read_text())
    names = {f"{l['layer']}/c{c}": n for l in concepts["layers"] for c, n in enumerate(l["names"])}
    for c in body["concepts"]:
        assert c["name"] == (names[c["id"]] or c["id"])
    assert len(r.content) < 150_000, len(r.content)
