"""Gaussian-copula mutual information (GCMI), pure numpy/scipy.

Estimators follow Ince et al. (2017), "A statistical framework for neuroimaging data
analysis based on mutual information estimated via a Gaussian copula", and the
conventions of their reference implementation:

* samples lie on the **last** axis: a d-dimensional variable is a ``(d, N)`` array; a 1-D
  array of length N is taken as one variable, shape ``(1, N)``;
* every information quantity is returned in **bits**;
* entropies are bias-corrected by default with the analytic correction for the
  log-determinant of a sample covariance (so small-N estimates are unbiased for Gaussian
  data; bias-corrected MI can therefore be slightly negative);
* all arithmetic is float64.

Gaussian entropy of a ``(d, N)`` sample with covariance ``C`` (normalised by ``N - 1``)::

    H = sum(log diag(chol C)) + d/2 (ln 2pi + 1)
    H -= d (ln 2 - ln(N - 1)) / 2 + sum_{i=1..d} psi((N - i) / 2) / 2     (bias correction)

The ``*_batch`` helpers compute many 1-D estimates at once in closed form (no Python loop
over variables) and agree with the corresponding loop of scalar calls to ~1e-12.

**Discrete variables.** The Gaussian-model estimate :func:`gcmi_model_cd` replaces the
unconditional entropy of ``X`` by that of one Gaussian with the pooled covariance. When the
class clusters are nearly separated, that Gaussian is far wider than the mixture it stands
for, and the estimate grows without bound: it can exceed ``H(Y)`` (e.g. 7.8 bits for a
10-class factor whose entropy is log2 10 = 3.3 bits), which no mutual information can. For
figures that are *reported* as ``I(X; Y)`` with a discrete ``Y`` use
:func:`mi_classifier_cd` (and :func:`mi_classifier_cd_batch`): the cross-validated
classifier information ``H(Y) - CE``, where ``CE`` is the held-out cross-entropy (bits) of a
Gaussian-copula class-conditional classifier. For any classifier ``q``,
``E[-log2 q(y|x)] >= H(Y|X)``, so ``H(Y) - CE`` is (in expectation, with the plug-in
``H(Y)``) a lower bound of ``I(X; Y)``; it is floored at 0 and can never exceed ``H(Y)``.
"""
from __future__ import annotations

import math
from typing import Any, cast, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import ndtri, psi

__all__ = [
    "ctransform",
    "copnorm",
    "ent_g",
    "mi_gg",
    "gcmi_cc",
    "mi_model_gd",
    "gcmi_model_cd",
    "cmi_ggg",
    "interaction_information_cd",
    "gcmi_cc_batch",
    "gcmi_model_cd_batch",
    "entropy_discrete",
    "mi_classifier_cd",
    "mi_classifier_cd_batch",
    "interaction_information_classifier_cd",
]

_LN2 = math.log(2.0)
_LN2PIE = math.log(2.0 * math.pi) + 1.0

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


# --------------------------------------------------------------------------- validation

def _as_2d(x: ArrayLike, name: str) -> FloatArray:
    """``x`` as a finite float64 ``(d, N)`` array; 1-D input becomes ``(1, N)``."""
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued")
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D (N,) or 2-D (d, N) array, got a scalar")
    if arr.ndim > 2:
        raise ValueError(f"{name} must have at most 2 dimensions (d, N), got shape {arr.shape}")
    try:
        arr = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from None
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no variables (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_same_samples(**arrays: np.ndarray) -> int:
    """Common number of samples (last axis) of the named arrays, or a ValueError."""
    counts = {name: a.shape[-1] for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{k} has {v}" for k, v in counts.items())
        raise ValueError(f"mismatched number of samples (last axis): {detail}")
    return next(iter(counts.values()))


def _check_capacity(n_samples: int, n_dims: int, what: str) -> None:
    if n_samples <= n_dims:
        raise ValueError(
            f"number of samples must exceed the dimensionality of the joint variable for {what}: "
            f"{n_samples} samples, {n_dims} dimensions")


def _as_labels(y: ArrayLike, Ym: int | None, name: str = "y") -> tuple[IntArray, int, IntArray]:
    """Validate discrete labels: returns ``(labels (N,), m, counts (m,))``.

    Labels must be integers (integer dtype, bool, or integral-valued floats) in ``0..m-1``
    with every class present; ``m`` is ``Ym`` when given, else ``max(y) + 1``.
    """
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels (N,), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int64, copy=False)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must contain integer class labels 0..m-1 (found non-integer values)")
        arr = arr.astype(np.int64)
    else:
        raise ValueError(f"{name} must contain integer class labels 0..m-1 (dtype {arr.dtype})")
    if arr.min() < 0:
        raise ValueError(f"{name} must contain class labels 0..m-1; found negative label {int(arr.min())}")
    if Ym is None:
        m = int(arr.max()) + 1
    else:
        if isinstance(Ym, (bool, np.bool_)) or not isinstance(Ym, (int, np.integer)) or Ym < 1:
            raise ValueError(f"Ym must be a positive integer number of classes, got {Ym!r}")
        m = int(Ym)
        if arr.max() >= m:
            raise ValueError(f"{name} has class label {int(arr.max())} out of range 0..{m - 1} (Ym={m})")
    counts = np.bincount(arr, minlength=m)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"{name}: empty class(es) {empty.tolist()}; labels must be 0..{m - 1} "
                         "with every class present")
    return arr, m, counts.astype(np.int64)


