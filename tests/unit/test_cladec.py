"""ClaDec decoders and reference autoencoders (method 2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.cladec import (ClaDecConfig, Decoder, RefAE, cladec_loss, object_weights, renormalize,
                           to_unit)
from export.data.loader import ImageDataset
from export.models import build_model
from handlers.runtime.cladec import to_uint8_images
from handlers.runtime.imaging import InputSpec, normalize


@pytest.mark.parametrize("act_shape, size, vector, start", [((64, 1, 1), 64, True, 8), ((64,), 32, True, 8),
                                                            ((512,), 224, True, 7), ((8, 1, 1), 96, True, 6),
                                                            ((16,), 28, True, 7), ((16,), 4, True, 4),
                                                            ((32, 16, 16), 64, False, 16), ((16, 8, 8), 32, False, 8),
                                                            ((128, 28, 28), 224, False, 28), ((8, 28, 28), 28, False, 28)])
def test_decoder_shapes_and_range(act_shape, size, vector, start):
    dec = Decoder(act_shape, 3, size)
    assert dec.vector == vector
    with torch.no_grad():
        out = dec(torch.randn(2, *act_shape))
    assert out.shape == (2, 3, size, size)
    assert 0 <= float(out.min()) and float(out.max()) <= 1  # sigmoid output
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dec.modules())
    n_up = sum(isinstance(m, torch.nn.ConvTranspose2d) for m in dec.modules())
    assert 2 ** n_up * start == size


def test_decoder_width_keeps_a_spatial_layers_channels():
    """``width``: the first feature map's channels, at least a spatial layer's own C; the
    channels halve (not below 16) at each doubling; a vector's decoder takes the width as given."""
    def first_channels(dec: Decoder) -> int:
        entry = dec.entry
        return entry.out_channels if isinstance(entry, torch.nn.Conv2d) else entry.out_features // dec.start ** 2
    assert first_channels(Decoder((32, 16, 16), 3, 64)) == 32
    assert first_channels(Decoder((32, 16, 16), 3, 64, 128)) == 128
    assert first_channels(Decoder((256, 14, 14), 3, 224, 128)) == 256
    assert first_channels(Decoder((64,), 3, 64, 128)) == 128 and first_channels(Decoder((64,), 3, 64)) == 64
    ups = [m.out_channels for m in Decoder((32, 16, 16), 3, 64, 128).modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert ups == [64, 3]


def test_decoder_rejects_non_power_of_two_growth():
    with pytest.raises(ValueError):
        Decoder((16, 7, 7), 3, 64)
    with pytest.raises(ValueError):
        Decoder((16,), 3, 225)  # a vector would have to start at 225 x 225


def test_refae_is_freshly_initialised_copy_up_to_layer():
    torch.manual_seed(0)
    clf = build_model("demo_resnet", 10, 3)
    ref = RefAE(clf, "layer2", Decoder((32, 8, 8), 3, 32))
    a = dict(clf.named_parameters())["layer1.0.conv1.weight"]
    b = dict(ref.encoder.named_parameters())["layer1.0.conv1.weight"]
    assert a.shape == b.shape and not torch.equal(a, b)
    assert ref(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def _random_images(n: int, size: int, channels: int, classes: int, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    pix = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    return ImageDataset(pix, rng.integers(0, classes, n).astype(np.int64), tuple(map(str, range(classes))), [""] * n)


def test_refae_encoder_trains_from_scratch():
    """The RefAE's encoder is trained end to end (the classifier it is copied from is frozen,
    as build_cladec freezes it): its weights up to the layer move away from their fresh
    initialisation and differ from the classifier's; the layers after it get no gradient."""
    torch.manual_seed(0)
    clf = build_model("demo_resnet", 4, 3).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    spec = InputSpec(32, 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = _random_images(64, 32, 3, 4)
    ref = RefAE(clf, "layer2", Decoder((32, 8, 8), 3, 32))
    assert all(p.requires_grad for p in ref.encoder.parameters())
    from export.cladec import train_refae
    init = {k: v.detach().clone() for k, v in ref.encoder.named_parameters()}
    log = train_refae(ref, ds, spec, ClaDecConfig(epochs=3, batch_size=64))
    assert log.steps == 3 and log.encoder_change is not None and log.encoder_change > 0
    trained = dict(ref.encoder.named_parameters())
    original = dict(clf.named_parameters())
    for name in ("stem.0.weight", "layer1.0.conv1.weight", "layer2.0.conv2.weight", "layer2.0.bn2.weight"):
        assert not torch.equal(trained[name], init[name]), f"{name} did not train"
        assert not torch.equal(trained[name], original[name])
    assert torch.equal(trained["fc.weight"], init["fc.weight"])  # after the layer: untouched
    assert not any(p.requires_grad for p in ref.parameters())  # frozen once trained


def test_decoder_standardises_its_input_with_constant_buffers():
    """fit_input_statistics stores per-channel mean/std as buffers (not parameters: they stay
    fixed in training) and the decoder takes raw activations."""
    torch.manual_seed(0)
    acts = torch.rand(50, 16, 4, 4) * torch.linspace(0.1, 9.0, 16).view(1, -1, 1, 1) + 3.0
    acts[:, 5] = 0.0  # a dead channel: its std is floored, not zero
    dec = Decoder((16, 4, 4), 1, 16)
    dec.fit_input_statistics(acts)
    z = dec.standardise(acts)
    live = [c for c in range(16) if c != 5]
    torch.testing.assert_close(z[:, live].mean(dim=(0, 2, 3)), torch.zeros(15), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, live].std(dim=(0, 2, 3)), torch.ones(15), atol=1e-2, rtol=0)
    assert torch.isfinite(z).all() and float(z[:, 5].abs().max()) == 0.0
    assert {"act_mean", "act_std"} <= set(dict(dec.named_buffers()))
    assert "act_mean" not in dict(dec.named_parameters())
    vec = Decoder((8,), 1, 32)
    vec.fit_input_statistics(torch.randn(40, 8) * 5 + 2)
    assert vec.act_mean.shape == (8,) and float(vec.act_std.min()) > 1


def test_decoder_output_starts_at_the_mean_pixel():
    dec = Decoder((16, 8, 8), 3, 32)
    dec.set_output_prior([0.1, 0.5, 0.8])
    torch.testing.assert_close(torch.sigmoid(dec.output_layer.bias), torch.tensor([0.1, 0.5, 0.8]))
    with torch.no_grad():
        torch.nn.init.zeros_(dec.output_layer.weight)
        out = dec(torch.rand(2, 16, 8, 8))
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.tensor([0.1, 0.5, 0.8]))


def test_standardising_decoder_exports_to_onnx_on_raw_activations(tmp_path: Path):
    from export.onnx_export import export_module, module_parity
    torch.manual_seed(0)
    dec = Decoder((8, 4, 4), 1, 16)
    dec.fit_input_statistics(torch.rand(30, 8, 4, 4) * 7 + 1)
    export_module(dec, torch.zeros(2, 8, 4, 4), tmp_path / "d.onnx", "activation", "reconstruction")
    assert module_parity(dec, tmp_path / "d.onnx", (8, 4, 4), nonneg=True) <= 1e-4


def test_pixel_conversions_roundtrip():
    spec = InputSpec(8, 8, 3, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    px = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    unit = to_unit(px)
    assert unit.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(to_uint8_images(unit.numpy()), px)
    torch.testing.assert_close(renormalize(unit, spec), torch.from_numpy(normalize(px, spec)))


def test_cladec_bundle_report(tiny_full_bundle: Path):
    doc = json.loads((tiny_full_bundle / "cladec.json").read_text())
    assert doc["format"] == "cladec/1"
    report = doc["report"]
    rows = report["evaluation"]
    assert {(r["layer"], r["alpha"]) for r in rows} == {("layer2", 0.0), ("layer2", 0.001),
                                                      ("avgpool", 0.0), ("avgpool", 0.001)}
    for r in rows:
        assert 0 <= r["mse_cladec"] <= 1 and 0 <= r["mse_refae"] <= 1 and 0 <= r["mse_constant_image"] <= 1
        for key in ("classifier_accuracy_on_cladec", "classifier_accuracy_on_refae",
                    "fresh_classifier_accuracy_on_cladec", "fresh_classifier_accuracy_on_refae",
                    "fresh_classifier_accuracy_on_real"):
            assert 0 <= r[key] <= 1
    # the alpha sweep (report only): served alphas and sweep_alphas, per layer
    sweep_alphas = sorted(set(report["config"]["alphas"]) | set(report["config"]["sweep_alphas"]))
    assert sorted((r["layer"], r["alpha"]) for r in report["sweep"]) == sorted(
        (l, a) for l in ("layer2", "avgpool") for a in sweep_alphas)
    for r in report["sweep"]:
        assert r["served"] == (r["alpha"] in (0.0, 0.001))
        assert 0 <= r["mse"] <= 1 and 0 <= r["classifier_accuracy"] <= 1
        fc = r["fresh_classifier"]
        assert fc["accuracy"] == r["fresh_classifier_accuracy"] and 1 <= fc["best_epoch"] <= fc["epochs_run"]
    assert [r["layer"] for r in report["refae"]] == ["layer2", "avgpool"]
    assert all(r["encoder_relative_change"] > 0 for r in report["refae"])
    for ref in report["refae"]:  # every decoder of a layer gets the RefAE's budget (shared MSE start included)
        assert {r["steps"] for r in report["sweep"] if r["layer"] == ref["layer"]} == {ref["steps"]}
    base = report["baselines"]
    assert 0 < base["mse_constant_image"] < 1 and 0 <= base["classifier_accuracy_on_real"] <= 1
    assert 0 <= base["fresh_classifier_on_real"]["accuracy"] <= 1
    assert max(report["onnx_parity_max_abs_diff"].values()) <= 1e-4
    assert set(report["onnx_parity_max_abs_diff"]) == {d["decoder_file"] for d in doc["decoders"]} | {
        d["refae_file"] for d in doc["decoders"]}  # sweep-only decoders are not exported
    manifest = json.loads((tiny_full_bundle / "manifest.json").read_text())["files"]
    for d in doc["decoders"]:
        assert d["decoder_file"] in manifest and d["refae_file"] in manifest


def test_cladec_loss_mixes_mse_and_cross_entropy():
    torch.manual_seed(0)
    spec = InputSpec(8, 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    clf = build_model("demo_resnet", 4, 3).eval()
    rec, target = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    labels = torch.tensor([0, 2, 3])
    mse = float(((rec - target) ** 2).mean())
    with torch.no_grad():
        logp = torch.log_softmax(clf(renormalize(rec, spec)), dim=1)
    ce = float(-logp[torch.arange(3), labels].mean())
    assert float(cladec_loss(rec, target, 0.0)) == pytest.approx(mse, rel=1e-6)
    assert float(cladec_loss(rec, target, 0.0, clf, spec, labels)) == pytest.approx(mse, rel=1e-6)
    assert float(cladec_loss(rec, target, 0.25, clf, spec, labels)) == pytest.approx(0.75 * mse + 0.25 * ce, rel=1e-5)


def test_object_pixels_weigh_more_in_the_reconstruction_error():
    """A 2x2 patch on a plain background: its 4 pixels weigh 1 + w, the other 60 weigh 1, and
    the loss is the weighted mean of the squared errors (hand-computed); a plain image keeps
    the plain MSE."""
    target = torch.full((1, 3, 8, 8), 0.5)
    target[:, :, 3:5, 3:5] = torch.tensor([1.0, 0.2, 0.5])[:, None, None]  # differs by 0.8 in sum
    weights = object_weights(target, 10.0)
    assert weights.shape == (1, 1, 8, 8)
    assert float(weights.sum()) == 60 + 4 * 11 and float(weights[0, 0, 3, 3]) == 11.0
    rec = target.clone()
    rec[:, :, 3, 3] += 0.1   # an object pixel off by 0.1 in each channel
    rec[:, :, 0, 0] += 0.2   # a background pixel off by 0.2
    expected = (11 * 3 * 0.1 ** 2 + 1 * 3 * 0.2 ** 2) / 3 / (60 + 44)
    assert float(cladec_loss(rec, target, 0.0, object_weight=10.0)) == pytest.approx(expected, rel=1e-5)
    plain = torch.full((2, 3, 8, 8), 0.3)  # no object anywhere
    off = plain + 0.1 * torch.rand(2, 3, 8, 8)
    assert float(cladec_loss(off, plain, 0.0, object_weight=10.0)) == pytest.approx(
        float(cladec_loss(off, plain, 0.0)), rel=1e-6)


def test_fresh_classifier_check_can_be_skipped():
    """fresh_classifier_epochs 0 skips the check: None in the report, "skipped" in the table."""
    from export.cladec import fresh_classifier, format_report
    assert fresh_classifier(None, None, None, None, None, None, ClaDecConfig(fresh_classifier_epochs=0)) is None
    row = {"layer": "layer2", "alpha": 0.0, "mse_cladec": 0.1, "mse_refae": 0.2, "classifier_accuracy_on_cladec": 0.9,
           "classifier_accuracy_on_refae": 0.5, "fresh_classifier_accuracy_on_cladec": None,
           "fresh_classifier_accuracy_on_refae": 0.25}
    table = format_report({"evaluation": [row]})
    assert "skipped" in table and "0.2500" in table


def test_fresh_classifier_stops_early_on_held_out_accuracy():
    """Brightness classes: the fresh classifier learns them, its validation accuracy stops
    improving, and it stops after ``patience`` more epochs, well before the maximum; the
    test accuracy is the best epoch's."""
    from export.cladec import fresh_classifier
    rng = np.random.default_rng(0)
    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        pix = (rng.integers(0, 60, (n, 16, 16, 1)) + 190 * y[:, None, None, None]).astype(np.uint8)
        return pix, y.astype(np.int64)
    (xtr, ytr), (xte, yte) = images(120), images(60)
    spec = InputSpec(16, 16, 1, (0.5,), (0.3,))
    cfg = ClaDecConfig(fresh_classifier_epochs=40, fresh_classifier_patience=2, fresh_classifier_batch_size=32)
    res = fresh_classifier(lambda: build_model("demo_resnet", 2, 1), xtr, ytr, xte, yte, spec, cfg)
    assert res.stopped == "plateau" and res.epochs_run == res.best_epoch + 2 < 40
    assert res.validation_accuracy == 1.0 and res.accuracy >= 0.95


def test_format_report_shows_baselines_and_sweep():
    from export.cladec import format_report
    fc = {"accuracy": 0.8, "validation_accuracy": 0.82, "best_epoch": 5, "epochs_run": 7, "stopped": "plateau",
          "seconds": 1.0}
    report = {"evaluation": [],
              "baselines": {"mse_constant_image": 0.058, "classifier_accuracy_on_real": 0.98,
                            "fresh_classifier_on_real": {**fc, "accuracy": 0.97}},
              "refae": [{"layer": "layer2", "mse": 0.003, "classifier_accuracy": 0.9, "fresh_classifier_accuracy": 0.8,
                         "fresh_classifier": fc}],
              "sweep": [{"layer": "layer2", "alpha": a, "mse": 0.01, "classifier_accuracy": 0.95,
                         "fresh_classifier_accuracy": 0.8, "fresh_classifier": fc} for a in (0.0, 0.1)]}
    table = format_report(report)
    assert "0.0580" in table and "(ceiling) 0.9700" in table and "steps" in table
    assert "RefAE" in table and "a=0.1" in table and "5/7, plateau" in table
