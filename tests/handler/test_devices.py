"""Each TorchServe worker opens its sessions on its own GPU (mock contexts, no GPU needed),
falls back to the CPU with one clear log line, and reports the providers in use."""
from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort
import pytest

from handlers.concept_handler import ConceptExplainerHandler
from handlers.runtime import metrics as metrics_mod
from handlers.runtime.devices import plan_devices
from tests.handler.mock_context import make_context, prepare_batch, wire_request

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.mark.parametrize("requested, gpu_id, available, providers, device, falls_back", [
    ((CUDA, CPU), 1, (CUDA, CPU), ((CUDA, {"device_id": 1}), CPU), "cuda:1", False),
    ((CUDA, CPU), 0, (CUDA, CPU), ((CUDA, {"device_id": 0}), CPU), "cuda:0", False),
    ((CUDA, CPU), 1, ("AzureExecutionProvider", CPU), (CPU,), "cpu", True),  # both wheels installed
    ((CUDA, CPU), None, (CUDA, CPU), (CPU,), "cpu", True),  # TorchServe gave this worker no GPU
    ((CPU,), 3, (CUDA, CPU), (CPU,), "cpu", False),  # CPU asked for: no fallback to report
])
def test_plan_devices(requested, gpu_id, available, providers, device, falls_back):
    plan = plan_devices(requested, gpu_id, available)
    assert plan.providers == providers and plan.device == device
    assert (plan.fallback is not None) == falls_back


class RecordingSession(ort.InferenceSession):
    """A CPU session that records the providers it was asked for and reports them as in use
    (as a CUDA build on a GPU host would)."""

    requested: list[list] = []

    def __init__(self, path, sess_options=None, providers=None, **kw):
        RecordingSession.requested.append(list(providers))
        super().__init__(path, sess_options=sess_options, providers=[CPU])
        self._asked = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self):
        return self._asked


def load_worker(model_dir: Path, gpu_id):
    ctx = make_context(model_dir, {"providers": [CUDA, CPU]}, gpu_id=gpu_id)
    handler = ConceptExplainerHandler()
    handler.initialize(ctx)
    return handler, ctx


def test_two_workers_get_their_own_gpu(model_dir, sample_pngs, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    seen = {}
    for gpu_id in (0, 1):
        RecordingSession.requested = []
        handler, ctx = load_worker(model_dir, gpu_id)
        try:
            assert len(RecordingSession.requested) > 3  # classifier, encoders, decoders, reference AEs
            assert all(r == [(CUDA, {"device_id": gpu_id}), CPU] for r in RecordingSession.requested)
            (body,) = handler.handle(prepare_batch(ctx, [wire_request(sample_pngs[0], explain=True)]), ctx)
            seen[gpu_id] = body
        finally:
            handler.close()
    import json
    for gpu_id, body in seen.items():
        model = json.loads(body)["model"]
        assert model["device"] == f"cuda:{gpu_id}" and model["providers"] == [CUDA, CPU]


def test_a_worker_without_cuda_falls_back_and_says_so(model_dir, sample_pngs, monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    with caplog.at_level(logging.WARNING, logger="handlers.runtime.service"):
        handler, ctx = load_worker(model_dir, 1)
    try:
        lines = [r.getMessage() for r in caplog.records if "running on the CPU" in r.getMessage()]
        assert len(lines) == 1 and "CUDAExecutionProvider not available" in lines[0] and "[gpu]" in lines[0]
        import json
        (body,) = handler.handle(prepare_batch(ctx, [wire_request(sample_pngs[0])]), ctx)
        assert ctx.get_response_status(0)[0] == 200
        samples = handler.service.baseline_samples()
        (provider,) = [s for s in samples if s.name == metrics_mod.EXECUTION_PROVIDER]
        assert dict(provider.labels) == {"provider": CPU, "device": "cpu"}
        (body,) = handler.handle(prepare_batch(ctx, [wire_request(sample_pngs[0], explain=True)]), ctx)
        assert json.loads(body)["model"]["device"] == "cpu"
    finally:
        handler.close()
