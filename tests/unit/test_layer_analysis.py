"""Layer analysis (method 4) on synthetic representations with known structure."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.analysis.layers import (
    encode_factors,
    factor_entropy,
    format_report,
    heatmap_png,
    mi_gaussian_model,
    mi_per_channel,
    mi_with_factor,
    pca_code,
    pose_invariance,
)


def test_factor_kinds_from_factors_json_and_inferred():
    rng = np.random.default_rng(0)
    cols = {"shape": rng.integers(0, 3, 100).astype(float), "rotation": rng.uniform(0, 360, 100),
            "scale": rng.uniform(0, 1, 100), "colour": np.array(["red", "blue"] * 50)}
    kinds = {"shape": {"type": "categorical", "levels": ["a", "b", "c"]},
             "rotation": {"type": "circular", "period": 360.0}}
    fs = {f.name: f for f in encode_factors(cols, kinds)}
    assert fs["shape"].kind == "categorical" and fs["shape"].levels == ("a", "b", "c")
    assert fs["rotation"].kind == "circular" and fs["rotation"].values.shape == (2, 100)
    np.testing.assert_allclose(np.hypot(*fs["rotation"].values), 1.0)
    assert fs["scale"].kind == "continuous" and fs["colour"].kind == "categorical"
    inferred = {f.name: f.kind for f in encode_factors(cols, None)}
    assert inferred == {"shape": "categorical", "rotation": "continuous", "scale": "continuous",
                        "colour": "categorical"}


def test_per_channel_mi_finds_the_informative_channel():
    rng = np.random.default_rng(1)
    n = 4000
    scale = rng.uniform(0, 1, n)
    cls = rng.integers(0, 4, n)
    p = rng.normal(size=(5, n))
    p[1] += 3 * scale
    p[3] += cls
    fs = {f.name: f for f in encode_factors({"scale": scale, "cls": cls.astype(float)}, None)}
    mi_scale = mi_per_channel(p, fs["scale"])
    mi_cls = mi_per_channel(p, fs["cls"])
    assert np.argmax(mi_scale) == 1 and mi_scale[1] > 0.3 and np.delete(mi_scale, 1).max() < 0.02
    assert np.argmax(mi_cls) == 3 and mi_cls[3] > 0.3
    assert np.all(mi_cls <= factor_entropy(fs["cls"])) and np.all(mi_cls >= 0)


def test_categorical_mi_is_bounded_by_the_factor_entropy():
    """A 10-class factor whose classes a 4-D code separates: the reported MI is close to
    log2(10) and never above it; the Gaussian-model figure (kept under its own name) is not."""
    rng = np.random.default_rng(4)
    shape = np.arange(5000) % 10
    code = shape + 0.05 * rng.standard_normal((4, 5000))
    [f] = encode_factors({"shape": shape.astype(float)}, {"shape": {"type": "categorical"}})
    h = factor_entropy(f)
    assert h == pytest.approx(np.log2(10))
    assert h - 0.01 <= mi_with_factor(code, f) <= h
    assert mi_gaussian_model(code, f) > h + 1.0  # the unbounded estimate the analysis no longer reports as MI
    assert np.all(mi_per_channel(code, f) <= h) and np.all(mi_per_channel(code, f) >= h - 0.01)
    independent = rng.standard_normal((4, 5000))
    assert 0 <= mi_with_factor(independent, f) < 0.005
    [g] = encode_factors({"scale": rng.uniform(0, 1, 5000)}, None)
    assert factor_entropy(g) is None and mi_gaussian_model(code, g) is None


def test_pca_code_drops_dead_channels():
    rng = np.random.default_rng(2)
    p = np.vstack([rng.normal(size=(3, 500)), np.zeros((2, 500))])
    code = pca_code(p, 4)
    assert code.shape == (3, 500) and np.all(np.isfinite(code))


def test_pose_invariance_separates_invariant_from_pose_bound_codes():
    rng = np.random.default_rng(3)
    n = 6000
    cls = rng.integers(0, 4, n)
    pose = rng.uniform(-1, 1, n)
    noise = rng.normal(size=(2, n)) * 0.3
    invariant = np.vstack([cls, cls ** 2]).astype(float) + noise
    only_low = np.where(pose <= np.median(pose), cls, 0.0)[None, :] * np.ones((2, 1)) + noise
    inv = pose_invariance(invariant, pose, cls)
    bound = pose_invariance(only_low, pose, cls)
    assert inv["ii_bits"] < -0.5 and inv["redundancy"] > 0.5
    assert bound["i_bin2_bits"] < 0.05 and abs(bound["redundancy"]) < 0.05
    assert inv["pairs"] > 2500
    for r in (inv, bound):
        assert r["class_entropy_bits"] == pytest.approx(2.0, abs=0.01)
        for key in ("i_bin1_bits", "i_bin2_bits", "i_joint_bits"):
            assert 0 <= r[key] <= r["class_entropy_bits"]
        assert r["ii_bits"] == pytest.approx(r["i_joint_bits"] - r["i_bin1_bits"] - r["i_bin2_bits"])


def test_heatmap_png(tmp_path):
    result = {"layers": ["a", "b"], "factors": ["x", "y", "z"], "images": 10,
              "mi_pca_bits": [[0.1, 0.2, 0.3], [1.0, 0.0, 0.5]]}
    heatmap_png(result, tmp_path / "h.png")
    from PIL import Image
    img = Image.open(tmp_path / "h.png")
    assert img.size[0] > 3 * 70 and img.mode == "RGB"


def test_tiny_bundle_concepts_named(tiny_full_bundle: Path):
    concepts = json.loads((tiny_full_bundle / "concepts.json").read_text())
    factors = {"shape", "texture", "hue", "scale", "rotation", "pos_x", "pos_y", "light", "background"}
    named = [(n, b) for l in concepts["layers"] for n, b in zip(l["names"], l["name_bits"]) if n is not None]
    classes = set(json.loads((tiny_full_bundle / "metadata.json").read_text())["classes"])
    heads = [n.split(" · ")[0] for n, _ in named]  # first the class part: "circle 92%" or "any class"
    assert named and all(h == "any class" or (h.rsplit(" ", 1)[0] in classes and h.endswith("%")) for h in heads)
    analysis = json.loads((tiny_full_bundle.parent / "analysis" / "layer_analysis.json").read_text())
    assert analysis["layers"] == ["stem", "layer1", "layer2", "layer3"]
    assert np.asarray(analysis["mi_pca_bits"]).shape == (4, 9)
    entropy = analysis["factor_entropy_bits"]
    assert set(entropy) == {f for f, k in analysis["kinds"].items() if k == "categorical"} >= {"shape", "texture"}
    assert "categorical" in analysis["estimators"] and "gaussian_model" in analysis["estimators"]
    for key in ("mi_pca_bits", "mi_best_channel_bits", "mi_mean_channel_bits"):
        for row in analysis[key]:
            for factor, v in zip(analysis["factors"], row):
                assert factor not in entropy or 0 <= v <= entropy[factor] + 1e-4  # rounding to 4 decimals
    for row in analysis["mi_pca_gaussian_model_bits"]:
        assert [v is not None for v in row] == [f in entropy for f in analysis["factors"]]
    for layer in concepts["layers"]:  # the bundle carries the analysis' names (a controlled data set names them)
        entries = analysis["concept_names"][layer["layer"]]
        assert layer["names"] == [e["name"] for e in entries] and layer["name_bits"] == [e["bits"] for e in entries]
        for e in entries:
            if e["name"] is None:
                continue
            assert all(v <= entropy[f] + 1e-4 for f, v in e["all_bits"].items() if f in entropy)
            assert "shape" not in e["bits_beyond_class"]  # the class determines it
            if e["factor"] is not None:  # the named factor is the one with the most information beyond the class
                assert e["factor"] in factors and e["factor"] in e["name"]
                assert e["bits"] == max(e["bits_beyond_class"].values()) >= 0.05
            else:
                assert e["bits"] is None and all(v < 0.05 for v in e["bits_beyond_class"].values())
    assert "H(factor)" in format_report(analysis)
    assert (tiny_full_bundle.parent / "analysis" / "layer_analysis.png").is_file()
