"""The offline pipeline as plain functions, each over one typed, frozen config.

    from export.pipeline import ExportStep, ModelSource, export_bundle
    export_bundle(ExportStep(out=Path("build/x/bundle"), model=ModelSource(classifier=Path("build/x/classifier"))))

One function per step: :func:`render`, :func:`digits`, :func:`train`, :func:`export_bundle`,
:func:`add_concepts`, :func:`add_cladec`, :func:`add_features`, :func:`analyze`,
:func:`archive` and :func:`build_demo`. Each takes its ``*Step`` config, prints a short
progress line or report, and returns its report as a dict. Steps that read the classifier
share one :class:`ModelSource`; the methods' own settings are the configs of their modules
(:class:`export.concepts.ConceptConfig`, :class:`export.cladec.ClaDecConfig`,
:class:`export.features.FeatureConfig`, :class:`export.train.TrainConfig`), nested as they are.

Every default is written once, on a dataclass field; the ``concept-explainer`` CLI
(:mod:`export.cli`) builds its options, their help and their defaults from these fields
(``metadata["help"]`` is the option's help text; ``metadata["flag"]``, ``["nargs"]`` and
``["choices"]`` adjust how the option is spelled). A step that cannot run raises
:class:`PipelineError`; the CLI prints its message and exits with status 1.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from export.cladec import ClaDecConfig
from export.concepts import ConceptConfig
from export.data.loader import ImageDataset
from export.device import DEVICE_HELP, channels_last_inference, resolve_device
from export.errors import FailedChecksError, PipelineError, describe_checks
from export.features import FeatureConfig
from export.quantize import QuantizeConfig
from export.train import TrainConfig
from handlers.runtime.bundle import ModelMetadata
from handlers.runtime.imaging import InputSpec

#: The repository (deploy/ templates and metrics.yaml live there).
_REPO = Path(__file__).resolve().parents[1]

CLASSIFIER_WEIGHTS = "weights.safetensors"
CLASSIFIER_INFO = "classifier.json"
#: Largest |torch - onnxruntime| difference an exported classifier may show.
PARITY_TOLERANCE = 1e-4
#: Preprocessing of a user's model when neither the data nor the options give it.
DEFAULT_CHANNELS = 3
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25


def _help(text: str, **cli: Any) -> dict[str, Any]:
    """Field metadata for the CLI: the option's help text and optional spelling (``flag``,
    ``nargs``, ``choices``)."""
    return {"help": text, **cli}


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (so a default is written once)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise ValueError(f"{cls.__name__} has no field {name!r}")


# -- the classifier ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """Where a step finds the classifier: the output folder of :func:`train`, or the user's own
    module file, class and weights with their preprocessing."""

    classifier: Path | None = field(default=None, metadata=_help(
        "output folder of `train` (default: none; else give --model-file, --model-class and --weights)"))
    model_file: Path | None = field(default=None, metadata=_help(
        "your own model: a Python file defining an nn.Module (default: none)"))
    model_class: str | None = field(default=None, metadata=_help(
        "name of the nn.Module class in --model-file (default: none)"))
    weights: Path | None = field(default=None, metadata=_help(
        "weights of your model: safetensors, or a state dict .pt loaded with weights_only=True (default: none)"))
    classes: tuple[str, ...] | None = field(default=None, metadata=_help(
        "comma-separated class names of your model (default: the data's class folders)"))
    size: int | None = field(default=None, metadata=_help(
        "input size in px of your model (default: the data's image size)"))
    channels: int | None = field(default=None, metadata=_help(
        f"input channels of your model (default: the data's, or {DEFAULT_CHANNELS} without data)", choices=(1, 3)))
    mean: tuple[float, ...] | None = field(default=None, metadata=_help(
        f"per-channel normalisation mean (default: the data's, or {DEFAULT_MEAN} per channel without data)",
        nargs="+"))
    std: tuple[float, ...] | None = field(default=None, metadata=_help(
        f"per-channel normalisation std (default: the data's, or {DEFAULT_STD} per channel without data)",
        nargs="+"))


@dataclass(frozen=True)
class LoadedClassifier:
    """A classifier in eval mode with its input spec, class labels, provenance (``info``: the
    ``classifier.json`` of a trained folder, or the user's model file and class) and a
    factory for a freshly initialised copy of the same architecture."""

    model: nn.Module
    spec: InputSpec
    classes: tuple[str, ...]
    info: dict[str, Any]
    factory: Callable[[], nn.Module]

    def to(self, device: str) -> LoadedClassifier:
        """The same classifier on ``device`` (``auto``, ``cpu``, ``cuda[:N]``:
        :func:`export.device.resolve_device`), with a factory whose fresh copies start there.
        On the CPU one of this project's architectures also switches to channels-last weights
        (:func:`export.device.channels_last_inference`), in place, and copies made from it
        inherit it; a user's model keeps its layout (its code may ``view`` activations)."""
        dev = resolve_device(device)
        if dev.type == "cpu":
            if "architecture" in self.info:  # one of this project's networks: safe in any layout
                channels_last_inference(self.model)
            return self
        make = self.factory
        return dataclasses.replace(self, model=self.model.to(dev), factory=lambda: make().to(dev))


def source_from_bundle(source: ModelSource, meta: ModelMetadata, bundle: Path) -> ModelSource:
    """``source`` if it names a classifier, else the one ``export`` recorded in the bundle's
    metadata ``meta`` (so steps after ``export`` need only ``--bundle``); the input spec and
    classes come from the bundle too. ``bundle`` names the folder in messages."""
    if source.classifier is not None or source.model_file is not None:
        return source
    recorded = meta.extra.get("source") or {}
    if recorded.get("classifier"):
        return ModelSource(classifier=Path(recorded["classifier"]))
    if recorded.get("model_file") and recorded.get("weights"):
        spec = meta.input
        return ModelSource(model_file=Path(recorded["model_file"]), model_class=recorded["model_class"],
                           weights=Path(recorded["weights"]), classes=tuple(meta.classes), size=spec.height,
                           channels=spec.channels, mean=tuple(spec.mean), std=tuple(spec.std))
    raise PipelineError(f"{bundle} does not record its classifier: give --classifier, or --model-file, "
                        "--model-class and --weights")


def _probe(model: nn.Module, spec: InputSpec) -> None:
    """One forward pass on the input the data gives (N=2): a model built for other channels or
    sizes fails here with a message that says so, not deep inside a later step."""
    import torch
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, spec.channels, spec.height, spec.width))
    except Exception as exc:  # noqa: BLE001 - the user's model: its error, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"the model does not take inputs of {spec.channels}x{spec.height}x{spec.width} "
                            f"(channels x height x width, from the data or the flags): {first}; "
                            "set --channels and --size to what it was trained on") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise PipelineError(f"the model must return logits of shape (N, classes), got "
                            f"{getattr(out, 'shape', type(out).__name__)}")


