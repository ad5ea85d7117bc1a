"""Method 4: information-theoretic layer analysis (Xu et al. 2018; Ince et al. 2017).

For each chosen layer: mutual information (bits) between the layer's representation and
every generative factor of a controlled data set (``factors.csv``), per pooled channel and
for a PCA-reduced multivariate code; pose invariance as the interaction information between
the codes of two pose bins about the class; and, for the concepts of method 1, their names
(what tells each concept apart beyond the class: :mod:`export.naming`).

Estimators (``ESTIMATORS``, repeated in the result):

* continuous and circular factors: Gaussian-copula MI (:func:`gcmi.gcmi_cc`), a lower bound
  of the MI for any monotone marginals;
* categorical factors: the cross-validated classifier information
  (:func:`gcmi.mi_classifier_cd`), ``H(Y) - held-out cross-entropy`` floored at 0 — a lower
  bound too, and never above the factor's entropy ``H(Y)`` (``factor_entropy_bits``). The
  Gaussian-model figure :func:`gcmi.gcmi_model_cd` is *not* bounded by ``H(Y)`` (nearly
  separated classes give several times log2 of the class count); it is kept only as
  ``mi_pca_gaussian_model_bits`` (categorical factors; None elsewhere), never used for
  ranking or naming.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from export.analysis import gcmi
from export.concepts import pooled_activations
from export.data.loader import ImageDataset
from handlers.runtime.concepts import pooled_values
from handlers.runtime.heatmaps import colormap
from handlers.runtime.imaging import InputSpec

MAX_CATEGORIES = 32
ESTIMATORS = {
    "categorical": "cross-validated classifier information: max(0, H(Y) - 5-fold held-out cross-entropy of a "
                   "Gaussian class-conditional classifier), a lower bound of I never above H(Y)",
    "continuous": "Gaussian-copula MI (gcmi_cc)",
    "circular": "Gaussian-copula MI (gcmi_cc) of (cos, sin)",
    "gaussian_model": "gcmi_model_cd, Gaussian-model estimate for a categorical factor; not bounded by H(Y)",
}


@dataclass(frozen=True)
class Factor:
    """One generative factor encoded for GCMI: ``values`` (d, N) float or (N,) int classes."""

    name: str
    kind: str  # "categorical", "continuous" or "circular"
    values: np.ndarray
    levels: tuple[str, ...] = ()


def encode_factors(factors: dict[str, np.ndarray], kinds: dict[str, dict] | None) -> list[Factor]:
    """Factors as GCMI variables. ``kinds`` comes from ``factors.json``; without it, text and
    integer columns with at most 32 distinct values are categorical, the rest continuous.
    Circular factors (angles) become (cos, sin) pairs."""
    out = []
    for name, col in factors.items():
        kind_doc = (kinds or {}).get(name, {})
        kind = kind_doc.get("type")
        if kind is None:
            if col.dtype.kind in "US" or (np.all(np.isfinite(col)) and np.all(col == np.round(col))
                                          and len(np.unique(col)) <= MAX_CATEGORIES):
                kind = "categorical"
            else:
                kind = "continuous"
        if kind == "categorical":
            levels, codes = np.unique(col, return_inverse=True)
            if len(levels) < 2:
                continue
            names = tuple(str(kind_doc["levels"][int(l)]) if "levels" in kind_doc else str(l) for l in levels)
            out.append(Factor(name, kind, codes.astype(np.int64), names))
        elif kind == "circular":
            theta = 2 * np.pi * col.astype(np.float64) / float(kind_doc.get("period", 360.0))
            out.append(Factor(name, kind, np.stack([np.cos(theta), np.sin(theta)])))
        else:
            out.append(Factor(name, "continuous", col.astype(np.float64)[None, :]))
    return out


def factor_entropy(f: Factor) -> float | None:
    """Plug-in entropy (bits) of a categorical factor; None for the others."""
    return gcmi.entropy_discrete(f.values) if f.kind == "categorical" else None


def mi_with_factor(x: np.ndarray, f: Factor) -> float:
    """MI (bits) between a representation x (d, N) and a factor (estimators: ``ESTIMATORS``).

    For a categorical factor the result lies in [0, H(factor)].
    """
    if f.kind == "categorical":
        return gcmi.mi_classifier_cd(x, f.values)
    return gcmi.gcmi_cc(x, f.values)


def mi_gaussian_model(x: np.ndarray, f: Factor) -> float | None:
    """The unbounded Gaussian-model GCMI (bits) of x (d, N) with a categorical factor; None otherwise."""
    return gcmi.gcmi_model_cd(x, f.values) if f.kind == "categorical" else None


def mi_per_channel(p: np.ndarray, f: Factor) -> np.ndarray:
    """MI (bits) of each row of p (C, N) with the factor, as :func:`mi_with_factor`: (C,)."""
    if f.kind == "categorical":
        return gcmi.mi_classifier_cd_batch(p, f.values)
    if f.kind == "continuous":
        return gcmi.gcmi_cc_batch(p, f.values[0])
    return np.array([gcmi.gcmi_cc(row, f.values) for row in p])


def live_rows(p: np.ndarray) -> np.ndarray:
    """Rows of (C, N) with variance (dead ReLU channels carry no information and break copulas)."""
    return p[p.std(axis=1) > 1e-8 * (np.abs(p).max() + 1e-12)]


def pca_code(p: np.ndarray, d: int) -> np.ndarray:
    """Top-d principal components of standardised rows of p (C, N) -> (d, N)."""
    p = live_rows(p)
    z = (p - p.mean(axis=1, keepdims=True)) / p.std(axis=1, keepdims=True)
    u, _, _ = np.linalg.svd(z @ z.T / z.shape[1])
    return u[:, :min(d, z.shape[0])].T @ z


def pose_invariance(code: np.ndarray, pose: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """Interaction information between the codes of two pose bins about the class.

    Images below / above the pose factor's median form two bins; within each class the
    i-th image of one bin is paired with the i-th of the other (classes with too few pairs
    for the estimate are left out), giving samples
    (r1, r2, class). ``II = I([R1; R2]; S) - I(R1; S) - I(R2; S)``; negative = redundancy:
    both poses carry the same class information. ``redundancy = -II / mean(I(R1;S), I(R2;S))``
    is the share of the class information the two poses have in common: high for a
    pose-invariant class code, near 0 for one that carries the class in one pose only.
    Every MI term is the bounded :func:`gcmi.mi_classifier_cd`, within [0, H(S)]
    (``class_entropy_bits``, the plug-in entropy of the paired samples' classes).

    code: (d, N); pose: (N,) continuous; classes: (N,) integer labels.
    """
    low = pose <= np.median(pose)
    r1, r2, s = [], [], []
    for c in np.unique(classes):
        a = np.flatnonzero(low & (classes == c))
        b = np.flatnonzero(~low & (classes == c))
        n = min(len(a), len(b))
        if n <= 2 * code.shape[0] + 1:  # too few pairs for a (2d)-dimensional Gaussian in this class
            continue
        r1.append(code[:, a[:n]])
        r2.append(code[:, b[:n]])
        s.append(np.full(n, c))
    if len(s) < 2:
        return {"error": "fewer than two classes have enough images in both pose bins"}
    R1, R2, S = np.concatenate(r1, axis=1), np.concatenate(r2, axis=1), np.concatenate(s)
    _, S = np.unique(S, return_inverse=True)
    t = gcmi.interaction_information_classifier_cd(R1, R2, S)
    ii, i1, i2 = t["ii"], t["i_r1"], t["i_r2"]
    return {"ii_bits": float(ii), "i_bin1_bits": float(i1), "i_bin2_bits": float(i2),
            "i_joint_bits": float(t["i_joint"]), "class_entropy_bits": float(t["h_s"]),
            "redundancy": float(-ii / max((i1 + i2) / 2, 1e-9)), "pairs": int(S.size)}


def analyse(model: torch.nn.Module, ds: ImageDataset, spec: InputSpec, layers: Sequence[str],
            kinds: dict[str, dict] | None, pca_dims: int = 4, pose_factor: str = "pos_x",
            concept_encoders: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full analysis. ``concept_encoders``: layer -> onnxruntime session (method 1),
    for naming concepts; the layers of the encoders are captured too.

    Result keys: ``mi_pca_bits``, ``mi_best_channel_bits``, ``mi_mean_channel_bits`` (layers x
    factors, estimators as :func:`mi_with_factor`: a categorical factor's entries never
    exceed ``factor_entropy_bits[factor]``); ``mi_pca_gaussian_model_bits`` (the unbounded
    Gaussian-model figure, categorical factors only, None elsewhere); ``estimators``;
    ``pose_invariance``; ``concept_names`` (per concept its name, :func:`export.naming.name_concepts`,
    and ``all_bits``: its bounded MI with every factor).
    """
    if ds.factors is None:
        raise ValueError("the data set has no factors.csv: nothing to analyse against")
    t0 = time.perf_counter()
    factors = encode_factors(ds.factors, kinds)
    enc_layers = list(concept_encoders or {})
    pooled, raw = pooled_activations(model, layers, ds, spec, keep_raw=enc_layers)
    pooled = {l: v.T for l, v in pooled.items()}  # GCMI wants samples on the last axis: (C, N)
    classes = ds.labels
    result: dict[str, Any] = {"layers": list(layers), "factors": [f.name for f in factors],
                              "kinds": {f.name: f.kind for f in factors}, "images": len(ds),
                              "estimators": {k: v for k, v in ESTIMATORS.items()
                                             if k == "gaussian_model" or any(f.kind == k for f in factors)},
                              "factor_entropy_bits": {f.name: round(h, 4) for f in factors
                                                      if (h := factor_entropy(f)) is not None},
                              "pca_dims": pca_dims, "mi_pca_bits": [], "mi_best_channel_bits": [],
                              "mi_mean_channel_bits": [], "mi_pca_gaussian_model_bits": [],
                              "pose_factor": pose_factor, "pose_invariance": {}}
    pose = next((f for f in factors if f.name == pose_factor), None)
    for l in layers:
        p = live_rows(pooled[l])
        code = pca_code(p, pca_dims)
        per = [mi_per_channel(p, f) for f in factors]
        result["mi_pca_bits"].append([round(mi_with_factor(code, f), 4) for f in factors])
        result["mi_pca_gaussian_model_bits"].append(
            [None if (g := mi_gaussian_model(code, f)) is None else round(g, 4) for f in factors])
        result["mi_best_channel_bits"].append([round(float(np.max(v)), 4) for v in per])
        result["mi_mean_channel_bits"].append([round(float(np.mean(v)), 4) for v in per])
        if pose is not None and pose.kind != "categorical":
            result["pose_invariance"][l] = pose_invariance(code, pose.values[0], classes)
    if concept_encoders:
        from export.naming import name_concepts
        names: dict[str, list[dict[str, Any]]] = {}
        for l, sess in concept_encoders.items():
            z = sess.run(None, {sess.get_inputs()[0].name: raw[l].astype(np.float32)})[0]
            values = pooled_values(z).T.astype(np.float64)  # (K, N): the concept variables
            live = values.std(axis=1) > 1e-8 * (np.abs(values).max(axis=1) + 1e-12)
            per_factor = {f.name: mi_per_channel(values[live], f) for f in factors} if live.any() else {}
            named = name_concepts(values.T, classes, ds.classes, ds.factors, kinds)
            entries: list[dict[str, Any]] = []
            for c, j in enumerate(np.cumsum(live) - 1):  # j: the row among the live ones
                bits = {name: round(float(v[j]), 4) for name, v in per_factor.items()} if live[c] else {}
                entries.append({**named[c].to_json(), "all_bits": bits})
            names[l] = entries
        result["concept_names"] = names
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def heatmap_png(result: dict[str, Any], path: str | Path, key: str = "mi_pca_bits") -> None:
    """Layers x factors heatmap of MI in bits, with the values written in the cells."""
    rows, cols = result["layers"], result["factors"]
    m = np.asarray(result[key], dtype=np.float64)
    cw, ch, left, top = 78, 34, 80, 46
    img = Image.new("RGB", (left + cw * len(cols) + 10, top + ch * len(rows) + 30), "white")
    draw = ImageDraw.Draw(img)
    vmax = max(float(m.max()), 1e-9)
    for j, name in enumerate(cols):
        draw.text((left + j * cw + 4, top - 18), name[:11], fill="black")
    for i, name in enumerate(rows):
        draw.text((6, top + i * ch + 11), name[:11], fill="black")
        for j in range(len(cols)):
            rgb = tuple(int(v * 255) for v in colormap(np.array(m[i, j] / vmax)))
            x0, y0 = left + j * cw, top + i * ch
            draw.rectangle([x0, y0, x0 + cw - 2, y0 + ch - 2], fill=rgb)
            lum = 0.3 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2]
            draw.text((x0 + 18, y0 + 11), f"{m[i, j]:.2f}", fill="black" if lum > 110 else "white")
    draw.text((left, 8), f"MI (bits), {key.replace('mi_', '').replace('_bits', '')}, {result['images']} images",
              fill="black")
    img.save(path)


