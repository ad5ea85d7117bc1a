"""``concept-explainer``: the offline pipeline, one subcommand per step.

    concept-explainer render     --out data/shapes                  # demo data + factors.csv
    concept-explainer train      --data data/shapes --out build/shapes/classifier
    concept-explainer export     --classifier build/shapes/classifier --out build/shapes/bundle
    concept-explainer concepts   --bundle build/shapes/bundle --data data/shapes --classifier build/shapes/classifier
    concept-explainer cladec     --bundle build/shapes/bundle --data data/shapes --classifier build/shapes/classifier
    concept-explainer features   --bundle build/shapes/bundle --data data/shapes --classifier build/shapes/classifier
    concept-explainer analyze    --bundle build/shapes/bundle --data data/shapes --classifier build/shapes/classifier
    concept-explainer archive    --bundle build/shapes/bundle --name shapes --model-store model_store
    concept-explainer build-demo                                    # all of the above
    concept-explainer query      --image x.png --model shapes       # ask a running TorchServe

Bring your own model: ``export --model-file net.py --model-class Net --weights w.safetensors
--data my_images/`` (classes and input size from the data, or ``--classes``/``--size``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from handlers.runtime.bundle import ModelMetadata
from handlers.runtime.imaging import InputSpec

CLASSIFIER_WEIGHTS = "weights.safetensors"
CLASSIFIER_INFO = "classifier.json"


def cmd_render(args: argparse.Namespace) -> dict:
    from export.data.renderer import render_dataset
    t0 = time.perf_counter()
    out = render_dataset(args.out, n_train=args.n_train, n_test=args.n_test, size=args.size,
                         seed=args.seed, workers=args.workers)
    info = {"out": str(out), "images": args.n_train + args.n_test, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"rendered {info['images']} images into {out} in {info['seconds']} s")
    return info


def cmd_digits(args: argparse.Namespace) -> dict:
    from export.data.digits import write_digits_folder
    out = write_digits_folder(args.out, size=args.size, seed=args.seed)
    print(f"wrote scikit-learn's 1,797 handwritten digits ({args.size} px) into {out}/train and {out}/test")
    return {"out": str(out)}


def cmd_train(args: argparse.Namespace) -> dict:
    import torch
    from export.data.loader import infer_input_spec, load_image_folder
    from export.models import build_model, save_weights
    from export.train import TrainConfig, train_classifier
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = infer_input_spec(args.data, size=args.size)
    train = load_image_folder(args.data, spec, "train", limit=args.limit)
    test = load_image_folder(args.data, spec, "test", limit=args.limit and max(args.limit // 4, 1))
    model = build_model(args.arch, len(train.classes), spec.channels)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      max_steps=args.max_steps)
    result = train_classifier(model, train, test, spec, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / CLASSIFIER_WEIGHTS)
    info = {"architecture": args.arch, "classes": list(train.classes), "input": spec.to_json(),
            "training": {"epochs": args.epochs, "steps": result.steps, "train_images": len(train),
                         "test_images": len(test), "test_accuracy": round(result.test_accuracy, 4),
                         "seconds": round(result.seconds, 1), "threads": torch.get_num_threads(),
                         "history": result.history}}
    (out / CLASSIFIER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"trained {args.arch}: held-out accuracy {result.test_accuracy:.4f} "
          f"in {result.seconds:.0f} s ({result.steps} steps, {torch.get_num_threads()} threads)")
    return info


def _load_classifier(args: argparse.Namespace):
    """(model, spec, classes, info) from a ``train`` output folder or a user's model file."""
    model, spec, classes, info, _ = _load_classifier_and_factory(args)
    return model, spec, classes, info