def load_classifier(source: ModelSource, data: Path | None = None) -> LoadedClassifier:
    """Load the classifier ``source`` names. ``data`` (an image folder) gives a user model's
    classes and input spec unless ``source`` sets them."""
    from export.data.loader import infer_input_spec, scan_image_folder
    from export.models import build_model, load_user_model, load_weights
    if source.classifier is not None:
        folder = Path(source.classifier)
        info = json.loads((folder / CLASSIFIER_INFO).read_text())
        spec = InputSpec.from_json(info["input"])

        def factory() -> nn.Module:
            return build_model(info["architecture"], len(info["classes"]), spec.channels)

        model = factory()
        load_weights(model, folder / CLASSIFIER_WEIGHTS)
        return LoadedClassifier(model.eval(), spec, tuple(info["classes"]), info, factory)
    if not (source.model_file and source.model_class and source.weights):
        raise PipelineError("the classifier is missing: give --classifier DIR, or --model-file, --model-class "
                            "and --weights (ModelSource.classifier, or model_file, model_class and weights)")
    model_file, model_class = source.model_file, source.model_class  # both set, checked just above
    if data is not None:
        classes, _ = scan_image_folder(data)
        spec = infer_input_spec(data, size=source.size, channels=source.channels)
        if source.mean or source.std:  # the model's own normalisation beats the data's statistics
            spec = dataclasses.replace(spec, mean=tuple(source.mean or spec.mean), std=tuple(source.std or spec.std))
    else:
        if not (source.classes and source.size):
            raise PipelineError("without --data, give --classes and --size (and --channels, --mean, --std)")
        classes = source.classes
        ch = source.channels or DEFAULT_CHANNELS
        spec = InputSpec(source.size, source.size, ch, tuple(source.mean or (DEFAULT_MEAN,) * ch),
                         tuple(source.std or (DEFAULT_STD,) * ch))
    if source.classes:
        classes = source.classes

    def user_factory() -> nn.Module:
        return load_user_model(model_file, model_class)

    try:
        model = user_factory()
    except Exception as exc:  # noqa: BLE001 - the user's code: its error, in one line
        raise PipelineError(f"cannot build {model_class} from {model_file}: {type(exc).__name__}: {exc}") from None
    load_weights(model, source.weights)
    _probe(model.eval(), spec)
    info = {"model_file": str(Path(source.model_file).resolve()), "model_class": source.model_class,
            "weights": str(Path(source.weights).resolve())}
    return LoadedClassifier(model.eval(), spec, tuple(classes), info, user_factory)


# -- data -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderStep:
    """Render the controlled-factor demo data set (an image folder plus ``factors.csv``)."""

    out: Path = field(default=Path("data/shapes"), metadata=_help("output folder"))
    n_train: int = field(default=16000, metadata=_help("training images"))
    n_test: int = field(default=4000, metadata=_help("held-out images"))
    size: int = field(default=64, metadata=_help("image size in px"))
    seed: int = field(default=0, metadata=_help("seed of the rendered factors"))
    workers: int | None = field(default=None, metadata=_help("rendering processes (default: one per CPU core)"))


def render(step: RenderStep) -> dict[str, Any]:
    """Render the demo data set into ``step.out``."""
    from export.data.renderer import render_dataset
    t0 = time.perf_counter()
    out = render_dataset(step.out, n_train=step.n_train, n_test=step.n_test, size=step.size, seed=step.seed,
                         workers=step.workers)
    info = {"out": str(out), "images": step.n_train + step.n_test, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"rendered {info['images']} images into {out} in {info['seconds']} s")
    return info


@dataclass(frozen=True)
class DigitsStep:
    """Write scikit-learn's real handwritten digits as an image folder."""

    out: Path = field(default=Path("data/digits"), metadata=_help("output folder"))
    size: int = field(default=32, metadata=_help("image size in px"))
    seed: int = field(default=0, metadata=_help("seed of the train/test split"))


