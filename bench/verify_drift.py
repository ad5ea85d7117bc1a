"""What live verification sees when traffic leaves the training distribution.

Loads a bundle as a worker does and, for held-out test images of its data folder and for
the same kind of rendered shapes on coloured backgrounds the classifier never saw
(:func:`export.data.renderer.render_on_colour`), verifies every concept of each served
answer against the network's own interventions, as sampled production verification does.
Prints, per set, the classifier's accuracy and the means of the live figures (agreement =
recall@3 of the answer's order against the network's effects, over all concepts and within
each layer; absolute error of P(target | do(state)); Lin's CCC per answer), beside the
bundle's offline figures.

    python -m bench.verify_drift --bundle build/shapes/bundle --data data/shapes
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.stats import write_json
from handlers.runtime.imaging import normalize, to_pixels
from handlers.runtime.service import ExplainerService
from handlers.runtime.settings import HandlerSettings
from handlers.runtime.verify import ALL_LAYERS, agreement, by_layer, verify_records

#: Background colours of the drifted set (RGB in [0, 1]): saturated, unlike the grey training backgrounds.
COLOURS = ((0.1, 0.75, 0.2), (0.85, 0.15, 0.6), (0.95, 0.8, 0.1), (0.1, 0.3, 0.9))


def drifted_images(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """``n`` rendered shapes on coloured backgrounds: (H, W, 3) uint8 images and their classes."""
    from export.data.renderer import image_rng, render_on_colour, sample_factors
    factors = sample_factors(np.random.default_rng(seed), n)
    images = [render_on_colour(f, COLOURS[i % len(COLOURS)], size, image_rng(seed, i)) for i, f in enumerate(factors)]
    return images, [f.shape for f in factors]


def held_out_images(data: Path, n: int, seed: int) -> tuple[list[np.ndarray], list[int], list[str]]:
    """``n`` test images of a data folder (``test/<class>/*.png``), their class indices and the class names."""
    classes = sorted(p.name for p in (data / "test").iterdir() if p.is_dir())
    files = sorted((data / "test").glob("*/*.png"))
    files = random.Random(seed).sample(files, min(n, len(files)))
    return ([np.asarray(Image.open(f).convert("RGB")) for f in files], [classes.index(f.parent.name) for f in files],
            classes)


def live_figures(service: ExplainerService, images: Sequence[np.ndarray], labels: Sequence[int]) -> dict[str, Any]:
    """Mean live verification figures over ``images`` (each verified over every concept),
    with the classifier's accuracy on them."""
    assert service.concepts is not None
    meta = service.meta
    agree: dict[str, list[float]] = {}
    error: dict[str, list[float]] = {}
    cccs: list[float] = []
    correct = 0
    for img, label in zip(images, labels):
        x = normalize(to_pixels(Image.fromarray(img), meta.input)[None], meta.input)
        out = service.classifier(x)
        target = int(np.argmax(out.logits[0]))
        correct += target == label
        batch = service.concepts.encode(out.activations)
        records = service.concepts.answer(batch, 0, target, service.settings.network_concepts)
        checks = verify_records(service.concepts, batch, 0, target, records)
        for layer, group in by_layer(checks).items():
            a = agreement(group)
            agree.setdefault(layer, []).append(a.recall3)
            error.setdefault(layer, []).extend(float(e) for c in group for e in c.abs_errors)
            if layer == ALL_LAYERS and a.ccc is not None:
                cccs.append(a.ccc)
    return {"images": len(images), "accuracy": round(correct / max(len(images), 1), 4),
            "agreement": {l: round(float(np.mean(v)), 4) for l, v in agree.items()},
            "probability_error": {l: round(float(np.mean(v)), 4) for l, v in error.items()},
            "ccc_per_answer_mean": round(float(np.mean(cccs)), 4) if cccs else None}


def offline_figures(service: ExplainerService) -> dict[str, Any]:
    """The bundle's offline figures the live ones are compared with (per layer and all)."""
    out: dict[str, Any] = {"agreement": {}, "probability_error": {}}
    for s in service.offline_verification_samples():
        labels = dict(s.labels)
        key = "agreement" if s.name.endswith("agreement") else "probability_error"
        out[key][labels["layer"]] = round(s.value, 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle folder (build/NAME/bundle)")
    parser.add_argument("--data", type=Path, required=True, help="its data folder, for held-out images")
    parser.add_argument("--images", type=int, default=200, help="images per set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    service = ExplainerService.load(args.bundle.parent, HandlerSettings(bundle_dir=args.bundle.name,
                                                                        verify_fraction=0.0), gpu_id=None)
    try:
        held, held_labels, _ = held_out_images(args.data, args.images, args.seed)
        size = service.meta.input.height
        shifted, shifted_labels = drifted_images(args.images, size, args.seed + 1)
        result = {"offline": offline_figures(service), "held_out": live_figures(service, held, held_labels),
                  "coloured_backgrounds": live_figures(service, shifted, shifted_labels)}
    finally:
        service.close()
    layers = list(result["held_out"]["agreement"])
    print(f"{'':<24}{'accuracy':>9}" + "".join(f"{'agree ' + l:>15}" for l in layers) + f"{'|dp| all':>10}{'ccc':>7}")
    for name in ("offline", "held_out", "coloured_backgrounds"):
        r = result[name]
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else ""
        cells = "".join(f"{r['agreement'].get(l, float('nan')):>15.3f}" for l in layers)
        ccc = f"{r['ccc_per_answer_mean']:.3f}" if r.get("ccc_per_answer_mean") is not None else ""
        print(f"{name:<24}{acc:>9}{cells}{r['probability_error'].get(ALL_LAYERS, float('nan')):>10.4f}{ccc:>7}")
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
