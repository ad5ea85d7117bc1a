"""Read a classifier's layout from its module tree and one forward pass, to choose the layers
the methods explain when the user does not name them.

- the **head** is the last ``nn.Linear`` the forward pass calls;
- the **penultimate** layer is the module whose output, flattened, is the head's input
  (a global pooling, preferred over a plain ``Flatten`` that follows it);
- the **blocks** are the outermost modules with a spatial (N, C, H, W) output larger than 1×1,
  in call order: the top-level children, or the children of a lone container that holds the
  whole feature extractor (``model.features`` of VGG-style networks);
- **concept layers**: the last three blocks (method 1 wants depth: early, middle and late
  representations); **ClaDec layers**: the middle block and the penultimate layer (the
  paper's pair: a spatial layer and the one the head reads); **exported layers**: every block
  plus the penultimate layer; feature selectivity runs over the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from handlers.runtime.imaging import InputSpec


class LayoutError(ValueError):
    """The module tree does not have what the methods need (e.g. no final ``nn.Linear``)."""


@dataclass(frozen=True)
class ModelLayout:
    """The layers chosen for each method, and why (one line per choice, for the user)."""

    head: str
    penultimate: str
    blocks: tuple[str, ...]
    concept_layers: tuple[str, ...]
    cladec_layers: tuple[str, ...]
    export_layers: tuple[str, ...]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class _Call:
    name: str
    order: int
    shape: tuple[int, ...]
    output: torch.Tensor
    module: nn.Module


def _trace(model: nn.Module, spec: InputSpec) -> tuple[list[_Call], dict[str, torch.Tensor]]:
    """Every named module's call (first call only) and the input of every Linear."""
    calls: dict[str, _Call] = {}
    linear_inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, inputs: tuple, output: object, name: str = name) -> None:
            if name not in calls and isinstance(output, torch.Tensor):
                calls[name] = _Call(name, len(calls), tuple(output.shape), output.detach(), m)
            if isinstance(m, nn.Linear) and inputs and isinstance(inputs[0], torch.Tensor):
                linear_inputs[name] = inputs[0].detach()
        hooks.append(module.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, spec.channels, spec.height, spec.width))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return sorted(calls.values(), key=lambda c: c.order), linear_inputs


def _is_spatial(call: _Call) -> bool:
    return len(call.shape) == 4 and call.shape[2] * call.shape[3] > 1


def _blocks(model: nn.Module, calls: list[_Call]) -> list[str]:
    by_name = {c.name: c for c in calls}
    prefix = ""
    while True:
        children = [f"{prefix}{n}" for n, _ in dict(model.named_modules())[prefix.rstrip(".")].named_children()] \
            if prefix else [n for n, _ in model.named_children()]
        spatial = [n for n in children if n in by_name and _is_spatial(by_name[n])]
        if len(spatial) == 1 and len([n for n in by_name if n.startswith(spatial[0] + ".")]) >= 3:
            prefix = spatial[0] + "."  # a lone container holds the feature extractor: look inside
            continue
        return sorted(spatial, key=lambda n: by_name[n].order)


def choose_layout(model: nn.Module, spec: InputSpec) -> ModelLayout:
    """The layout of ``model`` for inputs of ``spec`` (one forward pass on random inputs)."""
    calls, linear_inputs = _trace(model, spec)
    linears = [c for c in calls if isinstance(c.module, nn.Linear)]
    if not linears:
        raise LayoutError("the model calls no nn.Linear: the class-feature view needs a final linear head")
    head = linears[-1]
    h = linear_inputs[head.name].reshape(linear_inputs[head.name].shape[0], -1)
    matches = [c for c in calls if c.order < head.order and not c.name.startswith(head.name + ".")
               and c.output.numel() == h.numel() and torch.equal(c.output.reshape(h.shape), h)]
    if not matches:
        raise LayoutError(f"no module's output is the input of the head {head.name!r} (computed in forward() "
                          "itself?): wrap that computation in a module, or name --layers yourself")
    pooled = [c for c in matches if not isinstance(c.module, nn.Flatten)]
    penultimate = (pooled or matches)[-1]
    blocks = _blocks(model, calls)
    if not blocks:
        raise LayoutError("no module with a spatial (N, C, H, W) output: not a convolutional classifier")
    concept = tuple(blocks[-3:])
    cladec = tuple(dict.fromkeys([blocks[len(blocks) // 2], penultimate.name]))
    export = tuple(dict.fromkeys([*blocks, penultimate.name]))
    shapes = {c.name: "x".join(map(str, c.shape[1:])) for c in calls}
    reasons = (
        f"head: {head.name} (the last nn.Linear called: {head.module.in_features} -> {head.module.out_features})",
        f"penultimate layer: {penultimate.name} (its output is the head's input)",
        f"blocks: {', '.join(f'{b} ({shapes[b]})' for b in blocks)} (outermost modules with a spatial output)",
        f"concept layers: {', '.join(concept)} (the last {len(concept)} blocks)",
        f"ClaDec layers: {', '.join(cladec)} (the middle block and the penultimate layer)",
    )
    return ModelLayout(head.name, penultimate.name, tuple(blocks), concept, cladec, export, reasons)
