"""The concepts view (method 1) at serve time: encoders on the classifier's activations,
discretisation, compiled causal queries and heatmaps. No pgmpy, no torch."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from handlers.runtime.answer import Concept, ConceptAtlas, Intervention
from handlers.runtime.atlas import AtlasStrips, decode_sprite
from handlers.runtime.bundle import Bundle
from handlers.runtime.causal import CausalRecord, CompiledCausalModel
from handlers.runtime.classifier import GraphOpener
from handlers.runtime.concepts import (
    ConceptSpec,
    discretise,
    evidence_row,
    interpolate_states,
    pooled_values,
    probe_states,
    set_peaks_in_place,
)
from handlers.runtime.errors import ArtifactError
from handlers.runtime.heatmaps import heatmap_levels, heatmap_overlay, heatmap_palette
from handlers.runtime.helper import HelperThread, run_shared
from handlers.runtime.imaging import encode_indexed_png, encode_png


@dataclass(frozen=True)
class ConceptsPart:
    """The concepts view of one image and what it cost: ``causal_ms`` for the causal queries,
    ``encode_ms`` for building the answer (heatmaps); unrounded milliseconds. ``records``:
    the causal answers of the listed concepts, in the order of ``concepts``."""

    concepts: list[Concept]
    causal_ms: float
    encode_ms: float
    records: list[SourcedRecord]


@dataclass
class ConceptBatch:
    """Codes (layer -> (N, K, H, W)), pooled values and states (layer -> (N, K))."""

    codes: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    states: dict[str, np.ndarray]

    def evidence(self, row: int) -> dict[str, int]:
        return evidence_row(self.states, row)


class ConceptExplainer:
    """Loaded concept artifacts: encoder sessions, bins, names, the compiled network and, where
    the bundle has them, the intervention graphs (decoder + rest of the classifier)."""

    def __init__(self, spec: ConceptSpec, network: CompiledCausalModel, sessions: dict[str, Any],
                 interventions: dict[str, Any] | None = None, atlas: AtlasStrips | None = None) -> None:
        self.spec = spec
        self.atlas = atlas
        # the thread that takes intervention graphs beside the caller's (its own until the
        # service hands it the worker's shared helper; None: every graph in line)
        self.helper: HelperThread | None = HelperThread("concept-graphs")
        self._own_helper: HelperThread | None = self.helper  # closed when another takes its place
        # measured milliseconds per intervention-graph row, per layer (the order _run_graphs takes them in)
        self._ms_per_row: dict[str, float] = {}
        self.network = network
        self.sessions = sessions
        self.interventions = dict(interventions or {})
        self.layers = {l.layer: l for l in spec.layers}
        self._palette = heatmap_palette()
        ids = [cid for l in spec.layers for cid in l.ids()]
        if sorted(ids) != sorted(network.concepts):
            raise ArtifactError("concepts.json and the causal network disagree on the concept ids")
        self.num_concepts = len(ids)
        for layer in spec.layers:
            if layer.probes is not None and not 1 <= layer.probes <= spec.states:
                raise ArtifactError(f"concepts.json: layer {layer.layer} probes {layer.probes} is not in 1..{spec.states}")
        self._where = {cid: (l.layer, c) for l in spec.layers for c, cid in enumerate(l.ids())}
        self._screen = {cid: float(l.screen[c]) if l.screen is not None else 0.0
                        for l in spec.layers for c, cid in enumerate(l.ids())}

    @classmethod
    def load(cls, bundle: Bundle, file: str, open_graph: GraphOpener) -> ConceptExplainer:
        """The concept view of ``bundle`` (``file``: its concepts.json); ``open_graph`` opens a
        listed ONNX file as a session (the service picks 8-bit variants and providers)."""
        spec = ConceptSpec.from_file(bundle.path(file))
        network = CompiledCausalModel.from_file(bundle.path(spec.network_file))
        if network.outcome != spec.outcome:
            raise ArtifactError(f"causal network outcome {network.outcome!r} != {spec.outcome!r}")
        outputs = {l.name: l.output for l in bundle.metadata.layers}
        sessions, interventions, sprites = {}, {}, {}
        for layer in spec.layers:
            if layer.atlas is not None:
                sprites[layer.layer] = (layer.atlas, decode_sprite(bundle.path(layer.atlas.file).read_bytes(), layer.atlas))
            if outputs.get(layer.layer) != layer.activation:
                raise ArtifactError(f"concept layer {layer.layer} needs classifier output {layer.activation}")
            sessions[layer.layer] = open_graph(layer.encoder_file)
            if layer.intervention_file is not None:
                interventions[layer.layer] = open_graph(layer.intervention_file)
        return cls(spec, network, sessions, interventions, AtlasStrips(sprites) if sprites else None)

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

    def every_state(self) -> ConceptExplainer:
        """The same concepts view with the network run at every state of every concept (the
        bundle's probes ignored): the reference the interpolated answers are measured against."""
        layers = tuple(dataclasses.replace(l, probes=None) for l in self.spec.layers)
        return ConceptExplainer(dataclasses.replace(self.spec, layers=layers), self.network, self.sessions,
                                self.interventions, self.atlas)

    def atlas_part(self, layer: str, channel: int) -> ConceptAtlas | None:
        """The answer's atlas of one concept (built once at load); None where the bundle has
        none or the concept never fires."""
        return None if self.atlas is None else self.atlas.get(layer, channel)

    def where(self, concept: str) -> tuple[str, int]:
        """(layer, channel) of a concept id.

        Raises:
            KeyError: an id the archive does not have."""
        return self._where[concept]

    def network_probabilities(self, batch: ConceptBatch, row: int, layer: str, channels: Sequence[int],
                              target: int, probes: int | None = None) -> tuple[float, np.ndarray]:
        """The network's own answers on image ``row`` for the ``channels`` of ``layer``, in one
        batch through the layer's intervention graph:

        - the anchor: ``P(target)`` with the layer's autoencoder spliced in and its code unchanged;
        - ``P(target | do(c = x))``: each concept's code channel set to each state's typical
          value (:func:`set_code_peak`), decoded and the rest of the classifier run.

        probes: run only that many states per concept (those farthest from its observed peak,
        :func:`probe_states`) and interpolate the others (:func:`interpolate_states`); None or
        S: every state, ``1 + len(channels) * S`` rows. Returns (anchor, float64 (len(channels), S))."""
        session = self.interventions[layer]
        spec = self.layers[layer]
        s = spec.typical.shape[1]
        code = batch.codes[layer][row:row + 1]
        chans = list(channels)
        typical, peaks = spec.typical[chans], batch.values[layer][row, chans]
        if probes is None or probes >= s:
            probed = np.tile(np.arange(s), (len(chans), 1))
        else:
            probed = probe_states(typical, peaks, probes)
        probs = session.run(None, {session.get_inputs()[0].name: intervened_codes(code, chans, typical, probed)})[0][:, target]
        probs = probs.astype(np.float64)
        anchor, at_probes = float(probs[0]), probs[1:].reshape(len(chans), probed.shape[1])
        if probed.shape[1] == s:
            return anchor, at_probes
        return anchor, interpolate_states(typical, peaks, anchor, probed, at_probes)

    def _rows(self, layer: str, concepts: int) -> int:
        """Rows one intervention-graph run of ``concepts`` concepts of ``layer`` takes."""
        probes = self.layers[layer].probes
        return 1 + concepts * (self.spec.states if probes is None else min(probes, self.spec.states))

    def _cost(self, layer: str, concepts: int) -> float:
        """Expected milliseconds of one intervention-graph run of ``concepts`` concepts of
        ``layer``: its rows times the layer's measured milliseconds per row (1 until measured)."""
        return self._ms_per_row.get(layer, 1.0) * self._rows(layer, concepts)

    def _run_layer(self, batch: ConceptBatch, row: int, layer: str, chans: list[int], target: int
                   ) -> tuple[float, np.ndarray]:
        """:meth:`network_probabilities` of ``chans`` of ``layer``, timed into the layer's
        running milliseconds per row (an exponential average)."""
        t0 = time.perf_counter()
        out = self.network_probabilities(batch, row, layer, chans, target, self.layers[layer].probes)
        per_row = (time.perf_counter() - t0) * 1000 / self._rows(layer, len(chans))
        seen = self._ms_per_row.get(layer)
        self._ms_per_row[layer] = per_row if seen is None else 0.8 * seen + 0.2 * per_row
        return out

    def _run_graphs(self, batch: ConceptBatch, row: int, channels: dict[str, list[int]], target: int,
                    helper: HelperThread | None) -> dict[str, tuple[float, np.ndarray]]:
        """:meth:`network_probabilities` of every layer in ``channels`` (layer -> its channels
        asked), costliest measured layer first, shared between this thread and ``helper``
        (:func:`run_shared`: the helper takes the next layer whenever it is free, so a helper
        still busy with ClaDec leaves them all to this thread; onnxruntime releases the GIL,
        so the two overlap). In line without a helper or once it is closed."""
        out: dict[str, tuple[float, np.ndarray]] = {}

        def task(layer: str) -> Callable[[], None]:
            return lambda: out.__setitem__(layer, self._run_layer(batch, row, layer, channels[layer], target))
        run_shared([task(l) for l in costliest_first({l: self._cost(l, len(c)) for l, c in channels.items()})],
                   helper)
        return out

    def use_helper(self, helper: HelperThread | None) -> None:
        """Share ``helper`` (the worker's one helper thread; None: run every graph in line)
        instead of the explainer's own thread, which is closed; a helper shared before is left
        running (its owner closes it)."""
        own, self._own_helper, self.helper = self._own_helper, None, helper
        if own is not None and own is not helper:
            own.close()

    def close(self) -> None:
        """Stop the explainer's own helper thread (a shared one is its owner's to close); later
        answers run every graph in line. Idempotent."""
        if self._own_helper is not None:
            self._own_helper.close()
        self.helper = None

    def tables_answer(self, network_concepts: int | None) -> bool:
        """Whether :meth:`answer` with this ``network_concepts`` reads the Bayesian network's
        intervention tables: when the bundle has no intervention graphs, or the network answers
        fewer than every concept. Otherwise only the weights pi and the states are read."""
        return not self.interventions or self._asked_count(network_concepts) < self.num_concepts

    def _asked_count(self, network_concepts: int | None) -> int:
        """How many concepts the network answers: ``network_concepts`` capped at all of them (None: all)."""
        return self.num_concepts if network_concepts is None else min(network_concepts, self.num_concepts)

    def screening_order(self, records: Sequence[CausalRecord]) -> list[int]:
        """Indices of ``records`` in the order the network is asked about them: largest
        screening score first (ties by concept id); see :func:`screening_score`."""
        return sorted(range(len(records)), key=lambda i: (-screening_score(records[i], self._screen[records[i].concept]),
                                                          records[i].concept))

    def answer(self, batch: ConceptBatch, row: int, target: int, network_concepts: int | None,
               share: bool = True) -> list[SourcedRecord]:
        """Every concept's causal answer for image ``row``, in the order an answer lists them:
        the concepts the network answered (``network_concepts`` of them, None = all; chosen by
        screening order when fewer than all, then sorted by |effect|), followed by the ones the
        Bayesian network answered (by |effect|). Ties by concept id.

        The network runs each answered concept at its layer's ``probes`` states
        (:meth:`network_probabilities`); the source is "network" where that is every state and
        "network_interpolated" where some states are interpolated. Where the bundle has
        intervention graphs, a Bayesian-network answer keeps the tables' differences between
        states but is anchored at the network's level: its probability at the observed state
        is the network's ``P(target)`` with the concept's layer spliced in unchanged
        (:meth:`CausalRecord.anchored_at`). Effects are unchanged by the anchor unless a
        probability had to be clipped to [0, 1]. Without the graphs the tables answer alone.

        share: run the graphs together with :attr:`helper`; False runs them on this thread
        (background verification, which must not take the helper from live requests)."""
        evidence = batch.evidence(row)
        if not self.tables_answer(network_concepts):
            # the tables' own answers are not needed: only the weights pi and the states
            records = [CausalRecord(c, x, pi, np.full(pi.shape, np.nan)) for c, x, pi in self.network.weights(evidence)]
            asked = set(range(len(records)))
        else:
            records = self.network.explain(evidence, target)
            if not self.interventions:
                return sorted((SourcedRecord(r, "bayesian_network") for r in records), key=_by_effect)
            asked = set(self.screening_order(records)[:self._asked_count(network_concepts)])
        by_layer: dict[str, list[int]] = {l.layer: [] for l in self.spec.layers}  # every layer runs, for its anchor
        for i in sorted(asked, key=lambda i: records[i].concept):
            by_layer[self._where[records[i].concept][0]].append(i)
        answered: list[SourcedRecord] = []
        anchors: dict[str, float] = {}
        channels = {layer: [self._where[records[i].concept][1] for i in idx] for layer, idx in by_layer.items()}
        runs = self._run_graphs(batch, row, channels, target, self.helper if share else None)
        for layer, idx in by_layer.items():
            probes = self.layers[layer].probes
            anchors[layer], probs = runs[layer]
            source: Source = "network" if probes is None or probes >= self.spec.states else "network_interpolated"
            answered += [SourcedRecord(records[i].answered_by(p), source) for i, p in zip(idx, probs)]
        rest = [SourcedRecord(r.anchored_at(anchors[self._where[r.concept][0]]), "bayesian_network")
                for i, r in enumerate(records) if i not in asked]
        return sorted(answered, key=_by_effect) + sorted(rest, key=_by_effect)

    def explain(self, batch: ConceptBatch, row: int, target: int, top: int | None,
                pixels: np.ndarray | None, heatmap: str = "overlay", network_concepts: int | None = 0,
                atlas: bool = False) -> ConceptsPart:
        """The ``concepts`` view for one image, in the order of :meth:`answer`.

        row: the image's row in ``batch``; top: how many concepts (None: all).
        pixels: uint8 (H, W, C) model input for heatmaps, or None for no images.
        heatmap: "overlay" = a palette PNG with transparency, to draw over the input;
        "blended" = the heatmap already blended over the input (RGB PNG, several times larger).
        network_concepts: how many concepts the network answers (None: all; 0: the Bayesian
        network answers all, anchored where the bundle has intervention graphs).
        atlas: each concept carries its atlas strips (where the bundle has an atlas).
        """
        t0 = time.perf_counter()
        records = self.answer(batch, row, target, network_concepts)
        records = records[:top] if top else records
        t1 = time.perf_counter()
        concepts = []
        for sourced in records:
            rec = sourced.record
            layer_name, channel = self._where[rec.concept]
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
                id=rec.concept, layer=layer_name, channel=channel, name=layer.names[channel] or rec.concept,
                name_bits=layer.name_bits[channel], activation=float(batch.values[layer_name][row, channel]),
                state=rec.state, effect=rec.effect, sensitivity=rec.sensitivity, source=sourced.source,
                interventions=[Intervention(state=s, probability=float(p)) for s, p in enumerate(rec.probabilities)],
                heatmap_png=png, atlas=self.atlas_part(layer_name, channel) if atlas else None))
        return ConceptsPart(concepts, causal_ms=(t1 - t0) * 1000, encode_ms=(time.perf_counter() - t1) * 1000,
                            records=list(records))


