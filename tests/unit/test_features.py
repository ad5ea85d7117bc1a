"""Class-specific features (method 3) against brute-force references."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from export.features import (
    agreement_by_predicted_class,
    class_subsets,
    decomposed_logits,
    l1_normalise,
    mass_count,
    selectivity,
)
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
    out = view.explain(h.reshape(8, 1, 1), target=0).wire()
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


def _by_hand(w: np.ndarray, b: np.ndarray, h: np.ndarray, subsets: list[list[int]], c: int) -> dict:
    """Class c's evidence split with plain loops: subset terms, outside terms, logits."""
    inside = {i: w[c, i] * h[i] for i in subsets[c]}
    outside = [w[c, i] * h[i] for i in range(len(h)) if i not in subsets[c]]
    return {"inside": inside, "positive": sum(t for t in outside if t > 0), "negative": sum(t for t in outside if t < 0),
            "count": len(outside), "full": sum(w[c, i] * h[i] for i in range(len(h))) + b[c],
            "decomposed": sum(inside.values()) + b[c]}


@pytest.mark.parametrize("seed", range(6))
def test_feature_view_outside_and_runner_up_by_hand(seed: int):
    rng = np.random.default_rng(100 + seed)
    c_num, d = 5, 12
    w, b, h = rng.normal(size=(c_num, d)), rng.normal(size=c_num), rng.exponential(size=d)
    subsets = [sorted(rng.choice(d, size=3, replace=False).tolist()) for _ in range(c_num)]
    classes = [f"k{c}" for c in range(c_num)]
    view = FeatureView("avgpool", subsets, w, b, {}, classes)
    full = np.array([_by_hand(w, b, h, subsets, c)["full"] for c in range(c_num)])
    ranked = sorted(range(c_num), key=lambda c: -full[c])
    for target in range(c_num):
        out = view.explain(h, target).wire()
        ref = _by_hand(w, b, h, subsets, target)
        o = out["outside_subset"]
        assert o["features"] == ref["count"] == d - 3
        assert o["positive"] == pytest.approx(ref["positive"], abs=1e-6) and o["positive"] >= 0
        assert o["negative"] == pytest.approx(ref["negative"], abs=1e-6) and o["negative"] <= 0
        assert o["total"] == pytest.approx(o["positive"] + o["negative"], abs=2e-6)
        # subset + outside == full logit - bias; decomposed logit = subset + bias
        inside = sum(c["contribution"] for c in out["contributions"])
        assert inside + o["total"] == pytest.approx(ref["full"] - b[target], abs=1e-5)
        assert out["target_logit"] - out["target_bias"] == pytest.approx(inside + o["total"], abs=1e-5)
        assert out["decomposed_target_logit"] == pytest.approx(ref["decomposed"], abs=1e-6)
        assert out["target_logit"] - out["decomposed_target_logit"] == pytest.approx(o["total"], abs=2e-6)
        # runner-up: the full head's second class if the target is its top class, else the top class
        expected = ranked[1] if ranked[0] == target else ranked[0]
        ru = out["runner_up"]
        assert ru["index"] == expected and ru["label"] == f"k{expected}"
        rref = _by_hand(w, b, h, subsets, expected)
        assert ru["logit"] == pytest.approx(rref["full"], abs=1e-6)
        assert ru["decomposed_logit"] == pytest.approx(rref["decomposed"], abs=1e-6)
        assert ru["bias"] == pytest.approx(b[expected], abs=1e-6) and ru["subset_size"] == 3
        assert {c["index"]: c["contribution"] for c in ru["contributions"]} == pytest.approx(rref["inside"], abs=1e-6)
        for c in ru["contributions"]:
            assert c["share"] == pytest.approx(rref["inside"][c["index"]] / (rref["full"] - b[expected]), rel=1e-4,
                                               abs=1e-6)
        assert ru["outside_subset"]["positive"] == pytest.approx(rref["positive"], abs=1e-6)
        assert ru["outside_subset"]["negative"] == pytest.approx(rref["negative"], abs=1e-6)
        dec = np.array([_by_hand(w, b, h, subsets, c)["decomposed"] for c in range(c_num)])
        assert out["decomposed_prediction"] == int(np.argmax(dec))
        assert out["decomposed_prediction_logit"] == pytest.approx(dec.max(), abs=1e-6)


