"""How true served causal numbers are to the network, in the units a reader sees.

For images ``i``, concepts ``c`` and states ``x``: ``served`` holds the answer's
``P(target | do(c = x))`` and ``measured`` the network's own answer to the same
intervention (code channel set to the state's typical value, decoded, the rest of the
classifier run). Effects are ``p[x_o] - sum_x pi(x) p[x]`` with the same weights ``pi`` on
both sides. Everything here is plain numpy and has no notion of where the numbers came
from, so the export's validity report and a served answer's verification use one
definition.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def effects(p: np.ndarray, pi: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """``p[..., x_o] - sum_x pi[..., x] p[..., x]``.

    p, pi: (..., S); observed: int (...) the observed state. Returns (...)."""
    p = np.asarray(p, dtype=np.float64)
    at_obs = np.take_along_axis(p, np.asarray(observed, dtype=np.int64)[..., None], axis=-1)[..., 0]
    return at_obs - (np.asarray(pi, dtype=np.float64) * p).sum(axis=-1)


def ccc(served: np.ndarray, measured: np.ndarray) -> float | None:
    """Lin's concordance correlation with population moments:
    ``2 cov(s, m) / (var s + var m + (mean s - mean m)^2)``; None for fewer than two
    values, 1.0 when both sides are the same constant."""
    s, m = np.asarray(served, np.float64).ravel(), np.asarray(measured, np.float64).ravel()
    if s.size < 2:
        return None
    denom = s.var() + m.var() + (s.mean() - m.mean()) ** 2
    if denom == 0:
        return 1.0
    return float(2 * ((s - s.mean()) * (m - m.mean())).mean() / denom)


def ndcg_at_k(served: np.ndarray, measured: np.ndarray, k: int = 5) -> float | None:
    """nDCG@k of the ranking by ``|served|`` (descending; ties by position) with gain
    ``|measured|`` and discount ``log2(rank + 1)``; None when the ideal DCG is 0.

    served, measured: (C,) effects of one image's concepts."""
    gain = np.abs(np.asarray(measured, np.float64))
    order = np.argsort(-np.abs(np.asarray(served, np.float64)), kind="stable")[:k]
    discount = 1.0 / np.log2(np.arange(2, min(k, gain.size) + 2))
    ideal = float((np.sort(gain)[::-1][:k] * discount).sum())
    if ideal == 0:
        return None
    return float((gain[order] * discount[:order.size]).sum() / ideal)


def recall_at_k(served: np.ndarray, measured: np.ndarray, k: int = 3) -> float:
    """``|top-k by |served| ∩ top-k by |measured|| / k`` (ties by position); served,
    measured: (C,). With fewer than k concepts, k is the number of concepts."""
    s, m = np.abs(np.asarray(served, np.float64)), np.abs(np.asarray(measured, np.float64))
    k = min(k, s.size)
    if k == 0:
        return 1.0
    top_s = set(np.argsort(-s, kind="stable")[:k].tolist())
    top_m = set(np.argsort(-m, kind="stable")[:k].tolist())
    return len(top_s & top_m) / k


def weighted_sign_agreement(served: np.ndarray, measured: np.ndarray) -> float | None:
    """Share of ``|measured|`` mass whose served effect has the same sign (a served 0 agrees
    with nothing); None when every measured effect is 0."""
    s, m = np.asarray(served, np.float64).ravel(), np.asarray(measured, np.float64).ravel()
    w = np.abs(m)
    if w.sum() == 0:
        return None
    return float((w * (np.sign(s) == np.sign(m)) * (s != 0)).sum() / w.sum())


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than three values
    or a constant side."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    from scipy.stats import rankdata
    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass(frozen=True)
class Truth:
    """Effect-unit agreement of one set of served numbers with the network's.

    ``mae_p``: mean |served p - measured p| over (image, concept, state); ``mae``: mean
    |served effect - measured effect| over (image, concept); ``skill``: ``1 - mae / mean
    |measured effect|`` (answering "no effect" scores 0); ``ccc`` pooled; per image
    ``ndcg5`` (median), ``recall3`` (mean); ``sign``: sign agreement weighted by |measured|;
    ``spearman_resolved``: Spearman over pairs with |measured| above the noise floor;
    ``spearman`` pooled and ``spearman_per_image`` (mean) as diagnostics."""

    mae_p: float | None
    mae: float
    skill: float | None
    ccc: float | None
    ndcg5: float | None
    recall3: float | None
    sign: float | None
    spearman_resolved: float | None
    spearman: float | None
    spearman_per_image: float | None
    measured_mean_abs: float

    def to_json(self) -> dict[str, Any]:
        return {k: (None if v is None else round(float(v), 6)) for k, v in self.__dict__.items()}


