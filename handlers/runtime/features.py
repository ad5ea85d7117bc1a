"""The class-specific features view (method 3) at serve time.

For pooled penultimate features ``h`` (D,), head ``W`` (C, D), ``b`` (C,) and per-class
subsets ``S_c``, the full head's logit splits exactly into three parts::

    logit_c = sum_{i in S_c} W[c, i] h_i  +  sum_{i not in S_c} W[c, i] h_i  +  b_c
            = (decomposed logit_c - b_c)  +  outside_c                      +  b_c

The decomposed head (Badola et al., "Decomposing the Deep") keeps only the first part and
the bias. When it disagrees with the full head, the reason is in the ``outside`` parts: the
answer shows them for the target and for the runner-up class, split into positive and
negative sums, so a reader sees which class lost the evidence that kept it down.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from handlers.runtime.answer import Contribution, Features, OutsideSubset, RunnerUp
from handlers.runtime.bundle import Bundle, read_document
from handlers.runtime.errors import ArtifactError

FORMAT = "features/1"


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)


def subset_mask(subsets: Sequence[Sequence[int] | np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Boolean (C, D) mask of the decomposed head: row c is True exactly at the features of S_c."""
    mask = np.zeros(shape, dtype=bool)
    for c, s in enumerate(subsets):
        mask[c, np.asarray(s, dtype=np.int64)] = True
    return mask