def _load_classifier_and_factory(args: argparse.Namespace):
    """Like :func:`_load_classifier`, plus a factory for a freshly initialised copy."""
    from export.data.loader import infer_input_spec, scan_image_folder
    from export.models import build_model, load_user_model, load_weights
    if args.classifier:
        info = json.loads((Path(args.classifier) / CLASSIFIER_INFO).read_text())
        spec = InputSpec.from_json(info["input"])
        def factory():
            return build_model(info["architecture"], len(info["classes"]), spec.channels)
        model = factory()
        load_weights(model, Path(args.classifier) / CLASSIFIER_WEIGHTS)
        return model.eval(), spec, tuple(info["classes"]), info, factory
    if not (args.model_file and args.model_class and args.weights):
        raise SystemExit("export needs --classifier DIR, or --model-file, --model-class and --weights")
    if args.data:
        classes, _ = scan_image_folder(args.data)
        spec = infer_input_spec(args.data, size=args.size, channels=args.channels)
    else:
        if not (args.classes and args.size):
            raise SystemExit("without --data, give --classes and --size (and --channels, --mean, --std)")
        classes = tuple(c.strip() for c in args.classes.split(","))
        ch = args.channels or 3
        spec = InputSpec(args.size, args.size, ch, tuple(args.mean or [0.5] * ch), tuple(args.std or [0.25] * ch))
    if args.classes:
        classes = tuple(c.strip() for c in args.classes.split(","))
    def user_factory():
        return load_user_model(args.model_file, args.model_class)
    model = user_factory()
    load_weights(model, args.weights)
    return model.eval(), spec, classes, {"model_file": str(args.model_file), "model_class": args.model_class}, user_factory


def cmd_export(args: argparse.Namespace) -> dict:
    from export.archive import write_bundle
    from export.onnx_export import INPUT_NAME, LOGITS_NAME, default_layers, export_classifier, parity
    model, spec, classes, info = _load_classifier(args)
    layers = args.layers.split(",") if args.layers else default_layers(model)
    report: dict = {}

    def fill(tmp: Path) -> ModelMetadata:
        infos = export_classifier(model, spec, layers, tmp / "classifier.onnx")
        report["parity_max_abs_diff"] = parity(model, tmp / "classifier.onnx", spec, layers)
        if report["parity_max_abs_diff"] > 1e-4:
            raise RuntimeError(f"onnxruntime disagrees with torch by {report['parity_max_abs_diff']:.2e}")
        extra = {"source": {k: v for k, v in info.items() if k != "input"}}
        return ModelMetadata(args.name, args.version, tuple(classes), spec, "classifier.onnx",
                             INPUT_NAME, LOGITS_NAME, tuple(infos), extra)

    out = write_bundle(args.out, fill)
    print(f"bundle written to {out}; layers {layers}; torch/onnxruntime max abs diff "
          f"{report['parity_max_abs_diff']:.2e}")
    return {"bundle": str(out), "layers": layers, **report}


