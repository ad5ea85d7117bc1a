"""Where the offline steps run torch: the ``--device auto|cpu|cuda[:N]`` option.

One rule keeps the plumbing small: a step resolves its ``device`` option once
(:func:`resolve_device`) and moves the classifier there; every function that takes the
classifier sends its batches to the classifier's device (:func:`device_of`), creates the
modules it trains beside it, and brings results back to NumPy on the CPU (:func:`to_numpy`).
On the CPU these moves are no-ops, so a CPU build computes exactly what it did before the
option existed. ONNX export and the onnxruntime parity checks always run on CPU copies
(:func:`cpu_module`): the graphs a worker serves never depend on where they were trained.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

#: The option's help, shared by every step that runs torch.
DEVICE_HELP = ("where torch trains and runs the classifier: auto (CUDA when torch sees a GPU, else the CPU), "
               "cpu, or cuda[:N]; ONNX export and parity checks always run on the CPU")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; ``"cpu"``;
    ``"cuda"`` / ``"cuda:N"`` (checked to exist). Raises ValueError for anything else, or
    for a CUDA device this torch cannot use (a CPU-only build, no driver, N out of range)."""
    if isinstance(name, torch.device):
        name = str(name)
    text = name.strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device {name!r}: give auto, cpu or cuda[:N]") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device {name!r}: give auto, cpu or cuda[:N] (the offline steps run on CPUs and CUDA GPUs)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch {torch.__version__} sees no CUDA device "
                         "(a CPU-only build of torch, or no GPU driver); use --device cpu or auto")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU when it has neither."""
    first: torch.Tensor | None = next(module.parameters(), None)
    if first is None:
        first = next(module.buffers(), None)
    return torch.device("cpu") if first is None else first.device


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor on any device as a NumPy array (a view, not a copy, for a CPU tensor)."""
    return tensor.detach().cpu().numpy()


def cpu_module(module: nn.Module) -> nn.Module:
    """``module`` itself when it already lives on the CPU, else a CPU copy (the module stays
    where it is): what ONNX export and the parity checks run."""
    if device_of(module).type == "cpu":
        return module
    return copy.deepcopy(module).cpu()


PRECISIONS = ("fp32", "bf16", "auto")


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively: a CUDA GPU that supports
    bfloat16, or a CPU with AMX tiles or AVX-512 BF16 instructions. (Elsewhere torch emulates
    bfloat16 on the CPU, which is slower than float32.)"""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(bool(probe()) for probe in probes if probe is not None)


def is_mixed(precision: str, device: torch.device | None = None) -> bool:
    """Whether a training ``precision`` is mixed (bfloat16 autocast, float32 weights) rather
    than float32: "bf16" always, "fp32" never, "auto" where :func:`fast_bf16` says the
    ``device`` (default: the CPU) has bfloat16 units.

    Raises:
        ValueError: none of the three."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be fp32, bf16 or auto, not {precision!r}")
    if precision == "auto":
        return fast_bf16(device or torch.device("cpu"))
    return precision == "bf16"


def autocast(device: torch.device, mixed: bool) -> torch.autocast:
    """The forward passes' context on ``device``: bfloat16 autocast when ``mixed``, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed)


def channels_last_inference(model: nn.Module) -> nn.Module:
    """``model`` (in place) with its 4-d weights in channels-last layout, which oneDNN's CPU
    convolutions run faster in float32 too: the same outputs up to float rounding (1e-5 on the
    logits). On this project's 2-core machine a ResNet-18-sized forward pass at 224 px, batch
    64, took 1.16 s against 1.53 s contiguous (64 px demo, batch 256: 61 against 69 ms). The
    build's float32 passes (activations, the network's interventions, evaluations) gain that.
    Copies inherit the layout: a ClaDec reference autoencoder's encoder (a re-initialised copy
    of the classifier) trains in channels-last, which bf16 training uses anyway
    (:class:`export.train.TrainConfig`); saved weights are made contiguous
    (:func:`export.models.save_weights`)."""
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (missing from torch's stubs)
