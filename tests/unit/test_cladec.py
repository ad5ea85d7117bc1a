"""ClaDec decoders and reference autoencoders (method 2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.cladec import Decoder, RefAE, cladec_loss, renormalize, to_unit
from export.models import build_model
from handlers.runtime.cladec import to_uint8_images
from handlers.runtime.imaging import InputSpec, normalize


@pytest.mark.parametrize("act_shape, size, vector, start", [((64, 1, 1), 64, True, 1), ((64,), 32, True, 1),
                                                            ((512,), 224, True, 7), ((8, 1, 1), 96, True, 3),
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
    rows = doc["report"]["evaluation"]
    assert {(r["layer"], r["alpha"]) for r in rows} == {("layer2", 0.0), ("layer2", 0.001),
                                                      ("avgpool", 0.0), ("avgpool", 0.001)}
    for r in rows:
        assert 0 <= r["mse_cladec"] <= 1 and 0 <= r["mse_refae"] <= 1
        for key in ("classifier_accuracy_on_cladec", "classifier_accuracy_on_refae",
                    "fresh_classifier_accuracy_on_cladec", "fresh_classifier_accuracy_on_refae"):
            assert 0 <= r[key] <= 1
    assert max(doc["report"]["onnx_parity_max_abs_diff"].values()) <= 1e-4
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


def test_fresh_classifier_check_can_be_skipped():
    """fresh_classifier_epochs 0 skips the check: None in the report, "skipped" in the table."""
    from export.cladec import _fresh_accuracy, format_report
    assert _fresh_accuracy(None, None, None, None, None, None, 0, 0) is None
    row = {"layer": "layer2", "alpha": 0.0, "mse_cladec": 0.1, "mse_refae": 0.2, "classifier_accuracy_on_cladec": 0.9,
           "classifier_accuracy_on_refae": 0.5, "fresh_classifier_accuracy_on_cladec": None,
           "fresh_classifier_accuracy_on_refae": 0.25}
    table = format_report({"evaluation": [row]})
    assert "skipped" in table and "0.2500" in table
