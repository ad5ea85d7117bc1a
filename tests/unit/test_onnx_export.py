"""ONNX export leaves the model and the logging configuration as it found them."""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.onnx_export import export_classifier, onnx_export_quiet, parity, with_activations
from handlers.runtime.imaging import InputSpec


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer1(x)), 1))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_with_activations_removes_its_hooks_even_on_error():
    model = _Tiny().eval()
    with with_activations(model, ["layer1", "avgpool"]) as wrapped:
        assert _hooks(model) == 2
        logits, a1, pooled = wrapped(torch.zeros(2, 1, 8, 8))
        assert a1.shape == (2, 4, 8, 8) and pooled.shape == (2, 4, 1, 1)
    assert _hooks(model) == 0
    try:
        with with_activations(model, ["layer1"]):
            raise KeyError("boom")
    except KeyError:
        pass
    assert _hooks(model) == 0


def test_onnx_export_quiet_restores_the_logger_level():
    logger = logging.getLogger("torch.onnx")
    before = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with onnx_export_quiet():
            assert logger.level == logging.ERROR
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)


def test_export_classifier_leaves_no_hooks_and_no_global_log_level(tmp_path):
    torch.manual_seed(0)
    model = _Tiny().eval()
    level = logging.getLogger("torch.onnx").level
    spec = InputSpec(8, 8, 1, (0.5,), (0.25,))
    infos = export_classifier(model, spec, ["layer1", "avgpool"], tmp_path / "m.onnx")
    assert [(i.name, i.shape) for i in infos] == [("layer1", (4, 8, 8)), ("avgpool", (4, 1, 1))]
    assert _hooks(model) == 0 and logging.getLogger("torch.onnx").level == level
    assert parity(model, tmp_path / "m.onnx", spec, ["layer1", "avgpool"]) < 1e-5
    assert _hooks(model) == 0
    x = np.zeros((1, 1, 8, 8), np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model(torch.from_numpy(x)).numpy(), atol=1e-5)