#: Metrics where larger is better; the others (``mae_p``, ``mae``) are errors.
HIGHER_IS_BETTER = ("skill", "ccc", "ndcg5", "recall3", "sign", "spearman_resolved")
LOWER_IS_BETTER = ("mae_p", "mae")


def _nanmean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def truth(served_effect: np.ndarray, measured_effect: np.ndarray, floor: float | np.ndarray = 0.0,
          served_p: np.ndarray | None = None, measured_p: np.ndarray | None = None,
          order: np.ndarray | None = None) -> Truth:
    """The metrics of :class:`Truth` for effects (n, C) of n images and C concepts, with
    probabilities (n, C, S) when given (else ``mae_p`` is None). ``floor``: the noise floor,
    one number or one per concept (C,). ``order`` (n, C): non-negative ranking scores of the
    answer (larger first) for nDCG and recall; default |served effect|."""
    s = np.asarray(served_effect, np.float64)
    m = np.asarray(measured_effect, np.float64)
    if s.shape != m.shape or s.ndim != 2:
        raise ValueError(f"effects must both be (images, concepts), got {s.shape} and {m.shape}")
    mae = float(np.abs(s - m).mean())
    scale = float(np.abs(m).mean())
    rank = s if order is None else np.asarray(order, np.float64)
    per_image_ndcg = [ndcg_at_k(rank[i], m[i], 5) for i in range(len(s))]
    kept = [v for v in per_image_ndcg if v is not None]
    resolved = np.abs(m) > np.broadcast_to(np.asarray(floor, np.float64), m.shape)
    mae_p = None
    if served_p is not None and measured_p is not None:
        mae_p = float(np.abs(np.asarray(served_p, np.float64) - np.asarray(measured_p, np.float64)).mean())
    return Truth(
        mae_p=mae_p, mae=mae, skill=(1 - mae / scale) if scale > 0 else None, ccc=ccc(s, m),
        ndcg5=float(np.median(kept)) if kept else None,
        recall3=float(np.mean([recall_at_k(rank[i], m[i], 3) for i in range(len(s))])) if len(s) else None,
        sign=weighted_sign_agreement(s, m),
        spearman_resolved=spearman(s[resolved], m[resolved]),
        spearman=spearman(s, m),
        spearman_per_image=_nanmean([spearman(s[i], m[i]) for i in range(len(s))]),
        measured_mean_abs=scale)


def beats(answer: Truth, baseline: Truth) -> dict[str, bool]:
    """Per metric of :data:`HIGHER_IS_BETTER` and :data:`LOWER_IS_BETTER`: does ``answer``
    do strictly better than ``baseline`` (or equally well at the metric's best value, 0 for
    errors and 1 for the others, which nothing can improve on)? A metric the baseline
    cannot be scored on counts as beaten; one the answer cannot be scored on does not."""
    out: dict[str, bool] = {}
    for name in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER):
        a, b = getattr(answer, name), getattr(baseline, name)
        if a is None:
            out[name] = False
        elif b is None:
            out[name] = True
        else:
            best = 0.0 if name in LOWER_IS_BETTER else 1.0
            better = a < b if name in LOWER_IS_BETTER else a > b
            out[name] = better or (math.isclose(a, best, abs_tol=1e-12) and math.isclose(b, best, abs_tol=1e-12))
    return out


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``range(n)`` with no fixed point (identity for n < 2)."""
    if n < 2:
        return np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def columns_by_group(groups: Sequence[str]) -> Mapping[str, np.ndarray]:
    """Column indices of each group label (C,), in first-seen order."""
    labels = list(dict.fromkeys(groups))
    arr = np.asarray(groups)
    return {g: np.flatnonzero(arr == g) for g in labels}
