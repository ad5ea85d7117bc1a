"""Gaussian-copula mutual information: analytic Gaussian values, bias correction, batch helpers."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from scipy.special import ndtri

from export.analysis.gcmi import (
    cmi_ggg,
    copnorm,
    ctransform,
    ent_g,
    entropy_discrete,
    gcmi_cc,
    gcmi_cc_batch,
    gcmi_model_cd,
    gcmi_model_cd_batch,
    interaction_information_cd,
    interaction_information_classifier_cd,
    mi_classifier_cd,
    mi_classifier_cd_batch,
    mi_gg,
    mi_model_gd,
)


def gaussian_mi_bits(cov: np.ndarray, dx: int) -> float:
    """½ log2(det Σx det Σy / det Σ) for a joint covariance with x in the first dx rows."""
    return 0.5 * np.log2(np.linalg.det(cov[:dx, :dx]) * np.linalg.det(cov[dx:, dx:]) / np.linalg.det(cov))


def gaussian_entropy_bits(cov: np.ndarray) -> float:
    d = cov.shape[0]
    return 0.5 * np.log2((2 * np.pi * np.e) ** d * np.linalg.det(cov))


def correlated_pair(rng: np.random.Generator, rho: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal(n)
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.standard_normal(n)
    return x, y


# --------------------------------------------------------------------------- copula transform

def test_ctransform_and_copnorm_known_values_and_shapes():
    np.testing.assert_allclose(ctransform([3.0, 1.0, 2.0]), [0.75, 0.25, 0.5])
    x = np.array([[3.0, 1.0, 2.0], [-5.0, 10.0, 0.0]])
    np.testing.assert_allclose(ctransform(x), [[0.75, 0.25, 0.5], [0.25, 0.75, 0.5]])
    assert ctransform(x[0]).shape == (3,)
    np.testing.assert_array_equal(copnorm(x), ndtri(ctransform(x)))
    assert copnorm(x).dtype == np.float64 and copnorm(x[0]).shape == (3,)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 200), seed=st.integers(0, 2 ** 32 - 1))
def test_ctransform_is_a_permutation_of_uniform_grid(n: int, seed: int):
    x = np.random.default_rng(seed).integers(0, 5, size=(2, n)).astype(float)  # many ties
    u = ctransform(x)
    ranks = np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable")
    np.testing.assert_array_equal(u, (ranks + 1) / (n + 1))  # the spec's double argsort
    np.testing.assert_array_equal(copnorm(x), ndtri(u))
    grid = np.arange(1, n + 1) / (n + 1)
    for row in u:
        np.testing.assert_allclose(np.sort(row), grid)


# --------------------------------------------------------------------------- Gaussian MI / entropy

@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6, 0.9])
def test_mi_gg_and_gcmi_cc_match_analytic_bivariate(rho: float):
    rng = np.random.default_rng(int(rho * 10) + 11)
    x, y = correlated_pair(rng, rho, 100_000)
    true = -0.5 * np.log2(1 - rho ** 2)
    assert abs(mi_gg(x, y) - true) < 0.01
    assert abs(gcmi_cc(x, y) - true) < 0.01


def test_multivariate_mi_matches_determinant_formula():
    cov = np.array([[1.0, 0.3, 0.5],
                    [0.3, 2.0, -0.4],
                    [0.5, -0.4, 1.5]])
    rng = np.random.default_rng(3)
    xy = rng.multivariate_normal(np.zeros(3), cov, size=100_000).T
    x, y = xy[:2], xy[2]
    true = gaussian_mi_bits(cov, 2)
    assert true > 0.2
    assert abs(mi_gg(x, y) - true) < 0.01
    assert abs(gcmi_cc(x, y) - true) < 0.01  # the copula of a Gaussian is Gaussian


def test_ent_g_matches_closed_form():
    cov = np.array([[2.0, 0.6, 0.0],
                    [0.6, 1.0, 0.3],
                    [0.0, 0.3, 0.5]])
    rng = np.random.default_rng(4)
    x = rng.multivariate_normal([1.0, -2.0, 5.0], cov, size=100_000).T
    assert abs(ent_g(x) - gaussian_entropy_bits(cov)) < 0.01
    assert abs(ent_g(3.0 * x[0]) - gaussian_entropy_bits(9.0 * cov[:1, :1])) < 0.01


def test_gcmi_cc_invariant_under_monotone_transforms():
    rng = np.random.default_rng(5)
    x, y = correlated_pair(rng, 0.5, 3000)
    x2 = np.vstack((x, rng.standard_normal(3000) + y))
    base = gcmi_cc(x, y)
    assert base > 0.1
    assert abs(gcmi_cc(np.exp(x), y) - base) < 1e-12
    assert abs(gcmi_cc(x, y ** 3) - base) < 1e-12
    assert abs(gcmi_cc(-2.5 * x + 7.0, y) - base) < 1e-12
    base2 = gcmi_cc(x2, y)
    assert abs(gcmi_cc(np.vstack((np.exp(x2[0]), -x2[1] ** 3)), np.tanh(y)) - base2) < 1e-12


def test_independent_variables_give_near_zero():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((2, 50_000))
    assert abs(mi_gg(x, y)) < 0.005
    assert abs(gcmi_cc(np.exp(x), y)) < 0.005


def test_mi_identity_with_entropies():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 200))
    y = x[:1] + rng.standard_normal((1, 200))
    for bc in (True, False):
        expected = ent_g(x, bc) + ent_g(y, bc) - ent_g(np.vstack((x, y)), bc)
        assert abs(mi_gg(x, y, biascorrect=bc) - expected) < 1e-12


# --------------------------------------------------------------------------- bias correction

def test_bias_correction_makes_small_sample_mi_unbiased():
    rng = np.random.default_rng(8)
    data = rng.standard_normal((500, 4, 30))  # independent 2-D x and 2-D y, N = 30
    corrected = np.array([mi_gg(d[:2], d[2:]) for d in data])
    raw = np.array([mi_gg(d[:2], d[2:], biascorrect=False) for d in data])
    assert abs(corrected.mean()) < 0.02
    assert raw.mean() > 0.06  # ≈ dx·dy / (2N ln 2) ≈ 0.1 bits
    assert np.all(raw > corrected)
    assert corrected.min() < 0  # bias-corrected MI can go negative


def test_bias_correction_makes_small_sample_entropy_unbiased():
    cov = np.array([[1.0, 0.5], [0.5, 2.0]])
    true = gaussian_entropy_bits(cov)
    rng = np.random.default_rng(9)
    chol = np.linalg.cholesky(cov)
    data = chol @ rng.standard_normal((2000, 2, 30))
    corrected = np.array([ent_g(d) for d in data])
    raw = np.array([ent_g(d, biascorrect=False) for d in data])
    assert abs(corrected.mean() - true) < 0.02
    assert raw.mean() < true - 0.04  # uncorrected entropy underestimates (≈ 0.08 bits here)


# --------------------------------------------------------------------------- continuous vs discrete

def test_mi_model_gd_matches_gaussian_class_model():
    rng = np.random.default_rng(10)
    n = 120_000
    w = np.array([0.5, 0.3, 0.2])
    means = np.array([[0.0, 0.0], [1.5, -0.5], [-1.0, 1.0]])
    covs = np.array([[[1.0, 0.2], [0.2, 1.0]],
                     [[0.5, 0.0], [0.0, 2.0]],
                     [[1.5, -0.6], [-0.6, 1.0]]])
    y = rng.choice(3, size=n, p=w)
    x = np.empty((2, n))
    for k in range(3):
        idx = y == k
        x[:, idx] = rng.multivariate_normal(means[k], covs[k], size=idx.sum()).T
    # The estimator's limit: Gaussian entropy of the pooled covariance minus the weighted
    # class-conditional Gaussian entropies (the 2πe constants cancel).
    mu = w @ means
    pooled = np.einsum("k,kij->ij", w, covs) + np.einsum("k,ki,kj->ij", w, means - mu, means - mu)
    expected = 0.5 * np.log2(np.linalg.det(pooled)) - 0.5 * w @ np.log2(np.linalg.det(covs))
    assert expected > 0.5
    assert abs(mi_model_gd(x, y) - expected) < 0.02
    assert mi_model_gd(x, y, Ym=3) == mi_model_gd(x, y)


def test_mi_model_gd_is_entropy_difference_with_per_class_bias():
    rng = np.random.default_rng(11)
    y = np.repeat([0, 1, 2], [20, 35, 45])
    x = rng.standard_normal((2, 100)) + y
    w = np.bincount(y) / y.size
    for bc in (True, False):
        expected = ent_g(x, bc) - sum(w[k] * ent_g(x[:, y == k], bc) for k in range(3))
        assert abs(mi_model_gd(x, y, biascorrect=bc) - expected) < 1e-12


def test_model_mi_near_zero_when_class_independent():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 50_000))
    y = rng.integers(0, 4, 50_000)
    assert abs(mi_model_gd(x, y)) < 0.005
    assert abs(gcmi_model_cd(np.exp(x), y)) < 0.005


def test_gcmi_model_cd_one_dimensional_two_classes():
    rng = np.random.default_rng(13)
    y = rng.integers(0, 2, 50_000)
    x = 2.0 * y + rng.standard_normal(50_000)
    value = gcmi_model_cd(x, y)
    assert 0.3 < value < 1.0  # true MI of this mixture is ≈ 0.49 bits
    assert abs(gcmi_model_cd(np.exp(x), y) - value) < 1e-12


# --------------------------------------------------------------------------- conditional MI

def test_cmi_with_independent_z_equals_mi():
    rng = np.random.default_rng(14)
    x, y = correlated_pair(rng, 0.6, 50_000)
    z = rng.standard_normal((2, 50_000))
    mi = mi_gg(x, y)
    assert mi > 0.3
    assert abs(cmi_ggg(x, y, z) - mi) < 0.005


def test_cmi_vanishes_for_common_cause():
    rng = np.random.default_rng(15)
    z = rng.standard_normal(50_000)
    x = z + 0.5 * rng.standard_normal(50_000)
    y = z + 0.5 * rng.standard_normal(50_000)
    assert mi_gg(x, y) > 0.5
    assert abs(cmi_ggg(x, y, z)) < 0.005


def test_cmi_identity_with_entropies():
    rng = np.random.default_rng(16)
    x, y, z = rng.standard_normal((3, 80)) + rng.standard_normal(80)
    xz, yz, xyz = np.vstack((x, z)), np.vstack((y, z)), np.vstack((x, y, z))
    expected = ent_g(xz) + ent_g(yz) - ent_g(xyz) - ent_g(z)
    assert abs(cmi_ggg(x, y, z) - expected) < 1e-12


# --------------------------------------------------------------------------- interaction information

def test_interaction_information_redundant_code_is_negative():
    rng = np.random.default_rng(17)
    n = 20_000
    s = rng.integers(0, 2, n)
    signal = s + 0.7 * rng.standard_normal(n)
    r1 = signal + 0.1 * rng.standard_normal(n)
    r2 = signal + 0.1 * rng.standard_normal(n)
    ii = interaction_information_cd(r1, r2, s)
    expected = gcmi_model_cd(np.vstack((r1, r2)), s) - gcmi_model_cd(r1, s) - gcmi_model_cd(r2, s)
    assert abs(ii - expected) < 1e-12
    assert ii < -0.2


def test_interaction_information_xor_code_is_positive():
    rng = np.random.default_rng(18)
    n = 20_000
    a, b = rng.integers(0, 2, (2, n))
    s = a ^ b
    r1 = a + 0.3 * rng.standard_normal(n)
    r2 = b + 0.3 * rng.standard_normal(n)
    assert abs(gcmi_model_cd(r1, s)) < 0.005 and abs(gcmi_model_cd(r2, s)) < 0.005
    assert interaction_information_cd(r1, r2, s) > 0.2


# --------------------------------------------------------------------------- batch helpers

def test_gcmi_cc_batch_equals_loop():
    rng = np.random.default_rng(19)
    n = 500
    y = rng.standard_normal(n)
    X = rng.standard_normal((16, n)) + np.linspace(0, 3, 16)[:, None] * y
    X[3] = np.round(X[3])  # ties
    X[4] = -X[5] ** 3
    batch = gcmi_cc_batch(X, y)
    loop = np.array([gcmi_cc(row, y) for row in X])
    assert batch.shape == (16,)
    np.testing.assert_allclose(batch, loop, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gcmi_cc_batch(X[0], y), [loop[0]], rtol=0, atol=1e-10)


def test_gcmi_cc_batch_perfect_rank_dependence_is_infinite():
    y = np.random.default_rng(22).standard_normal(50)
    out = gcmi_cc_batch(np.vstack((np.exp(y), -y, y[::-1])), y)
    assert out[0] == np.inf and out[1] == np.inf and np.isfinite(out[2])
    with pytest.raises(ValueError, match="not positive definite"):
        gcmi_cc(np.exp(y), y)


@settings(max_examples=25, deadline=None)
@given(f=st.integers(1, 6), n=st.integers(3, 60), seed=st.integers(0, 2 ** 32 - 1))
def test_gcmi_cc_batch_equals_loop_property(f: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n)
    X = rng.standard_normal((f, n)) + rng.normal(size=(f, 1)) * y
    rank_y = np.argsort(np.argsort(y))
    for row in X:  # identical or reversed ranks: singular joint covariance, gcmi_cc raises
        rank_x = np.argsort(np.argsort(row))
        assume(not np.array_equal(rank_x, rank_y) and not np.array_equal(rank_x, n - 1 - rank_y))
    loop = np.array([gcmi_cc(row, y) for row in X])
    np.testing.assert_allclose(gcmi_cc_batch(X, y), loop, rtol=0, atol=1e-10)


def test_gcmi_model_cd_batch_equals_loop():
    rng = np.random.default_rng(20)
    n = 600
    y = rng.integers(0, 3, n)
    X = rng.standard_normal((12, n)) + np.linspace(0, 2, 12)[:, None] * y
    X[2] = np.exp(X[2])
    batch = gcmi_model_cd_batch(X, y)
    loop = np.array([gcmi_model_cd(row, y) for row in X])
    assert batch.shape == (12,)
    np.testing.assert_allclose(batch, loop, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gcmi_model_cd_batch(X, y, Ym=3), loop, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- validation

_RNG = np.random.default_rng(21)
_X100 = _RNG.standard_normal((1, 100))
_Y99 = _RNG.standard_normal((1, 99))
_LAB100 = _RNG.integers(0, 2, 100)

_TOO_FEW = "number of samples must exceed the dimensionality"
_MISMATCH = "mismatched number of samples"


@pytest.mark.parametrize("call", [
    lambda: ent_g(_RNG.standard_normal((3, 3))),
    lambda: mi_gg(_RNG.standard_normal((2, 3)), _RNG.standard_normal(3)),
    lambda: gcmi_cc(_RNG.standard_normal((2, 3)), _RNG.standard_normal(3)),
    lambda: cmi_ggg(*_RNG.standard_normal((3, 3))),
    lambda: mi_model_gd(_RNG.standard_normal((2, 2)), [0, 0]),
    lambda: mi_model_gd(_RNG.standard_normal((2, 20)), np.r_[np.zeros(18, int), 1, 1]),  # class 1: 2 ≤ d
    lambda: gcmi_cc_batch(_RNG.standard_normal((4, 2)), _RNG.standard_normal(2)),
    lambda: gcmi_model_cd_batch(_RNG.standard_normal((4, 10)), np.r_[np.zeros(9, int), 1]),
], ids=["ent_g", "mi_gg", "gcmi_cc", "cmi_ggg", "mi_model_gd", "mi_model_gd-class", "cc_batch", "cd_batch"])
def test_too_few_samples_raise(call):
    with pytest.raises(ValueError, match=_TOO_FEW):
        call()


@pytest.mark.parametrize("call", [
    lambda: mi_gg(_X100, _Y99),
    lambda: gcmi_cc(_X100, _Y99),
    lambda: cmi_ggg(_X100, _X100, _Y99),
    lambda: mi_model_gd(_Y99, _LAB100),
    lambda: gcmi_model_cd(_Y99, _LAB100),
    lambda: interaction_information_cd(_X100, _Y99, _LAB100),
    lambda: gcmi_cc_batch(_X100, _Y99),
    lambda: gcmi_model_cd_batch(_Y99, _LAB100),
], ids=["mi_gg", "gcmi_cc", "cmi_ggg", "mi_model_gd", "gcmi_model_cd", "interaction", "cc_batch", "cd_batch"])
def test_mismatched_sample_counts_raise(call):
    with pytest.raises(ValueError, match=_MISMATCH):
        call()


@pytest.mark.parametrize("func", [mi_model_gd, gcmi_model_cd, gcmi_model_cd_batch])
def test_bad_class_labels_raise(func):
    x = _X100
    with pytest.raises(ValueError, match="non-integer"):
        func(x, _LAB100 + 0.5)
    with pytest.raises(ValueError, match="integer class labels"):
        func(x, np.array(["a"] * 100))
    with pytest.raises(ValueError, match="negative label"):
        func(x, _LAB100 - 1)
    with pytest.raises(ValueError, match="empty class"):
        func(x, 2 * _LAB100)  # labels {0, 2}: class 1 empty
    with pytest.raises(ValueError, match="empty class"):
        func(x, _LAB100, 3)  # Ym = 3 but class 2 never occurs
    with pytest.raises(ValueError, match="out of range"):
        func(x, _LAB100 + 1, 2)


def test_integral_float_and_bool_labels_accepted():
    x = _RNG.standard_normal(100) + _LAB100
    value = mi_model_gd(x, _LAB100)
    assert mi_model_gd(x, _LAB100.astype(float)) == value
    assert mi_model_gd(x, _LAB100.astype(bool)) == value


@pytest.mark.parametrize("call", [
    lambda: ctransform(np.zeros((2, 2, 10))),
    lambda: copnorm(np.zeros((2, 2, 10))),
    lambda: ent_g(np.zeros((2, 2, 10))),
    lambda: mi_gg(np.zeros((2, 2, 10)), np.zeros(10)),
    lambda: gcmi_cc(np.zeros(10), np.zeros((1, 1, 10))),
    lambda: mi_model_gd(np.zeros((2, 2, 10)), np.zeros(10, int)),
    lambda: cmi_ggg(np.zeros(10), np.zeros(10), np.zeros((1, 1, 10))),
    lambda: gcmi_cc_batch(np.zeros((2, 2, 10)), np.zeros(10)),
    lambda: gcmi_model_cd_batch(np.zeros((2, 2, 10)), np.zeros(10, int)),
], ids=["ctransform", "copnorm", "ent_g", "mi_gg", "gcmi_cc", "mi_model_gd", "cmi_ggg", "cc_batch", "cd_batch"])
def test_more_than_two_dimensions_raise(call):
    with pytest.raises(ValueError, match="at most 2 dimensions"):
        call()


def test_other_invalid_inputs_raise():
    with pytest.raises(ValueError, match="NaN or infinite"):
        mi_gg(np.r_[np.nan, np.zeros(9)], np.arange(10.0))
    with pytest.raises(ValueError, match="not positive definite"):
        mi_gg(np.ones(10), np.arange(10.0))
    with pytest.raises(ValueError, match="one 1-D variable"):
        gcmi_cc_batch(_RNG.standard_normal((3, 10)), _RNG.standard_normal((2, 10)))
    with pytest.raises(ValueError, match="Ym must be a positive integer"):
        mi_model_gd(_X100, _LAB100, 2.0)


# --------------------------------------------------------------------------- bounded discrete MI

def mixture_mi_bits(mu: float) -> float:
    """True I(X; Y) for Y ~ Bernoulli(1/2), X | Y ~ N(mu Y, 1), by quadrature (bits)."""
    def integrand(x: float) -> float:
        p = [stats.norm.pdf(x, mu * k, 1.0) for k in (0, 1)]
        mix = 0.5 * (p[0] + p[1])
        return sum(0.5 * pk * np.log2(pk / mix) for pk in p if pk > 0)
    return integrate.quad(integrand, -12.0, 12.0 + mu, limit=200)[0]


def test_entropy_discrete_known_values():
    assert entropy_discrete([0, 1, 0, 1]) == pytest.approx(1.0)
    assert entropy_discrete(np.arange(40) % 10) == pytest.approx(np.log2(10))
    assert entropy_discrete([0, 0, 0, 1]) == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    assert entropy_discrete(np.zeros(5, int)) == 0.0


@pytest.mark.parametrize("m", [2, 3, 10])
@pytest.mark.parametrize("d", [1, 4])
def test_separable_factor_gives_its_entropy(m: int, d: int):
    """Perfectly separable classes: I(X; Y) = H(Y); the estimate is at most H(Y) and close to it,
    for raw clusters and for a strictly monotone transform of them."""
    rng = np.random.default_rng(30 + m + d)
    y = np.arange(3000) % m
    x = y + 0.05 * rng.standard_normal((d, 3000))
    h = np.log2(m)
    for values in (x, np.exp(x)):
        est = mi_classifier_cd(values, y)
        assert h - 0.01 <= est <= h
    np.testing.assert_array_less(mi_classifier_cd_batch(x, y), h + 1e-12)
    assert np.all(mi_classifier_cd_batch(x, y) >= h - 0.01)


def test_gaussian_model_estimate_exceeds_the_entropy_where_the_bounded_one_does_not():
    """The reported fault: 4-D separated clusters of a 10-class factor give the Gaussian-model
    estimate far above log2(10) = 3.32 bits; the classifier information stays below it."""
    rng = np.random.default_rng(31)
    y = np.arange(4000) % 10
    x = y + 0.05 * rng.standard_normal((4, 4000))
    assert gcmi_model_cd(x, y) > np.log2(10) + 1.0
    assert np.log2(10) - 0.01 <= mi_classifier_cd(x, y) <= np.log2(10)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_classifier_information_matches_a_gaussian_mixture_by_quadrature(mu: float):
    rng = np.random.default_rng(int(mu * 10) + 32)
    y = rng.integers(0, 2, 20_000)
    x = mu * y + rng.standard_normal(20_000)
    true = mixture_mi_bits(mu)
    est = mi_classifier_cd(x, y)
    assert est <= entropy_discrete(y)
    assert abs(est - true) < 0.015  # the class model is the true model here: close to I, not above it by more than noise


def test_classifier_information_of_an_independent_factor_is_near_zero():
    rng = np.random.default_rng(33)
    for m, d in ((2, 1), (10, 1), (4, 3)):
        y = rng.integers(0, m, 5000)
        x = rng.standard_normal((d, 5000))
        assert 0.0 <= mi_classifier_cd(x, y) < 0.005
        assert 0.0 <= mi_classifier_cd(np.exp(x), y) < 0.005
    batch = mi_classifier_cd_batch(rng.standard_normal((20, 5000)), rng.integers(0, 10, 5000))
    assert np.all(batch >= 0) and batch.max() < 0.005


@settings(max_examples=40, deadline=None)
@given(n=st.integers(10, 150), m=st.integers(2, 6), d=st.integers(1, 3),
       strength=st.floats(0.0, 50.0), seed=st.integers(0, 2 ** 32 - 1))
def test_classifier_information_never_exceeds_the_entropy(n: int, m: int, d: int, strength: float, seed: int):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(m), rng.integers(0, m, n - m)])  # every class present, some with 1 sample
    x = rng.standard_normal((d, n)) + strength * rng.normal(size=(d, 1)) * y
    x[0] = np.round(x[0])  # ties
    h = entropy_discrete(y)
    est = mi_classifier_cd(x, y)
    assert 0.0 <= est <= h
    batch = mi_classifier_cd_batch(x, y)
    assert np.all((batch >= 0.0) & (batch <= h))


def test_mi_classifier_cd_batch_equals_loop():
    rng = np.random.default_rng(34)
    n = 700
    y = rng.integers(0, 4, n)
    X = rng.standard_normal((10, n)) + np.linspace(0, 2, 10)[:, None] * y
    X[2] = np.exp(X[2])
    X[3] = np.round(X[3])
    X[4] = y + 0.01 * rng.standard_normal(n)
    batch = mi_classifier_cd_batch(X, y)
    loop = np.array([mi_classifier_cd(row, y) for row in X])
    assert batch.shape == (10,)
    np.testing.assert_allclose(batch, loop, rtol=0, atol=1e-10)
    np.testing.assert_allclose(mi_classifier_cd_batch(X, y, Ym=4, folds=3, seed=5),
                               [mi_classifier_cd(row, y, 4, 3, 5) for row in X], rtol=0, atol=1e-10)


def test_mi_classifier_cd_is_deterministic_and_seeded():
    rng = np.random.default_rng(35)
    y = rng.integers(0, 3, 400)
    x = rng.standard_normal((2, 400)) + y
    assert mi_classifier_cd(x, y) == mi_classifier_cd(x, y)
    assert mi_classifier_cd(x, y, seed=1) != mi_classifier_cd(x, y, seed=2)
    assert mi_classifier_cd(x, np.zeros(400, int)) == 0.0  # one class: H(Y) = 0


def test_interaction_information_classifier_terms_are_bounded():
    rng = np.random.default_rng(36)
    n = 6000
    s = rng.integers(0, 2, n)
    signal = s + 0.7 * rng.standard_normal(n)
    r1 = signal + 0.1 * rng.standard_normal(n)
    r2 = signal + 0.1 * rng.standard_normal(n)
    t = interaction_information_classifier_cd(r1, r2, s)
    assert t["h_s"] == pytest.approx(entropy_discrete(s))
    for key in ("i_joint", "i_r1", "i_r2"):
        assert 0 <= t[key] <= t["h_s"]
    assert t["ii"] == pytest.approx(t["i_joint"] - t["i_r1"] - t["i_r2"])
    assert t["ii"] < -0.2  # redundant code
    a, b = rng.integers(0, 2, (2, n))
    xor = interaction_information_classifier_cd(a + 0.3 * rng.standard_normal(n), b + 0.3 * rng.standard_normal(n),
                                                a ^ b)
    assert xor["i_r1"] < 0.005 and xor["i_r2"] < 0.005 and xor["ii"] > 0.2  # synergy


@pytest.mark.parametrize("func", [mi_classifier_cd, mi_classifier_cd_batch])
def test_classifier_information_invalid_inputs_raise(func):
    with pytest.raises(ValueError, match=_MISMATCH):
        func(_Y99, _LAB100)
    with pytest.raises(ValueError, match="folds must be an integer"):
        func(_X100, _LAB100, folds=1)
    with pytest.raises(ValueError, match="at least the number of folds"):
        func(_X100[:, :4], _LAB100[:4] * 0, folds=5)
    with pytest.raises(ValueError, match="empty class"):
        func(_X100, 2 * _LAB100)
    with pytest.raises(ValueError, match="NaN or infinite"):
        func(np.r_[np.nan, np.zeros(99)], _LAB100)