def decomposed_head(weight: np.ndarray, subsets: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    """The decomposed head's weights: ``W`` (C, D) with every weight outside its class's subset
    set to 0, so ``decomposed logit_c = (W_masked @ h)_c + b_c``. Export and serving both use it."""
    weight = np.asarray(weight)
    return weight * subset_mask(subsets, weight.shape)


class FeatureView:
    """Per-class feature subsets ``S_c`` and the classifier head ``W`` (C, D), ``b`` (C,).

    ``report`` is the export report stored in the artifact (``features.json``); its
    held-out agreement figures are repeated in every answer. ``classes``: the class labels
    (C,), used to label the runner-up; without them the runner-up has no ``label``.
    """

    def __init__(self, layer: str, subsets: Sequence[Sequence[int]], weight: np.ndarray, bias: np.ndarray,
                 report: dict[str, Any], classes: Sequence[str] | None = None) -> None:
        self.layer = layer
        self.subsets = [np.asarray(s, dtype=np.int64) for s in subsets]
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        self.report = report
        self.classes = tuple(classes) if classes is not None else None
        self.mask = subset_mask(self.subsets, self.weight.shape)
        self.masked = decomposed_head(self.weight, self.subsets)
        per_class = report.get("agreement_decomposed_vs_full_by_predicted_class")
        self._agreement_by_class: list[float | None] | None = (
            list(per_class) if isinstance(per_class, list) and len(per_class) == self.weight.shape[0] else None)

    @classmethod
    def load(cls, bundle: Bundle, file: str) -> FeatureView:
        doc = read_document(bundle.path(file), FORMAT)
        weight = np.asarray(doc["weight"], dtype=np.float64)
        bias = np.asarray(doc["bias"], dtype=np.float64)
        if weight.shape[0] != len(bundle.metadata.classes) or len(doc["subsets"]) != weight.shape[0]:
            raise ArtifactError(f"{file}: head has {weight.shape[0]} rows for {len(bundle.metadata.classes)} classes")
        if doc["layer"] not in {l.name for l in bundle.metadata.layers}:
            raise ArtifactError(f"{file}: layer {doc['layer']} is not an output of the classifier graph")
        return cls(doc["layer"], doc["subsets"], weight, bias, doc.get("report", {}), bundle.metadata.classes)

    def _subset_contributions(self, h: np.ndarray, c: int) -> list[Contribution]:
        """Class ``c``'s subset features, largest contribution first.

        ``contribution_i = W[c, i] h_i`` for i in S_c; ``share`` = contribution / (full logit_c - b_c),
        None when that evidence is exactly 0. h: (D,).
        """
        subset = self.subsets[c]
        contrib = self.weight[c, subset] * h[subset]
        evidence = float(self.weight[c] @ h)
        order = np.argsort(-contrib, kind="stable")
        return [Contribution(index=int(subset[i]), contribution=float(contrib[i]),
                             share=float(contrib[i] / evidence) if evidence != 0 else None) for i in order]

    def _outside(self, h: np.ndarray, c: int) -> OutsideSubset:
        """Evidence of the features outside ``S_c`` for class ``c``: ``W[c, i] h_i`` for i not in S_c.

        h: (D,). ``positive`` and ``negative`` are the sums of the positive and negative terms;
        ``total`` = positive + negative = full logit_c - decomposed logit_c.
        """
        terms = self.weight[c, ~self.mask[c]] * h[~self.mask[c]]
        pos = float(terms[terms > 0].sum())
        neg = float(terms[terms < 0].sum())
        return OutsideSubset(features=int(terms.size), positive=pos, negative=neg, total=pos + neg)

    def runner_up(self, full: np.ndarray, target: int) -> int | None:
        """The class the target is compared with: the full head's second class when the target
        is its top class, else its top class. full: (C,) logits. None with a single class."""
        if full.shape[0] < 2:
            return None
        order = np.argsort(-full, kind="stable")
        return int(order[1]) if int(order[0]) == target else int(order[0])

    def explain(self, activation: np.ndarray, target: int) -> Features:
        """The ``features`` view for one image.

        activation: the layer's output for the image, any shape with D elements (e.g. (D, 1, 1)).
        ``contributions``: the target's subset features (``contribution_i = W[t, i] h_i`` for
        i in S_t; ``share`` = contribution / (full logit - bias)). ``outside_subset``: the
        target's evidence from the features not in S_t. ``runner_up``: the same breakdown for
        the class compared with the target (see :meth:`runner_up`), with its full and
        decomposed logits. ``decomposed_agreement_held_out``: share of the export's held-out
        images on which the decomposed head's class equals the full head's (None for an
        artifact without that figure); ``decomposed_agreement_held_out_class``: the same over
        the held-out images the full head puts in this image's full-head class.
        """
        h = np.asarray(activation, dtype=np.float64).reshape(-1)
        if h.shape[0] != self.weight.shape[1]:
            raise ValueError(f"{self.layer} activation has {h.shape[0]} values, head expects {self.weight.shape[1]}")
        full = self.weight @ h + self.bias
        decomposed = self.masked @ h + self.bias
        predicted, dec_pred = int(np.argmax(full)), int(np.argmax(decomposed))
        by_class = self._agreement_by_class
        other = self.runner_up(full, target)
        runner_up = None
        if other is not None:
            runner_up = RunnerUp(
                index=other, label=self.classes[other] if self.classes is not None else None,
                logit=float(full[other]), decomposed_logit=float(decomposed[other]), bias=float(self.bias[other]),
                subset_size=int(len(self.subsets[other])),
                contributions=self._subset_contributions(h, other),
                outside_subset=self._outside(h, other))
        return Features(
            layer=self.layer, subset_size=int(len(self.subsets[target])),
            decomposed_agrees=bool(dec_pred == predicted),
            decomposed_prediction=dec_pred,
            decomposed_prediction_logit=float(decomposed[dec_pred]),
            target_logit=float(full[target]),
            decomposed_target_logit=float(decomposed[target]),
            target_bias=float(self.bias[target]),
            contributions=self._subset_contributions(h, target),
            outside_subset=self._outside(h, target),
            runner_up=runner_up,
            decomposed_agreement_held_out=_optional_float(self.report.get("agreement_decomposed_vs_full")),
            decomposed_agreement_held_out_class=_optional_float(by_class[predicted]) if by_class else None,
            held_out_images=self.report.get("test_images"),
        )
