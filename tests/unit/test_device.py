"""``--device auto|cpu|cuda[:N]`` on the offline steps: how it resolves, which steps take it,
and that a step run on a device gives what the CPU gives (the CUDA case runs where torch
sees a GPU and is skipped elsewhere)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from export import cli, pipeline
from export.device import cpu_module, device_of, resolve_device, to_numpy
from export.pipeline import ModelSource
from export.train import TrainConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_is_the_cpu_without_cuda_and_the_current_gpu_with_it(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    _two_gpus(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device(" CUDA:1 ") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, words", [("cuda:2", "sees 2 CUDA device"), ("mps", "auto, cpu or cuda"),
                                         ("gpu", "auto, cpu or cuda"), ("cuda:x", "auto, cpu or cuda")])
def test_a_device_torch_cannot_use_is_refused_with_the_reason(monkeypatch, name, words):
    _two_gpus(monkeypatch)
    with pytest.raises(ValueError, match=words):
        resolve_device(name)


def test_cuda_on_a_machine_without_it_says_so(monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(ValueError, match="sees no CUDA device.*--device cpu or auto"):
        resolve_device("cuda")


def test_device_of_reads_parameters_then_buffers_and_defaults_to_the_cpu():
    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    buffers_only = nn.Module()
    buffers_only.register_buffer("b", torch.zeros(1, device="meta"))
    assert device_of(buffers_only) == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")
    assert device_of(nn.Linear(2, 2, device="meta")) == torch.device("meta")


def test_a_cpu_module_is_exported_as_itself_and_tensors_come_back_as_numpy():
    m = nn.Linear(3, 2)
    assert cpu_module(m) is m
    t = torch.arange(4.0, requires_grad=True) * 2
    assert np.array_equal(to_numpy(t), [0.0, 2.0, 4.0, 6.0])


TORCH_STEPS = ("train", "concepts", "cladec", "features", "analyze", "build", "build-demo")
CPU_ONLY_STEPS = ("export", "quantize", "archive")


@pytest.mark.parametrize("name", TORCH_STEPS + CPU_ONLY_STEPS)
def test_every_step_that_runs_torch_takes_device_and_the_others_do_not(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]  # type: ignore[attr-defined]
    text = sub.format_help()
    assert ("--device" in text) == (name in TORCH_STEPS)
    if name in TORCH_STEPS:
        assert "(default: auto)" in " ".join(text.split())


def test_an_unusable_device_fails_the_step_in_one_line(tiny_data, tmp_path, capsys):
    status = cli.main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "c"), "--device", "cuda:9",
                       "--max-steps", "1"])
    assert status == 1
    err = capsys.readouterr().err
    assert "concept-explainer train: device 'cuda:9'" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def _train(data: Path, out: Path, device: str) -> dict:
    # the step builds the model before TrainConfig.seed seeds training: start each from one RNG state
    torch.manual_seed(1234)
    return pipeline.train(pipeline.TrainStep(data=data, out=out, arch="demo_resnet", device=device,
                                             training=TrainConfig(epochs=1, batch_size=64, seed=0, max_steps=3)))


def test_the_cpu_device_trains_exactly_what_the_default_trains_on_a_cpu_machine(tiny_data, tmp_path, monkeypatch):
    _no_cuda(monkeypatch)
    a, b = _train(tiny_data, tmp_path / "auto", "auto"), _train(tiny_data, tmp_path / "cpu", "cpu")
    assert a["training"]["device"] == b["training"]["device"] == "cpu"
    wa, wb = load_file(tmp_path / "auto" / "weights.safetensors"), load_file(tmp_path / "cpu" / "weights.safetensors")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@CUDA
def test_a_cuda_build_matches_the_cpu_build(tiny_data, tmp_path):
    """Training on the GPU lands near the CPU's weights (convolutions may use TF32 there), and
    every later step runs there, exports graphs on the CPU that pass their parity checks, and
    records the device."""
    _train(tiny_data, tmp_path / "cpu", "cpu")
    info = _train(tiny_data, tmp_path / "gpu", "cuda")
    assert info["training"]["device"].startswith("cuda")
    wc, wg = load_file(tmp_path / "cpu" / "weights.safetensors"), load_file(tmp_path / "gpu" / "weights.safetensors")
    assert max(float(np.abs(wc[k] - wg[k]).max()) for k in wc) < 5e-2
    bundle = tmp_path / "bundle"
    pipeline.export_bundle(pipeline.ExportStep(out=bundle, model=ModelSource(classifier=tmp_path / "gpu"), name="g"))
    from export.cladec import ClaDecConfig
    from export.concepts import ConceptConfig
    step = {"bundle": bundle, "data": tiny_data, "device": "cuda"}
    concepts = pipeline.add_concepts(pipeline.ConceptsStep(**step, concepts=ConceptConfig(
        k=4, states=3, epochs=1, train_images=200, validity_images=20, intervention_images=40, min_steps=0)))
    assert max(concepts["autoencoders"]["onnx_parity_max_abs_diff"].values()) <= 1e-4
    cladec = pipeline.add_cladec(pipeline.ClaDecStep(**step, cladec=ClaDecConfig(
        alphas=(0.0,), sweep_alphas=(0.0,), epochs=1, min_steps=0, train_images=200, eval_images=40,
        fresh_classifier_epochs=1, fresh_classifier_images=200)))
    assert cladec["evaluation"] and max(cladec["onnx_parity_max_abs_diff"].values()) <= 5e-4
    features = pipeline.add_features(pipeline.FeaturesStep(**step))
    assert 0.0 <= features["accuracy_full_head"] <= 1.0
    meta = json.loads((bundle / "metadata.json").read_text())
    assert {"concepts", "cladec", "features"} <= set(meta)


def test_mixed_precision_training_lands_near_fp32_and_exports_float_weights(tiny_data, tmp_path):
    """precision "bf16" trains under bfloat16 autocast with channels-last tensors: the weights
    stay float32 and contiguous, land near the fp32 run's, and export to an ONNX graph that
    passes the same parity check; an unknown precision is refused."""
    torch.manual_seed(1234)
    fp32 = pipeline.train(pipeline.TrainStep(data=tiny_data, out=tmp_path / "fp32", arch="demo_resnet", device="cpu",
                                             training=TrainConfig(epochs=1, batch_size=64, seed=0, max_steps=3)))
    torch.manual_seed(1234)
    bf16 = pipeline.train(pipeline.TrainStep(data=tiny_data, out=tmp_path / "bf16", arch="demo_resnet", device="cpu",
                                             training=TrainConfig(epochs=1, batch_size=64, seed=0, max_steps=3,
                                                                  precision="bf16")))
    assert fp32["training"]["steps"] == bf16["training"]["steps"] == 3
    w32, w16 = load_file(tmp_path / "fp32" / "weights.safetensors"), load_file(tmp_path / "bf16" / "weights.safetensors")
    assert all(w16[k].dtype == w32[k].dtype for k in w32)
    diff = max(float(np.abs(w32[k] - w16[k]).max()) for k in w32 if w32[k].dtype == np.float32)
    assert 0 < diff < 5e-2  # bfloat16 products differ, three small steps keep them close
    bundle = tmp_path / "bundle"
    report = pipeline.export_bundle(pipeline.ExportStep(out=bundle, model=ModelSource(classifier=tmp_path / "bf16"), name="b"))
    assert report["parity_max_abs_diff"] <= 1e-4
    with pytest.raises(ValueError, match="precision"):
        pipeline.train(pipeline.TrainStep(data=tiny_data, out=tmp_path / "fp16", arch="demo_resnet", device="cpu",
                                          training=TrainConfig(epochs=1, max_steps=1, precision="fp16")))


def test_concept_autoencoders_train_in_mixed_precision(tiny_data):
    """ConceptConfig.precision "bf16" runs the autoencoders' training passes under bfloat16
    autocast: the autoencoders stay float32, their losses finite and close to the fp32 run's
    first-epoch losses; an unknown precision is refused."""
    from export.concepts import ConceptConfig, train_autoencoders
    from export.data.loader import load_image_folder
    from export.models import build_model
    from handlers.runtime.imaging import InputSpec
    torch.manual_seed(0)
    spec = InputSpec(32, 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = load_image_folder(tiny_data, spec, "train", limit=64, progress=False)
    model = build_model("demo_resnet", len(ds.classes), 3).eval()
    logs = {}
    for precision in ("fp32", "bf16"):
        cfg = ConceptConfig(k=4, epochs=1, min_steps=0, batch_size=32, train_images=64, precision=precision)
        aes, log = train_autoencoders(model, ds, spec, cfg, progress=False)
        assert all(p.dtype == torch.float32 for ae in aes.values() for p in ae.parameters())
        logs[precision] = log["history"][-1]
    assert all(np.isfinite(v) for v in logs["bf16"].values())
    for key, v in logs["fp32"].items():
        assert logs["bf16"][key] == pytest.approx(v, rel=0.1, abs=1e-3), key
    with pytest.raises(ValueError, match="precision"):
        train_autoencoders(model, ds, spec, ConceptConfig(precision="fp16"), progress=False)


def test_cladec_decoders_and_refaes_train_in_mixed_precision(tiny_data):
    """ClaDecConfig.precision "bf16" trains a decoder (alpha > 0: the classifier term too) and a
    RefAE under bfloat16 autocast: float32 weights, finite losses close to the fp32 run's; an
    unknown precision is refused."""
    from export.cladec import ClaDecConfig, _activations, new_refae, train_decoder, train_refae
    from export.data.loader import load_image_folder
    from export.models import build_model
    from handlers.runtime.imaging import InputSpec
    torch.manual_seed(0)
    spec = InputSpec(32, 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = load_image_folder(tiny_data, spec, "train", limit=48, progress=False)
    model = build_model("demo_resnet", len(ds.classes), 3).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    acts = _activations(model, "layer2", ds, spec)
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = ClaDecConfig(epochs=2, batch_size=16, precision=precision)
        dec, log = train_decoder(acts, ds, spec, cfg, 0.01, model)
        ref = new_refae(model, "layer2", tuple(acts.shape[1:]), ds, spec)
        ref_log = train_refae(ref, ds, spec, cfg)
        assert all(p.dtype == torch.float32 for m in (dec, ref) for p in m.parameters())
        losses[precision] = (log.final_loss, ref_log.final_loss)
    assert all(np.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.15)
    with pytest.raises(ValueError, match="precision"):
        train_decoder(acts, ds, spec, ClaDecConfig(epochs=1, precision="fp16"), 0.0, model)


def test_cached_activations_train_the_autoencoders_as_recomputed_ones_do(tiny_data):
    """The concept autoencoders see the same activations whether they are computed once and
    kept or recomputed every batch (activation_cache_mib 0): the same losses, epoch by epoch."""
    from export.concepts import ConceptConfig, train_autoencoders
    from export.data.loader import load_image_folder
    from export.models import build_model
    from handlers.runtime.imaging import InputSpec
    torch.manual_seed(0)
    spec = InputSpec(32, 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = load_image_folder(tiny_data, spec, "train", limit=64, progress=False)
    model = build_model("demo_resnet", len(ds.classes), 3).eval()
    logs = {}
    for mib in (0, 4096):
        cfg = ConceptConfig(k=4, epochs=2, min_steps=0, batch_size=32, train_images=64, activation_cache_mib=mib)
        _, log = train_autoencoders(model, ds, spec, cfg, progress=False)
        assert log["activations_cached"] is (mib > 0)
        assert log["prefix_on_one_image"] == list(cfg.layers)
        logs[mib] = log["history"]
    for cached, recomputed in zip(logs[4096], logs[0]):
        for key, v in recomputed.items():
            assert cached[key] == pytest.approx(v, rel=1e-3, abs=1e-6), key


def test_auto_precision_follows_the_devices_bfloat16_units(monkeypatch):
    """"auto" is bf16 exactly where fast_bf16 says the device has bfloat16 units; "fp32" and
    "bf16" ignore the device; anything else is refused."""
    from export import device as dev
    cpu = torch.device("cpu")
    for has_units in (True, False):
        monkeypatch.setattr(dev, "fast_bf16", lambda d, v=has_units: v)
        assert dev.is_mixed("auto", cpu) is has_units
        assert dev.is_mixed("bf16", cpu) is True and dev.is_mixed("fp32", cpu) is False
    with pytest.raises(ValueError, match="precision"):
        dev.is_mixed("fp16", cpu)


def test_fast_bf16_reads_the_cpus_instruction_sets(monkeypatch):
    from export import device as dev
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        assert dev.fast_bf16(torch.device("cpu")) is (amx or avx)
    assert dev.fast_bf16(torch.device("meta")) is False


def test_a_project_classifier_infers_in_channels_last_on_the_cpu_with_the_same_logits(tiny_classifier, tmp_path):
    """On the CPU the build's own architectures switch to channels-last weights (faster float32
    convolutions): the logits stay those of the contiguous model up to float rounding. A
    user's model keeps its layout (its code may ``view`` activations)."""
    from safetensors.torch import save_file
    loaded = pipeline.load_classifier(ModelSource(classifier=tiny_classifier))
    conv = next(m for m in loaded.model.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(4, loaded.spec.channels, loaded.spec.height, loaded.spec.width)
    with torch.no_grad():
        before = loaded.model(x)
        assert conv.weight.is_contiguous()
        on_cpu = loaded.to("cpu")
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        assert torch.allclose(on_cpu.model(x), before, atol=1e-4, rtol=1e-4)

    user_file = tmp_path / "user_net.py"
    user_file.write_text("from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
                         "        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 3)\n"
                         "        self.fc = nn.Linear(4 * 30 * 30, 2)\n\n    def forward(self, x):\n"
                         "        h = self.conv(x)\n        return self.fc(h.view(h.shape[0], -1))\n")
    weights = tmp_path / "user_net.safetensors"
    from export.models import load_user_model
    save_file(load_user_model(user_file, "Net").state_dict(), str(weights))
    user = pipeline.load_classifier(ModelSource(model_file=user_file, model_class="Net", weights=weights,
                                                classes=("a", "b"), size=32, channels=3)).to("cpu")
    assert user.model.conv.weight.is_contiguous()
    with torch.no_grad():
        assert user.model(torch.randn(2, 3, 32, 32)).shape == (2, 2)  # its view still works