def test_feature_view_shows_why_the_decomposed_head_flips():
    """Class 1 is held down only by strong negative weights on features outside its subset:
    the full head picks class 0, the decomposed head class 1, and the runner-up block shows
    the missing negative evidence."""
    h = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 2.0])
    w = np.array([[1.0, 1.0, 0.0, 0.0, 0.1, 0.1],
                  [0.0, 0.0, 1.5, 1.5, -2.0, -2.0]])
    view = FeatureView("avgpool", [[0, 1], [2, 3]], w, np.zeros(2), {})
    out = view.explain(h, target=0).wire()
    assert out["decomposed_agrees"] is False and out["decomposed_prediction"] == 1
    ru = out["runner_up"]
    assert ru["index"] == 1 and ru["label"] is None
    assert ru["logit"] == pytest.approx(3.0 - 8.0) and ru["decomposed_logit"] == pytest.approx(3.0)
    assert ru["outside_subset"] == {"features": 4, "positive": 0.0, "negative": -8.0, "total": -8.0}
    assert out["outside_subset"] == {"features": 4, "positive": pytest.approx(0.4), "negative": 0.0,
                                     "total": pytest.approx(0.4)}
    assert out["decomposed_target_logit"] == pytest.approx(2.0)
    assert out["decomposed_target_logit"] < ru["decomposed_logit"] and out["target_logit"] > ru["logit"]
    # target not the full head's top class: the runner-up is the top class
    assert view.explain(h, target=1).wire()["runner_up"]["index"] == 0


def test_feature_view_repeats_the_held_out_agreement():
    w, b = np.eye(3), np.zeros(3)
    report = {"agreement_decomposed_vs_full": 0.75, "test_images": 40,
              "agreement_decomposed_vs_full_by_predicted_class": [0.5, None, 1.0]}
    view = FeatureView("avgpool", [[0], [1], [2]], w, b, report)
    out = view.explain(np.array([3.0, 1.0, 0.0]), target=2).wire()
    assert out["decomposed_agreement_held_out"] == 0.75 and out["held_out_images"] == 40
    assert out["decomposed_agreement_held_out_class"] == 0.5  # the full head's class (0), not the target's
    assert view.explain(np.array([0.0, 3.0, 0.0]), target=1).wire()["decomposed_agreement_held_out_class"] is None
    bare = FeatureView("avgpool", [[0], [1], [2]], w, b, {}).explain(np.ones(3), 0).wire()
    assert bare["decomposed_agreement_held_out"] is None and bare["decomposed_agreement_held_out_class"] is None
    assert bare["held_out_images"] is None
    one = FeatureView("avgpool", [[0]], np.ones((1, 2)), np.zeros(1), {}).explain(np.ones(2), 0).wire()
    assert one["runner_up"] is None


def test_agreement_by_predicted_class_by_hand():
    full = np.array([[2, 0, 0], [2, 0, 0], [0, 2, 0], [2, 0, 0]], dtype=float)
    dec = np.array([[2, 0, 0], [0, 2, 0], [0, 2, 0], [2, 0, 0]], dtype=float)
    assert agreement_by_predicted_class(full, dec) == [pytest.approx(2 / 3), 1.0, None]


def test_features_bundle_report(tiny_full_bundle: Path):
    doc = json.loads((tiny_full_bundle / "features.json").read_text())
    r = doc["report"]
    assert doc["format"] == "features/1" and len(doc["subsets"]) == len(doc["weight"])
    assert all(len(s) == 5 for s in doc["subsets"]) and r["distinct_features"] <= 5 * len(doc["subsets"])
    for key in ("accuracy_full_head", "accuracy_decomposed_head", "accuracy_decomposed_finetuned"):
        assert 0 <= r[key] <= 1
    assert set(r["selectivity"]) == {"avgpool", "layer1", "layer2", "layer3"}
    assert 0 <= r["agreement_decomposed_vs_full"] <= 1 and r["test_images"] > 0
    per_class = r["agreement_decomposed_vs_full_by_predicted_class"]
    assert len(per_class) == len(doc["weight"]) and any(v is not None for v in per_class)
    assert all(v is None or 0 <= v <= 1 for v in per_class)
