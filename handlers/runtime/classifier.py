"""The classifier as one onnxruntime graph: logits plus the activations of explanation layers."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from handlers.runtime.bundle import Bundle
from handlers.runtime.devices import ProviderSpec

#: Opens a bundle's ONNX file (by its listed name) as a session: what the views' loaders get
#: from the service, which decides the providers, threads and 8-bit variants.
GraphOpener = Callable[[str], ort.InferenceSession]


def make_session(path: str | Path, providers: Sequence[ProviderSpec], intra_op_threads: int) -> ort.InferenceSession:
    """An onnxruntime session on the first available of ``providers`` (names, or (name,
    options) as planned by :func:`handlers.runtime.devices.plan_devices`; CPU always last)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(intra_op_threads))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No CPU memory arena: an explaining worker holds about ten sessions, and each arena keeps
    # its largest batch's buffers for good (ResNet-18/224, batch 8: 639 -> 446 MB peak RSS);
    # latency was unchanged at 64 and 224 px (bench/results, docs/benchmarks.md).
    options.enable_cpu_mem_arena = False
    available = set(ort.get_available_providers())
    chosen: list[ProviderSpec] = [p for p in providers if (p if isinstance(p, str) else p[0]) in available
                                  and p != "CPUExecutionProvider"]
    chosen.append("CPUExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=chosen)


@dataclass(frozen=True)
class ClassifierOutput:
    """One batched classifier run.

    logits: (N, K) float32; activations: layer name -> (N, C, H, W) or (N, D) float32.
    """

    logits: np.ndarray
    activations: dict[str, np.ndarray]


class OnnxClassifier:
    """Runs the exported classifier graph and returns logits and layer activations together."""

    def __init__(self, session: ort.InferenceSession, input_name: str, logits_name: str,
                 layer_outputs: dict[str, str]) -> None:
        self.session = session
        self.input_name = input_name
        self.logits_name = logits_name
        self.layer_outputs = dict(layer_outputs)
        self._names = [logits_name, *self.layer_outputs.values()]
        graph_outputs = {o.name for o in session.get_outputs()}
        missing = [n for n in self._names if n not in graph_outputs]
        if missing:
            raise ValueError(f"classifier graph lacks outputs {missing}; it has {sorted(graph_outputs)}")

    @classmethod
    def from_bundle(cls, bundle: Bundle, providers: Sequence[ProviderSpec], intra_op_threads: int) -> OnnxClassifier:
        """The bundle's classifier graph with every exported layer's activation as an output."""
        meta = bundle.metadata
        return cls(make_session(bundle.path(meta.classifier_file), providers, intra_op_threads), meta.input_name,
                   meta.logits_name, {l.name: l.output for l in meta.layers})

    def __call__(self, x: np.ndarray) -> ClassifierOutput:
        """x: float32 (N, C, H, W), already normalised."""
        outs = self.session.run(self._names, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        acts = {layer: out for layer, out in zip(self.layer_outputs, outs[1:])}
        return ClassifierOutput(logits=outs[0], activations=acts)

    def activations(self, x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """layer -> (N, ...) activations of x, normalised float32 (N, C, H, W), run
        ``batch_size`` rows at a time (for offline tools with many images)."""
        parts = [self(x[i:i + batch_size]).activations for i in range(0, len(x), batch_size)]
        return {layer: np.concatenate([p[layer] for p in parts]) for layer in self.layer_outputs}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, computed stably in float64, returned as float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
