"""How many steps a ClaDec decoder needs: one layer's alpha-0 decoder trained from scratch for
each step count given (the decoder alone, no reference autoencoder), and how often the
classifier recognises its reconstructions of held-out images.

    python -m bench.cladec_steps --classifier build/bench/resnet18_224_trained/classifier \\
        --data build/bench/resnet18_224_trained/data --layer layer2 --steps 80 320

Training images, batch, width and precision follow ``export.cladec.ClaDecConfig`` with the
flags given (the 224 px model's build: 1,000 images, batches of 128, width 32, bf16). Prints,
per step count, the classifier's accuracy on the reconstructions (chance: 1 / classes), their
MSE against the held-out images and the seconds it took.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from export import pipeline
from export.cladec import ClaDecConfig, _activations, _subset, classifier_accuracy, reconstruct, to_unit, train_decoder
from export.data.loader import load_image_folder


def measure(classifier: Path, data: Path, layer: str, steps: Sequence[int], train_images: int = 1000,
            eval_images: int = 300, batch_size: int = 128, width: int = 32, precision: str = "bf16",
            seed: int = 0) -> list[dict[str, Any]]:
    """One row per step count: steps, recognised (accuracy of the classifier on the decoder's
    reconstructions of ``eval_images`` test images), mse (against those images, pixels in 0..1)
    and seconds (training and evaluation)."""
    loaded = pipeline.load_classifier(pipeline.ModelSource(classifier=classifier)).to("cpu")
    model, spec = loaded.model.eval(), loaded.spec
    for p in model.parameters():
        p.requires_grad_(False)
    train = _subset(load_image_folder(data, spec, "train", progress=False), train_images, seed)
    test = _subset(load_image_folder(data, spec, "test", progress=False), eval_images, seed + 1)
    acts_train, acts_test = _activations(model, layer, train, spec), _activations(model, layer, test, spec)
    target = to_unit(test.pixels)
    cfg = ClaDecConfig(layers=(layer,), train_images=train_images, batch_size=batch_size, decoder_width=width,
                       precision=precision, seed=seed)
    rows = []
    for n in steps:
        t0 = time.perf_counter()
        decoder, _ = train_decoder(acts_train, train, spec, cfg, 0.0, model, steps=n)
        with torch.no_grad():
            rec = reconstruct(decoder, acts_test)
        rows.append({"steps": n, "recognised": round(classifier_accuracy(model, rec, test.labels, spec), 4),
                     "mse": round(float(((rec - target) ** 2).mean()), 5),
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", type=Path, required=True, help="output folder of `concept-explainer train`")
    ap.add_argument("--data", type=Path, required=True, help="image folder with train/ and test/ splits")
    ap.add_argument("--layer", default="layer2")
    ap.add_argument("--steps", type=int, nargs="+", default=[80, 320])
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--eval-images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "auto"))
    args = ap.parse_args()
    for r in measure(args.classifier, args.data, args.layer, args.steps, args.train_images, args.eval_images,
                     args.batch_size, args.width, args.precision):
        print(f"{args.layer}, {r['steps']} steps: recognised {r['recognised']:.3f}, MSE {r['mse']:.4f}, "
              f"{r['seconds']} s")


if __name__ == "__main__":
    main()