def _overrides(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    """The config fields the user set on the command line."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _extend_bundle(args: argparse.Namespace, meta: ModelMetadata, layers: tuple[str, ...], key: str,
                   filename: str, build) -> dict:
    """Check that ``layers`` are classifier outputs, load the train and test splits, and write a
    new bundle (atomically, from the old one) with ``build(train, test, tmp_dir)``'s artifacts,
    recorded in metadata under ``key``. Returns build's report."""
    import dataclasses
    from export.archive import write_bundle
    from export.data.loader import load_image_folder
    names = {l.name for l in meta.layers}
    missing = [l for l in layers if l not in names]
    if missing:
        raise SystemExit(f"layers {missing} are not outputs of the exported classifier; it has {sorted(names)}")
    train = load_image_folder(args.data, meta.input, "train", limit=args.limit)
    test = load_image_folder(args.data, meta.input, "test", limit=args.test_limit)
    report: dict = {}

    def fill(tmp: Path) -> ModelMetadata:
        report.update(build(train, test, tmp))
        return dataclasses.replace(meta, extra={**meta.extra, key: filename})

    write_bundle(args.bundle, fill, base=args.bundle)
    return report


def cmd_concepts(args: argparse.Namespace) -> dict:
    """Method 1: concept autoencoders, Bayesian network and validity report, added to a bundle."""
    import dataclasses
    from export.concepts import ConceptConfig, build_concepts, format_report
    from handlers.runtime.bundle import load_bundle
    meta = load_bundle(args.bundle).metadata
    model, _, _, _ = _load_classifier(args)
    overrides = _overrides(args, ("k", "states", "epochs", "train_images", "validity_images", "max_indegree",
                                  "outcome_max_indegree", "intervention_images", "backoff", "min_steps", "seed"))
    if args.layers:
        overrides["layers"] = tuple(args.layers.split(","))
    cfg = dataclasses.replace(ConceptConfig(), **overrides)
    outputs = {l.name: l.output for l in meta.layers}
    report = _extend_bundle(args, meta, cfg.layers, "concepts", "concepts.json",
                            lambda train, test, tmp: build_concepts(model, meta.input, train, test, outputs, tmp, cfg))
    print(format_report(report))
    print(f"concept artifacts added to {args.bundle} in {report['seconds']} s")
    return report


def cmd_cladec(args: argparse.Namespace) -> dict:
    """Method 2: ClaDec decoders and reference autoencoders with their evaluation, added to a bundle."""
    import dataclasses
    from export.cladec import ClaDecConfig, build_cladec, format_report
    from handlers.runtime.bundle import load_bundle
    meta = load_bundle(args.bundle).metadata
    model, _, _, _, factory = _load_classifier_and_factory(args)
    overrides = _overrides(args, ("epochs", "train_images", "eval_images", "fresh_classifier_epochs", "seed"))
    if args.layers:
        overrides["layers"] = tuple(args.layers.split(","))
    if args.alphas:
        overrides["alphas"] = tuple(float(a) for a in args.alphas.split(","))
    cfg = dataclasses.replace(ClaDecConfig(), **overrides)
    report = _extend_bundle(args, meta, cfg.layers, "cladec", "cladec.json",
                            lambda train, test, tmp: build_cladec(model, factory, meta.input, train, test, tmp, cfg))
    print(format_report(report))
    print(f"ClaDec artifacts added to {args.bundle} in {report['seconds']} s")
    return report


def cmd_features(args: argparse.Namespace) -> dict:
    """Method 3: class-specific penultimate features and selectivity, added to a bundle."""
    import dataclasses
    from export.features import FeatureConfig, build_features, format_report
    from handlers.runtime.bundle import load_bundle
    meta = load_bundle(args.bundle).metadata
    model, _, _, _ = _load_classifier(args)
    overrides = _overrides(args, ("layer", "head", "k", "selectivity_share", "finetune_epochs"))
    if args.selectivity_layers:
        overrides["selectivity_layers"] = tuple(args.selectivity_layers.split(","))
    cfg = dataclasses.replace(FeatureConfig(), **overrides)
    report = _extend_bundle(args, meta, (cfg.layer,), "features", "features.json",
                            lambda train, test, tmp: build_features(model, meta.input, train, test, tmp, cfg))
    print(format_report(report))
    return report


def cmd_analyze(args: argparse.Namespace) -> dict:
    """Method 4: GCMI between layers and the data's generative factors; names the concepts."""
    import dataclasses
    from export.analysis.layers import analyse, format_report, save
    from export.archive import write_bundle
    from export.data.loader import load_image_folder
    from handlers.runtime.bundle import load_bundle
    from handlers.runtime.classifier import make_session
    from handlers.runtime.concepts import ConceptSpec
    bundle = load_bundle(args.bundle)
    meta = bundle.metadata
    model, _, _, _ = _load_classifier(args)
    ds = load_image_folder(args.data, meta.input, args.split, limit=args.images)
    kinds_file = Path(args.data) / "factors.json"
    kinds = json.loads(kinds_file.read_text())["factors"] if kinds_file.is_file() else None
    encoders = {}
    spec_c = None
    if "concepts" in meta.extra and not args.no_names:
        spec_c = ConceptSpec.from_file(bundle.path(meta.extra["concepts"]))
        encoders = {l.layer: make_session(bundle.path(l.encoder_file), ("CPUExecutionProvider",), 0)
                    for l in spec_c.layers}
    layers = tuple(args.layers.split(",")) if args.layers else ("stem", "layer1", "layer2", "layer3")
    result = analyse(model, ds, meta.input, layers, kinds, pca_dims=args.pca_dims, pose_factor=args.pose_factor,
                     concept_encoders=encoders)
    out = save(result, args.out)
    print(format_report(result))
    print(f"analysis of {len(ds)} images in {result['seconds']} s -> {out / 'layer_analysis.json'}, "
          f"{out / 'layer_analysis.png'}")
    if spec_c is not None and "concept_names" in result:
        names = result["concept_names"]

        def fill(tmp: Path) -> ModelMetadata:
            layers_named = tuple(dataclasses.replace(
                l, names=tuple(e["name"] for e in names[l.layer]),
                name_bits=tuple(e["bits"] for e in names[l.layer])) for l in spec_c.layers)
            dataclasses.replace(spec_c, layers=layers_named).save(tmp / meta.extra["concepts"])
            return meta

        write_bundle(args.bundle, fill, base=args.bundle)
        print(f"concept names written into {args.bundle}/{meta.extra['concepts']}")
    return result


def cmd_archive(args: argparse.Namespace) -> dict:
    from export.archive import build_mar
    from export.concepts import failed_checks
    from handlers.runtime.bundle import load_bundle
    bundle = load_bundle(args.bundle)  # refuse to archive a corrupted bundle
    failed = []
    if "concepts" in bundle.metadata.extra:
        report = json.loads(bundle.path(bundle.metadata.extra["concepts"]).read_text()).get("report", {})
        failed = failed_checks(report)
    if failed:
        lines = "; ".join(f"{c['name']} = {c['measured']} (target {c['target']})" for c in failed)
        if not getattr(args, "accept_failed_checks", False):
            raise SystemExit(f"refusing to archive {args.bundle}: concept validity checks failed: {lines}. "
                             "Improve the bundle, or pass --accept-failed-checks to archive it anyway "
                             "(answers then carry the failed checks in their validity block).")
        print(f"archiving despite failed concept validity checks (--accept-failed-checks): {lines}")
    mar = build_mar(args.bundle, args.name or bundle.metadata.name, args.version or bundle.metadata.version,
                    args.model_store, args.model_config)
    print(f"archived {mar} ({mar.stat().st_size / 1e6:.2f} MB, bundle sha256 {bundle.sha256[:12]})")
    return {"mar": str(mar), "failed_checks": [c["name"] for c in failed]}


def cmd_build_demo(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    data, build = Path(args.data), Path(args.build)
    report: dict = {}
    if not (data / "factors.csv").is_file() or args.force:
        report["render"] = cmd_render(argparse.Namespace(out=data, n_train=args.n_train, n_test=args.n_test,
                                                         size=64, seed=args.seed, workers=None))
    if not (build / "classifier" / CLASSIFIER_INFO).is_file() or args.force:
        report["train"] = cmd_train(argparse.Namespace(
            data=data, out=build / "classifier", arch="demo_resnet", size=None, limit=None,
            epochs=args.epochs, batch_size=128, lr=4e-3, seed=args.seed, max_steps=None, threads=None))
    report["export"] = cmd_export(argparse.Namespace(
        classifier=build / "classifier", model_file=None, model_class=None, weights=None, data=None,
        classes=None, size=None, channels=None, mean=None, std=None, layers=None,
        out=build / "bundle", name=args.name, version=args.version))
    report["concepts"] = cmd_concepts(argparse.Namespace(
        bundle=build / "bundle", classifier=build / "classifier", data=data, layers=None, limit=None,
        test_limit=None, k=None, states=None, epochs=None, train_images=None, validity_images=None,
        max_indegree=None, outcome_max_indegree=None, intervention_images=None, backoff=None, seed=None))
    report["cladec"] = cmd_cladec(argparse.Namespace(
        bundle=build / "bundle", classifier=build / "classifier", data=data, layers=None, alphas=None,
        limit=None, test_limit=None, epochs=None, train_images=None, eval_images=None,
        fresh_classifier_epochs=None, seed=None))
    report["features"] = cmd_features(argparse.Namespace(
        bundle=build / "bundle", classifier=build / "classifier", data=data, layer=None, head=None, k=None,
        selectivity_share=None, selectivity_layers=None, finetune_epochs=None, limit=None, test_limit=None))
    if (data / "factors.csv").is_file():
        report["analysis"] = {k: v for k, v in cmd_analyze(argparse.Namespace(
            bundle=build / "bundle", classifier=build / "classifier", data=data, split="train", images=5000,
            layers=None, pca_dims=4, pose_factor="pos_x", no_names=False, out=build / "analysis")).items()
            if k != "concept_names"}
    report["archive"] = cmd_archive(argparse.Namespace(bundle=build / "bundle", name=args.name,
                                                       version=args.version, model_store=args.model_store,
                                                       model_config=None,
                                                       accept_failed_checks=args.accept_failed_checks))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (build / "build-report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"demo build finished in {report['seconds']} s; report in {build / 'build-report.json'}")
    return report


def cmd_query(args: argparse.Namespace) -> dict:
    from export.client import TorchServeClient
    client = TorchServeClient(args.url, key_file=args.key_file)
    client.wait_ready(args.model, timeout=args.timeout)
    status, body = client.post_image(args.endpoint, args.model, Path(args.image).read_bytes())
    print(json.dumps(body, indent=2))
    if status != 200:
        raise SystemExit(f"HTTP {status}")
    return body


def cmd_demo_report(args: argparse.Namespace) -> dict:
    """Ask a running TorchServe for explanations of a few test images; print one, save the
    full JSON and a PNG grid of the ClaDec triplets (input, RefAE, ClaDec per layer)."""
    import base64
    import io
    from PIL import Image, ImageDraw
    from export.client import TorchServeClient
    client = TorchServeClient(args.url, key_file=args.key_file)
    client.wait_ready(args.model, timeout=args.timeout)
    files = sorted(Path(args.data, "test").glob("*/*.png"))
    picks, seen = [], set()
    for f in files:
        if f.parent.name not in seen:
            seen.add(f.parent.name)
            picks.append(f)
    picks = picks[: args.images]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, first = [], None
    for f in picks:
        raw = f.read_bytes()
        status, body = client.post_image("explanations", args.model, raw)
        if status != 200:
            raise SystemExit(f"{f}: HTTP {status}: {body}")
        size = len(json.dumps(body, separators=(",", ":")))
        if first is None:
            first = (f, body, size)
        cells = [("input", Image.open(io.BytesIO(raw)).convert("RGB"))]
        for e in body.get("cladec", []):
            if not any(label == f"RefAE {e['layer']}" for label, _ in cells):
                cells.append((f"RefAE {e['layer']}", Image.open(io.BytesIO(base64.b64decode(e["reference_png"])))))
            cells.append((f"ClaDec {e['layer']} a={e['alpha']:g}",
                          Image.open(io.BytesIO(base64.b64decode(e["reconstruction_png"])))))
        rows.append(cells)
    (out / "explanation.json").write_text(json.dumps(first[1], indent=1) + "\n")
    scale, label_h = 2, 16
    w, h = rows[0][0][1].size
    cw = max(w * scale, 118)
    grid = Image.new("RGB", (cw * len(rows[0]), label_h + h * scale * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (label, _) in enumerate(rows[0]):
        draw.text((j * cw + 2, 2), label, fill="black")
    for i, cells in enumerate(rows):
        for j, (_, img) in enumerate(cells):
            grid.paste(img.resize((w * scale, h * scale), Image.NEAREST), (j * cw, label_h + i * h * scale))
    grid.save(out / "cladec_grid.png")
    f, body, size = first
    print(f"explanation of {f} ({size / 1024:.1f} KiB of JSON):")
    preds = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in body["predictions"][:3])
    print(f"  predictions: {preds}; target: {body['target']['label']}")
    for c in body.get("concepts", [])[:5]:
        print(f"  concept {c['id']:<10} name={c['name']:<10} state={c['state']} effect={c['effect']:+.4f} "
              f"sensitivity={c['sensitivity']:.4f}")
    if "features" in body:
        ft = body["features"]
        top = ", ".join(f"#{c['index']} {c['contribution']:+.2f}" for c in ft["contributions"])
        print(f"  features ({ft['layer']}, {ft['subset_size']} of the target's subset): {top}; "
              f"decomposed head agrees: {ft['decomposed_agrees']}")
        o, ru = ft["outside_subset"], ft.get("runner_up")
        print(f"    outside the subset: {o['positive']:+.2f} / {o['negative']:+.2f} (total {o['total']:+.2f}); "
              f"held-out agreement {ft['decomposed_agreement_held_out']}")
        if ru:
            print(f"    runner-up {ru['label']}: logit {ru['logit']:+.2f}, decomposed {ru['decomposed_logit']:+.2f}, "
                  f"outside the subset {ru['outside_subset']['negative']:+.2f} negative")
    if "validity" in body and "concepts" in body["validity"]:
        v = body["validity"]["concepts"]
        print(f"  bundle validity: causal Spearman {v['causal_spearman']} (per image {v['causal_spearman_per_image']}), "
              f"fidelity {v['fidelity']}; failed checks: {', '.join(v['failed_checks']) or 'none'}")
    print("  timings (ms): " + ", ".join(f"{k}={v}" for k, v in body["timings_ms"].items()))
    print(f"full explanation: {out / 'explanation.json'}; ClaDec triplets: {out / 'cladec_grid.png'}")
    return {"explanation_bytes": size}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """How a step finds the classifier: a `train` folder, or the user's own module and weights."""
    p.add_argument("--classifier", help="output folder of `train`")
    p.add_argument("--model-file", help="your own model: a Python file defining an nn.Module")
    p.add_argument("--model-class")
    p.add_argument("--weights", help="safetensors, or a state dict .pt (loaded with weights_only=True)")
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--size", type=int)
    p.add_argument("--channels", type=int, choices=(1, 3))
    p.add_argument("--mean", type=float, nargs="+")
    p.add_argument("--std", type=float, nargs="+")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="concept-explainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render the controlled-factor demo data set")
    r.add_argument("--out", default="data/shapes")
    r.add_argument("--n-train", type=int, default=16000)
    r.add_argument("--n-test", type=int, default=4000)
    r.add_argument("--size", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=int, default=None)
    r.set_defaults(func=cmd_render)

    dg = sub.add_parser("digits", help="write scikit-learn's real handwritten digits as an image folder "
                                       "(a small real data set for checks; needs scikit-learn)")
    dg.add_argument("--out", default="data/digits", help="output folder (default data/digits)")
    dg.add_argument("--size", type=int, default=32, help="image size in px (default 32)")
    dg.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    dg.set_defaults(func=cmd_digits)

    t = sub.add_parser("train", help="train a project architecture on an image folder")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--arch", default="demo_resnet")
    t.add_argument("--size", type=int, default=None, help="input size (default: the data's)")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=4e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="use at most this many training images")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a classifier to ONNX and write the artifact bundle")
    _add_model_args(e)
    e.add_argument("--data", help="image folder, to read classes and input size from")
    e.add_argument("--layers", help="comma-separated module names to expose (default: layer1..N, avgpool)")
    e.add_argument("--out", required=True)
    e.add_argument("--name", default="shapes")
    e.add_argument("--version", default="1.0")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("concepts", help="concept autoencoders + causal Bayesian network (method 1)")
    c.add_argument("--bundle", required=True, help="bundle written by `export` (updated atomically)")
    c.add_argument("--data", required=True, help="image folder the classifier was trained on")
    _add_model_args(c)
    c.add_argument("--layers", help="comma-separated concept layers (default layer1,layer2,layer3)")
    c.add_argument("--k", type=int, help="concepts per layer (default 8)")
    c.add_argument("--states", type=int, help="states per concept (default 3)")
    c.add_argument("--epochs", type=int)
    c.add_argument("--train-images", type=int)
    c.add_argument("--min-steps", type=int,
                   help="least autoencoder training steps; small data sets get more epochs (default 180)")
    c.add_argument("--validity-images", type=int)
    c.add_argument("--max-indegree", type=int, help="parents per concept from the previous layer (default 3)")
    c.add_argument("--outcome-max-indegree", type=int, help="parents of Y from the last layer (default 8)")
    c.add_argument("--intervention-images", type=int,
                   help="training images put through every single-concept intervention (default 1200)")
    c.add_argument("--backoff", type=float,
                   help="weight of the logistic table against configuration counts (default 5)")
    c.add_argument("--seed", type=int)
    c.add_argument("--limit", type=int, help="training images loaded (default all)")
    c.add_argument("--test-limit", type=int, help="held-out images loaded (default all)")
    c.set_defaults(func=cmd_concepts)

    cd = sub.add_parser("cladec", help="ClaDec decoders + reference autoencoders (method 2)")
    cd.add_argument("--bundle", required=True, help="bundle written by `export` (updated atomically)")
    cd.add_argument("--data", required=True)
    _add_model_args(cd)
    cd.add_argument("--layers", help="comma-separated layers (default layer2,avgpool)")
    cd.add_argument("--alphas", help="comma-separated alphas (default 0,0.001)")
    cd.add_argument("--epochs", type=int)
    cd.add_argument("--train-images", type=int)
    cd.add_argument("--eval-images", type=int)
    cd.add_argument("--fresh-classifier-epochs", type=int)
    cd.add_argument("--seed", type=int)
    cd.add_argument("--limit", type=int)
    cd.add_argument("--test-limit", type=int)
    cd.set_defaults(func=cmd_cladec)

    f = sub.add_parser("features", help="class-specific penultimate features (method 3)")
    f.add_argument("--bundle", required=True)
    f.add_argument("--data", required=True)
    _add_model_args(f)
    f.add_argument("--layer", help="penultimate layer (default avgpool)")
    f.add_argument("--head", help="final nn.Linear module (default fc)")
    f.add_argument("--k", type=float, help="subset size (>= 1) or L1-mass share (0 < k < 1); default 5")
    f.add_argument("--selectivity-share", type=float)
    f.add_argument("--selectivity-layers")
    f.add_argument("--finetune-epochs", type=int)
    f.add_argument("--limit", type=int)
    f.add_argument("--test-limit", type=int)
    f.set_defaults(func=cmd_features)

    an = sub.add_parser("analyze", help="GCMI layer analysis against factors.csv; names concepts (method 4)")
    an.add_argument("--bundle", required=True)
    an.add_argument("--data", required=True, help="image folder with factors.csv (and optionally factors.json)")
    _add_model_args(an)
    an.add_argument("--split", default="train")
    an.add_argument("--images", type=int, default=5000)
    an.add_argument("--layers", help="comma-separated modules (default stem,layer1,layer2,layer3)")
    an.add_argument("--pca-dims", type=int, default=4)
    an.add_argument("--pose-factor", default="pos_x")
    an.add_argument("--no-names", action="store_true", help="do not write concept names into the bundle")
    an.add_argument("--out", default="build/shapes/analysis")
    an.set_defaults(func=cmd_analyze)

    a = sub.add_parser("archive", help="build model_store/NAME.mar from a bundle")
    a.add_argument("--bundle", required=True)
    a.add_argument("--name")
    a.add_argument("--version")
    a.add_argument("--model-store", default="model_store")
    a.add_argument("--model-config", help="model-config.yaml (default: export/model-config.yaml)")
    a.add_argument("--accept-failed-checks", action="store_true",
                   help="archive even if the bundle's concept validity checks failed (default: refuse)")
    a.set_defaults(func=cmd_archive)

    d = sub.add_parser("build-demo", help="render, train, export and archive the demo model")
    d.add_argument("--data", default="data/shapes")
    d.add_argument("--build", default="build/shapes")
    d.add_argument("--model-store", default="model_store")
    d.add_argument("--name", default="shapes")
    d.add_argument("--version", default="1.0")
    d.add_argument("--n-train", type=int, default=16000)
    d.add_argument("--n-test", type=int, default=4000)
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true", help="redo data and training even if present")
    d.add_argument("--accept-failed-checks", action="store_true",
                   help="archive the demo even if its concept validity checks failed (default: refuse)")
    d.set_defaults(func=cmd_build_demo)

    q = sub.add_parser("query", help="send an image to a running TorchServe")
    q.add_argument("--image", required=True)
    q.add_argument("--model", default="shapes")
    q.add_argument("--endpoint", default="predictions", choices=("predictions", "explanations"))
    q.add_argument("--url", default="http://127.0.0.1:8080")
    q.add_argument("--key-file", default="key_file.json")
    q.add_argument("--timeout", type=float, default=120)
    q.set_defaults(func=cmd_query)
    dr = sub.add_parser("demo-report", help="explain a few test images through a running TorchServe")
    dr.add_argument("--model", default="shapes")
    dr.add_argument("--data", default="data/shapes")
    dr.add_argument("--images", type=int, default=4)
    dr.add_argument("--out", default="build/shapes/demo")
    dr.add_argument("--url", default="http://127.0.0.1:8080")
    dr.add_argument("--key-file", default="key_file.json")
    dr.add_argument("--timeout", type=float, default=120)
    dr.set_defaults(func=cmd_demo_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
