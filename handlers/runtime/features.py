"""The class-specific features view (method 3) at serve time."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from handlers.runtime.bundle import Bundle
from handlers.runtime.errors import ArtifactError

FORMAT = "features/1"


class FeatureView:
    """Per-class feature subsets ``S_c`` and the classifier head ``W`` (C, D), ``b`` (C,)."""

    def __init__(self, layer: str, subsets: list[list[int]], weight: np.ndarray, bias: np.ndarray,
                 report: dict[str, Any]) -> None:
        self.layer = layer
        self.subsets = [np.asarray(s, dtype=np.int64) for s in subsets]
        self.weight = weight
        self.bias = bias
        self.report = report
        mask = np.zeros_like(weight)
        for c, s in enumerate(self.subsets):
            mask[c, s] = 1.0
        self.masked = weight * mask

    @classmethod
    def load(cls, bundle: Bundle, file: str) -> "FeatureView":
        doc = json.loads(bundle.path(file).read_text())
        if doc.get("format") != FORMAT:
            raise ArtifactError(f"{file} is not a {FORMAT} document")
        weight = np.asarray(doc["weight"], dtype=np.float64)
        bias = np.asarray(doc["bias"], dtype=np.float64)
        if weight.shape[0] != len(bundle.metadata.classes) or len(doc["subsets"]) != weight.shape[0]:
            raise ArtifactError(f"{file}: head has {weight.shape[0]} rows for {len(bundle.metadata.classes)} classes")
        if doc["layer"] not in {l.name for l in bundle.metadata.layers}:
            raise ArtifactError(f"{file}: layer {doc['layer']} is not an output of the classifier graph")
        return cls(doc["layer"], doc["subsets"], weight, bias, doc.get("report", {}))

    def explain(self, activation: np.ndarray, target: int) -> dict[str, Any]:
        """The ``features`` view for one image.

        activation: the layer's output for the image, any shape with D elements (e.g. (D, 1, 1)).
        ``contribution_i = W[t, i] h_i`` for i in S_t; ``share`` = contribution / (full logit - bias),
        i.e. the part of the target's weighted evidence this feature carries.
        """
        h = np.asarray(activation, dtype=np.float64).reshape(-1)
        if h.shape[0] != self.weight.shape[1]:
            raise ValueError(f"{self.layer} activation has {h.shape[0]} values, head expects {self.weight.shape[1]}")
        full = self.weight @ h + self.bias
        decomposed = self.masked @ h + self.bias
        subset = self.subsets[target]
        contrib = self.weight[target, subset] * h[subset]
        evidence = float(full[target] - self.bias[target])
        order = np.argsort(-contrib, kind="stable")
        return {
            "layer": self.layer, "subset_size": int(len(subset)),
            "decomposed_agrees": bool(np.argmax(decomposed) == np.argmax(full)),
            "decomposed_prediction": int(np.argmax(decomposed)),
            "target_logit": round(float(full[target]), 6),
            "decomposed_target_logit": round(float(decomposed[target]), 6),
            "contributions": [{"index": int(subset[i]), "contribution": round(float(contrib[i]), 6),
                               "share": round(float(contrib[i] / evidence), 6) if evidence != 0 else None}
                              for i in order],
        }