def digits(step: DigitsStep) -> dict[str, Any]:
    """Write the 1,797 digits into ``step.out/train`` and ``step.out/test`` (needs scikit-learn)."""
    from export.data.digits import write_digits_folder
    out = write_digits_folder(step.out, size=step.size, seed=step.seed)
    print(f"wrote scikit-learn's 1,797 handwritten digits ({step.size} px) into {out}/train and {out}/test")
    return {"out": str(out)}


# -- training and export ----------------------------------------------------------------------

@dataclass(frozen=True)
class TrainStep:
    """Train a project architecture on an image folder."""

    data: Path = field(metadata=_help("image folder (class sub-folders, optional train/test split)"))
    out: Path = field(metadata=_help("output folder for weights.safetensors and classifier.json"))
    arch: str = field(default="demo_resnet", metadata=_help("architecture: demo_resnet or resnet18_like"))
    size: int | None = field(default=None, metadata=_help("input size in px (default: the data's)"))
    limit: int | None = field(default=None, metadata=_help(
        "use at most this many training images, and a quarter as many held-out ones (default: all)"))
    threads: int | None = field(default=None, metadata=_help("torch CPU threads (default: torch's choice)"))
    device: str = field(default="auto", metadata=_help(DEVICE_HELP))
    training: TrainConfig = field(default_factory=TrainConfig)


