"""Concept names that tell concepts apart.

Late concepts all carry the class, so the factor a concept shares most information with is
nearly always the class factor, and "shape" names almost every concept. A name here says
what distinguishes the concept *beyond* the class, built from parts with figures:

1. **class part**: the class most common among the concept's top-decile images (its highest
   pooled values), when that share is at least :data:`SELECTIVE` times chance (and 25 %),
   followed by that share ("circle 92%"); else "any class".
2. **factor part** (only where the data have generative factors): the factor with the
   largest information once the class is accounted for, ``I(value; factor | class) =
   sum_k p(k) I(value; factor | class = k)``, each term estimated within one class with the
   bounded estimators of the layer analysis (Gaussian-copula MI for continuous and circular
   factors, cross-validated classifier information for categorical ones); only when it is at
   least :data:`MIN_BITS`. Factors the class determines (one level per class) carry nothing
   beyond it and are skipped. The part says which end the concept prefers: the level with the
   highest mean value (categorical), "high"/"low" by the sign of the rank correlation
   (continuous), or the value-weighted circular mean (circular).

Two concepts of a layer whose names coincide keep the same name only when their values
agree (Pearson correlation at least :data:`SAME_THING` over the images: dominated by where
the concepts fire, not by the ranks of near-zero values); otherwise
each takes its next part (the next factor above :data:`MIN_BITS`, else its second class)
and, if the names still coincide, an ordinal ("#2") telling the reader to look at the atlas.
Names are compared without the class share: two concepts differing only in it have the same
name plus different figures, not different names.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.analysis.layers import Factor, encode_factors, mi_per_channel

SELECTIVE = 2.0  # the class part needs this many times the chance share among the top images
MIN_BITS = 0.05  # least conditional information (bits) for a factor part
SAME_THING = 0.9  # Pearson correlation above which two concepts carry the same thing
TOP_SHARE = 0.1  # the top images: this share of the images with the highest values
MIN_CLASS_IMAGES = 20  # classes with fewer images are left out of the conditional information
MAX_IMAGES = 4000  # images the names are computed on (a fixed subsample beyond)


@dataclass
class ConceptName:
    """A concept's name and the figures behind it. ``bits``: the named factor's information
    beyond the class (None without a factor part); ``parts``: the name's parts, most
    important first, and ``spare``: further parts used only to tell colliding names apart."""

    channel: int
    name: str | None
    bits: float | None = None
    klass: str | None = None
    class_share: float | None = None
    factor: str | None = None
    parts: list[str] = field(default_factory=list)
    spare: list[str] = field(default_factory=list)
    factor_bits: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"channel": self.channel, "name": self.name, "bits": self.bits, "class": self.klass,
                "class_share": self.class_share, "factor": self.factor,
                "bits_beyond_class": {k: round(v, 4) for k, v in self.factor_bits.items()}}


def top_images(values: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    """Indices of the top ``share`` of ``values`` (N,) among those above zero, at least 10 (fewer
    when fewer fire), highest first."""
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0]
    return order[:max(10, int(round(share * len(values))))]


def class_shares(values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class among the top images of one concept: (num_classes,), zeros when it never fires."""
    top = top_images(values)
    if top.size == 0:
        return np.zeros(num_classes)
    return np.bincount(labels[top], minlength=num_classes) / top.size


def class_determined(f: Factor, labels: np.ndarray) -> bool:
    """A categorical factor with one level per class carries nothing beyond the class."""
    if f.kind != "categorical":
        return False
    return all(np.unique(f.values[labels == k]).size <= 1 for k in np.unique(labels))


def bits_beyond_class(values: np.ndarray, f: Factor, labels: np.ndarray) -> np.ndarray:
    """``I(value; factor | class)`` in bits for each concept: values (K, N) -> (K,), the
    class-weighted mean of the information within each class (classes with fewer than
    :data:`MIN_CLASS_IMAGES` images, or where the factor or a concept does not vary, add 0)."""
    k, n = values.shape
    total = np.zeros(k)
    for c in np.unique(labels):
        sel = labels == c
        if sel.sum() < MIN_CLASS_IMAGES:
            continue
        fv = f.values[..., sel]
        if f.kind == "categorical" and np.unique(fv).size < 2:
            continue
        v = values[:, sel]
        live = v.std(axis=1) > 1e-8 * (np.abs(v).max(axis=1) + 1e-12)
        if not live.any():
            continue
        part = np.zeros(k)
        part[live] = mi_per_channel(v[live], Factor(f.name, f.kind, fv, f.levels))
        total += sel.mean() * part
    return total


