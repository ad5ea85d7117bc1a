"""Method 3 offline: class-specific penultimate features (Badola, Roy, Padmanabhan, Lal).

``h(x)`` is the globally pooled output of the last conv block (the input of the final
linear layer). For class ``c``, over its training images: L1-normalise ``h``, take each
image's top-k features, count how often each feature appears; ``S_c`` is the k most
frequent. The decomposed head keeps, for each class, only the weights of its subset.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.concepts import pooled_activations
from export.data.loader import ImageDataset
from export.device import to_numpy
from handlers.runtime.features import FORMAT, decomposed_head, subset_mask
from handlers.runtime.imaging import InputSpec


@dataclass(frozen=True)
class FeatureConfig:
    """``k`` >= 1: subset size; 0 < k < 1: the L1-mass variant (features holding share k)."""

    layer: str = "avgpool"
    head: str = "fc"
    k: float = 5
    selectivity_share: float = 0.8
    selectivity_layers: tuple[str, ...] | None = None  # None: the bundle's exported spatial layers
    finetune_epochs: int = 1
    seed: int = 0


def l1_normalise(h: np.ndarray) -> np.ndarray:
    """(N, D) -> rows divided by their L1 norm (rows of zeros stay zero)."""
    norm = np.abs(h).sum(axis=1, keepdims=True)
    return np.divide(h, norm, out=np.zeros_like(h, dtype=np.float64), where=norm > 0)


def mass_count(h: np.ndarray, share: float) -> np.ndarray:
    """Per row, the smallest number of features whose |h| holds ``share`` of the L1 mass. (N,)"""
    a = np.sort(np.abs(l1_normalise(h)), axis=1)[:, ::-1]
    return (np.cumsum(a, axis=1) < share - 1e-12).sum(axis=1) + 1


def class_subsets(h: np.ndarray, labels: np.ndarray, num_classes: int, k: float) -> list[list[int]]:
    """``S_c`` per class: the most frequent top-k features of the class's L1-normalised ``h``.

    h (N, D), labels (N,). With 0 < k < 1, each image contributes the features holding
    share k of its L1 mass and the subset size is the class's median of those counts.
    Ties in frequency go to the feature with the larger mean normalised value.
    """
    d = h.shape[1]
    hn = np.abs(l1_normalise(h))
    subsets = []
    for c in range(num_classes):
        rows = hn[labels == c]
        if len(rows) == 0:
            raise ValueError(f"class {c} has no training images")
        order = np.argsort(-rows, axis=1, kind="stable")
        if k >= 1:
            size = int(k)
            counts = np.bincount(order[:, :size].ravel(), minlength=d)
        else:
            per_image = mass_count(rows, k)
            size = int(np.median(per_image))
            mask = np.arange(d)[None, :] < per_image[:, None]
            counts = np.bincount(order[mask], minlength=d)
        key = counts + rows.mean(axis=0) / (rows.mean(axis=0).max() + 1e-12) * 0.5
        subsets.append(sorted(int(i) for i in np.argsort(-key, kind="stable")[:max(size, 1)]))
    return subsets


def decomposed_logits(h: np.ndarray, weight: np.ndarray, bias: np.ndarray, subsets: Sequence[Sequence[int]]) -> np.ndarray:
    """``logit_c = sum_{i in S_c} W[c, i] h_i + b_c``: h (N, D) -> (N, C)."""
    return h @ decomposed_head(weight, subsets).T + bias


def agreement_by_predicted_class(full: np.ndarray, decomposed: np.ndarray) -> list[float | None]:
    """Per class c: share of the rows the full head puts in c on which the decomposed head agrees.

    full, decomposed: (N, C) logits of the same images. Returns (C,) floats, None for a class
    the full head predicts for no row.
    """
    fp, dp = full.argmax(1), decomposed.argmax(1)
    return [float((dp[fp == c] == c).mean()) if np.any(fp == c) else None for c in range(full.shape[1])]


def selectivity(h: np.ndarray, share: float) -> float:
    """(D - median number of features holding ``share`` of the L1 mass) / D, for (N, D) pooled features."""
    return float((h.shape[1] - np.median(mass_count(h, share))) / h.shape[1])


def _finetune(h: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, subsets, epochs: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune the decomposed head (subset weights and biases only) with cross-entropy."""
    torch.manual_seed(seed)
    mask = torch.from_numpy(subset_mask(subsets, weight.shape).astype(np.float32))
    w = torch.tensor(weight, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-3)
    ht, yt = torch.tensor(h, dtype=torch.float32), torch.tensor(y)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(h)), max(len(h) // 128, 1)):
            loss = F.cross_entropy(ht[idx] @ (w * mask).T + b, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (w * mask).detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64)


def build_features(model: nn.Module, spec: InputSpec, train: ImageDataset, test: ImageDataset, out: Path,
                   cfg: FeatureConfig) -> dict[str, Any]:
    """Subsets, decomposed-head accuracy, fine-tuning, selectivity; writes ``features.json``.

    All head figures are measured on ``test`` (held out from the subset counting):
    ``agreement_decomposed_vs_full`` is the share of its images on which the decomposed head
    (no fine-tuning: the head the bundle serves) picks the full head's class, and
    ``agreement_decomposed_vs_full_by_predicted_class`` the same per full-head class (C,),
    None for a class the full head never predicts. The served ``features`` view repeats both.
    """
    t0 = time.perf_counter()
    head = dict(model.named_modules()).get(cfg.head)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"head {cfg.head!r} is not an nn.Linear module of the classifier")
    weight = to_numpy(head.weight).astype(np.float64)
    bias = to_numpy(head.bias).astype(np.float64) if head.bias is not None else np.zeros(weight.shape[0])
    layers = tuple(dict.fromkeys([cfg.layer, *(cfg.selectivity_layers or ())]))
    f_train, _ = pooled_activations(model, layers, train, spec)
    f_test, _ = pooled_activations(model, layers, test, spec)
    h_tr, h_te = f_train[cfg.layer], f_test[cfg.layer]
    if h_tr.shape[1] != weight.shape[1]:
        raise ValueError(f"{cfg.layer} has {h_tr.shape[1]} features but {cfg.head} takes {weight.shape[1]}")
    num_classes = weight.shape[0]
    subsets = class_subsets(h_tr, train.labels, num_classes, cfg.k)
    full = h_te @ weight.T + bias
    dec = decomposed_logits(h_te, weight, bias, subsets)
    report: dict[str, Any] = {
        "config": {**asdict(cfg), "selectivity_layers": list(cfg.selectivity_layers or ())},
        "features": int(weight.shape[1]),
        "subset_sizes": [len(s) for s in subsets],
        "distinct_features": len(set().union(*map(set, subsets))),
        "accuracy_full_head": float((full.argmax(1) == test.labels).mean()),
        "accuracy_decomposed_head": float((dec.argmax(1) == test.labels).mean()),
        "agreement_decomposed_vs_full": float((dec.argmax(1) == full.argmax(1)).mean()),
        "agreement_decomposed_vs_full_by_predicted_class": agreement_by_predicted_class(full, dec),
        "selectivity": {l: selectivity(f_train[l], cfg.selectivity_share) for l in layers},
        "test_images": len(test),
    }
    if cfg.finetune_epochs > 0:
        w2, b2 = _finetune(h_tr, train.labels, weight, bias, subsets, cfg.finetune_epochs, cfg.seed)
        report["accuracy_decomposed_finetuned"] = float(((h_te @ w2.T + b2).argmax(1) == test.labels).mean())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    doc = {"format": FORMAT, "layer": cfg.layer, "head": cfg.head, "subsets": subsets,
           "weight": weight.tolist(), "bias": bias.tolist(), "report": report}
    (out / "features.json").write_text(json.dumps(doc) + "\n")
    return report


def format_report(r: dict[str, Any]) -> str:
    """The report of :func:`build_features` as text lines."""
    lines = [f"class-specific features of {r['config']['layer']} (k={r['config']['k']:g}, {r['features']} features)",
             f"  accuracy, full head             {r['accuracy_full_head']:.4f}",
             f"  accuracy, decomposed head       {r['accuracy_decomposed_head']:.4f}",
             f"  decomposed agrees with full     {r['agreement_decomposed_vs_full']:.4f} "
             f"({r['test_images']} held-out images)"]
    if "accuracy_decomposed_finetuned" in r:
        lines.append(f"  accuracy, decomposed fine-tuned {r['accuracy_decomposed_finetuned']:.4f}")
    lines.append(f"  distinct features over classes  {r['distinct_features']}")
    for l, s in r["selectivity"].items():
        lines.append(f"  selectivity {l:<10} (share {r['config']['selectivity_share']:g})  {s:.3f}")
    return "\n".join(lines)