def _cholesky(cov: FloatArray, what: str) -> FloatArray:
    try:
        return cast(FloatArray, np.linalg.cholesky(cov))
    except np.linalg.LinAlgError:
        raise ValueError(f"covariance of {what} is not positive definite "
                         "(constant or linearly dependent variables?)") from None


# --------------------------------------------------------------------------- core maths

@overload
def _bias(n_samples: int, n_dims: int) -> float: ...
@overload
def _bias(n_samples: NDArray[np.integer[Any]] | FloatArray, n_dims: int) -> FloatArray: ...
def _bias(n_samples: int | NDArray[np.integer[Any]] | FloatArray, n_dims: int) -> float | FloatArray:
    """Bias of the Gaussian entropy estimate (nats): ``d(ln2 - ln(N-1))/2 + sum psi((N-i)/2)/2``.

    ``n_samples`` may be an array (one correction per entry).
    """
    n = np.asarray(n_samples, dtype=np.float64)
    dims = np.arange(1, n_dims + 1, dtype=np.float64)
    psi_sum = psi((n[..., np.newaxis] - dims) / 2.0).sum(axis=-1) / 2.0
    out = n_dims * (_LN2 - np.log(n - 1.0)) / 2.0 + psi_sum
    return float(out) if out.ndim == 0 else out


def _half_logdet(chol: FloatArray) -> float:
    """``sum(log diag(L))`` = ½ log det C for ``C = L Lᵀ``."""
    return float(np.log(np.diagonal(chol)).sum())


def _cov(x: FloatArray, demeaned: bool) -> FloatArray:
    """Sample covariance of ``(d, N)`` data normalised by ``N - 1``."""
    if not demeaned:
        x = x - x.mean(axis=1, keepdims=True)
    return (x @ x.T) / float(x.shape[1] - 1)


# --------------------------------------------------------------------------- copula

def _ranks(arr: FloatArray) -> IntArray:
    """0-based ranks along the last axis of ``(d, N)`` data.

    Equal to ``argsort(argsort(arr, stable), stable)`` (ties broken by position), computed
    with one stable sort and an inverse-permutation scatter.
    """
    order = np.argsort(arr, axis=-1, kind="stable")
    ranks = np.empty(order.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(arr.shape[-1]), order.shape), axis=-1)
    return ranks


def _uniform_from_ranks(ranks: IntArray) -> FloatArray:
    return (ranks + 1.0) / (ranks.shape[-1] + 1.0)


def _normal_scores(ranks: IntArray) -> FloatArray:
    """``ndtri((ranks + 1) / (N + 1))`` via an N-entry lookup table (same values, less work)."""
    n = ranks.shape[-1]
    table = ndtri((np.arange(n) + 1.0) / (n + 1.0))
    return table[ranks]


def ctransform(x: ArrayLike) -> FloatArray:
    """Empirical CDF values along the last axis: ``(rank + 1) / (N + 1)``.

    ``x``: ``(N,)`` or ``(d, N)``; returns float64 in the same shape, values in (0, 1).
    Ranks are ``argsort(argsort(x))`` with a stable sort (ties broken by position).
    """
    arr = _as_2d(x, "x")
    return _uniform_from_ranks(_ranks(arr)).reshape(np.shape(x))