def _rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two value vectors (N,); 0 when either is constant."""
    if a.std() == 0 or b.std() == 0:
        return 0.0
    ra, rb = _rank(a), _rank(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two value vectors (N,); 0 when either is constant."""
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def preferred_end(values: np.ndarray, f: Factor, period: float = 1.0) -> str:
    """Which end of factor ``f`` one concept's values (N,) prefer, as a phrase."""
    if f.kind == "categorical":
        means = [values[f.values == i].mean() if np.any(f.values == i) else -np.inf for i in range(len(f.levels))]
        return f"{f.name} {f.levels[int(np.argmax(means))]}"
    if f.kind == "circular":
        w = np.clip(values, 0, None) + 1e-12
        angle = float(np.arctan2((w * f.values[1]).sum(), (w * f.values[0]).sum())) % (2 * np.pi)
        return f"{f.name} ≈ {angle / (2 * np.pi) * period:.3g}"
    return f"{f.name} {'high' if spearman(values, f.values[0]) >= 0 else 'low'}"


def name_concepts(values: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                  factors: dict[str, np.ndarray] | None = None, kinds: dict[str, dict] | None = None
                  ) -> list[ConceptName]:
    """Names of one layer's concepts. values: pooled values (N, K); labels: (N,) class
    indices into ``classes``; factors: factor name -> (N,) (``factors.csv``), with
    ``kinds`` from ``factors.json``. Returns one :class:`ConceptName` per concept (name None
    for a concept that never varies)."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels)
    if len(values) > MAX_IMAGES:
        keep = np.sort(np.random.default_rng(0).permutation(len(values))[:MAX_IMAGES])
        values, labels = values[keep], labels[keep]
        factors = None if factors is None else {k: np.asarray(v)[keep] for k, v in factors.items()}
    n, k = values.shape
    chance = 1.0 / max(len(classes), 1)
    usable = [f for f in encode_factors(factors, kinds) if not class_determined(f, labels)] if factors else []
    beyond = {f.name: bits_beyond_class(values.T, f, labels) for f in usable}
    out = []
    for c in range(k):
        v = values[:, c]
        if v.std() <= 1e-8 * (np.abs(v).max() + 1e-12):
            out.append(ConceptName(c, None))
            continue
        shares = class_shares(v, labels, len(classes))
        ranked = np.argsort(-shares, kind="stable")
        best, share = int(ranked[0]), float(shares[ranked[0]])
        selective = share >= max(SELECTIVE * chance, 0.25)
        parts = [classes[best] if selective else "any class"]
        bits = {name: float(b[c]) for name, b in beyond.items()}
        strong = sorted((f for f in usable if bits[f.name] >= MIN_BITS), key=lambda f: -bits[f.name])
        period = {f.name: float((kinds or {}).get(f.name, {}).get("period", 360.0)) for f in usable}
        phrases = [preferred_end(v, f, period[f.name]) for f in strong]
        name = ConceptName(c, None, klass=classes[best] if selective else None, class_share=round(share, 4),
                           factor_bits=bits)
        if phrases:
            parts.append(phrases[0])
            name.factor, name.bits = strong[0].name, round(bits[strong[0].name], 4)
        second = int(ranked[1]) if len(ranked) > 1 and shares[ranked[1]] > 0 else None
        name.spare = phrases[1:] + ([f"then {classes[second]}"] if second is not None else [])
        name.parts = parts
        name.name = " · ".join(parts)
        out.append(name)
    _separate(out, values)
    for name in out:  # the figure behind the class part, once the names are told apart
        if name.name is not None and name.klass is not None and name.class_share is not None:
            name.name = f"{name.klass} {name.class_share:.0%}" + name.name[len(name.klass):]
    return out


def _separate(names: list[ConceptName], values: np.ndarray) -> None:
    """Give colliding names their spare parts, then ordinals, unless the concepts carry the
    same thing (correlation >= :data:`SAME_THING` with every other of the group)."""
    for _ in range(4):
        groups: dict[str, list[ConceptName]] = {}
        for n in names:
            if n.name is not None:
                groups.setdefault(n.name, []).append(n)
        clashes = [g for g in groups.values() if len(g) > 1 and not all(
            pearson(values[:, a.channel], values[:, b.channel]) >= SAME_THING for a in g for b in g if a is not b)]
        if not clashes:
            return
        extended = False
        for g in clashes:
            for n in g:
                if n.spare:
                    n.parts.append(n.spare.pop(0))
                    n.name = " · ".join(n.parts)
                    extended = True
        if not extended:
            for g in clashes:
                for i, n in enumerate(sorted(g, key=lambda n: n.channel)):
                    n.name = f"{n.name} #{i + 1}"
            return
