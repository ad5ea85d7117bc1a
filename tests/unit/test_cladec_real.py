"""ClaDec on real images (method 2): scikit-learn's handwritten digits, not rendered here.

A classifier (the demo architecture) is trained briefly on the digits in the test; then,
at its middle layer and at its pooled penultimate layer, a ClaDec decoder (alpha 0) and a
reference autoencoder are trained with the build's settings on a shorter budget (120
steps instead of 200) and compared with the constant (training-mean) image. Before the
fixes of export/cladec.py the decoders stayed at a constant image (flat grey from
``avgpool`` at 64 px, MSE 1.01x the constant's; 0.70x at 32 px) and the RefAE's encoder
never trained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

from export.cladec import (ClaDecConfig, _activations, classifier_accuracy, new_refae, reconstruct, to_unit,
                           train_decoder, train_refae)
from export.data.digits import write_digits_folder
from export.data.loader import infer_input_spec, load_image_folder
from export.models.resnet import ARCHITECTURES
from export.train import TrainConfig, accuracy, train_classifier
from handlers.runtime.imaging import normalize

pytestmark = pytest.mark.slow
LAYERS = ("layer2", "avgpool")
STEPS = 120  # the default budget is 200 steps on this small set; 120 keeps the test short


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Per layer: MSE of ClaDec (alpha 0), RefAE and the constant image on the 450 test
    digits, the classifier's accuracy on the reconstructions, and the RefAE encoder's change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small convolutions: 2 threads on 2 busy cores were 10x slower
    try:
        yield _run(tmp_path_factory.mktemp("digits") / "digits")
    finally:
        torch.set_num_threads(threads)


def _run(folder: Path) -> dict[str, Any]:
    root = write_digits_folder(folder, size=32)
    spec = infer_input_spec(root)
    train = load_image_folder(root, spec, "train", progress=False)
    test = load_image_folder(root, spec, "test", progress=False)
    torch.manual_seed(0)
    clf = ARCHITECTURES["demo_resnet"](len(train.classes), spec.channels)
    train_classifier(clf, train, test, spec, TrainConfig(epochs=3, batch_size=64), progress=False)
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    cfg = ClaDecConfig(min_steps=STEPS)
    x_test = to_unit(test.pixels)
    constant = to_unit(train.pixels).mean(0, keepdim=True).expand_as(x_test)
    out: dict[str, Any] = {"classifier_accuracy": accuracy(clf, test, spec),
                           "mse_constant": float(F.mse_loss(constant, x_test))}
    for layer in LAYERS:
        acts_train, acts_test = _activations(clf, layer, train, spec), _activations(clf, layer, test, spec)
        dec, _ = train_decoder(acts_train, train, spec, cfg, 0.0, clf)
        rec = reconstruct(dec, acts_test)
        ref = new_refae(clf, layer, tuple(acts_train.shape[1:]), train, spec, cfg.seed, cfg.decoder_width)
        init = {k: v.clone() for k, v in ref.encoder.state_dict().items()}
        log = train_refae(ref, train, spec, cfg)
        ref_rec = reconstruct(ref, torch.from_numpy(normalize(test.pixels, spec)))
        out[layer] = {"mse_cladec": float(F.mse_loss(rec, x_test)), "mse_refae": float(F.mse_loss(ref_rec, x_test)),
                      "accuracy_cladec": classifier_accuracy(clf, rec, test.labels, spec),
                      "encoder_change": log.encoder_change,
                      "encoder_init": init, "encoder": ref.encoder.state_dict(), "classifier": clf.state_dict()}
    return out


def test_the_classifier_learned_the_digits(digits_run):
    assert digits_run["classifier_accuracy"] >= 0.9


@pytest.mark.parametrize("layer", LAYERS)
def test_cladec_reconstructions_beat_the_constant_image(digits_run, layer):
    """Decoders learn from the classifier's activations: MSE at most half the training-mean
    image's (a black or flat grey image would sit at the constant's level or worse)."""
    r = digits_run[layer]
    assert r["mse_cladec"] <= 0.5 * digits_run["mse_constant"], (layer, r["mse_cladec"], digits_run["mse_constant"])


def test_the_classifier_recognises_middle_layer_reconstructions(digits_run):
    assert digits_run["layer2"]["accuracy_cladec"] >= 0.5  # chance: 0.1


@pytest.mark.parametrize("layer", LAYERS)
def test_refae_trains_its_encoder_and_reconstructs_better(digits_run, layer):
    r = digits_run[layer]
    assert r["mse_refae"] < r["mse_cladec"] <= 0.5 * digits_run["mse_constant"]
    assert r["encoder_change"] > 0.01
    for name in ("stem.0.weight", "layer1.0.conv1.weight"):
        assert not torch.equal(r["encoder"][name], r["encoder_init"][name])
        assert not torch.equal(r["encoder"][name], r["classifier"][name])