def copnorm(x: ArrayLike) -> FloatArray:
    """Copula normalisation: ``ndtri(ctransform(x))`` — standard-normal scores per row.

    ``x``: ``(N,)`` or ``(d, N)``; returns float64 in the same shape.
    """
    arr = _as_2d(x, "x")
    return _normal_scores(_ranks(arr)).reshape(np.shape(x))


# --------------------------------------------------------------------------- estimators

def ent_g(x: ArrayLike, biascorrect: bool = True) -> float:
    """Entropy (bits) of a Gaussian variable from samples ``x`` of shape ``(d, N)`` or ``(N,)``.

    The data are demeaned; covariance uses ``N - 1``. Requires ``N > d``.
    """
    arr = _as_2d(x, "x")
    d, n = arr.shape
    _check_capacity(n, d, "ent_g")
    h = _half_logdet(_cholesky(_cov(arr, demeaned=False), "x")) + 0.5 * d * _LN2PIE
    if biascorrect:
        h -= _bias(n, d)
    return h / _LN2


def mi_gg(x: ArrayLike, y: ArrayLike, biascorrect: bool = True, demeaned: bool = False) -> float:
    """Mutual information (bits) between Gaussian variables ``x`` ``(dx, N)`` and ``y`` ``(dy, N)``.

    ``I = H(X) + H(Y) - H(X,Y)`` from the Cholesky factors of the joint covariance blocks,
    each term bias-corrected with its own dimension when ``biascorrect``. ``demeaned=True``
    skips removing the sample mean. Requires ``N > dx + dy``.
    """
    xa, ya = _as_2d(x, "x"), _as_2d(y, "y")
    n = _check_same_samples(x=xa, y=ya)
    dx, dy = xa.shape[0], ya.shape[0]
    dxy = dx + dy
    _check_capacity(n, dxy, "mi_gg (x and y jointly)")
    c = _cov(np.vstack((xa, ya)), demeaned)
    hx = _half_logdet(_cholesky(c[:dx, :dx], "x"))
    hy = _half_logdet(_cholesky(c[dx:, dx:], "y"))
    hxy = _half_logdet(_cholesky(c, "[x; y]"))
    if biascorrect:
        hx -= _bias(n, dx)
        hy -= _bias(n, dy)
        hxy -= _bias(n, dxy)
    return (hx + hy - hxy) / _LN2


def gcmi_cc(x: ArrayLike, y: ArrayLike) -> float:
    """Gaussian-copula MI (bits) between continuous ``x`` ``(dx, N)`` and ``y`` ``(dy, N)``.

    Each row is copula-normalised, then ``mi_gg(..., biascorrect=True, demeaned=True)``.
    Invariant under strictly monotone transforms of each row.
    """
    xa, ya = _as_2d(x, "x"), _as_2d(y, "y")
    _check_same_samples(x=xa, y=ya)
    return mi_gg(copnorm(xa), copnorm(ya), True, True)


def mi_model_gd(x: ArrayLike, y: ArrayLike, Ym: int | None = None,
                biascorrect: bool = True, demeaned: bool = False) -> float:
    """MI (bits) between Gaussian ``x`` ``(d, N)`` and discrete ``y`` ``(N,)`` with classes ``0..m-1``.

    ``I = H(X) - sum_y w_y H(X | Y=y)`` with ``w_y = N_y / N``; each class-conditional
    entropy uses the class's own demeaned data and (when ``biascorrect``) its own ``N_y``.
    ``Ym`` is the number of classes (default ``max(y) + 1``); no class may be empty, and each
    class needs more than ``d`` samples. ``demeaned=True`` skips demeaning the pooled ``x``.
    """
    xa = _as_2d(x, "x")
    d, n = xa.shape
    labels, m, counts = _as_labels(y, Ym)
    _check_same_samples(x=xa, y=labels)
    _check_capacity(n, d, "mi_model_gd")
    small = np.flatnonzero(counts <= d)
    if small.size:
        raise ValueError(
            "number of samples must exceed the dimensionality of the joint variable in every class: "
            f"class(es) {small.tolist()} have {counts[small].tolist()} samples for {d} dimensions")
    h_unc = _half_logdet(_cholesky(_cov(xa, demeaned), "x"))
    h_cond = np.empty(m)
    for k in range(m):
        h_cond[k] = _half_logdet(_cholesky(_cov(xa[:, labels == k], demeaned=False), f"x | y={k}"))
    if biascorrect:
        h_unc -= _bias(n, d)
        h_cond -= _bias(counts, d)
    w = counts / float(n)
    return (h_unc - float(np.dot(w, h_cond))) / _LN2


