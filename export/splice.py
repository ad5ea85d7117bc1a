"""The rest of a network after one of its modules, in eager torch.

Replacing a module's output with a forward hook works on any ``nn.Module``, but eager torch
still computes everything before that module, on every row, and throws it away. For the
concept methods that is most of the cost at large inputs: an autoencoder on ``layer3`` of a
ResNet-18 at 224 px pays for the stem and three stages on each deep-loss pass only to run one
stage and the head on the replacement.

:class:`Splice` runs the part before the module on a single row instead, and lets the hook
hand the full batch of replacements to the rest of the network. That is only right when
nothing after the module reads a tensor computed before it (a skip connection around the
module, or a shape taken from the input), so :meth:`Splice.checked` tries it once on a probe
batch of distinct images against the full pass, and falls back to the full pass when the two
differ or the cheap pass fails.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def capture(model: nn.Module, layers: Sequence[str], x: torch.Tensor, replace: nn.Module | None = None,
            replacement: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass ``model(x)`` returning the logits and the outputs of ``layers``; with
    ``replace``, that module's output is ``replacement`` instead."""
    modules = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    # the replacement first: a hook registered after it sees the replaced output
    handles = [] if replace is None else [replace.register_forward_hook(lambda _m, _i, _o: replacement)]
    handles += [modules[l].register_forward_hook(lambda _m, _i, o, l=l: acts.__setitem__(l, o)) for l in layers]
    try:
        return model(x), acts
    finally:
        for h in handles:
            h.remove()


class Splice:
    """``f_{>l}``: the network after ``layer``, fed a replacement (N, ...) of that layer's output.

    ``prefix_rows`` is 1 when the part before ``layer`` may run on one image (checked), else
    None (every row, as a plain hook would).
    """

    def __init__(self, model: nn.Module, layer: str, prefix_rows: int | None = None) -> None:
        self.model, self.layer = model, layer
        self.module = dict(model.named_modules())[layer]
        self.prefix_rows = prefix_rows

    @classmethod
    @torch.no_grad()
    def checked(cls, model: nn.Module, layer: str, probe: torch.Tensor, rtol: float = 1e-4) -> Splice:
        """A splice that runs the prefix on one row if, on ``probe`` (B >= 2 distinct images,
        on the model's device), doing so gives the full pass's logits with ``layer``'s own
        outputs spliced back in; a full-pass splice otherwise."""
        if probe.shape[0] < 2:
            raise ValueError("the probe needs at least two images to tell rows apart")
        full = cls(model, layer)
        reference, acts = capture(model, [layer], probe)
        if not isinstance(acts.get(layer), torch.Tensor):
            return full
        cheap = cls(model, layer, prefix_rows=1)
        try:
            got = cheap.logits(probe, acts[layer])
        except RuntimeError as e:  # shapes of the one-row prefix met the full batch
            log.info("splice at %s runs the full prefix: %s", layer, e)
            return full
        scale = float(reference.abs().max()) + 1e-12
        if got.shape != reference.shape or not torch.allclose(got.float(), reference.float(), rtol=rtol,
                                                                atol=rtol * scale):
            log.info("splice at %s runs the full prefix: a later module reads the input's rows", layer)
            return full
        return cheap

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.prefix_rows is None else x[: self.prefix_rows]

    def logits(self, x: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) of the network on ``x`` (N, C, H, W) with ``layer``'s output
        replaced by ``replacement`` (N, ...)."""
        return capture(self.model, (), self._rows(x), self.module, replacement)[0]

    def capture(self, x: torch.Tensor, replacement: torch.Tensor,
                layers: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`logits` and the outputs of the later ``layers``."""
        return capture(self.model, layers, self._rows(x), self.module, replacement)
