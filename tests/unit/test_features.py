"""Class-specific features (method 3) against brute-force references."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from export.features import class_subsets, decomposed_logits, l1_normalise, mass_count, selectivity
from handlers.runtime.features import FeatureView


def test_mass_count_brute_force():
    rng = np.random.default_rng(0)
    h = rng.exponential(size=(50, 12))
    for share in (0.3, 0.5, 0.8, 1.0):
        counts = mass_count(h, share)
        for row, n in zip(h, counts):
            a = np.sort(row / row.sum())[::-1]
            expected = next(i + 1 for i in range(len(a)) if a[: i + 1].sum() >= share - 1e-12)
            assert n == expected


def test_selectivity_of_one_hot_and_uniform_features():
    one_hot = np.eye(10)[np.arange(100) % 10]
    assert selectivity(one_hot, 0.8) == pytest.approx(0.9)
    assert selectivity(np.ones((20, 10)), 0.8) == pytest.approx(0.2)


def test_class_subsets_match_counting_by_hand():
    rng = np.random.default_rng(1)
    h = rng.exponential(size=(300, 16))
    labels = rng.integers(0, 3, 300)
    h[labels == 0, 2] += 5  # feature 2 dominates class 0
    subsets = class_subsets(h, labels, 3, 4)
    hn = l1_normalise(h)
    for c in range(3):
        counts = Counter(int(i) for row in hn[labels == c] for i in np.argsort(-row, kind="stable")[:4])
        top = sorted(counts.values(), reverse=True)[:4]
        assert sorted(counts[i] for i in subsets[c]) == sorted(top)
        assert len(subsets[c]) == 4
    assert 2 in subsets[0]
    variant = class_subsets(h, labels, 3, 0.5)
    assert all(1 <= len(s) <= 16 for s in variant)
    with pytest.raises(ValueError, match="no training images"):
        class_subsets(h, labels, 4, 3)


def test_decomposed_logits_by_hand():
    rng = np.random.default_rng(2)
    h, w, b = rng.random((5, 6)), rng.normal(size=(3, 6)), rng.normal(size=3)
    subsets = [[0, 1], [2], [3, 4, 5]]
    out = decomposed_logits(h, w, b, subsets)
    for n in range(5):
        for c, s in enumerate(subsets):
            assert out[n, c] == pytest.approx(sum(w[c, i] * h[n, i] for i in s) + b[c])
    full = [[0, 1, 2, 3, 4, 5]] * 3
    np.testing.assert_allclose(decomposed_logits(h, w, b, full), h @ w.T + b)


def test_feature_view_contributions():
    rng = np.random.default_rng(3)
    w, b, h = rng.normal(size=(3, 8)), rng.normal(size=3), rng.random(8)
    view = FeatureView("avgpool", [[0, 1, 2], [3, 4], [5, 6, 7]], w, b, {})
    out = view.explain(h.reshape(8, 1, 1), target=0)
    assert out["subset_size"] == 3 and out["layer"] == "avgpool"
    contrib = {c["index"]: c["contribution"] for c in out["contributions"]}
    for i in (0, 1, 2):
        assert contrib[i] == pytest.approx(w[0, i] * h[i], abs=1e-6)
        share = next(c["share"] for c in out["contributions"] if c["index"] == i)
        assert share == pytest.approx(w[0, i] * h[i] / float(w[0] @ h), abs=1e-5)
    values = [c["contribution"] for c in out["contributions"]]
    assert values == sorted(values, reverse=True)
    full_pred = int(np.argmax(w @ h + b))
    dec = np.array([sum(w[c, i] * h[i] for i in s) + b[c] for c, s in enumerate([[0, 1, 2], [3, 4], [5, 6, 7]])])
    assert out["decomposed_agrees"] == (int(np.argmax(dec)) == full_pred)
    assert out["decomposed_prediction"] == int(np.argmax(dec))


def test_features_bundle_report(tiny_full_bundle: Path):
    doc = json.loads((tiny_full_bundle / "features.json").read_text())
    r = doc["report"]
    assert doc["format"] == "features/1" and len(doc["subsets"]) == len(doc["weight"])
    assert all(len(s) == 5 for s in doc["subsets"]) and r["distinct_features"] <= 5 * len(doc["subsets"])
    for key in ("accuracy_full_head", "accuracy_decomposed_head", "accuracy_decomposed_finetuned"):
        assert 0 <= r[key] <= 1
    assert set(r["selectivity"]) == {"avgpool", "layer1", "layer2", "layer3"}