def gcmi_model_cd(x: ArrayLike, y: ArrayLike, Ym: int | None = None) -> float:
    """Gaussian-copula MI (bits) between continuous ``x`` ``(d, N)`` and discrete ``y`` ``(N,)``.

    ``x`` is copula-normalised per row, then ``mi_model_gd(..., biascorrect=True, demeaned=True)``.
    """
    xa = _as_2d(x, "x")
    labels, m, _ = _as_labels(y, Ym)
    _check_same_samples(x=xa, y=labels)
    return mi_model_gd(copnorm(xa), labels, m, True, True)


def cmi_ggg(x: ArrayLike, y: ArrayLike, z: ArrayLike,
            biascorrect: bool = True, demeaned: bool = False) -> float:
    """Conditional MI ``I(X;Y|Z)`` (bits) for Gaussian ``x`` ``(dx,N)``, ``y`` ``(dy,N)``, ``z`` ``(dz,N)``.

    ``I = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)``, each term bias-corrected with its own
    dimension. Requires ``N > dx + dy + dz``.
    """
    xa, ya, za = _as_2d(x, "x"), _as_2d(y, "y"), _as_2d(z, "z")
    n = _check_same_samples(x=xa, y=ya, z=za)
    dx, dy, dz = xa.shape[0], ya.shape[0], za.shape[0]
    dxyz = dx + dy + dz
    _check_capacity(n, dxyz, "cmi_ggg (x, y and z jointly)")
    c = _cov(np.vstack((xa, ya, za)), demeaned)
    ix, iy, iz = np.arange(dx), np.arange(dx, dx + dy), np.arange(dx + dy, dxyz)
    ixz, iyz = np.concatenate((ix, iz)), np.concatenate((iy, iz))
    hz = _half_logdet(_cholesky(c[np.ix_(iz, iz)], "z"))
    hxz = _half_logdet(_cholesky(c[np.ix_(ixz, ixz)], "[x; z]"))
    hyz = _half_logdet(_cholesky(c[np.ix_(iyz, iyz)], "[y; z]"))
    hxyz = _half_logdet(_cholesky(c, "[x; y; z]"))
    if biascorrect:
        hz -= _bias(n, dz)
        hxz -= _bias(n, dx + dz)
        hyz -= _bias(n, dy + dz)
        hxyz -= _bias(n, dxyz)
    return (hxz + hyz - hxyz - hz) / _LN2


def interaction_information_cd(r1: ArrayLike, r2: ArrayLike, s: ArrayLike,
                               Ym: int | None = None) -> float:
    """Interaction information (bits) of continuous ``r1`` ``(d1,N)``, ``r2`` ``(d2,N)`` about discrete ``s`` ``(N,)``.

    ``II = I([R1; R2]; S) - I(R1; S) - I(R2; S)`` with :func:`gcmi_model_cd`.
    Negative means redundancy, positive means synergy.
    """
    a, b = _as_2d(r1, "r1"), _as_2d(r2, "r2")
    labels, m, _ = _as_labels(s, Ym, "s")
    _check_same_samples(r1=a, r2=b, s=labels)
    joint = gcmi_model_cd(np.vstack((a, b)), labels, m)
    return joint - gcmi_model_cd(a, labels, m) - gcmi_model_cd(b, labels, m)


# --------------------------------------------------------------------------- batch helpers

def _as_batch(X: ArrayLike) -> FloatArray:
    """``X`` as ``(F, N)``: F independent 1-D variables (1-D input is one variable)."""
    return _as_2d(X, "X")