def costliest_first(costs: Mapping[str, float]) -> list[str]:
    """The keys of ``costs``, largest cost first (ties by name): longest first, the greedy
    order for workers that each take the next job when free."""
    return sorted(costs, key=lambda k: (-costs[k], k))


Source = Literal["network", "network_interpolated", "bayesian_network"]


@dataclass(frozen=True)
class SourcedRecord:
    """A concept's causal answer and who gave its probabilities: "network" (the intervention
    graphs, at every state), "network_interpolated" (the intervention graphs at some states,
    the others interpolated in the code peak) or "bayesian_network" (the compiled tables'
    differences between states, anchored at the network's level where the bundle has
    intervention graphs)."""

    record: CausalRecord
    source: Source


def _by_effect(s: SourcedRecord) -> tuple[float, str]:
    return -abs(s.record.effect), s.record.concept


def intervened_codes(code: np.ndarray, channels: Sequence[int], typical: np.ndarray, probed: np.ndarray) -> np.ndarray:
    """The rows one intervention-graph run takes: the unchanged code (1, K, H, W) first, then
    for each of ``channels`` (in order) and each of its ``probed`` states (len(channels), P)
    the code with that channel's peak set to the state's typical value (``typical``
    (len(channels), S); :func:`set_code_peak`, one channel changed per row). Returns float32
    (1 + len(channels) * P, K, H, W)."""
    base = np.asarray(code, dtype=np.float32)
    p = probed.shape[1] if len(channels) else 0
    rows = np.repeat(base, 1 + len(channels) * p, axis=0)
    if p:  # every changed row at once: row 1 + i * P + j sets channels[i] to state probed[i, j]
        set_peaks_in_place(rows[1:], np.repeat(np.asarray(channels, dtype=np.int64), p),
                           np.take_along_axis(np.asarray(typical), np.asarray(probed), axis=1).ravel())
    return rows


def screening_score(record: CausalRecord, screen: float) -> float:
    """How likely the concept moves the target on this image: the larger of the Bayesian
    network's |effect| for it and its mean |effect| measured in the network on training
    images (``screen``)."""
    return max(abs(record.effect), screen)
