"""Build the benchmark's second model size: a ResNet-18-sized classifier at 224 x 224 with every
explanation artifact (concept autoencoders and network, ClaDec decoders and RefAEs, features).

    python bench/build_model.py --out build/bench/resnet18_224          # 7 to 10 minutes on 2 cores

For timing only: the classifier takes one training step (its weights are as good as untrained)
and every autoencoder and decoder trains one short epoch on a few hundred rendered images, so
the artifacts have the shapes and the cost of real ones, not their quality. It runs the same
`concept-explainer` steps as the demo build (export.cli), with small counts; the layer analysis
is left out (it adds names, not serving cost). ``--size``/``--arch`` give other sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from export import cli  # noqa: E402


def build(out: Path, arch: str = "resnet18_like", size: int = 224, n_train: int = 400, n_test: int = 100,
          ae_images: int = 300, seed: int = 0) -> dict:
    """Render, train one step, export, fit concepts, ClaDec and features into ``out / "bundle"``.
    Returns the build report (also written to ``out / "build-report.json"``)."""
    t0 = time.perf_counter()
    data, classifier, bundle = out / "data", out / "classifier", out / "bundle"
    report: dict = {"arch": arch, "size": size, "trained": "1 step (untrained for timing)"}
    report["render"] = cli.cmd_render(argparse.Namespace(out=data, n_train=n_train, n_test=n_test, size=size,
                                                         seed=seed, workers=None))
    report["train"] = cli.cmd_train(argparse.Namespace(
        data=data, out=classifier, arch=arch, size=None, limit=None, epochs=1, batch_size=16, lr=1e-3,
        seed=seed, max_steps=1, threads=None))
    report["export"] = cli.cmd_export(argparse.Namespace(
        classifier=classifier, model_file=None, model_class=None, weights=None, data=None, classes=None,
        size=None, channels=None, mean=None, std=None, layers=None, out=bundle, name=f"{arch}_{size}",
        version="bench"))
    report["concepts"] = cli.cmd_concepts(argparse.Namespace(
        bundle=bundle, classifier=classifier, data=data, layers=None, limit=None, test_limit=None, k=None,
        states=None, epochs=1, train_images=ae_images, validity_images=20, max_indegree=None,
        outcome_max_indegree=None, intervention_images=40, backoff=None, seed=seed))
    report["cladec"] = cli.cmd_cladec(argparse.Namespace(
        bundle=bundle, classifier=classifier, data=data, layers=None, alphas=None, limit=None, test_limit=None,
        epochs=1, train_images=ae_images, eval_images=20, fresh_classifier_epochs=0, seed=seed))
    report["features"] = cli.cmd_features(argparse.Namespace(
        bundle=bundle, classifier=classifier, data=data, layer=None, head=None, k=None, selectivity_share=None,
        selectivity_layers=None, finetune_epochs=0, limit=None, test_limit=None))
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