def gcmi_cc_batch(X: ArrayLike, y: ArrayLike) -> FloatArray:
    """Gaussian-copula MI (bits) of each row of ``X`` ``(F, N)`` with one continuous ``y`` ``(N,)``.

    Returns ``(F,)``, equal to ``[gcmi_cc(X[f], y) for f in range(F)]``, computed in closed
    form: with ``r`` the (uncentred) correlation of the copula-normal scores,
    ``I = [-½ ln(1 - r²) + (psi((N-2)/2) - psi((N-1)/2)) / 2] / ln 2``.
    A row whose ranks equal (or exactly reverse) those of ``y`` gets ``+inf``, where
    :func:`gcmi_cc` raises because the joint covariance is singular.
    """
    Xa = _as_batch(X)
    ya = _as_2d(y, "y")
    if ya.shape[0] != 1:
        raise ValueError(f"y must be one 1-D variable (N,), got shape {np.shape(y)}")
    n = _check_same_samples(X=Xa, y=ya)
    _check_capacity(n, 2, "gcmi_cc_batch (each row of X with y)")
    rx, ry = _ranks(Xa), _ranks(ya[0])
    gx = _normal_scores(rx)
    gy = _normal_scores(ry)
    sxx = np.einsum("fn,fn->f", gx, gx)
    syy = float(gy @ gy)
    sxy = gx @ gy
    r2 = np.minimum(sxy * sxy / (sxx * syy), 1.0)
    # Bias: H_X and H_Y (d=1) minus H_XY (d=2); the log(N-1) terms cancel.
    bias = (psi((n - 2.0) / 2.0) - psi((n - 1.0) / 2.0)) / 2.0
    # Identical or reversed ranks: singular joint covariance, infinite MI (exactly, not via rounding).
    r2[np.all(rx == ry, axis=1) | np.all(rx == n - 1 - ry, axis=1)] = 1.0
    with np.errstate(divide="ignore"):
        return (-0.5 * np.log1p(-r2) + bias) / _LN2


def gcmi_model_cd_batch(X: ArrayLike, y: ArrayLike, Ym: int | None = None) -> FloatArray:
    """Gaussian-copula MI (bits) of each row of ``X`` ``(F, N)`` with one discrete ``y`` ``(N,)``.

    Returns ``(F,)``, equal to ``[gcmi_model_cd(X[f], y, Ym) for f in range(F)]``, without a
    Python loop over rows (class-grouped columns, per-class sums with ``np.add.reduceat``).
    """
    Xa = _as_batch(X)
    labels, m, counts = _as_labels(y, Ym)
    n = _check_same_samples(X=Xa, y=labels)
    _check_capacity(n, 1, "gcmi_model_cd_batch")
    small = np.flatnonzero(counts <= 1)
    if small.size:
        raise ValueError(
            "number of samples must exceed the dimensionality of the joint variable in every class: "
            f"class(es) {small.tolist()} have {counts[small].tolist()} samples for 1 dimension")
    gx = copnorm(Xa)
    # Columns grouped by class (stable), then per-class sums with reduceat: no loop over F.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    gs = gx[:, order]
    nk = counts.astype(np.float64)
    means = np.add.reduceat(gs, starts, axis=1) / nk           # (F, m)
    resid = gs - np.repeat(means, counts, axis=1)              # class-demeaned, (F, N)
    var_cond = np.add.reduceat(resid * resid, starts, axis=1) / (nk - 1.0)
    var_unc = np.einsum("fn,fn->f", gx, gx) / (n - 1.0)      # demeaned=True, as in gcmi_model_cd
    h_unc = 0.5 * np.log(var_unc) - _bias(n, 1)
    h_cond = 0.5 * np.log(var_cond) - _bias(nk, 1)
    w = nk / float(n)
    return (h_unc - h_cond @ w) / _LN2


# --------------------------------------------------------------------------- bounded discrete MI

_LN2PI = math.log(2.0 * math.pi)
_SELECTION_SAMPLES = 1000  # training samples scored to choose the classifier's representation
_CHUNK = 4_000_000  # elements of the (rows, samples, classes) arrays of the batch estimator


def entropy_discrete(y: ArrayLike, Ym: int | None = None) -> float:
    """Plug-in entropy (bits) of discrete labels ``y`` ``(N,)``: ``-sum_k p_k log2 p_k``, ``p_k = N_k / N``.

    Labels as for :func:`mi_model_gd` (``0..m-1``, every class present).
    """
    _, _, counts = _as_labels(y, Ym)
    p = counts / float(counts.sum())
    return float(-(p * np.log2(p)).sum())


