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

Each step's options are the fields of its config in :mod:`export.pipeline` (nested configs
flattened: ``--k`` of ``concepts`` is ``ConceptsStep.concepts.k``); a field added to a config
becomes an option without code here.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.errors import PipelineError

#: Help of the methods' config fields, whose classes live in the methods' modules. A field
#: without an entry still gets an option (helped by its class and name, with its default).
CONFIG_HELP: dict[str, dict[str, str]] = {
    "TrainConfig": {
        "epochs": "training epochs",
        "batch_size": "batch size",
        "lr": "peak learning rate of the one-cycle schedule (AdamW)",
        "weight_decay": "AdamW weight decay",
        "seed": "seed of initialisation and batch order",
        "max_steps": "stop after this many optimiser steps (default: none, every epoch runs)",
    },
    "ConceptConfig": {
        "layers": "comma-separated concept layers",
        "k": "concepts per layer",
        "states": "states per concept",
        "epochs": "autoencoder training epochs",
        "batch_size": "autoencoder batch size",
        "lr": "autoencoder learning rate",
        "deep_weight": "weight of the loss on the classifier's output from reconstructed activations",
        "deep_warmup_epochs": "epochs over which that deep loss weight ramps up linearly from 0",
        "hidden_multiplier": "autoencoder hidden width as a multiple of the layer's channels",
        "sparsity_weight": "weight of the codes' sparsity loss",
        "tv_weight": "weight of the codes' total-variation loss",
        "train_images": "training images the autoencoders train on",
        "min_steps": "least autoencoder training steps; small data sets get more epochs",
        "max_indegree": "parents per concept from the previous layer",
        "outcome_max_indegree": "parents of Y from the last layer",
        "intervention_images": "training images put through every single-concept intervention",
        "backoff": "weight of the logistic table against configuration counts",
        "l2": "L2 weight of the logistic tables",
        "min_influence": "least mean |change| (in stds) of a child for an edge",
        "reacting_threshold": "mean |change of P(prediction)| that makes a concept reacting",
        "validity_images": "held-out images of the causal validity measurement",
        "atlas_images": "training images per concept atlas strip (0: no atlas)",
        "seed": "seed of sampling and training",
    },
    "ClaDecConfig": {
        "layers": "comma-separated layers",
        "alphas": "comma-separated alphas (weight of the classification loss)",
        "epochs": "decoder and reference autoencoder training epochs",
        "batch_size": "batch size",
        "lr": "learning rate",
        "train_images": "training images the decoders train on",
        "eval_images": "held-out images of the evaluation",
        "fresh_classifier_epochs": "epochs of the fresh classifiers trained on reconstructions (0 skips them)",
        "object_weight": "extra weight of the object's pixels (those unlike the image's border) in the reconstruction "
                         "error of the decoders and RefAEs (0: plain MSE)",
        "decoder_width": "channels of each decoder's first feature map (a spatial layer's at least its own)",
        "precision": "training precision: fp32, bf16 (bfloat16 autocast) or auto (bf16 where the device has "
                     "bfloat16 units)",
        "seed": "seed of sampling and training",
    },
    "QuantizeConfig": {
        "calibration_images": "training images whose activations set the 8-bit ranges",
        "eval_images": "held-out images the 8-bit graphs are judged on",
        "min_state_agreement": "least share of (image, concept) states equal to the float encoder's",
        "min_psnr_db": "least PSNR (dB) of a reference autoencoder's images against float",
        "timing_runs": "batch-1 runs per graph for the report's latencies",
        "batch_size": "batch size of calibration and evaluation",
    },
    "FeatureConfig": {
        "layer": "penultimate layer",
        "head": "final nn.Linear module",
        "k": "subset size (>= 1) or L1-mass share (0 < k < 1)",
        "selectivity_share": "L1-mass share of the selectivity measure",
        "selectivity_layers": "comma-separated layers whose selectivity is measured (default: the exported "
                              "spatial layers but the features layer)",
        "finetune_epochs": "epochs of the decomposed head's fine-tuning (reported only; 0 skips it)",
        "seed": "seed of the fine-tuning",
    },
}

