"""Concept names: what distinguishes a concept beyond the class, on data whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from export.analysis.layers import Factor
from export.naming import (
    MIN_BITS,
    bits_beyond_class,
    class_determined,
    class_shares,
    name_concepts,
    pearson,
    preferred_end,
    spearman,
)

CLASSES = ("circle", "square", "star")
COLOURS = ("red", "green", "blue")


def _data(n: int = 1800, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n // 3)
    colour = rng.integers(0, 3, n)  # independent of the class
    size = rng.random(n)
    factors = {"shape": np.array([CLASSES[i] for i in labels]), "colour": colour.astype(np.float64), "size": size}
    kinds = {"shape": {"type": "categorical"}, "colour": {"type": "categorical", "levels": list(COLOURS)},
             "size": {"type": "continuous"}}
    noise = lambda: 0.05 * rng.random(n)  # noqa: E731
    values = np.stack([
        (labels == 0) * (1.0 + 2.0 * (colour == 2)) + noise(),  # circles, stronger when blue
        (labels == 1) * (0.2 + 3.0 * size) + noise(),  # squares, stronger when large
        np.full(n, 0.7),  # never varies
        (labels == 0) * (1.0 + 2.0 * (colour == 2)) + 1.01 * noise(),  # the same thing as concept 0
        (labels == 1) * (0.2 + 3.0 * (1 - size)) + noise(),  # squares too, but small ones
        (labels == 2) * 1.0 + noise(),  # stars, nothing beyond the class
    ], axis=1)
    return values, labels, factors, kinds


def test_names_say_what_tells_concepts_apart():
    values, labels, factors, kinds = _data()
    names = name_concepts(values, labels, CLASSES, factors, kinds)
    by = {n.channel: n for n in names}
    assert by[0].name == "circle 100% · colour blue" and by[0].factor == "colour" and by[0].bits >= MIN_BITS
    assert by[1].name == "square 100% · size high" and by[1].factor == "size"
    assert by[2].name is None  # a constant concept has no name
    assert by[3].name == by[0].name  # the same thing (correlation ~1): the same name
    assert by[4].name == "square 100% · size low"
    assert by[5].name == "star 100%" and by[5].factor is None and by[5].bits is None
    # the class factor is never a name part: the class determines it
    assert all("shape" not in (n.name or "") for n in names)
    assert by[0].klass == "circle" and by[0].class_share > 0.9


def test_without_factors_names_by_class_and_separates_what_differs():
    values, labels, _, _ = _data()
    names = name_concepts(values, labels, CLASSES)
    by = {n.channel: n for n in names}
    assert by[5].name == "star 100%"
    assert by[0].name == by[3].name  # the same thing keeps one name
    # concepts 1 and 4 both fire for squares but anti-correlate within them: they must differ
    assert by[1].name != by[4].name and by[1].name.startswith("square")
    assert by[0].name.startswith("circle")


def test_unselective_concept_is_any_class():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 400)
    values = rng.random((1200, 1))
    assert name_concepts(values, labels, CLASSES)[0].name == "any class"


def test_bits_beyond_class_reference():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(2), 600)
    x = rng.normal(size=1200)
    y = x + 0.1 * rng.normal(size=1200)
    # a factor carried strongly within each class versus one independent of the value
    strong = bits_beyond_class(x[None], Factor("y", "continuous", y[None]), labels)[0]
    none = bits_beyond_class(x[None], Factor("z", "continuous", rng.normal(size=(1, 1200))), labels)[0]
    # Gaussian reference: I = -0.5 log2(1 - rho^2), rho = 1 / sqrt(1.01)
    assert abs(strong - (-0.5 * np.log2(1 - 1 / 1.01))) < 0.25
    assert none < MIN_BITS
    # a class-determined factor is recognised and carries nothing beyond the class
    shape = Factor("shape", "categorical", labels.copy(), ("a", "b"))
    assert class_determined(shape, labels)
    assert not class_determined(Factor("c", "categorical", rng.integers(0, 2, 1200), ("p", "q")), labels)
    assert bits_beyond_class(x[None], shape, labels)[0] == 0.0


def test_helpers():
    labels = np.array([0, 0, 1, 1, 2] * 10)
    v = np.array([5.0, 4.0, 0.0, 0.0, 1.0] * 10)
    shares = class_shares(v, labels, 3)
    assert shares[0] == 1.0 and shares.sum() == 1.0  # top decile (>= 10 images) are all class 0
    assert class_shares(np.zeros(50), labels, 3).sum() == 0
    assert spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert spearman(np.ones(5), np.arange(5.0)) == 0.0 and pearson(np.ones(5), np.arange(5.0)) == 0.0
    assert pearson(np.arange(5.0), np.arange(5.0) ** 3) < 0.95  # not a rank measure
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    hue = Factor("hue", "circular", np.stack([np.cos(theta), np.sin(theta)]))
    peak = np.exp(4 * np.cos(theta - np.pi / 2))  # fires around a quarter turn (symmetric on the circle)
    assert preferred_end(peak, hue, period=1.0) == "hue ≈ 0.25"
