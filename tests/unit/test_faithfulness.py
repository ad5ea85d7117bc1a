"""Effect-unit metrics against hand-computed values on tiny data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from export.causal_truth import EffectTable, effect_truth, noise_floor, truth_checks
from handlers.runtime import faithfulness as F


def test_effect_is_observed_minus_weighted_mean():
    p = np.array([0.2, 0.5, 0.9])
    pi = np.array([0.25, 0.25, 0.5])
    assert F.effects(p, pi, np.array(2)) == pytest.approx(0.9 - (0.05 + 0.125 + 0.45))
    assert F.effects(p, pi, np.array(0)) == pytest.approx(0.2 - 0.625)


def test_ccc_hand_values():
    assert F.ccc(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == pytest.approx(1.0)
    # shift by one: var = 2/3 on both sides, cov = 2/3 -> 2 (2/3) / (4/3 + 1) = 4/7
    assert F.ccc(np.array([1.0, 2, 3]), np.array([2.0, 3, 4])) == pytest.approx(4 / 7)
    assert F.ccc(np.zeros(4), np.zeros(4)) == 1.0
    assert F.ccc(np.zeros(4), np.array([1.0, -1, 1, -1])) == pytest.approx(0.0)
    assert F.ccc(np.array([1.0]), np.array([1.0])) is None


def test_ndcg_hand_value():
    served, measured = np.array([0.3, 0.1, 0.2]), np.array([0.1, 0.3, 0.2])
    dcg = 0.1 + 0.2 / math.log2(3)
    ideal = 0.3 + 0.2 / math.log2(3)
    assert F.ndcg_at_k(served, measured, 2) == pytest.approx(dcg / ideal)
    assert F.ndcg_at_k(measured, measured, 2) == pytest.approx(1.0)
    assert F.ndcg_at_k(served, np.zeros(3), 2) is None
    # signs do not matter: ranking and gain are by magnitude
    assert F.ndcg_at_k(-served, -measured, 2) == pytest.approx(dcg / ideal)


def test_recall_and_sign():
    assert F.recall_at_k(np.array([3.0, 2, 1, 0]), np.array([0.0, 1, 2, 3]), 3) == pytest.approx(2 / 3)
    assert F.recall_at_k(np.array([1.0, 2]), np.array([2.0, 1]), 3) == 1.0
    # |m|-weighted: index 0 agrees (weight 2), index 1 disagrees (1), a served 0 agrees with nothing (1)
    assert F.weighted_sign_agreement(np.array([1.0, -1, 0]), np.array([2.0, 1, 1])) == pytest.approx(0.5)
    assert F.weighted_sign_agreement(np.ones(2), np.zeros(2)) is None


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 30).astype(float), rng.normal(size=30)
    assert F.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert F.spearman(np.ones(5), b[:5]) is None


def test_truth_of_no_effect_and_of_the_truth():
    m = np.array([[0.2, -0.1, 0.0], [0.05, 0.3, -0.2]])
    none = F.truth(np.zeros_like(m), m)
    assert none.skill == pytest.approx(0.0) and none.mae == pytest.approx(np.abs(m).mean())
    exact = F.truth(m, m, floor=0.01)
    assert exact.mae == 0 and exact.skill == 1 and exact.ccc == pytest.approx(1.0)
    assert exact.ndcg5 == pytest.approx(1.0) and exact.recall3 == 1.0 and exact.sign == 1.0
    assert exact.mae_p is None
    half = F.truth(m / 2, m)
    assert half.skill == pytest.approx(0.5)
    won = F.beats(exact, half)
    assert won["mae"] and won["skill"] and won["ccc"] and not won["mae_p"]  # mae_p: not scored
    # m / 2 ranks and signs like m: a tie at the best value counts, a tie below it would not
    assert won["ndcg5"] and won["recall3"] and won["sign"]
    assert not F.beats(half, half)["skill"]


def test_derangement_has_no_fixed_point():
    rng = np.random.default_rng(1)
    for n in range(2, 9):
        perm = F.derangement(n, rng)
        assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()


def _table(p: np.ndarray, pi: np.ndarray, observed: np.ndarray, layers: tuple[str, ...]) -> EffectTable:
    order = np.argsort(np.argsort(-np.abs(F.effects(p, pi, observed)), axis=1, kind="stable"), axis=1)
    return EffectTable(tuple(f"c{j}" for j in range(p.shape[1])), layers, p, pi, observed, order,
                       np.ones(observed.shape, bool))


def test_noise_floor_hand_value():
    measured = np.array([[[0.2, 0.4], [0.6, 0.8]]])  # 1 image, 2 concepts, 2 states
    observed = np.array([[1, 0]])
    null = np.array([[0.5, 0.7]])  # two layers, one concept each
    assert noise_floor(null, measured, observed, ("a", "b")) == {"a": pytest.approx(0.1), "b": pytest.approx(0.1)}


def test_effect_truth_served_truth_beats_both_baselines_and_passes():
    rng = np.random.default_rng(0)
    n, c, s = 40, 6, 3
    measured = rng.uniform(0, 1, (n, c, s))
    pi = rng.dirichlet(np.ones(s), (n, c))
    observed = rng.integers(0, s, (n, c))
    layers = ("l1",) * 3 + ("l2",) * 3
    at_obs = np.take_along_axis(measured, observed[..., None], -1)[..., 0]
    null = np.stack([at_obs[:, :3].mean(1), at_obs[:, 3:].mean(1)], axis=1)
    served = _table(measured.copy(), pi, observed, layers)
    report = effect_truth(served, measured, null, shuffles=3)
    assert report["answer"]["mae_p"] == 0 and report["answer"]["skill"] == 1
    assert all(all(b.values()) for b in report["beats"].values())
    assert all(passed for *_, passed in truth_checks(report))
    # answering each concept's mean effect to every image loses image-specific skill
    assert report["baselines"]["mean_effect"]["skill"] < 1
    noisy = _table(np.clip(measured + rng.normal(0, 0.3, measured.shape), 0, 1), pi, observed, layers)
    bad = effect_truth(noisy, measured, null, shuffles=3)
    failed = {name for name, _, _, passed in truth_checks(bad) if not passed}
    assert "effect truth mae of P(target | do)" in failed


def test_layer_under_its_noise_floor_is_below_resolution():
    measured = np.full((5, 2, 3), 0.5)
    measured[:, 1, 2] += 0.3  # only the second layer's concept moves the target
    observed = np.zeros((5, 2), np.int64)
    pi = np.full((5, 2, 3), 1 / 3)
    null = np.array([[0.6, 0.5]] * 5)  # layer a: within-state change 0.1, larger than its effects (0)
    report = effect_truth(_table(measured, pi, observed, ("a", "b")), measured, null, shuffles=1)
    assert report["below_resolution"] == ["a"]
    names = {name for name, *_ in truth_checks(report)}
    assert "effect truth ccc b" in names and "effect truth ccc a" not in names
