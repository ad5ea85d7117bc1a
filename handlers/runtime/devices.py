"""Which onnxruntime execution providers a worker's sessions use, and on which GPU.

TorchServe gives each worker of a GPU host its own ``gpu_id`` (``context.system_properties``;
None when the worker has no GPU). Every session of the worker then runs on that device (the
CUDA provider's ``device_id``). When CUDA was asked for but this onnxruntime build has no CUDA
provider (the CPU flavour, or both flavours installed over each other), the worker runs on the
CPU and says why, once, in the load log; the answer's ``model`` block and a metric label show
the providers actually in use.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: What onnxruntime's ``InferenceSession(providers=...)`` takes: a name, or (name, options).
ProviderSpec = str | tuple[str, dict[str, Any]]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_GPU_PROVIDERS = (CUDA, "TensorrtExecutionProvider")


@dataclass(frozen=True)
class DevicePlan:
    """The providers to open every session with (CPU always last), the device they target
    (``"cuda:1"`` or ``"cpu"``), and why the CPU was chosen although a GPU provider was asked
    for (None when it was not asked for, or is used)."""

    providers: tuple[ProviderSpec, ...]
    device: str
    fallback: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p if isinstance(p, str) else p[0] for p in self.providers)


def plan_devices(requested: Sequence[str], gpu_id: int | None, available: Sequence[str]) -> DevicePlan:
    """Plan a worker's providers.

    requested: the ``providers`` setting, in order of preference; gpu_id: the worker's GPU
    (None: no GPU for this worker); available: ``onnxruntime.get_available_providers()``.
    """
    wants_gpu = [p for p in requested if p in _GPU_PROVIDERS]
    chosen: list[ProviderSpec] = []
    fallback = None
    if wants_gpu and gpu_id is None:
        fallback = "the server assigned this worker no GPU"
    elif wants_gpu and gpu_id is not None:
        missing = [p for p in wants_gpu if p not in available]
        usable = [p for p in wants_gpu if p in available]
        if not usable:
            fallback = (f"{', '.join(missing)} not available in this onnxruntime (available: {list(available)}); "
                        "install the [gpu] flavour alone (pip install '.[gpu]' in an environment without "
                        "the onnxruntime CPU package)")
        for p in usable:
            chosen.append((p, {"device_id": gpu_id}))
    for p in requested:
        if p not in _GPU_PROVIDERS and p != CPU and p in available:
            chosen.append(p)
    chosen.append(CPU)
    device = f"cuda:{gpu_id}" if any(not isinstance(p, str) for p in chosen) else "cpu"
    return DevicePlan(tuple(chosen), device, fallback)


def in_use(session_providers: Sequence[str], plan: DevicePlan) -> tuple[tuple[str, ...], str]:
    """The providers a session really runs on (onnxruntime drops a provider whose libraries
    fail to load, with only a warning) and the device that means."""
    names = tuple(session_providers)
    device = plan.device if any(p in _GPU_PROVIDERS for p in names) else "cpu"
    return names, device
