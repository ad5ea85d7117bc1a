"""Build the benchmark's second model size: a ResNet-18-sized classifier at 224 x 224 with every
explanation artifact (concept autoencoders and network, ClaDec decoders and RefAEs, features).

    python -m bench.build_model --out build/bench/resnet18_224                  # timing model, 7-10 min on 2 cores
    python -m bench.build_model --out build/bench/resnet18_224_trained --trained --device auto

Without ``--trained`` it is a timing model: the classifier takes one training step (its weights
are as good as untrained) and every autoencoder and decoder trains one short epoch on a few
hundred rendered images, so the artifacts have the shapes and the cost of real ones, not their
quality. With ``--trained`` the classifier trains ``--epochs`` epochs on ``--n-train`` rendered
images and the methods get the counts given (``--ae-images`` for the concept autoencoders and
ClaDec, ``--intervention-images``, ``--validity-images``), their defaults otherwise, plus the
layer analysis that names the concepts; the report records every step's wall time and the
device. It runs the same `concept-explainer` steps as the demo build (export.pipeline).
``--size``/``--arch`` give other sizes. ``--reuse-classifier`` keeps rendered data and a
trained classifier already in ``--out`` when its record shows the same architecture, size
and counts (the report then gives that training's recorded seconds, marked reused).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export import pipeline
from export.cladec import ClaDecConfig
from export.concepts import ConceptConfig
from export.device import resolve_device
from export.features import FeatureConfig
from export.pipeline import ModelSource, timed
from export.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Counts:
    """How much a build trains and measures (the timing model's counts by default)."""

    n_train: int = 400
    n_test: int = 100
    ae_images: int = 300
    epochs: int = 0  # classifier epochs; 0: one step (the timing model)
    intervention_images: int = 40
    validity_images: int = 20
    cladec_eval_images: int = 20
    ae_epochs: int | None = 1  # None: the methods' defaults (epochs with their least step counts)
    cladec_images: int | None = None  # None: ae_images
    cladec_epochs: int | None = None  # None: as ae_epochs
    analysis_images: int | None = None  # None: n_train (the layer analysis of a trained model)
    cladec_width: int = ClaDecConfig.decoder_width  # channels of a ClaDec decoder's first feature map
    cladec_batch: int = ClaDecConfig.batch_size  # images per ClaDec decoder and RefAE step


# Counts that fit the 45-minute budget of a 2-core build (docs/deployment.md says what each
# trades). The classifier needs its 10 epochs (held-out accuracy 0.53 after 6, 0.97-1.0 from 7).
# The concept autoencoders train 7 epochs of 16 steps (their losses flattened after 8-9 of the
# 12 the methods' 180-step floor gives). The network's interventions run on 160 training
# images (rows scale with them); the validity keeps 100 held-out images. ClaDec: a RefAE step
# (a fresh encoder up to the layer, the whole network for avgpool) takes 2.6-3 s in bf16 at
# batch 128, so the RefAEs and decoders get 80 steps on 1,000 images and only the alpha = 0
# decoder is served. At that budget layer2's ClaDec images were recognised in 24 % and 11 % of
# held-out images in two builds with these counts (RefAE 31 % and 33 %, chance 10 %), and in 9 %
# (RefAE 41 %) with 160 steps of 64: ClaDec needs more steps than 2 cores give here
# (docs/deployment.md).
# The layer analysis reads 1,500 images.
TRAINED = Counts(n_train=3000, n_test=500, ae_images=2000, epochs=10, intervention_images=160, validity_images=100,
                 cladec_eval_images=300, ae_epochs=7, cladec_images=1000, cladec_epochs=10, analysis_images=1500,
                 cladec_width=32, cladec_batch=128)

#: the counts the method steps in ``out / "bundle"`` were built with (a resumed build keeps
#: those steps only when they match)
METHOD_COUNTS = "method-counts.json"

#: bundle file whose presence means a step already ran (a resumed build skips it)
STEP_FILES = {"concepts": "concepts.json", "cladec": "cladec.json", "features": "features.json",
              "quantization": "quantization.json"}


def reusable_training(out: Path, arch: str, size: int, c: Counts) -> dict | None:
    """The training record of a classifier already built in ``out`` with ``arch``, ``size``
    and the counts of ``c`` (epochs, images), or None when there is none or it differs."""
    info_path = out / "classifier" / "classifier.json"
    if not info_path.exists() or not (out / "data" / "factors.csv").exists():
        return None
    info = json.loads(info_path.read_text())
    training = info.get("training")
    if not isinstance(training, dict):
        return None
    same = (info.get("architecture") == arch and info.get("input", {}).get("height") == size
            and training.get("epochs") == c.epochs and training.get("train_images") == c.n_train
            and training.get("test_images") == c.n_test)
    return training if same else None


def build(out: Path, arch: str = "resnet18_like", size: int = 224, n_train: int = 400, n_test: int = 100,
          ae_images: int = 300, seed: int = 0, counts: Counts | None = None, device: str = "auto",
          precision: str = "bf16", reuse_classifier: bool = False) -> dict:
    """Render, train, export, fit concepts, ClaDec and features into ``out / "bundle"`` (and the
    layer analysis for a trained model), torch on ``device``; a trained classifier, the concept
    autoencoders and ClaDec train in ``precision`` (:class:`export.train.TrainConfig`).
    ``counts`` None: the timing model with ``n_train``, ``n_test`` and ``ae_images``.
    ``reuse_classifier``: keep the data and classifier in ``out`` when
    :func:`reusable_training` finds them, and the method steps already in its bundle when they
    were built with the same counts, architecture, size and precision (``out /
    METHOD_COUNTS``; a build that stopped resumes at the first missing step, a build with other
    counts runs every method step again; a skipped step's seconds are the ones its file
    recorded). Returns the build report (also written to ``out / "build-report.json"``)."""
    c = counts or Counts(n_train=n_train, n_test=n_test, ae_images=ae_images)
    trained = c.epochs > 0
    t0 = time.perf_counter()
    data, classifier, bundle = out / "data", out / "classifier", out / "bundle"
    model = ModelSource(classifier=classifier)
    report: dict = {"arch": arch, "size": size, "device": str(resolve_device(device)), "counts": dataclasses.asdict(c),
                    "precision": precision if trained else "fp32",
                    "trained": f"{c.epochs} epochs" if trained else "1 step (untrained for timing)"}
    reused = reusable_training(out, arch, size, c) if reuse_classifier and trained else None
    if reused is None:
        timed(report, "render", lambda: pipeline.render(pipeline.RenderStep(
            out=data, n_train=c.n_train, n_test=c.n_test, size=size, seed=seed)))
        training = (TrainConfig(epochs=c.epochs, batch_size=64, lr=2e-3, seed=seed, precision=precision) if trained
                    else TrainConfig(epochs=1, batch_size=16, lr=1e-3, seed=seed, max_steps=1))
        timed(report, "train", lambda: pipeline.train(pipeline.TrainStep(data=data, out=classifier, arch=arch,
                                                                          device=device, training=training)))
    else:
        report["train"] = {"reused": True, **{k: v for k, v in reused.items() if k != "history"}}
        report.setdefault("step_seconds", {})["train"] = reused.get("seconds")
        report["reused_classifier"] = True

    method_record = {"arch": arch, "size": size, "precision": report["precision"], "counts": dataclasses.asdict(c)}
    counts_file = out / METHOD_COUNTS
    keep_steps = (reused is not None and counts_file.exists()
                  and json.loads(counts_file.read_text()) == method_record)
    out.mkdir(parents=True, exist_ok=True)
    counts_file.write_text(json.dumps(method_record, indent=2) + "\n")

    def step(name: str, run: Callable[[], dict[str, Any]]) -> None:
        done = bundle / STEP_FILES[name]
        if not keep_steps or not done.exists():
            timed(report, name, run)
            return
        recorded = json.loads(done.read_text()).get("report", {})  # the step's own report, as it ran
        report[name] = {"reused": True, **recorded}
        report.setdefault("step_seconds", {})[name] = recorded.get("seconds")

    if reused is None or not (bundle / "metadata.json").exists():
        timed(report, "export", lambda: pipeline.export_bundle(pipeline.ExportStep(
            out=bundle, model=model, name=f"{arch}_{size}", version="bench" + ("-trained" if trained else ""))))
    ae: dict[str, Any] = {} if c.ae_epochs is None else {"epochs": c.ae_epochs, "min_steps": 0}
    cladec_epochs = c.ae_epochs if c.cladec_epochs is None else c.cladec_epochs
    step("concepts", lambda: pipeline.add_concepts(pipeline.ConceptsStep(
        bundle=bundle, data=data, model=model, device=device,
        concepts=ConceptConfig(train_images=c.ae_images, validity_images=c.validity_images,
                               intervention_images=c.intervention_images, seed=seed,
                               precision=precision if trained else "fp32", **ae))))
    step("cladec", lambda: pipeline.add_cladec(pipeline.ClaDecStep(
        bundle=bundle, data=data, model=model, device=device,
        # only the served decoders, no alpha sweep and no fresh classifiers
        cladec=ClaDecConfig(train_images=c.cladec_images or c.ae_images, eval_images=c.cladec_eval_images,
                            fresh_classifier_epochs=0, sweep_alphas=(), seed=seed,
                            alphas=(0.0,) if trained else ClaDecConfig.alphas,
                            decoder_width=c.cladec_width, batch_size=c.cladec_batch,
                            precision=precision if trained else "fp32",
                            epochs=cladec_epochs, min_steps=ClaDecConfig.min_steps if cladec_epochs is None else 0))))
    step("features", lambda: pipeline.add_features(pipeline.FeaturesStep(
        bundle=bundle, data=data, model=model, device=device, features=FeatureConfig(finetune_epochs=0))))
    step("quantization", lambda: pipeline.quantize(pipeline.QuantizeStep(bundle=bundle, data=data)))
    if trained:
        timed(report, "analysis", lambda: {k: v for k, v in pipeline.analyze(pipeline.AnalyzeStep(
            bundle=bundle, data=data, model=model, device=device, images=c.analysis_images or c.n_train,
            out=out / "analysis")).items() if k != "concept_names"})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if reused is not None:  # every step's seconds, this run's and the reused ones'
        report["seconds_all_steps"] = round(sum(float(v or 0) for v in report["step_seconds"].values()), 1)
    (out / "build-report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/bench/resnet18_224")
    ap.add_argument("--arch", default="resnet18_like")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"),
                    help="the trained classifier's, the concept autoencoders' and ClaDec's training precision "
                    "(default: bf16, mixed)")
    ap.add_argument("--reuse-classifier", action="store_true",
                    help="keep the data and trained classifier already in --out when they match the counts")
    ap.add_argument("--trained", action="store_true", help="train the classifier and the methods for real "
                    f"(counts default to {dataclasses.asdict(TRAINED)})")
    for f in dataclasses.fields(Counts):
        ap.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                        help=f"(default: {getattr(Counts(), f.name)}, with --trained {getattr(TRAINED, f.name)})")
    args = ap.parse_args()
    base = TRAINED if args.trained else Counts()
    counts = dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Counts)
                                          if getattr(args, f.name) is not None})
    report = build(Path(args.out), args.arch, args.size, counts=counts, device=args.device, precision=args.precision,
                   reuse_classifier=args.reuse_classifier)
    print(f"bench model built in {report['seconds']} s on {report['device']}: {Path(args.out) / 'bundle'}; "
          f"step seconds {report['step_seconds']}")


if __name__ == "__main__":
    main()