def train(step: TrainStep) -> dict[str, Any]:
    """Train, save the weights (safetensors) and ``classifier.json``; returns that info."""
    import torch

    from export.data.loader import infer_input_spec, load_image_folder
    from export.models import build_model, save_weights
    from export.train import train_classifier
    if step.threads:
        torch.set_num_threads(step.threads)
    spec = infer_input_spec(step.data, size=step.size)
    train_ds = load_image_folder(step.data, spec, "train", limit=step.limit)
    test_ds = load_image_folder(step.data, spec, "test", limit=step.limit and max(step.limit // 4, 1))
    device = resolve_device(step.device)
    model = build_model(step.arch, len(train_ds.classes), spec.channels).to(device)
    result = train_classifier(model, train_ds, test_ds, spec, step.training)
    out = Path(step.out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.cpu(), out / CLASSIFIER_WEIGHTS)
    info = {"architecture": step.arch, "classes": list(train_ds.classes), "input": spec.to_json(),
            "training": {"epochs": step.training.epochs, "steps": result.steps, "train_images": len(train_ds),
                         "test_images": len(test_ds), "test_accuracy": round(result.test_accuracy, 4),
                         "seconds": round(result.seconds, 1), "threads": torch.get_num_threads(),
                         "device": str(device),
                         "history": result.history}}
    (out / CLASSIFIER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"trained {step.arch}: held-out accuracy {result.test_accuracy:.4f} "
          f"in {result.seconds:.0f} s ({result.steps} steps, {torch.get_num_threads()} threads, {device})")
    return info


@dataclass(frozen=True)
class ExportStep:
    """Export a classifier to ONNX and write a new artifact bundle."""

    out: Path = field(metadata=_help("bundle folder to write (replaced atomically)"))
    model: ModelSource = field(default_factory=ModelSource)
    data: Path | None = field(default=None, metadata=_help(
        "image folder to read a user model's classes and input size from (default: none)"))
    layers: tuple[str, ...] | None = field(default=None, metadata=_help(
        "comma-separated module names whose activations the ONNX graph outputs "
        "(default: layer1..N and avgpool when present, else every top-level child but the last)"))
    name: str = field(default="shapes", metadata=_help("model name recorded in the bundle"))
    version: str = field(default="1.0", metadata=_help("model version recorded in the bundle"))


def export_bundle(step: ExportStep) -> dict[str, Any]:
    """Export the classifier, check torch/onnxruntime parity, write the bundle at ``step.out``."""
    from export.archive import write_bundle
    from export.onnx_export import INPUT_NAME, LOGITS_NAME, default_layers, export_classifier, parity
    loaded = load_classifier(step.model, step.data)
    layers = list(step.layers) if step.layers else default_layers(loaded.model)
    report: dict[str, Any] = {}

    def fill(tmp: Path) -> ModelMetadata:
        infos = export_classifier(loaded.model, loaded.spec, layers, tmp / "classifier.onnx")
        report["parity_max_abs_diff"] = parity(loaded.model, tmp / "classifier.onnx", loaded.spec, layers)
        if report["parity_max_abs_diff"] > PARITY_TOLERANCE:
            raise PipelineError(f"onnxruntime disagrees with torch by {report['parity_max_abs_diff']:.2e}")
        extra = {"source": {k: v for k, v in loaded.info.items() if k != "input"}}
        if step.model.classifier is not None:
            extra["source"]["classifier"] = str(Path(step.model.classifier).resolve())
        return ModelMetadata(step.name, step.version, loaded.classes, loaded.spec, "classifier.onnx",
                             INPUT_NAME, LOGITS_NAME, tuple(infos), extra)

    out = write_bundle(step.out, fill)
    print(f"bundle written to {out}; layers {layers}; torch/onnxruntime max abs diff "
          f"{report['parity_max_abs_diff']:.2e}")
    return {"bundle": str(out), "layers": layers, **report}


# -- steps that add artifacts to a bundle -----------------------------------------------------

@dataclass(frozen=True)
class BundleData:
    """What every step that adds artifacts to an exported bundle needs."""

    bundle: Path = field(metadata=_help("bundle written by `export` (updated atomically)"))
    data: Path = field(metadata=_help("image folder the classifier was trained on"))
    limit: int | None = field(default=None, metadata=_help("training images loaded (default: all)"))
    test_limit: int | None = field(default=None, metadata=_help("held-out images loaded (default: all)"))


@dataclass(frozen=True)
class BundleStep(BundleData):
    """A bundle step that also runs the torch classifier (the bundle's recorded one by default)."""

    model: ModelSource = field(default_factory=ModelSource)
    device: str = field(default="auto", metadata=_help(DEVICE_HELP))


def _add_to_bundle(step: BundleData, meta: ModelMetadata, layers: tuple[str, ...], key: str, filename: str,
                   build: Callable[[ImageDataset, ImageDataset, Path], dict[str, Any]]) -> dict[str, Any]:
    """Check that ``layers`` are classifier outputs, load the train and test splits, and write a
    new bundle (atomically, from the old one) with ``build(train, test, tmp_dir)``'s artifacts,
    recorded in metadata under ``key``. Returns build's report."""
    from export.archive import write_bundle
    from export.data.loader import load_image_folder
    names = {l.name for l in meta.layers}
    missing = [l for l in layers if l not in names]
    if missing:
        raise PipelineError(f"layers {missing} are not outputs of the exported classifier; it has {sorted(names)}")
    train_ds = load_image_folder(step.data, meta.input, "train", limit=step.limit)
    test_ds = load_image_folder(step.data, meta.input, "test", limit=step.test_limit)
    report: dict[str, Any] = {}

    def fill(tmp: Path) -> ModelMetadata:
        report.update(build(train_ds, test_ds, tmp))
        return dataclasses.replace(meta, extra={**meta.extra, key: filename})

    write_bundle(step.bundle, fill, base=step.bundle)
    return report


def _bundle_and_classifier(step: BundleStep) -> tuple[ModelMetadata, LoadedClassifier]:
    """The bundle's metadata and the classifier the step names, or else the one the bundle records."""
    from handlers.runtime.bundle import load_bundle
    meta = load_bundle(step.bundle).metadata
    return meta, load_classifier(source_from_bundle(step.model, meta, step.bundle), step.data).to(step.device)


@dataclass(frozen=True)
class ConceptsStep(BundleStep):
    """Method 1: concept autoencoders, causal Bayesian network and validity report."""

    concepts: ConceptConfig = field(default_factory=ConceptConfig)


def add_concepts(step: ConceptsStep) -> dict[str, Any]:
    """Add method 1's artifacts (``concepts.json`` and friends) to ``step.bundle``."""
    from export.concepts import build_concepts, format_report
    from export.data.loader import read_factor_kinds
    meta, loaded = _bundle_and_classifier(step)
    model = loaded.model
    outputs = {l.name: l.output for l in meta.layers}
    kinds = read_factor_kinds(step.data)
    report = _add_to_bundle(step, meta, step.concepts.layers, "concepts", "concepts.json",
                            lambda tr, te, tmp: build_concepts(model, meta.input, tr, te, outputs, tmp, step.concepts,
                                                               kinds=kinds))
    print(format_report(report))
    print(f"concept artifacts added to {step.bundle} in {report['seconds']} s")
    return report


@dataclass(frozen=True)
class ClaDecStep(BundleStep):
    """Method 2: ClaDec decoders and reference autoencoders with their evaluation."""

    cladec: ClaDecConfig = field(default_factory=ClaDecConfig)


def add_cladec(step: ClaDecStep) -> dict[str, Any]:
    """Add method 2's artifacts (``cladec.json``, decoders, RefAEs) to ``step.bundle``."""
    from export.cladec import build_cladec, format_report
    meta, loaded = _bundle_and_classifier(step)
    report = _add_to_bundle(step, meta, step.cladec.layers, "cladec", "cladec.json",
                            lambda tr, te, tmp: build_cladec(loaded.model, loaded.factory, meta.input, tr, te, tmp,
                                                             step.cladec))
    print(format_report(report))
    print(f"ClaDec artifacts added to {step.bundle} in {report['seconds']} s")
    return report


@dataclass(frozen=True)
class FeaturesStep(BundleStep):
    """Method 3: class-specific penultimate features and selectivity."""

    features: FeatureConfig = field(default_factory=FeatureConfig)


def add_features(step: FeaturesStep) -> dict[str, Any]:
    """Add method 3's artifact (``features.json``) to ``step.bundle``."""
    from export.features import build_features, format_report
    meta, loaded = _bundle_and_classifier(step)
    model = loaded.model
    cfg = step.features
    if cfg.selectivity_layers is None:  # every exported spatial layer but the features layer
        cfg = dataclasses.replace(cfg, selectivity_layers=tuple(
            l.name for l in meta.layers if len(l.shape) == 3 and l.name != cfg.layer))
    report = _add_to_bundle(step, meta, (cfg.layer,), "features", "features.json",
                            lambda tr, te, tmp: build_features(model, meta.input, tr, te, tmp, cfg))
    print(format_report(report))
    return report


@dataclass(frozen=True)
class QuantizeStep(BundleData):
    """8-bit concept encoders and reference autoencoders, each kept only if close to float
    (the classifier stays float; activations come from the bundle's ONNX classifier)."""

    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)


def quantize(step: QuantizeStep) -> dict[str, Any]:
    """Add ``quantization.json`` and the accepted ``*.int8.onnx`` graphs to ``step.bundle``."""
    from export.quantize import build_quantized, format_report, pick
    from handlers.runtime.bundle import load_bundle
    bundle = load_bundle(step.bundle)
    meta = bundle.metadata
    if "concepts" not in meta.extra and "cladec" not in meta.extra:
        raise PipelineError(f"{step.bundle} has no concept encoders or reference autoencoders to quantize")
    cfg = step.quantize

    def build(train: ImageDataset, test: ImageDataset, tmp: Path) -> dict[str, Any]:
        report = build_quantized(bundle, train.pixels[pick(len(train), cfg.calibration_images)],
                                 test.pixels[pick(len(test), cfg.eval_images)], tmp, cfg)
        (tmp / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
        return report

    report = _add_to_bundle(step, meta, (), "quantization", "quantization.json", build)
    print(format_report(report))
    return report


@dataclass(frozen=True)
class AnalyzeStep:
    """Method 4: GCMI between layers and the data's generative factors; names the concepts."""

    bundle: Path = field(metadata=_help("bundle written by `export` (concept names are written into it)"))
    data: Path = field(metadata=_help("image folder with factors.csv (and optionally factors.json)"))
    model: ModelSource = field(default_factory=ModelSource)
    split: str = field(default="train", metadata=_help("split of the data analysed", choices=("train", "test")))
    images: int = field(default=5000, metadata=_help("images analysed (at most)"))
    layers: tuple[str, ...] = field(default=("stem", "layer1", "layer2", "layer3"),
                                    metadata=_help("comma-separated modules analysed"))
    pca_dims: int = field(default=4, metadata=_help("PCA dimensions of a layer's pooled activations"))
    pose_factor: str = field(default="pos_x", metadata=_help("factor the pose-invariance figure is measured on"))
    device: str = field(default="auto", metadata=_help(DEVICE_HELP))
    name_concepts: bool = field(default=True, metadata=_help(
        "do not write concept names into the bundle (default: names are written when it has concepts)",
        flag="--no-names"))
    out: Path = field(default=Path("build/shapes/analysis"), metadata=_help(
        "folder for layer_analysis.json and layer_analysis.png"))


def analyze(step: AnalyzeStep) -> dict[str, Any]:
    """Analyse the layers; with concepts in the bundle, name them and write the names into it."""
    from export.analysis.layers import analyse, format_report, save
    from export.archive import write_bundle
    from export.data.loader import load_image_folder, read_factor_kinds
    from handlers.runtime.bundle import load_bundle
    from handlers.runtime.classifier import make_session
    from handlers.runtime.concepts import ConceptSpec
    bundle = load_bundle(step.bundle)
    meta = bundle.metadata
    model = load_classifier(source_from_bundle(step.model, meta, step.bundle), step.data).to(step.device).model
    ds = load_image_folder(step.data, meta.input, step.split, limit=step.images)
    kinds = read_factor_kinds(step.data)
    encoders = {}
    spec_c = None
    if "concepts" in meta.extra and step.name_concepts:
        spec_c = ConceptSpec.from_file(bundle.path(meta.extra["concepts"]))
        encoders = {l.layer: make_session(bundle.path(l.encoder_file), ("CPUExecutionProvider",), 0)
                    for l in spec_c.layers}
    result = analyse(model, ds, meta.input, step.layers, kinds, pca_dims=step.pca_dims,
                     pose_factor=step.pose_factor, concept_encoders=encoders)
    out = save(result, step.out)
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

        write_bundle(step.bundle, fill, base=step.bundle)
        print(f"concept names written into {step.bundle}/{meta.extra['concepts']}")
    return result


# -- archive and the demo build ---------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveStep:
    """Build ``model_store/NAME.mar`` from a bundle."""

    bundle: Path = field(metadata=_help("bundle to archive (verified first)"))
    name: str | None = field(default=None, metadata=_help("model name (default: the bundle's)"))
    version: str | None = field(default=None, metadata=_help("model version (default: the bundle's)"))
    model_store: Path = field(default=Path("model_store"), metadata=_help("folder the .mar is written into"))
    model_config: Path | None = field(default=None, metadata=_help(
        "TorchServe model-config.yaml archived with the model (default: export/model-config.yaml)"))
    accept_failed_checks: bool = field(default=False, metadata=_help(
        "archive even if the bundle's concept validity checks failed (default: refuse)"))


def archive(step: ArchiveStep) -> dict[str, Any]:
    """Verify the bundle, refuse it if its concept checks failed (unless accepted), archive it."""
    from export.archive import build_mar
    from export.concepts import failed_checks
    from handlers.runtime.bundle import load_bundle
    bundle = load_bundle(step.bundle)  # refuse to archive a corrupted bundle
    failed: list[dict[str, Any]] = []
    if "concepts" in bundle.metadata.extra:
        report = json.loads(bundle.path(bundle.metadata.extra["concepts"]).read_text()).get("report", {})
        failed = failed_checks(report)
    if failed:
        if not step.accept_failed_checks:
            raise FailedChecksError(Path(step.bundle), failed)
        print(f"archiving despite failed concept validity checks (--accept-failed-checks): {describe_checks(failed)}")
    mar = build_mar(step.bundle, step.name or bundle.metadata.name, step.version or bundle.metadata.version,
                    step.model_store, step.model_config)
    print(f"archived {mar} ({mar.stat().st_size / 1e6:.2f} MB, bundle sha256 {bundle.sha256[:12]})")
    return {"mar": str(mar), "failed_checks": [c["name"] for c in failed]}


#: Preprocessing of TorchServe's built-in ``image_classifier`` handler (ImageNet statistics,
#: 224 px after resizing to 256 and cropping the centre; this project resizes to 224 directly).
MAR_DEFAULT_SIZE = 224
MAR_DEFAULT_MEAN = (0.485, 0.456, 0.406)
MAR_DEFAULT_STD = (0.229, 0.224, 0.225)


def source_from_mar(mar: Path, into: Path, flags: ModelSource) -> tuple[ModelSource, str | None]:
    """The eager model in a TorchServe archive (its model file and state dict) as a
    :class:`ModelSource`, extracted into ``into``, and the archive's model version. The model class is the one ``nn.Module``
    subclass the model file defines (TorchServe's own rule); weights load with
    ``weights_only=True``. Preprocessing comes from ``flags``, else TorchServe's
    ``image_classifier`` defaults; classes from ``flags``, else ``index_to_name.json``."""
    import ast

    from handlers.runtime.source import from_mar
    try:
        from_mar(mar, into)
    except (OSError, ValueError) as exc:
        raise PipelineError(str(exc)) from None
    manifest = json.loads((into / "MAR-INF" / "MANIFEST.json").read_text()).get("model", {})
    model_file, weights = manifest.get("modelFile"), manifest.get("serializedFile")
    if not model_file or not weights:
        raise PipelineError(f"{mar} holds no eager model (a model file and a state dict): TorchScript or "
                            f"handler-only archives cannot be explained; archive the nn.Module's file and state dict")
    tree = ast.parse((into / model_file).read_text())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)
               and any((b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")) == "Module" for b in n.bases)]
    if len(classes) != 1:
        raise PipelineError(f"{mar}: {model_file} defines {len(classes)} nn.Module classes {classes}; "
                            "TorchServe (and this tool) need exactly one")
    labels = flags.classes
    index = into / "index_to_name.json"
    if labels is None and index.is_file():
        mapping = json.loads(index.read_text())
        labels = tuple(str(v[-1] if isinstance(v, list) else v) for _, v in sorted(mapping.items(), key=lambda kv: int(kv[0])))
    channels = flags.channels or 3
    source = ModelSource(model_file=into / model_file, model_class=classes[0], weights=into / weights, classes=labels,
                         size=flags.size or MAR_DEFAULT_SIZE, channels=channels,
                         mean=flags.mean or (MAR_DEFAULT_MEAN if channels == 3 else (DEFAULT_MEAN,) * channels),
                         std=flags.std or (MAR_DEFAULT_STD if channels == 3 else (DEFAULT_STD,) * channels))
    return source, manifest.get("modelVersion")


@dataclass(frozen=True)
class BuildStep:
    """Every step for your own model in one command: export, concepts, ClaDec, features, layer
    analysis (when the data has factors.csv) and archive, with layers chosen from the model."""

    data: Path = field(metadata=_help("image folder (train/ and test/ with a folder per class)"))
    name: str = field(metadata=_help("model name (the archive is model_store/NAME.mar)"))
    model: ModelSource = field(default_factory=ModelSource)
    from_mar: Path | None = field(default=None, metadata=_help(
        "an existing TorchServe archive of an eager model (model file + state dict) instead of the model "
        "arguments (default: none); preprocessing from --size/--mean/--std, else image_classifier's "
        f"({MAR_DEFAULT_SIZE} px, ImageNet mean and std)"))
    version: str | None = field(default=None, metadata=_help("model version (default: the .mar's, else 1.0)"))
    layers: tuple[str, ...] | None = field(default=None, metadata=_help(
        "comma-separated concept layers (default: the last three spatial blocks of the model)"))
    cladec_layers: tuple[str, ...] | None = field(default=None, metadata=_help(
        "comma-separated ClaDec layers (default: the middle block and the head's input)"))
    build: Path | None = field(default=None, metadata=_help("build folder (default: build/NAME)"))
    model_store: Path = field(default=Path("model_store"), metadata=_help("folder the .mar is written into"))
    accept_failed_checks: bool = field(default=False, metadata=_help(
        "archive even if the concept validity checks failed (default: refuse, and say which failed)"))
    device: str = field(default="auto", metadata=_help(DEVICE_HELP))


def timed(report: dict[str, Any], name: str, run: Callable[[], dict[str, Any]]) -> None:
    """``report[name] = run()``, and its wall time in ``report["step_seconds"][name]``."""
    t0 = time.perf_counter()
    report[name] = run()
    report.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 1)


def _method_steps(bundle: Path, data: Path, model: ModelSource, concepts: ConceptConfig, cladec: ClaDecConfig,
                  features: FeatureConfig, analysis: AnalyzeStep | None, archive_step: ArchiveStep,
                  say: Callable[[str], None] = lambda _: None, device: str = "auto",
                  report: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every build runs on an exported bundle, in order: methods 1-3, the 8-bit graphs,
    method 4 (``analysis``; None when the data has no factors) and the archive, torch on
    ``device``. ``say`` announces each step. Adds the steps' reports by name to ``report``
    (a new dict by default), with each step's wall time under ``step_seconds``; returns it."""
    report = {} if report is None else report
    say("[2/7] concepts (method 1)")
    timed(report, "concepts", lambda: add_concepts(
        ConceptsStep(bundle=bundle, data=data, model=model, device=device, concepts=concepts)))
    say("[3/7] ClaDec (method 2)")
    timed(report, "cladec", lambda: add_cladec(
        ClaDecStep(bundle=bundle, data=data, model=model, device=device, cladec=cladec)))
    say("[4/7] class-specific features (method 3)")
    timed(report, "features", lambda: add_features(
        FeaturesStep(bundle=bundle, data=data, model=model, device=device, features=features)))
    say("[5/7] 8-bit concept encoders and reference autoencoders")
    timed(report, "quantization", lambda: quantize(QuantizeStep(bundle=bundle, data=data)))
    if analysis is not None:
        say("[6/7] layer analysis (method 4)")
        step = dataclasses.replace(analysis, device=device)
        timed(report, "analysis", lambda: {k: v for k, v in analyze(step).items() if k != "concept_names"})
    else:
        say("[6/7] layer analysis skipped: the data has no factors.csv")
    say("[7/7] archive")
    timed(report, "archive", lambda: archive(archive_step))
    return report


def build(step: BuildStep, concepts: ConceptConfig | None = None, cladec: ClaDecConfig | None = None
          ) -> dict[str, Any]:
    """Run every step on the user's model; each step stays runnable alone on the same bundle
    (the model is recorded in it). ``concepts`` / ``cladec``: other method configs (tests)."""
    from export.layout import LayoutError, choose_layout
    t0 = time.perf_counter()
    out = Path(step.build or Path("build") / step.name)
    bundle = out / "bundle"
    source, version = step.model, step.version
    if step.from_mar is not None:
        source, mar_version = source_from_mar(Path(step.from_mar), out / "source", step.model)
        version = version or mar_version
        print(f"[0/7] read {step.from_mar}: {source.model_class} in {Path(str(source.model_file)).name}, "
              f"weights {Path(str(source.weights)).name}")
    loaded = load_classifier(source, step.data)
    try:
        layout = choose_layout(loaded.model, loaded.spec)
    except LayoutError as exc:
        raise PipelineError(f"cannot choose the layers: {exc}") from None
    concept_layers = step.layers or layout.concept_layers
    cladec_layers = step.cladec_layers or layout.cladec_layers
    exported = tuple(dict.fromkeys([*layout.export_layers, *concept_layers, *cladec_layers]))
    print("layers chosen from the model:\n  " + "\n  ".join(layout.reasons))
    report: dict[str, Any] = {"layout": {"head": layout.head, "penultimate": layout.penultimate,
                                         "concept_layers": list(concept_layers), "cladec_layers": list(cladec_layers)}}
    report["device"] = str(resolve_device(step.device))
    print(f"[1/7] export (torch on {report['device']} from here on; export on the CPU)")
    version = version or "1.0"
    timed(report, "export", lambda: export_bundle(ExportStep(out=bundle, model=source, data=step.data,
                                                              layers=exported, name=step.name, version=version)))
    recorded = ModelSource()  # from here on the bundle names the model
    analysis = (AnalyzeStep(bundle=bundle, data=step.data, model=recorded, layers=layout.blocks, out=out / "analysis")
                if (Path(step.data) / "factors.csv").is_file() else None)
    _method_steps(
        bundle, Path(step.data), recorded,
        dataclasses.replace(concepts or ConceptConfig(), layers=tuple(concept_layers)),
        dataclasses.replace(cladec or ClaDecConfig(), layers=tuple(cladec_layers)),
        FeatureConfig(layer=layout.penultimate, head=layout.head), analysis,
        ArchiveStep(bundle=bundle, name=step.name, version=version, model_store=step.model_store,
                    accept_failed_checks=step.accept_failed_checks), say=print, device=step.device, report=report)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "build-report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"built {report['archive']['mar']} in {report['seconds']} s; concept checks failed: "
          f"{', '.join(report['archive']['failed_checks']) or 'none'}")
    return report


@dataclass(frozen=True)
class KServeStorageStep:
    """Lay out a .mar as KServe's TorchServe runtime reads its storageUri."""

    mar: Path = field(metadata=_help("the .mar to serve"))
    out: Path = field(default=Path("build/kserve-storage"), metadata=_help(
        "folder to write config/config.properties, config/metrics.yaml and model-store/NAME.mar into"))


def kserve_storage(step: KServeStorageStep) -> dict[str, Any]:
    """Write ``out/config/config.properties`` (deploy/kubernetes/torchserve-storage, with the
    model's name), ``out/config/metrics.yaml`` and ``out/model-store/NAME.mar``; copy ``out``
    to the bucket or volume an InferenceService's ``storageUri`` names."""
    mar, out = Path(step.mar), Path(step.out)
    if not mar.is_file():
        raise PipelineError(f"{mar} is not a file: build the archive first (concept-explainer archive)")
    import zipfile
    try:
        with zipfile.ZipFile(mar) as zf:
            manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise PipelineError(f"{mar} is not a TorchServe archive: {exc}") from None
    name, version = mar.stem, str(manifest.get("modelVersion") or "1.0")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    template = (_REPO / "deploy" / "kubernetes" / "torchserve-storage" / "config" / "config.properties").read_text()
    (out / "config" / "config.properties").write_text(template.replace("@MODEL@", name).replace("@VERSION@", version))
    shutil.copy(_REPO / "metrics.yaml", out / "config" / "metrics.yaml")
    shutil.copy(mar, out / "model-store" / mar.name)
    print(f"KServe storage for {name} in {out} (copy it to the InferenceService's storageUri)")
    return {"out": str(out), "model": name, "version": version}


@dataclass(frozen=True)
class BuildDemoStep:
    """Render, train, export, add every method's artifacts, analyse and archive the demo model."""

    data: Path = field(default=default_of(RenderStep, "out"), metadata=_help("demo image folder"))
    build: Path = field(default=Path("build/shapes"), metadata=_help(
        "build folder (classifier/, bundle/, analysis/, build-report.json)"))
    model_store: Path = field(default=default_of(ArchiveStep, "model_store"),
                              metadata=_help("folder the .mar is written into"))
    name: str = field(default=default_of(ExportStep, "name"), metadata=_help("model name"))
    version: str = field(default=default_of(ExportStep, "version"), metadata=_help("model version"))
    n_train: int = field(default=default_of(RenderStep, "n_train"), metadata=_help("training images rendered"))
    n_test: int = field(default=default_of(RenderStep, "n_test"), metadata=_help("held-out images rendered"))
    epochs: int = field(default=default_of(TrainConfig, "epochs"), metadata=_help("classifier training epochs"))
    seed: int = field(default=default_of(RenderStep, "seed"), metadata=_help("seed of rendering and training"))
    force: bool = field(default=False, metadata=_help(
        "redo data and training even if present (default: reuse them)"))
    accept_failed_checks: bool = field(default=False, metadata=_help(
        "archive the demo even if its concept validity checks failed (default: refuse)"))
    cladec_sweep: bool = field(default=False, metadata=_help(
        "also train and judge ClaDec's report-only alphas and the fresh classifiers (the evaluation; default: "
        "only the served alphas, judged by the classifier itself, with the time saved given to the decoders; "
        "concept-explainer cladec runs the evaluation)"))
    device: str = field(default="auto", metadata=_help(DEVICE_HELP))


#: Least steps of each demo decoder and RefAE: four times the plain default's 240 on the demo's
#: 5,000 images, paid for by leaving the evaluation (report-only alphas, fresh classifiers) out,
#: by batches of 64 and by bfloat16 where the CPU has it.
DEMO_CLADEC_MIN_STEPS = 960


def demo_cladec_config(sweep: bool) -> ClaDecConfig:
    """ClaDec's defaults for the demo. Without ``sweep`` only the served alphas are trained, and
    they are judged by the classifier alone: the report-only alphas (about 200 s of a demo build)
    and the fresh classifiers (about 190 s more) are the evaluation, run by ``concept-explainer
    cladec`` or ``build-demo --cladec-sweep``. Either way the decoders train
    :data:`DEMO_CLADEC_MIN_STEPS` steps."""
    evaluation = ClaDecConfig(min_steps=DEMO_CLADEC_MIN_STEPS)
    return evaluation if sweep else dataclasses.replace(evaluation, sweep_alphas=evaluation.alphas,
                                                        fresh_classifier_epochs=0)


def build_demo(step: BuildDemoStep, concepts: ConceptConfig | None = None, cladec: ClaDecConfig | None = None
               ) -> dict[str, Any]:
    """Every step with its defaults (``concepts`` / ``cladec``: other method configs, e.g.
    small budgets in tests); data and classifier are reused when present unless
    ``step.force``. Writes and returns the build report (``build/build-report.json``)."""
    t0 = time.perf_counter()
    data, build = Path(step.data), Path(step.build)
    source = ModelSource(classifier=build / "classifier")
    bundle = build / "bundle"
    report: dict[str, Any] = {"device": str(resolve_device(step.device))}
    if not (data / "factors.csv").is_file() or step.force:
        timed(report, "render", lambda: render(RenderStep(out=data, n_train=step.n_train, n_test=step.n_test,
                                                           seed=step.seed)))
    if not (build / "classifier" / CLASSIFIER_INFO).is_file() or step.force:
        timed(report, "train", lambda: train(TrainStep(data=data, out=build / "classifier", device=step.device,
                                                        training=TrainConfig(epochs=step.epochs, seed=step.seed))))
    timed(report, "export", lambda: export_bundle(ExportStep(out=bundle, model=source, name=step.name,
                                                              version=step.version)))
    analysis = (AnalyzeStep(bundle=bundle, data=data, model=source, out=build / "analysis")
                if (data / "factors.csv").is_file() else None)
    _method_steps(bundle, data, source, concepts or ConceptConfig(),
                  cladec or demo_cladec_config(step.cladec_sweep), FeatureConfig(), analysis,
                  ArchiveStep(bundle=bundle, name=step.name, version=step.version,
                              model_store=step.model_store, accept_failed_checks=step.accept_failed_checks),
                  device=step.device, report=report)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (build / "build-report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"demo build finished in {report['seconds']} s; report in {build / 'build-report.json'}")
    return report


#: Every step: its config class and function, by CLI subcommand name.
STEPS: Mapping[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "render": (RenderStep, render),
    "digits": (DigitsStep, digits),
    "train": (TrainStep, train),
    "export": (ExportStep, export_bundle),
    "concepts": (ConceptsStep, add_concepts),
    "cladec": (ClaDecStep, add_cladec),
    "features": (FeaturesStep, add_features),
    "quantize": (QuantizeStep, quantize),
    "analyze": (AnalyzeStep, analyze),
    "archive": (ArchiveStep, archive),
    "kserve-storage": (KServeStorageStep, kserve_storage),
    "build": (BuildStep, build),
    "build-demo": (BuildDemoStep, build_demo),
}
