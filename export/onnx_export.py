"""Export the classifier to ONNX with the activations of explanation layers as extra outputs.

Serving then gets logits and every activation it needs from one onnxruntime run.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.device import cpu_module
from handlers.runtime.bundle import LayerInfo
from handlers.runtime.imaging import InputSpec

INPUT_NAME = "image"
LOGITS_NAME = "logits"


def default_layers(model: nn.Module) -> list[str]:
    """ResNet-style names (``layer1..N`` and ``avgpool``) when present, else the top-level
    children except the last (the head)."""
    names = [n for n, _ in model.named_children()]
    stages = [n for n in names if n.startswith("layer") and n[5:].isdigit()]
    if stages:
        return stages + (["avgpool"] if "avgpool" in names else [])
    return names[:-1]


class WithActivations(nn.Module):
    """Wraps a classifier: forward returns ``(logits, act_1, ..., act_L)``.

    Activations are captured with forward hooks on the named submodules, so any eager
    ``nn.Module`` works without changes to its code. The hooks stay on ``model`` until
    :meth:`remove_hooks`; :func:`with_activations` removes them when its block ends.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        modules = dict(model.named_modules())
        unknown = [l for l in self.layers if l not in modules]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; the model has {[n for n in modules if n][:40]}")
        self._acts: dict[str, torch.Tensor] = {}
        self._handles = [modules[l].register_forward_hook(self._hook(l)) for l in self.layers]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._acts[name] = output
        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._acts.clear()
        logits = self.model(x)
        return (logits, *[self._acts[l] for l in self.layers])

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the wrapped model (it is then as it was before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._acts.clear()


@contextmanager
def with_activations(model: nn.Module, layers: Sequence[str]) -> Iterator[WithActivations]:
    """:class:`WithActivations` for the duration of the block; its hooks are removed on exit."""
    wrapped = WithActivations(model, layers).eval()
    try:
        yield wrapped
    finally:
        wrapped.remove_hooks()


@contextmanager
def onnx_export_quiet() -> Iterator[None]:
    """Silence the exporter's warnings and INFO/WARNING logs for the block; the ``torch.onnx``
    logger's level and the warning filters are restored on exit."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def output_name(layer: str) -> str:
    return "act_" + layer.replace(".", "_")


def export_classifier(model: nn.Module, spec: InputSpec, layers: Sequence[str], path: str | Path) -> list[LayerInfo]:
    """Write ``path`` (one self-contained ONNX file, dynamic batch) and describe its layer outputs.
    Exports a CPU copy when ``model`` lives on a GPU."""
    model = cpu_module(model).eval()
    x = torch.zeros(2, spec.channels, spec.height, spec.width)
    names = [LOGITS_NAME, *[output_name(l) for l in layers]]
    batch = torch.export.Dim("batch", min=1, max=4096)
    with with_activations(model, layers) as wrapped:
        with torch.no_grad():
            outs = wrapped(x)
        with onnx_export_quiet():
            torch.onnx.export(wrapped, (x,), str(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_shapes={"x": {0: batch}}, verbose=False)
    return [LayerInfo(l, output_name(l), tuple(int(s) for s in o.shape[1:])) for l, o in zip(layers, outs[1:])]


def parity(model: nn.Module, path: str | Path, spec: InputSpec, layers: Sequence[str],
           batch_sizes: Sequence[int] = (1, 8), seed: int = 0) -> float:
    """Max abs difference between torch (on the CPU) and onnxruntime over logits and activations."""
    model = cpu_module(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with with_activations(model.eval(), layers) as wrapped:
        for b in batch_sizes:
            x = torch.randn(b, spec.channels, spec.height, spec.width, generator=gen)
            with torch.no_grad():
                ref = [t.numpy() for t in wrapped(x)]
            got = session.run(None, {INPUT_NAME: x.numpy()})
            for r, g in zip(ref, got):
                if r.shape != g.shape:
                    raise AssertionError(f"shape mismatch {r.shape} vs {g.shape} at batch {b}")
                worst = max(worst, float(np.abs(r - g).max()))
    return worst


def export_module(module: nn.Module, example: torch.Tensor, path: str | Path, input_name: str,
                  output_name: str) -> None:
    """Export a one-input, one-output module (dynamic batch) as one self-contained ONNX file
    (from a CPU copy when it lives on a GPU)."""
    module = cpu_module(module).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with onnx_export_quiet():
        torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_shapes=({0: batch},), verbose=False)


def module_parity(module: nn.Module, path: str | Path, example_shape: Sequence[int],
                  batch_sizes: Sequence[int] = (1, 8), seed: int = 0, nonneg: bool = False) -> float:
    """Max abs difference between torch (on the CPU) and onnxruntime for a one-input module."""
    module = cpu_module(module)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, *example_shape, generator=gen)
        if nonneg:
            x = x.abs()
        with torch.no_grad():
            ref = module.eval()(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if ref.shape != got.shape:
            raise AssertionError(f"shape mismatch {ref.shape} vs {got.shape} at batch {b}")
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


class DecodeAndRest(nn.Module):
    """``softmax(f_{>l}(D_l(code)))``: a concept layer's decoder followed by the rest of the
    classifier after ``layer``, for the method's interventions in the network itself.

    Input codes (M, K, h, w) -> class probabilities (M, classes). The classifier runs on a
    zero image with ``layer``'s output replaced by the decoded codes (a forward hook, so any
    eager module works); the part before ``layer`` no longer reaches the output, and the
    exporter drops it from the graph.
    """

    def __init__(self, model: nn.Module, decoder: nn.Module, layer: str, spec: InputSpec) -> None:
        super().__init__()
        self.model, self.decoder = model, decoder
        self.module = dict(model.named_modules())[layer]
        self.input_shape = (spec.channels, spec.height, spec.width)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        decoded = self.decoder(code)
        handle = self.module.register_forward_hook(lambda _m, _i, _o: decoded)
        try:
            x = torch.zeros(code.shape[0], *self.input_shape, dtype=code.dtype)
            return torch.softmax(self.model(x), dim=1)
        finally:
            handle.remove()


def export_intervention_graph(model: nn.Module, decoder: nn.Module, layer: str, spec: InputSpec,
                              code_shape: Sequence[int], path: str | Path) -> float:
    """Write :class:`DecodeAndRest` for ``layer`` to ``path`` (input ``code`` (M, K, h, w),
    output ``probabilities``) and return its largest difference from torch (non-negative
    random codes, batches 1 and 8)."""
    wrapped = DecodeAndRest(cpu_module(model).eval(), cpu_module(decoder).eval(), layer, spec).eval()
    export_module(wrapped, torch.zeros(2, *code_shape), path, "code", "probabilities")
    return module_parity(wrapped, path, code_shape, nonneg=True)