#: The steps' subcommands and their one-line help, in the order ``--help`` lists them.
STEP_HELP: dict[str, str] = {
    "render": "render the controlled-factor demo data set",
    "digits": "write scikit-learn's real handwritten digits as an image folder "
              "(a small real data set for checks; needs scikit-learn)",
    "train": "train a project architecture on an image folder",
    "export": "export a classifier to ONNX and write the artifact bundle",
    "concepts": "concept autoencoders + causal Bayesian network (method 1)",
    "cladec": "ClaDec decoders + reference autoencoders (method 2)",
    "features": "class-specific penultimate features (method 3)",
    "quantize": "8-bit concept encoders and reference autoencoders, kept where close to float",
    "analyze": "GCMI layer analysis against factors.csv; names concepts (method 4)",
    "archive": "build model_store/NAME.mar from a bundle",
    "kserve-storage": "lay out a .mar as KServe's TorchServe runtime reads its storageUri",
    "build": "your own model (trained folder, model file + weights, or an existing .mar) in one command: "
             "export, concepts, ClaDec, features, 8-bit graphs, analysis, archive",
    "build-demo": "render, train, export, add every method's artifacts and archive the demo model",
}


# -- options from dataclass fields ------------------------------------------------------------

def _show(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def with_default(text: str, default: Any) -> str:
    """``text`` plus ``(default: ...)`` unless it already states its default."""
    if "default" in text.lower():
        return text
    return f"{text} (default: {'none' if default is None else _show(default)})"


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(item(v.strip()) for v in text.split(",") if v.strip())
    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


_SCALARS: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str, Path: Path}


def _without_none(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _add_field(parser: argparse._ActionsContainer, cls: type, f: dataclasses.Field, tp: Any) -> None:
    """One option for one field: ``--field-name`` (or ``metadata["flag"]``), typed from the
    annotation, defaulting to the field's default, required when the field has none."""
    meta = f.metadata
    tp = _without_none(tp)
    default = _default(f)
    text = meta.get("help") or CONFIG_HELP.get(cls.__name__, {}).get(f.name) or f"{cls.__name__}.{f.name}"
    kwargs: dict[str, Any] = {"dest": f.name}
    if tp is bool:
        if default is True and "flag" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} defaults to True: give metadata['flag'] (a --no-... option)")
        kwargs["action"] = "store_false" if default is True else "store_true"
    elif typing.get_origin(tp) is tuple:
        item = _SCALARS.get(typing.get_args(tp)[0])
        if item is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp}")
        if "nargs" in meta:
            kwargs.update(nargs=meta["nargs"], type=item)
        else:
            kwargs["type"] = _comma_list(item)
    elif typing.get_origin(tp) is typing.Literal:
        kwargs.update(type=type(typing.get_args(tp)[0]), choices=typing.get_args(tp))
    elif tp in _SCALARS:
        kwargs["type"] = _SCALARS[tp]
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp}")
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    if default is dataclasses.MISSING:
        kwargs["required"] = True
        text += " (required)"
    else:
        kwargs["default"] = default
        text = with_default(text, default)
    kwargs["help"] = text.replace("%", "%%")
    parser.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), **kwargs)


