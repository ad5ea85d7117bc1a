"""Concept variables: code maps -> pooled values -> discrete states (heatmaps: heatmaps.py).

One implementation used by export (to fit the bins and the Bayesian network) and by
serving (to turn the encoders' code maps into evidence). Stored as ``concepts.json``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.runtime.atlas import LayerAtlas
from handlers.runtime.bundle import checked_document, read_document

FORMAT = "concepts/1"


def concept_id(layer: str, channel: int) -> str:
    return f"{layer}/c{channel}"


def evidence_row(states: Mapping[str, np.ndarray], row: int) -> dict[str, int]:
    """The evidence of one image: {concept id: state} from per-layer states (layer -> (N, K))."""
    return {concept_id(l, c): int(s[row, c]) for l, s in states.items() for c in range(s.shape[1])}


def pooled_values(codes: np.ndarray) -> np.ndarray:
    """Spatial max of each code channel: (N, K, H, W) -> (N, K) (docs/methods.md)."""
    codes = np.asarray(codes)
    if codes.ndim != 4:
        raise ValueError(f"code maps must be (N, K, H, W), got shape {codes.shape}")
    return codes.max(axis=(2, 3))


def set_code_peak(codes: np.ndarray, channel: int, value: float) -> np.ndarray:
    """``do(concept = state)`` in code space: a copy of codes (N, K, H, W) whose ``channel``
    is rescaled so its spatial max is ``value``, or is a flat map of ``value`` where the
    channel is silent (max <= 1e-6)."""
    out = np.array(codes, dtype=np.float32, copy=True)
    set_peaks_in_place(out, channel, value)
    return out


def set_peaks_in_place(codes: np.ndarray, channel: int | np.ndarray, values: float | np.ndarray) -> None:
    """The rule of :func:`set_code_peak`, in place on float32 codes (N, K, H, W): one channel
    for every row or one per row (N,), one value for every row or one per row (N,)."""
    n = codes.shape[0]
    rows = np.arange(n)
    chans = np.broadcast_to(np.asarray(channel, dtype=np.int64), (n,))
    values = np.broadcast_to(np.asarray(values, dtype=np.float32), (n,))
    peak = codes[rows, chans].max(axis=(1, 2))
    live = peak > 1e-6
    codes[rows[live], chans[live]] *= (values[live] / peak[live])[:, None, None]
    codes[rows[~live], chans[~live]] = values[~live][:, None, None]


def probe_states(typical: np.ndarray, peaks: np.ndarray, probes: int) -> np.ndarray:
    """Which states the network is run at when only ``probes`` of the S are: for each concept,
    the states whose typical value lies farthest from its observed peak (ties: lower state),
    in increasing state order.

    typical (K, S); peaks (K,) the code channels' observed spatial max (0 for a silent
    channel). Returns int64 (K, probes)."""
    typical, peaks = np.asarray(typical, np.float64), np.asarray(peaks, np.float64)
    s = typical.shape[1]
    probes = min(max(int(probes), 1), s)
    distance = np.abs(typical - peaks[:, None])
    # stable sort on -distance keeps the lower state first among equals
    farthest = np.argsort(-distance, axis=1, kind="stable")[:, :probes]
    return np.sort(farthest, axis=1)


def interpolate_states(typical: np.ndarray, peaks: np.ndarray, anchor: float, probed: np.ndarray,
                       probed_p: np.ndarray) -> np.ndarray:
    """``P(target | do(c = x))`` for every state from the network's answers at some of them.

    The probability is taken as piecewise linear in the value the intervention gives the code
    peak, through the unchanged code (x = the observed peak, y = ``anchor``) and the probed
    states (x = their typical values, y = ``probed_p``), continued by the outer segments'
    lines beyond the outer points. Probed states keep their network values exactly.

    typical (K, S); peaks (K,); anchor: P(target) with the layer's autoencoder spliced in
    and the code unchanged; probed int (K, P) and probed_p (K, P) from :func:`probe_states`
    and the network. Returns float64 (K, S)."""
    typical, peaks = np.asarray(typical, np.float64), np.asarray(peaks, np.float64)
    probed, probed_p = np.asarray(probed, np.int64), np.asarray(probed_p, np.float64)
    k = typical.shape[0]
    xs = np.concatenate([peaks[:, None], np.take_along_axis(typical, probed, axis=1)], axis=1)  # (K, P+1)
    ys = np.concatenate([np.full((k, 1), float(anchor)), probed_p], axis=1)
    order = np.argsort(xs, axis=1, kind="stable")
    xs, ys = np.take_along_axis(xs, order, axis=1), np.take_along_axis(ys, order, axis=1)
    # segment of each state's value: the last point at or below it, kept inside [0, P-1]
    seg = (xs[:, None, :] <= typical[:, :, None]).sum(axis=2) - 1  # (K, S)
    seg = np.clip(seg, 0, xs.shape[1] - 2)
    x0, x1 = np.take_along_axis(xs, seg, axis=1), np.take_along_axis(xs, seg + 1, axis=1)
    y0, y1 = np.take_along_axis(ys, seg, axis=1), np.take_along_axis(ys, seg + 1, axis=1)
    dx = x1 - x0
    slope = np.divide(y1 - y0, dx, out=np.zeros_like(dx), where=np.abs(dx) > 1e-12)
    out = y0 + (typical - x0) * slope
    np.put_along_axis(out, probed, probed_p, axis=1)
    return out


def fit_edges(values: np.ndarray, states: int) -> np.ndarray:
    """Quantile bin edges per channel: (N, K) -> (K, states - 1)."""
    qs = np.arange(1, states) / states
    return np.quantile(np.asarray(values, dtype=np.float64), qs, axis=0).T.copy()


def discretise(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """State of each value = number of its channel's edges strictly below it.

    values (N, K), edges (K, S-1) -> int64 (N, K) in 0..S-1. Ties with an edge fall in the
    lower state, so a channel that is mostly exactly zero keeps its zeros in state 0.
    """
    v = np.asarray(values, dtype=np.float64)
    return (v[:, :, None] > np.asarray(edges)[None, :, :]).sum(axis=2).astype(np.int64)


@dataclass(frozen=True)
class ConceptLayer:
    """Concepts of one layer: the classifier output feeding it, its encoder/decoder ONNX files,
    bin edges (K, S-1) and the typical pooled value of each state (K, S).

    ``intervention_file``: the ONNX graph decoder + rest of the classifier (codes -> class
    probabilities) that answers interventions in the network itself; None in bundles built
    without it. ``screen`` (K,): each concept's mean |effect| measured in the network on
    training images, the image-independent part of the order in which the network is asked.
    ``probes``: at how many states per concept the network is run when it answers (the
    others are interpolated, :func:`interpolate_states`); None = every state. ``atlas``: the
    index of the layer's concept atlas sprite (:mod:`handlers.runtime.atlas`); None in
    bundles built without one."""

    layer: str
    activation: str
    encoder_file: str
    decoder_file: str
    edges: np.ndarray
    typical: np.ndarray
    names: tuple[str | None, ...]
    name_bits: tuple[float | None, ...]
    baseline: np.ndarray | None = None  # (K, S) share of training images in each state
    intervention_file: str | None = None
    screen: np.ndarray | None = None
    probes: int | None = None
    atlas: LayerAtlas | None = None

    @property
    def k(self) -> int:
        return int(self.edges.shape[0])

    def ids(self) -> list[str]:
        return [concept_id(self.layer, c) for c in range(self.k)]


@dataclass(frozen=True)
class ConceptSpec:
    """Everything serving needs about concepts (``concepts.json``)."""

    states: int
    layers: tuple[ConceptLayer, ...]
    network_file: str
    outcome: str
    report: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "states": self.states, "network_file": self.network_file,
                "outcome": self.outcome, "report": self.report,
                "layers": [{"layer": l.layer, "activation": l.activation, "encoder_file": l.encoder_file,
                            "decoder_file": l.decoder_file,
                            "edges": l.edges.tolist(), "typical": l.typical.tolist(),
                            "names": list(l.names), "name_bits": list(l.name_bits),
                            "baseline": None if l.baseline is None else l.baseline.tolist(),
                            **({} if l.intervention_file is None else {"intervention_file": l.intervention_file}),
                            **({} if l.screen is None else {"screen": l.screen.tolist()}),
                            **({} if l.probes is None else {"probes": l.probes}),
                            **({} if l.atlas is None else {"atlas": l.atlas.to_json()})}
                           for l in self.layers]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ConceptSpec:
        d = checked_document(d, FORMAT, "the concept spec")
        layers = []
        for l in d["layers"]:
            edges = np.asarray(l["edges"], dtype=np.float64)
            k = edges.shape[0]
            layers.append(ConceptLayer(l["layer"], l["activation"], l["encoder_file"], l["decoder_file"], edges,
                                       np.asarray(l["typical"], dtype=np.float64),
                                       tuple(l.get("names") or [None] * k), tuple(l.get("name_bits") or [None] * k),
                                       None if l.get("baseline") is None else np.asarray(l["baseline"], dtype=np.float64),
                                       l.get("intervention_file"),
                                       None if l.get("screen") is None else np.asarray(l["screen"], dtype=np.float64),
                                       None if l.get("probes") is None else int(l["probes"]),
                                       LayerAtlas.from_json(l.get("atlas"), k)))
        return cls(int(d["states"]), tuple(layers), d["network_file"], d.get("outcome", "Y"),
                   dict(d.get("report", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> ConceptSpec:
        return cls.from_json(read_document(path, FORMAT))
