"""Concept variables, heatmaps and the concept export pipeline, against independent references."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.concepts import ConceptAutoencoder, capture, spliced_logits
from export.models import build_model
from handlers.runtime.concepts import ConceptLayer, ConceptSpec, discretise, fit_edges, pooled_values
from handlers.runtime.heatmaps import colormap, heatmap_overlay, upsample


def test_pooled_values_is_spatial_max():
    z = np.random.default_rng(0).random((3, 4, 5, 6))
    np.testing.assert_array_equal(pooled_values(z), z.reshape(3, 4, -1).max(axis=2))
    with pytest.raises(ValueError):
        pooled_values(z[0])


def test_edges_are_quantiles_and_discretise_matches_digitize():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.exponential(size=(500, 3)), np.zeros((250, 3))])
    edges = fit_edges(v, 3)
    for c in range(3):
        np.testing.assert_allclose(edges[c], np.quantile(v[:, c], [1 / 3, 2 / 3]))
    states = discretise(v, edges)
    for c in range(3):
        np.testing.assert_array_equal(states[:, c], np.digitize(v[:, c], edges[c], right=True))
    assert states.min() == 0 and states.max() == 2
    counts = np.bincount(discretise(rng.random((3000, 1)), fit_edges(rng.random((3000, 1)), 3))[:, 0])
    assert counts.min() > 800  # roughly equal-mass bins


@pytest.mark.parametrize("shape, size", [((8, 5), (32, 20)), ((14, 14), (224, 224)), ((1, 1), (7, 7)),
                                         ((7, 7), (7, 7)), ((6, 4), (3, 2)), ((3, 9), (64, 17))])
def test_upsample_matches_torch_bilinear(shape, size):
    m = np.random.default_rng(2).random(shape)
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(upsample(m, *size), ref.numpy(), atol=1e-12)


def test_heatmap_overlay_shape_and_colours():
    img = np.full((16, 16, 1), 128, np.uint8)
    code = np.zeros((4, 4))
    code[0, 0] = 2.0
    out = heatmap_overlay(img, code, scale=2.0)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > out[0, 0, 2]  # hot corner is red
    assert out[15, 15, 2] > out[15, 15, 0]  # cold corner is blue
    np.testing.assert_allclose(colormap(np.array([0.0, 1.0])), [[0, 0, 0.5], [0.6, 0, 0]])


def test_concept_spec_json_roundtrip(tmp_path):
    layer = ConceptLayer("layer1", "act_layer1", "e.onnx", "d.onnx", np.array([[0.1, 0.5]]), np.array([[0.0, 0.3, 0.9]]),
                         ("texture",), (0.42,))
    spec = ConceptSpec(3, (layer,), "bn.json", "Y", {"fidelity": 0.9})
    spec.save(tmp_path / "c.json")
    again = ConceptSpec.from_file(tmp_path / "c.json")
    assert again.layers[0].names == ("texture",) and again.layers[0].name_bits == (0.42,)
    np.testing.assert_array_equal(again.layers[0].edges, layer.edges)
    assert again.layers[0].ids() == ["layer1/c0"] and again.report == {"fidelity": 0.9}


def test_splice_with_identity_reproduces_the_network():
    torch.manual_seed(0)
    model = build_model("demo_resnet", 10, 3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, acts = capture(model, ["layer2"], x)
        same = spliced_logits(model, "layer2", x, acts["layer2"])
        zeroed = spliced_logits(model, "layer2", x, torch.zeros_like(acts["layer2"]))
    torch.testing.assert_close(same, logits)
    assert not torch.allclose(zeroed, logits)


def test_autoencoder_shapes_and_nonnegative_codes():
    ae = ConceptAutoencoder(16, 8, hidden=32)
    z, rec = ae(torch.rand(2, 16, 9, 7))
    assert z.shape == (2, 8, 9, 7) and rec.shape == (2, 16, 9, 7)
    assert (z >= 0).all() and (rec >= 0).all()


def test_exported_concept_bundle(tiny_concept_bundle: Path):
    concepts = json.loads((tiny_concept_bundle / "concepts.json").read_text())
    report = concepts["report"]
    for layer, diff in report["autoencoders"]["onnx_parity_max_abs_diff"].items():
        assert diff <= 1e-4, layer
    for key in ("agreement", "fidelity", "causal_validity"):
        assert key in report
    assert -1 <= report["causal_validity"]["spearman"] <= 1 and 0 <= report["fidelity"] <= 1
    manifest = json.loads((tiny_concept_bundle / "manifest.json").read_text())["files"]
    for layer in concepts["layers"]:
        assert layer["encoder_file"] in manifest and layer["decoder_file"] in manifest
        assert np.all(np.diff(np.asarray(layer["edges"]), axis=1) >= 0)
    assert "causal_network.json" in manifest and "classifier.onnx" in manifest


def test_network_respects_layer_constraints(tiny_concept_bundle: Path):
    doc = json.loads((tiny_concept_bundle / "causal_network.json").read_text())
    report = json.loads((tiny_concept_bundle / "concepts.json").read_text())["report"]
    repaired = [e.split(" -> ")[1] for e in report["network"]["edges_added_for_a_path_to_y"]]
    order = {"layer1": 0, "layer2": 1, "layer3": 2}
    for node in doc["nodes"]:
        cap = 2 + repaired.count(node["name"])  # the cap, plus edges added to give a reacting concept a path
        if node["name"] == "Y":
            assert all(p.startswith("layer3/") for p in node["parents"])
        else:
            level = order[node["name"].split("/")[0]]
            assert len(node["parents"]) <= cap
            assert all(order[p.split("/")[0]] == level - 1 for p in node["parents"])
        cpd = np.asarray(node["cpd"])
        assert cpd.min() > 0  # tables backed off to a fitted model: no zero probabilities
        np.testing.assert_allclose(cpd.sum(axis=0), 1.0)


def test_heatmap_levels_quantise_the_upsampled_map():
    from handlers.runtime.heatmaps import HEATMAP_LEVELS, heatmap_levels, heatmap_palette, upsample
    m = np.array([[0.0, 1.0], [2.0, 4.0]])
    idx = heatmap_levels(m, 2.0, 6, 6)
    assert idx.shape == (6, 6) and idx.dtype == np.uint8
    exact = np.clip(upsample(m, 6, 6) / 2.0, 0, 1) * (HEATMAP_LEVELS - 1)  # float64 reference
    expected = np.round(exact)
    # float32 arithmetic: equal except within float32 rounding of a level boundary (x.5), then one off
    at_boundary = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
    np.testing.assert_array_equal(idx[~at_boundary], expected[~at_boundary])
    assert np.abs(idx[at_boundary].astype(int) - expected[at_boundary]).max(initial=0) <= 1
    assert idx[0, 0] == 0 and idx[-1, -1] == HEATMAP_LEVELS - 1  # saturates at the typical top
    palette, opacity = heatmap_palette()
    assert palette.shape == (HEATMAP_LEVELS, 3) and opacity[0] == 0 and np.all(np.diff(opacity.astype(int)) >= 0)


def test_heatmap_levels_treat_non_finite_cells_as_inactive():
    from handlers.runtime.heatmaps import heatmap_levels
    m = np.array([[0.5, np.nan], [np.inf, 1.0]])
    clean = np.array([[0.5, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(heatmap_levels(m, 1.0, 8, 8), heatmap_levels(clean, 1.0, 8, 8))
