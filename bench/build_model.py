"""Build the benchmark's second model size: a ResNet-18-sized classifier at 224 x 224 with every
explanation artifact (concept autoencoders and network, ClaDec decoders and RefAEs, features).

    python -m bench.build_model --out build/bench/resnet18_224          # 7 to 10 minutes on 2 cores

For timing only: the classifier takes one training step (its weights are as good as untrained)
and every autoencoder and decoder trains one short epoch on a few hundred rendered images, so
the artifacts have the shapes and the cost of real ones, not their quality. It runs the same
`concept-explainer` steps as the demo build (export.pipeline), with small counts; the layer analysis
is left out (it adds names, not serving cost). ``--size``/``--arch`` give other sizes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from export import pipeline
from export.cladec import ClaDecConfig
from export.concepts import ConceptConfig
from export.features import FeatureConfig
from export.pipeline import ModelSource
from export.train import TrainConfig


def build(out: Path, arch: str = "resnet18_like", size: int = 224, n_train: int = 400, n_test: int = 100,
          ae_images: int = 300, seed: int = 0) -> dict:
    """Render, train one step, export, fit concepts, ClaDec and features into ``out / "bundle"``.
    Returns the build report (also written to ``out / "build-report.json"``)."""
    t0 = time.perf_counter()
    data, classifier, bundle = out / "data", out / "classifier", out / "bundle"
    model = ModelSource(classifier=classifier)
    report: dict = {"arch": arch, "size": size, "trained": "1 step (untrained for timing)"}
    report["render"] = pipeline.render(pipeline.RenderStep(out=data, n_train=n_train, n_test=n_test, size=size,
                                                           seed=seed))
    report["train"] = pipeline.train(pipeline.TrainStep(
        data=data, out=classifier, arch=arch,
        training=TrainConfig(epochs=1, batch_size=16, lr=1e-3, seed=seed, max_steps=1)))
    report["export"] = pipeline.export_bundle(pipeline.ExportStep(out=bundle, model=model, name=f"{arch}_{size}",
                                                                  version="bench"))
    report["concepts"] = pipeline.add_concepts(pipeline.ConceptsStep(
        bundle=bundle, data=data, model=model,
        concepts=ConceptConfig(epochs=1, min_steps=0, train_images=ae_images, validity_images=20,
                               intervention_images=40, seed=seed)))
    report["cladec"] = pipeline.add_cladec(pipeline.ClaDecStep(
        bundle=bundle, data=data, model=model,
        # a timing model: only the served decoders, no alpha sweep
        cladec=ClaDecConfig(epochs=1, min_steps=0, train_images=ae_images, eval_images=20,
                            fresh_classifier_epochs=0, sweep_alphas=(), seed=seed)))
    report["features"] = pipeline.add_features(pipeline.FeaturesStep(
        bundle=bundle, data=data, model=model, features=FeatureConfig(finetune_epochs=0)))
    report["quantization"] = pipeline.quantize(pipeline.QuantizeStep(bundle=bundle, data=data))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "build-report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/bench/resnet18_224")
    ap.add_argument("--arch", default="resnet18_like")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--ae-images", type=int, default=300)
    args = ap.parse_args()
    report = build(Path(args.out), args.arch, args.size, args.n_train, args.n_test, args.ae_images)
    print(f"bench model built in {report['seconds']} s: {Path(args.out) / 'bundle'}")


if __name__ == "__main__":
    main()
