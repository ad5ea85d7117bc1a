"""Classifier construction: project architectures by name, or a user's own ``nn.Module``."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from export.models.resnet import ARCHITECTURES


def build_model(architecture: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised project architecture (see ``ARCHITECTURES``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](num_classes, in_channels)


def load_user_model(model_file: str | Path, class_name: str, **kwargs: object) -> nn.Module:
    """Instantiate ``class_name`` from a Python file, as torch-model-archiver's ``--model-file`` does."""
    path = Path(model_file)
    spec = importlib.util.spec_from_file_location(f"user_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path} has no nn.Module subclass named {class_name!r}")
    return cls(**kwargs)


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as safetensors (no pickle)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors, or a ``.pt``/``.pth`` state dict with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict")
    expected = model.state_dict()
    for key, tensor in expected.items():  # name the first tensor that does not fit (load_state_dict lists all)
        if key not in state:
            raise ValueError(f"{path} does not fit {type(model).__name__}: it lacks {key} "
                             f"(shape {tuple(tensor.shape)})")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{path} does not fit {type(model).__name__}: {key} is {tuple(state[key].shape)}, "
                             f"the model's is {tuple(tensor.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{path} does not fit {type(model).__name__}: unexpected tensor {extra[0]} "
                         f"({len(extra)} in all)")
    model.load_state_dict(state)
    return model