def format_report(result: dict[str, Any]) -> str:
    cols = result["factors"]
    lines = ["MI (bits) of the PCA code with each factor", "layer      " + " ".join(f"{c[:10]:>10}" for c in cols)]
    for l, row in zip(result["layers"], result["mi_pca_bits"]):
        lines.append(f"{l:<10} " + " ".join(f"{v:10.3f}" for v in row))
    entropies = result.get("factor_entropy_bits", {})
    if entropies:
        lines.append("H(factor)  " + " ".join(f"{entropies[c]:10.3f}" if c in entropies else f"{'':>10}"
                                             for c in cols))
    for kind, text in result.get("estimators", {}).items():
        lines.append(f"  estimator, {kind}: {text}")
    if result["pose_invariance"]:
        lines.append(f"pose invariance over {result['pose_factor']} bins (shared share of the class information)")
        for l, v in result["pose_invariance"].items():
            if "error" in v:
                lines.append(f"  {l:<10} not estimated: {v['error']}")
            else:
                lines.append(f"  {l:<10} II {v['ii_bits']:+.3f} bits   redundancy {v['redundancy']:.2f}")
    for l, entries in result.get("concept_names", {}).items():
        lines.append(f"concepts of {l}: " + ", ".join(
            f"c{e['channel']}={e['name']}" + (f" ({e['bits']:.2f} bits beyond the class)" if e["bits"] else "")
            if e["name"] else f"c{e['channel']}=silent"
            for e in entries))
    return "\n".join(lines)


def save(result: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    heatmap_png(result, out / "layer_analysis.png")
    return out