def _stratified_folds(labels: IntArray, m: int, folds: int, seed: int) -> IntArray:
    """Fold index (N,) in ``0..folds-1``: each class's samples, shuffled with ``seed``, are
    dealt round-robin, so every fold holds each class's share to within one sample."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == k)) for k in range(m)])
    fold = np.empty(labels.size, dtype=np.int64)
    fold[order] = np.arange(labels.size) % folds
    return fold


def _check_cv(n: int, folds: int) -> None:
    if isinstance(folds, (bool, np.bool_)) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if n < folds:
        raise ValueError(f"number of samples must be at least the number of folds: {n} samples, {folds} folds")


def _representations(x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The two inputs the classifier may use, both ``(d, N)`` and label-free: the copula-normal
    scores of each row, and each row standardised (raw values; an affine map)."""
    sd = x.std(axis=1, keepdims=True)
    return _normal_scores(_ranks(x)), (x - x.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def _selection_rows(train_idx: IntArray) -> IntArray:
    """At most ``_SELECTION_SAMPLES`` training indices, evenly spaced (the representation is
    chosen by the classifier's fit to these: training data only)."""
    if train_idx.size <= _SELECTION_SAMPLES:
        return train_idx
    return train_idx[np.linspace(0, train_idx.size - 1, _SELECTION_SAMPLES).astype(np.int64)]


def _log_prior(n_k: FloatArray, n_train: int, m: int) -> FloatArray:
    """Laplace-smoothed class log-prior of a training fold: ``log((N_k + 1) / (N + m))`` (m,)."""
    return np.log((n_k + 1.0) / (n_train + m))


def _mixed_log_post_at(joint: FloatArray, labels: IntArray, log_prior: FloatArray, eps: float) -> FloatArray:
    """``log((1 - eps) q(y|x) + eps pi_y)`` at the true labels: ``joint`` is log p(x, k) with
    classes on the last axis, ``(..., e, m)``; ``labels`` (e,); returns ``(..., e)``. ``q`` is
    ``joint`` normalised over classes and ``pi`` the prior (m,); the floor means one
    confidently wrong held-out sample costs at most ``-log2(eps pi_y)`` bits."""
    top = joint.max(axis=-1, keepdims=True)
    norm = top[..., 0] + np.log(np.exp(joint - top).sum(axis=-1))
    at = np.take_along_axis(joint, np.broadcast_to(labels[:, None], joint.shape[:-1] + (1,)), axis=-1)[..., 0]
    return np.logaddexp(math.log1p(-eps) + at - norm, math.log(eps) + log_prior[labels])


def _class_levels(ss_k: FloatArray, n_k: FloatArray, level: FloatArray | float, d: int) -> FloatArray:
    """Per class, the variance level ``tau_k`` its covariance is shrunk towards.

    ss_k (..., m): trace of the class's scatter ``R_k R_kᵀ``; n_k (m,); level (...,): the
    pooled within-class average variance ``tr(S_w) / d``. ``tau_k`` is the geometric mean of
    the class's own average variance ``ss_k / (d (N_k - 1))`` (weight ``N_k - 1``, floored at
    1e-6 level) and ``level`` (weight 1): a large class keeps its own scale, a class with one
    sample takes the pooled one. (A linear mix would let a wide class blur a narrow one.)
    """
    lvl = np.asarray(level, dtype=np.float64)[..., None]
    w = np.maximum(n_k - 1.0, 0.0)
    own = np.maximum(ss_k / (d * np.maximum(w, 1.0)), 1e-6 * lvl)
    return np.exp((w * np.log(own) + np.log(lvl)) / (w + 1.0))


def _class_model_loss(xt: FloatArray, yt: IntArray, xe: FloatArray, ye: IntArray, m: int) -> float:
    """Summed cross-entropy (nats) on ``(xe (d, e), ye (e,))`` of the Gaussian class-conditional
    classifier fit on ``xt`` (d, n) with labels ``yt`` (n,).

    Per class: the mean of its training samples (the training mean for a class absent from
    the fold) and covariance ``(R_k R_kᵀ + nu tau_k S_w / level) / (N_k + nu)``: ``R_k`` the
    class-demeaned samples, ``S_w`` the pooled within-class covariance plus a 1e-6 relative
    ridge, ``level = tr(S_w) / d``, ``tau_k`` from :func:`_class_levels`, ``nu = d + 2``
    (shrinkage of the pooled shape at the class's own scale: keeps small classes well posed);
    Laplace class priors; probabilities mixed with the prior at weight ``1 / n``.
    """
    d, n = xt.shape
    n_k = np.bincount(yt, minlength=m).astype(np.float64)
    onehot = np.zeros((n, m))
    onehot[np.arange(n), yt] = 1.0
    means = np.where(n_k > 0, (xt @ onehot) / np.maximum(n_k, 1.0), xt.mean(axis=1, keepdims=True))  # (d, m)
    resid = xt - means[:, yt]
    s_w = resid @ resid.T / n
    s_w += 1e-6 * max(float(np.trace(s_w)) / d, 1e-12) * np.eye(d)
    level = float(np.trace(s_w)) / d
    tau = _class_levels(np.einsum("dn,dn->n", resid, resid) @ onehot, n_k, level, d)
    nu = d + 2.0
    log_prior = _log_prior(n_k, n, m)
    joint = np.empty((xe.shape[1], m))
    for k in range(m):
        r = resid[:, yt == k]
        chol = _cholesky((r @ r.T + nu * tau[k] / level * s_w) / (n_k[k] + nu), f"x | y={k}")
        z = np.linalg.solve(chol, xe - means[:, k:k + 1])
        joint[:, k] = -0.5 * np.einsum("de,de->e", z, z) - _half_logdet(chol) - 0.5 * d * _LN2PI + log_prior[k]
    return float(-_mixed_log_post_at(joint, ye, log_prior, 1.0 / n).sum())


def _class_model_loss_1d(xt: FloatArray, yt: IntArray, xe: FloatArray, ye: IntArray, m: int) -> FloatArray:
    """:func:`_class_model_loss` for each row of ``xt`` (F, n), ``xe`` (F, e) at once: (F,) nats."""
    nt = yt.size
    n_k = np.bincount(yt, minlength=m).astype(np.float64)
    onehot = np.zeros((nt, m))
    onehot[np.arange(nt), yt] = 1.0
    means = np.where(n_k > 0, (xt @ onehot) / np.maximum(n_k, 1.0), xt.mean(axis=1, keepdims=True))  # (F, m)
    resid = xt - means[:, yt]
    ss_k = (resid * resid) @ onehot                                           # (F, m)
    s_w = ss_k.sum(axis=1) / nt
    s_w = s_w + 1e-6 * np.maximum(s_w, 1e-12)
    nu = 3.0                                                                  # d + 2, d = 1
    var = (ss_k + nu * _class_levels(ss_k, n_k, s_w, 1)) / (n_k + nu)        # (F, m)
    log_prior = _log_prior(n_k, nt, m)
    # log p(x, k) = a x² + b x + c per row and class: one batched (e, 3) @ (3, m) product per row
    a = -0.5 / var
    coef = np.stack([a, -2.0 * a * means, a * means * means - 0.5 * np.log(var) - 0.5 * _LN2PI + log_prior],
                    axis=1)                                                   # (F, 3, m)
    out = np.empty(xt.shape[0])
    step = max(1, _CHUNK // max(xe.shape[1] * m, 1))
    for lo in range(0, xt.shape[0], step):
        sl = slice(lo, lo + step)
        xs = xe[sl]
        powers = np.stack([xs * xs, xs, np.ones_like(xs)], axis=2)           # (f, e, 3)
        joint = powers @ coef[sl]                                             # (f, e, m)
        out[sl] = -_mixed_log_post_at(joint, ye, log_prior, 1.0 / nt).sum(axis=1)
    return out


def mi_classifier_cd(x: ArrayLike, y: ArrayLike, Ym: int | None = None, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated classifier information (bits) between continuous ``x`` ``(d, N)`` and discrete ``y`` ``(N,)``.

    ``I_cv = clip(H(Y) - CE, 0, H(Y))``: ``H(Y)`` the plug-in entropy of ``y``; ``CE`` the mean
    held-out cross-entropy (bits) ``-log2 q(y_n | x_n)`` over ``folds`` stratified folds
    (shuffled with ``seed``), every sample scored once by the classifier fit on the other
    folds. ``q`` is a Gaussian class-conditional classifier (see :func:`_class_model_loss`)
    on one of two label-free representations of ``x``: the copula-normal scores of its rows
    (as in GCMI) or its standardised raw values. Per fold, the one whose fit scores better on
    (up to 1,000 of) the fold's *training* samples is used — both models have the same
    number of parameters, and the held-out samples play no part in the choice.

    For any classifier, ``E[-log2 q(y|x)] >= H(Y|X)``, so ``I_cv`` is (in expectation, with
    the plug-in ``H(Y)``) a lower bound of ``I(X; Y)``: it never exceeds ``H(Y)``, is close to
    it for separable classes and near 0 for an ``x`` independent of ``y``. Deterministic.
    """
    xa = _as_2d(x, "x")
    labels, m, _ = _as_labels(y, Ym)
    n = _check_same_samples(x=xa, y=labels)
    _check_cv(n, folds)
    h_y = entropy_discrete(labels, m)
    if m < 2:
        return 0.0
    reps = _representations(xa)
    fold = _stratified_folds(labels, m, folds, seed)
    total = 0.0
    for f in range(folds):
        test, train = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        sel = _selection_rows(train)
        fit = [_class_model_loss(r[:, train], labels[train], r[:, sel], labels[sel], m) for r in reps]
        best = reps[int(np.argmin(fit))]
        total += _class_model_loss(best[:, train], labels[train], best[:, test], labels[test], m)
    ce = total / n / _LN2
    return float(min(max(h_y - ce, 0.0), h_y))


def mi_classifier_cd_batch(X: ArrayLike, y: ArrayLike, Ym: int | None = None, folds: int = 5,
                           seed: int = 0) -> FloatArray:
    """:func:`mi_classifier_cd` (bits) of each row of ``X`` ``(F, N)`` with one discrete ``y`` ``(N,)``.

    Returns ``(F,)``, equal to ``[mi_classifier_cd(X[f], y, Ym, folds, seed) for f in range(F)]``
    (to ~1e-10), with the 1-D class models of all rows fitted at once (no loop over rows).
    """
    Xa = _as_batch(X)
    labels, m, _ = _as_labels(y, Ym)
    n = _check_same_samples(X=Xa, y=labels)
    _check_cv(n, folds)
    h_y = entropy_discrete(labels, m)
    if m < 2:
        return np.zeros(Xa.shape[0])
    reps = _representations(Xa)
    fold = _stratified_folds(labels, m, folds, seed)
    total = np.zeros(Xa.shape[0])
    for f in range(folds):
        test, train = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        sel = _selection_rows(train)
        fit = np.stack([_class_model_loss_1d(r[:, train], labels[train], r[:, sel], labels[sel], m) for r in reps])
        held = np.stack([_class_model_loss_1d(r[:, train], labels[train], r[:, test], labels[test], m)
                         for r in reps])
        total += np.take_along_axis(held, np.argmin(fit, axis=0)[None, :], axis=0)[0]
    ce = total / n / _LN2
    return np.clip(h_y - ce, 0.0, h_y)


def interaction_information_classifier_cd(r1: ArrayLike, r2: ArrayLike, s: ArrayLike, Ym: int | None = None,
                                          folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Interaction information (bits) of ``r1`` ``(d1,N)``, ``r2`` ``(d2,N)`` about discrete ``s`` ``(N,)``
    with the bounded :func:`mi_classifier_cd` for each term.

    Returns ``{"ii", "i_joint", "i_r1", "i_r2", "h_s"}``: ``ii = i_joint - i_r1 - i_r2`` with
    ``i_joint = I([R1; R2]; S)``; every MI term lies in ``[0, h_s]``, ``h_s`` the plug-in
    entropy of ``s``. Negative ``ii`` means redundancy, positive synergy.
    """
    a, b = _as_2d(r1, "r1"), _as_2d(r2, "r2")
    labels, m, _ = _as_labels(s, Ym, "s")
    _check_same_samples(r1=a, r2=b, s=labels)
    joint = mi_classifier_cd(np.vstack((a, b)), labels, m, folds, seed)
    i1 = mi_classifier_cd(a, labels, m, folds, seed)
    i2 = mi_classifier_cd(b, labels, m, folds, seed)
    return {"ii": joint - i1 - i2, "i_joint": joint, "i_r1": i1, "i_r2": i2, "h_s": entropy_discrete(labels, m)}
