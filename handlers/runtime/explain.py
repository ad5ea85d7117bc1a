"""The concepts view (method 1) at serve time: encoders on the classifier's activations,
discretisation, compiled causal queries and heatmaps. No pgmpy, no torch."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.runtime.answer import Concept, Intervention
from handlers.runtime.bundle import Bundle
from handlers.runtime.causal import CompiledCausalModel
from handlers.runtime.classifier import GraphOpener
from handlers.runtime.concepts import (
    ConceptSpec,
    discretise,
    evidence_row,
    heatmap_levels,
    heatmap_overlay,
    heatmap_palette,
    pooled_values,
)
from handlers.runtime.errors import ArtifactError
from handlers.runtime.imaging import encode_indexed_png, encode_png


@dataclass(frozen=True)
class ConceptsView:
    """The concepts view of one image and what it cost: ``causal_ms`` for the causal queries,
    ``encode_ms`` for building the answer (heatmaps); unrounded milliseconds."""

    concepts: list[Concept]
    causal_ms: float
    encode_ms: float


@dataclass
class ConceptBatch:
    """Codes (layer -> (N, K, H, W)), pooled values and states (layer -> (N, K))."""

    codes: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    states: dict[str, np.ndarray]

    def evidence(self, row: int) -> dict[str, int]:
        return evidence_row(self.states, row)


class ConceptExplainer:
    """Loaded concept artifacts: encoder sessions, bins, names and the compiled network."""

    def __init__(self, spec: ConceptSpec, network: CompiledCausalModel, sessions: dict[str, Any]) -> None:
        self.spec = spec
        self.network = network
        self.sessions = sessions
        self.layers = {l.layer: l for l in spec.layers}
        self._palette = heatmap_palette()
        ids = [cid for l in spec.layers for cid in l.ids()]
        if sorted(ids) != sorted(network.concepts):
            raise ArtifactError("concepts.json and the causal network disagree on the concept ids")
        self.num_concepts = len(ids)

    @classmethod
    def load(cls, bundle: Bundle, file: str, open_graph: GraphOpener) -> ConceptExplainer:
        """The concept view of ``bundle`` (``file``: its concepts.json); ``open_graph`` opens a
        listed ONNX file as a session (the service picks 8-bit variants and providers)."""
        spec = ConceptSpec.from_file(bundle.path(file))
        network = CompiledCausalModel.from_file(bundle.path(spec.network_file))
        if network.outcome != spec.outcome:
            raise ArtifactError(f"causal network outcome {network.outcome!r} != {spec.outcome!r}")
        outputs = {l.name: l.output for l in bundle.metadata.layers}
        sessions = {}
        for layer in spec.layers:
            if outputs.get(layer.layer) != layer.activation:
                raise ArtifactError(f"concept layer {layer.layer} needs classifier output {layer.activation}")
            sessions[layer.layer] = open_graph(layer.encoder_file)
        return cls(spec, network, sessions)

    def encode(self, activations: dict[str, np.ndarray]) -> ConceptBatch:
        """Run the encoders on the activations the classifier already produced."""
        codes, values, states = {}, {}, {}
        for layer in self.spec.layers:
            sess = self.sessions[layer.layer]
            z = sess.run(None, {sess.get_inputs()[0].name: activations[layer.layer]})[0]
            codes[layer.layer] = z
            values[layer.layer] = pooled_values(z)
            states[layer.layer] = discretise(values[layer.layer], layer.edges)
        return ConceptBatch(codes, values, states)

    def explain(self, batch: ConceptBatch, row: int, target: int, top: int | None,
                pixels: np.ndarray | None, heatmap: str = "overlay") -> ConceptsView:
        """The ``concepts`` view for one image, sorted by |effect| (largest first; ties by id).

        row: the image's row in ``batch``; top: how many concepts (None: all).
        pixels: uint8 (H, W, C) model input for heatmaps, or None for no images.
        heatmap: "overlay" = a palette PNG with transparency, to draw over the input;
        "blended" = the heatmap already blended over the input (RGB PNG, several times larger).
        """
        t0 = time.perf_counter()
        records = self.network.explain(batch.evidence(row), target)
        records.sort(key=lambda r: (-abs(r["effect"]), r["id"]))
        records = records[:top] if top else records
        t1 = time.perf_counter()
        concepts = []
        for rec in records:
            layer_name, c = rec["id"].rsplit("/c", 1)
            channel = int(c)
            layer = self.layers[layer_name]
            png = None
            if pixels is not None:
                code_map = batch.codes[layer_name][row, channel]
                scale = float(layer.typical[channel, -1])
                if heatmap == "blended":
                    png = encode_png(heatmap_overlay(pixels, code_map, scale))
                else:
                    png = encode_indexed_png(heatmap_levels(code_map, scale, *pixels.shape[:2]), *self._palette)
            concepts.append(Concept(
                id=rec["id"], layer=layer_name, channel=channel, name=layer.names[channel] or rec["id"],
                name_bits=layer.name_bits[channel], activation=float(batch.values[layer_name][row, channel]),
                state=int(rec["state"]), effect=float(rec["effect"]), sensitivity=float(rec["sensitivity"]),
                interventions=[Intervention(state=int(i["state"]), probability=float(i["probability"]))
                               for i in rec["interventions"]],
                heatmap_png=png))
        return ConceptsView(concepts, causal_ms=(t1 - t0) * 1000, encode_ms=(time.perf_counter() - t1) * 1000)