def add_config_options(parser: argparse.ArgumentParser, cls: type,
                       group: argparse._ActionsContainer | None = None) -> None:
    """Add an option per field of dataclass ``cls``; a nested config's fields become options
    too, in an argument group named after the field and its class."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_config(tp):
            add_config_options(parser, tp, parser.add_argument_group(f"{f.name} ({tp.__name__})"))
        else:
            _add_field(group or parser, cls, f, tp)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config of class ``cls`` from options added by :func:`add_config_options`."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_config(hints[f.name]):
            values[f.name] = config_from_args(hints[f.name], args)
        else:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose options are added on first use: a step's options come from
    config classes whose modules import torch, which ``--help`` and ``query`` do not need."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populate(self) -> _LazyParser:
        """Add the options now (once)."""
        if self._populate is not None:
            fill, self._populate = self._populate, None
            fill(self)
        return self

    def parse_known_args(self, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
        self.populate()
        return super().parse_known_args(*args, **kwargs)

    def format_usage(self) -> str:
        self.populate()
        return super().format_usage()

    def format_help(self) -> str:
        self.populate()
        return super().format_help()


def _step_options(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def populate(parser: argparse.ArgumentParser) -> None:
        from export.pipeline import STEPS
        cls, run = STEPS[name]
        add_config_options(parser, cls)
        parser.set_defaults(func=lambda args: run(config_from_args(cls, args)))
    return populate


# -- client commands (a running TorchServe) ---------------------------------------------------

def cmd_query(args: argparse.Namespace) -> dict:
    """Send one image to a running TorchServe and print the answer."""
    from export.client import TorchServeClient
    client = TorchServeClient(args.url, key_file=args.key_file)
    client.wait_ready(args.model, timeout=args.timeout)
    status, body = client.post_image(args.endpoint, args.model, Path(args.image).read_bytes())
    print(json.dumps(body, indent=2))
    if status != 200:
        raise PipelineError(f"HTTP {status}")
    return body


def _one_image_per_class(data: Path, n: int) -> list[Path]:
    """The first test image of each class folder (``data/test/<class>/*.png``), at most ``n``."""
    picks, seen = [], set()
    for f in sorted(Path(data, "test").glob("*/*.png")):
        if f.parent.name not in seen:
            seen.add(f.parent.name)
            picks.append(f)
    return picks[:n]


def _triplet_cells(raw: bytes, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """One grid row of an explanation: the input, each layer's reference reconstruction (once)
    and each ClaDec reconstruction, with their labels."""
    import base64
    import io

    from PIL import Image
    cells = [("input", Image.open(io.BytesIO(raw)).convert("RGB"))]
    for e in body.get("cladec", []):
        reference = e.get("reference_png") or e.get("reference_jpeg")  # the answer's image_format
        if reference and not any(label == f"RefAE {e['layer']}" for label, _ in cells):
            cells.append((f"RefAE {e['layer']}", Image.open(io.BytesIO(base64.b64decode(reference)))))
        cells.append((f"ClaDec {e['layer']} a={e['alpha']:g}", Image.open(io.BytesIO(base64.b64decode(
            e.get("reconstruction_png") or e["reconstruction_jpeg"])))))
    return cells


def _save_grid(rows: list[list[tuple[str, Any]]], path: Path, scale: int = 2, label_h: int = 16) -> None:
    """The rows of labelled images as one PNG grid (labels over the first row's columns)."""
    from PIL import Image, ImageDraw
    w, h = rows[0][0][1].size
    cw = max(w * scale, 118)
    grid = Image.new("RGB", (cw * len(rows[0]), label_h + h * scale * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (label, _) in enumerate(rows[0]):
        draw.text((j * cw + 2, 2), label, fill="black")
    for i, cells in enumerate(rows):
        for j, (_, img) in enumerate(cells):
            grid.paste(img.resize((w * scale, h * scale), Image.Resampling.NEAREST), (j * cw, label_h + i * h * scale))
    grid.save(path)


def cmd_demo_report(args: argparse.Namespace) -> dict:
    """Ask a running TorchServe for explanations of a few test images; print one, save the
    full JSON and a PNG grid of the ClaDec triplets (input, RefAE, ClaDec per layer)."""
    from export.client import TorchServeClient
    from export.report import Section, summary_lines, write_report
    client = TorchServeClient(args.url, key_file=args.key_file)
    client.wait_ready(args.model, timeout=args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers = []  # with each concept's atlas strips, for the report
    for f in _one_image_per_class(Path(args.data), args.images):
        status, body = client.post_json("explanations", args.model,
                                        {"data": base64.b64encode(f.read_bytes()).decode(), "atlas": True})
        if status != 200:
            raise PipelineError(f"{f}: HTTP {status}: {body}")
        answers.append((f, body))
    if not answers:
        raise PipelineError(f"no test images to explain under {Path(args.data, 'test')} (--images {args.images})")
    f = answers[0][0]
    status, body = client.post_image("explanations", args.model, f.read_bytes())  # the default answer
    if status != 200:
        raise PipelineError(f"{f}: HTTP {status}: {body}")
    size = len(json.dumps(body, separators=(",", ":")))
    (out / "explanation.json").write_text(json.dumps(body, indent=1) + "\n")
    _save_grid([_triplet_cells(p.read_bytes(), b) for p, b in answers], out / "cladec_grid.png")
    print(f"explanation of {f} ({size / 1024:.1f} KiB of JSON):")
    print("\n".join(summary_lines(body)))
    report = write_report([Section(str(p), p.read_bytes(), b) for p, b in answers], out / "report.html",
                          title=f"Explanations of {args.model}")
    print(f"full explanation: {out / 'explanation.json'}; ClaDec triplets: {out / 'cladec_grid.png'}")
    print(f"HTML report (open it in a browser): {report}")
    return {"explanation_bytes": size}


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The /explanations options the command line sets (the rest stay the archive's defaults)."""
    from handlers.runtime.request import ALPHA_CHOICES
    options: dict[str, Any] = {}
    if args.target is not None:
        options["target"] = int(args.target) if args.target.isdigit() else args.target
    if args.top_concepts is not None:
        options["top_concepts"] = args.top_concepts
    if args.alphas is not None:
        options["alphas"] = args.alphas if args.alphas in ALPHA_CHOICES else [
            float(a) for a in args.alphas.split(",")]
    if args.image_format is not None:
        options["image_format"] = args.image_format
    if args.verify:
        options["verify"] = True
    if args.atlas:
        options["atlas"] = True
    return options


def _explain_in_process(args: argparse.Namespace, images: list[tuple[Path, bytes]], options: dict[str, Any]) -> list[Any]:
    """The replies of the serving runtime, loaded from ``--mar`` or ``--bundle``, to one
    explanation request per image. The requests go through the same parsing as a REST
    client's, so the command line's options are checked exactly as the server checks them."""
    import tempfile

    from handlers.runtime.errors import ArtifactError
    from handlers.runtime.service import ExplainerService, RawRequest
    from handlers.runtime.settings import HandlerSettings, SettingsError
    from handlers.runtime.source import from_bundle, from_mar
    with tempfile.TemporaryDirectory(prefix="explain-") as tmp:
        try:
            src = from_mar(Path(args.mar), Path(tmp)) if args.mar else from_bundle(Path(args.bundle), None, None)
            service = ExplainerService.load(src.model_dir, HandlerSettings.from_mapping(src.handler),
                                            None if args.gpu_id < 0 else args.gpu_id)
        except (OSError, ValueError, KeyError, ArtifactError, SettingsError) as exc:
            raise PipelineError(f"cannot load the model: {exc}") from None
        try:
            raws = [RawRequest({"data": base64.b64encode(raw).decode(), **options}, "application/json", True)
                    if options else RawRequest(raw, "application/octet-stream", True) for _, raw in images]
            return service.handle_batch(raws)
        finally:
            service.close()


def cmd_explain(args: argparse.Namespace) -> dict:
    """Explain images in process (no server): the runtime TorchServe runs, on a bundle or a
    .mar; print the summary, write the /explanations JSON and the HTML report."""
    from export.report import ReportError, Section, summary_lines, write_report
    images = []
    for path in args.image:
        try:
            images.append((Path(path), Path(path).read_bytes()))
        except OSError as exc:
            raise PipelineError(f"cannot read image {path}: {exc.strerror or exc}") from None
    replies = _explain_in_process(args, images, _request_options(args))
    bodies, failures = [], []
    for (path, raw), reply in zip(images, replies):
        body = reply.body
        if reply.status != 200:
            failures.append(f"{path}: {body['error']['type']}: {body['error']['message']}")
            continue
        print(f"explanation of {path}:")
        print("\n".join(summary_lines(body)))
        bodies.append((path, raw, body))
    if args.json and bodies:
        answer: Any = bodies[0][2] if len(images) == 1 else [b for _, _, b in bodies]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(answer, separators=(",", ":")) + "\n")
        print(f"JSON answer: {args.json}")
    if args.html and bodies:
        try:
            write_report([Section(str(p), raw, b) for p, raw, b in bodies], Path(args.html))
        except ReportError as exc:
            raise PipelineError(str(exc)) from None
        print(f"HTML report: {args.html}")
    if failures:
        raise PipelineError("; ".join(failures))
    return {"explained": len(bodies)}


def cmd_report(args: argparse.Namespace) -> dict:
    """Render saved /explanations answers (one body or a list) and their images as HTML."""
    from export.report import ReportError, Section, load_answers, write_report
    try:
        answers = load_answers(Path(args.answer))
        if len(answers) != len(args.image):
            raise ReportError(f"{args.answer} holds {len(answers)} answer(s) but {len(args.image)} --image given")
        sections = []
        for path, body in zip(args.image, answers):
            try:
                sections.append(Section(str(path), Path(path).read_bytes(), body))
            except OSError as exc:
                raise ReportError(f"cannot read image {path}: {exc.strerror or exc}") from None
        write_report(sections, Path(args.out))
    except ReportError as exc:
        raise PipelineError(str(exc)) from None
    print(f"HTML report: {args.out}")
    return {"sections": len(sections)}


def _explain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", nargs="+", required=True, help="image files (PNG or JPEG) to explain (required)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="a bundle folder (build/NAME/bundle) (default: none; give --bundle or --mar)")
    source.add_argument("--mar", help="a .mar built by concept-explainer archive (default: none; give --bundle or --mar)")
    _option(p, "--target", None, "class index or label to explain (default: the predicted class)")
    _option(p, "--top-concepts", None, "concepts per explanation (default: the archive's setting)", type=int)
    _option(p, "--alphas", None, 'ClaDec alphas: "lowest", "all" or comma-separated values (default: the archive\'s '
            "setting)")
    _option(p, "--image-format", None, "ClaDec images as png or jpeg (default: the archive's setting)",
            choices=("png", "jpeg"))
    _option(p, "--gpu-id", -1, "GPU to run on when the archive's providers include CUDA ([gpu] flavour); -1: the CPU",
            type=int)
    p.add_argument("--verify", action="store_true",
                   help="check every listed concept against the network's own interventions (the request option "
                        '"verify": true) (default: off)')
    p.add_argument("--atlas", action="store_true",
                   help="each listed concept carries its atlas strips (the request option \"atlas\": true) "
                        "(default: off)")
    _option(p, "--json", None, "write the /explanations answer here (a list for several images)")
    _option(p, "--html", None, "write the HTML report here")
    p.set_defaults(func=cmd_explain)


def cmd_atlas(args: argparse.Namespace) -> dict:
    """Write a bundle's concept atlas as PNG strips and an HTML index."""
    from export.atlas import write_atlas
    from handlers.runtime.errors import ArtifactError
    try:
        index = write_atlas(Path(args.bundle), Path(args.out))
    except ArtifactError as exc:
        raise PipelineError(str(exc)) from None
    print(f"concept atlas: {index}")
    return {"index": str(index)}


def _atlas_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="a bundle folder with concepts (build/NAME/bundle) (required)")
    p.add_argument("--out", required=True, help="folder for the strips and index.html (required)")
    p.set_defaults(func=cmd_atlas)


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answer", required=True, help="an /explanations answer (JSON), or a list of them (required)")
    p.add_argument("--image", nargs="+", required=True, help="the explained image(s), in the answers' order (required)")
    p.add_argument("--out", required=True, help="the HTML file written (required)")
    p.set_defaults(func=cmd_report)


def _option(p: argparse.ArgumentParser, flag: str, default: Any, text: str, **kwargs: Any) -> None:
    """An option of a client command, its default written once (and stated in its help)."""
    p.add_argument(flag, default=default, help=with_default(text, default), **kwargs)


def _query_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--image", required=True, help="image file sent (required)")
    _option(q, "--model", "shapes", "registered model name")
    _option(q, "--endpoint", "predictions", "inference API", choices=("predictions", "explanations"))
    _server_options(q)
    q.set_defaults(func=cmd_query)


def _demo_report_options(dr: argparse.ArgumentParser) -> None:
    _option(dr, "--model", "shapes", "registered model name")
    _option(dr, "--data", "data/shapes", "image folder whose test split is explained (one image per class)")
    _option(dr, "--images", 4, "images explained", type=int)
    _option(dr, "--out", "build/shapes/demo", "folder for explanation.json, cladec_grid.png and report.html")
    _server_options(dr)
    dr.set_defaults(func=cmd_demo_report)


def _server_options(p: argparse.ArgumentParser) -> None:
    _option(p, "--url", "http://127.0.0.1:8080", "TorchServe inference address")
    _option(p, "--key-file", "key_file.json", "TorchServe's token file (token authorisation)")
    _option(p, "--timeout", 120, "seconds to wait for the model to be ready", type=float)


def build_parser() -> argparse.ArgumentParser:
    """The ``concept-explainer`` parser: a subcommand per pipeline step, plus ``query`` and
    ``demo-report`` against a running TorchServe."""
    p = argparse.ArgumentParser(prog="concept-explainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_LazyParser)
    for name, text in STEP_HELP.items():
        sub.add_parser(name, help=text, description=text, populate=_step_options(name))
    sub.add_parser("query", help="send an image to a running TorchServe", populate=_query_options)
    sub.add_parser("demo-report", help="explain a few test images through a running TorchServe",
                   populate=_demo_report_options)
    sub.add_parser("explain", help="explain images in process (no server) and write JSON and an HTML report",
                   populate=_explain_options)
    sub.add_parser("report", help="render saved /explanations answers as a self-contained HTML report",
                   populate=_report_options)
    sub.add_parser("atlas", help="write a bundle's concept atlas (the training images where each concept fires) "
                                 "as PNG strips and an HTML index", populate=_atlas_options)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Returns 0, or 1 when a step cannot run (its message goes to stderr)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PipelineError as err:
        print(f"concept-explainer {args.command}: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:  # bad data, layers, weights: one line, no traceback
        if os.environ.get("CONCEPT_EXPLAINER_DEBUG"):
            raise
        print(f"concept-explainer {args.command}: {err} (CONCEPT_EXPLAINER_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
