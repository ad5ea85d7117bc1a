"""Offline measurements of the serving levers, on one bundle (what ``make bench`` records
beside the server figures; each lever kept or dropped in docs/benchmarks.md cites these rows).

    python -m bench.levers --bundle build/shapes/bundle --data data/shapes

1. 8-bit vs float, every explanation graph (concept encoders, reference autoencoders and the
   ClaDec decoders, which are not shipped in 8 bits): batch-1 latency, alternating, plus
   the quality measure of :mod:`export.quantize` for the ones the bundle judged.
2. Fewer, larger sessions: all concept encoders merged into one ONNX graph vs one session each.
3. Graph optimisation saved at export (onnxruntime's optimised model file, basic and
   extended levels) vs optimising at load: session creation and batch-1 latency.
4. Image encodings of the ClaDec images of one answer: PNG (ours), lossless WebP, JPEG q90.
5. The helper thread (``overlap_views``): every view in line, ClaDec on the helper with
   the concept graphs in line, ClaDec and the concept graphs sharing it (the shipped mode);
   one explanation at a time through the in-process service.
6. ClaDec decoders and reference autoencoders a few rows at a time (``cladec_chunk_rows``):
   peak resident memory of fresh processes explaining batches of 8, whole batch vs 2 rows
   (the default).

Every timing is a median of alternating runs on one thread (the worker's setting).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import alternating_times
from export.quantize import pick, quantize_graph
from handlers.runtime.bundle import Bundle, load_bundle
from handlers.runtime.cladec import to_uint8_images
from handlers.runtime.classifier import OnnxClassifier, make_session
from handlers.runtime.imaging import encode_jpeg, encode_png, normalize
from handlers.runtime.quantized import INT8_SUFFIX

CPU = ("CPUExecutionProvider",)


def alternating_ms(fns: dict[str, Callable[[], Any]], n: int) -> dict[str, float]:
    """Median milliseconds of each function over ``n`` alternating rounds (:func:`alternating_times`)."""
    return {k: round(statistics.median(v), 3) for k, v in alternating_times(fns, n).items()}


@dataclass(frozen=True)
class Inputs:
    """What the levers feed the graphs: calibration images and one held-out image, normalised
    (N, C, H, W), with the classifier's activations of each (layer -> (N, ...))."""

    x_cal: np.ndarray
    x_one: np.ndarray
    a_cal: dict[str, np.ndarray]
    a_one: dict[str, np.ndarray]

    def calibration(self, source: str) -> np.ndarray:
        """The calibration batch of a graph whose input is ``source`` ("input" or a layer)."""
        return self.x_cal if source == "input" else self.a_cal[source]

    def one(self, source: str) -> np.ndarray:
        """The held-out image's input of a graph whose input is ``source``."""
        return self.x_one if source == "input" else self.a_one[source]


def load_inputs(bundle: Bundle, data: Path, n_cal: int = 64) -> Inputs:
    """``n_cal`` evenly spaced training images and the first held-out image of ``data``, run
    through the bundle's classifier once."""
    from export.data.loader import load_image_folder
    meta = bundle.metadata
    train = load_image_folder(data, meta.input, "train", limit=max(n_cal * 8, 400))
    test = load_image_folder(data, meta.input, "test", limit=1)
    x_cal = normalize(train.pixels[pick(len(train), n_cal)], meta.input)
    x_one = normalize(test.pixels[:1], meta.input)
    classifier = OnnxClassifier.from_bundle(bundle, CPU, 0)
    return Inputs(x_cal, x_one, classifier.activations(x_cal, 16), classifier.activations(x_one, 16))


def _graphs(bundle: Bundle) -> list[tuple[str, str, str]]:
    """(kind, file, input: "input" or a layer name) of every explanation graph."""
    meta = bundle.metadata
    out: list[tuple[str, str, str]] = []
    if "concepts" in meta.extra:
        for l in json.loads(bundle.path(meta.extra["concepts"]).read_text())["layers"]:
            out.append(("concept_encoder", l["encoder_file"], l["layer"]))
    if "cladec" in meta.extra:
        decoders = json.loads(bundle.path(meta.extra["cladec"]).read_text())["decoders"]
        for refae in dict.fromkeys(d["refae_file"] for d in decoders):
            out.append(("reference_autoencoder", refae, "input"))
        for d in decoders:
            out.append(("cladec_decoder", d["decoder_file"], d["layer"]))
    return out


def int8_vs_float(bundle: Bundle, inputs: Inputs, n: int, tmp: Path) -> list[dict[str, Any]]:
    """Every explanation graph in float and quantized here (as ``concept-explainer quantize``
    does), batch 1, alternating; with the bundle's own verdict where it judged the graph."""
    judged = {}
    if "quantization" in bundle.metadata.extra:
        judged = {g["source"]: g for g in json.loads(bundle.path("quantization.json").read_text())["graphs"]}
    rows = []
    for kind, file, source in _graphs(bundle):
        cal, one = inputs.calibration(source), inputs.one(source)
        f = make_session(bundle.path(file), CPU, 1)
        name = f.get_inputs()[0].name
        q_file = quantize_graph(bundle.path(file), tmp / (Path(file).stem + INT8_SUFFIX),
                                iter({name: cal[i:i + 16]} for i in range(0, len(cal), 16)))
        q = make_session(q_file, CPU, 1)
        ms = alternating_ms({"float": lambda: f.run(None, {name: one}), "int8": lambda: q.run(None, {name: one})}, n)
        row: dict[str, Any] = {"kind": kind, "file": file, "float_ms": ms["float"], "int8_ms": ms["int8"],
                               "speedup": round(ms["float"] / ms["int8"], 2)}
        if file in judged:
            g = judged[file]
            row.update(metric=g["metric"], value=g["value"], threshold=g["threshold"], accepted=g["accepted"])
        rows.append(row)
    return rows


def merged_encoders(bundle: Bundle, inputs: Inputs, n: int, tmp: Path) -> dict[str, Any] | None:
    """All concept encoders as one ONNX graph (names prefixed) vs one session per encoder."""
    import onnx
    from onnx import compose, helper
    encoders = [(file, layer) for kind, file, layer in _graphs(bundle) if kind == "concept_encoder"]
    if len(encoders) < 2:
        return None
    models = [compose.add_prefix(onnx.load(str(bundle.path(f))), f"e{i}_") for i, (f, _) in enumerate(encoders)]
    merged = helper.make_model(
        helper.make_graph([n for m in models for n in m.graph.node], "concept_encoders",
                          [i for m in models for i in m.graph.input], [o for m in models for o in m.graph.output],
                          [t for m in models for t in m.graph.initializer]),
        opset_imports=models[0].opset_import)
    onnx.save(merged, str(tmp / "merged_encoders.onnx"))
    one = make_session(tmp / "merged_encoders.onnx", CPU, 1)
    sessions = [make_session(bundle.path(f), CPU, 1) for f, _ in encoders]
    feeds = [{s.get_inputs()[0].name: inputs.one(layer)} for s, (_, layer) in zip(sessions, encoders)]
    merged_feed = {f"e{i}_{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()}
    for s, feed, merged_out in zip(sessions, feeds, one.run(None, merged_feed), strict=True):  # same codes
        assert np.allclose(s.run(None, feed)[0], merged_out, atol=1e-5)
    ms = alternating_ms({"separate": lambda: [s.run(None, f) for s, f in zip(sessions, feeds)],
                         "merged": lambda: one.run(None, merged_feed)}, n)
    return {"encoders": len(encoders), "separate_ms": ms["separate"], "merged_ms": ms["merged"],
            "speedup": round(ms["separate"] / ms["merged"], 2)}


def saved_optimisation(bundle: Bundle, inputs: Inputs, n: int, tmp: Path) -> list[dict[str, Any]]:
    """The largest explanation graph and the classifier: session creation and batch-1 latency
    when optimised at load (what serving does) vs loading a model optimised and saved offline."""
    import onnxruntime as ort
    meta = bundle.metadata
    graphs = [(meta.classifier_file, "input")]
    others = [(f, s) for _, f, s in _graphs(bundle)]
    if others:
        graphs.append(max(others, key=lambda g: bundle.path(g[0]).stat().st_size))
    rows = []
    for file, source in graphs:
        variants = {"at load": bundle.path(file)}
        for label, level in (("saved, basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                             ("saved, extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)):
            opts = ort.SessionOptions()
            opts.graph_optimization_level = level
            opts.optimized_model_filepath = str(tmp / f"{Path(file).stem}.{level.name}.onnx")
            ort.InferenceSession(str(bundle.path(file)), opts, providers=list(CPU))
            variants[label] = Path(opts.optimized_model_filepath)
        sessions = {k: make_session(p, CPU, 1) for k, p in variants.items()}
        feed_value = inputs.one(source)
        feeds = {k: {s.get_inputs()[0].name: feed_value} for k, s in sessions.items()}
        def runner(k: str) -> Callable[[], Any]:
            return lambda: sessions[k].run(None, feeds[k])

        def loader(p: Path) -> Callable[[], Any]:
            return lambda: make_session(p, CPU, 1)

        run_ms = alternating_ms({k: runner(k) for k in sessions}, max(n // 2, 5))
        load_ms = alternating_ms({k: loader(p) for k, p in variants.items()}, 5)
        rows.append({"file": file, "load_ms": load_ms, "run_ms": run_ms})
    return rows


def image_formats(bundle: Bundle, inputs: Inputs, n: int) -> dict[str, Any] | None:
    """Bytes and encode milliseconds of one answer's ClaDec images (every decoder and RefAE
    on one held-out image) as PNG (ours), lossless WebP (method 0, Pillow's fastest) and
    JPEG q90 (ours)."""
    from PIL import Image
    if "cladec" not in bundle.metadata.extra:
        return None
    images = []
    for kind, file, source in _graphs(bundle):
        if kind == "concept_encoder":
            continue
        s = make_session(bundle.path(file), CPU, 1)
        images.append(to_uint8_images(s.run(None, {s.get_inputs()[0].name: inputs.one(source)})[0])[0])

    def webp(img: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(img.squeeze()).save(out, "WEBP", lossless=True, method=0)
        return out.getvalue()

    encoders: dict[str, Callable[[np.ndarray], bytes]] = {"png": encode_png, "webp_lossless": webp,
                                                           "jpeg_q90": encode_jpeg}

    def encode_all(e: Callable[[np.ndarray], bytes]) -> Callable[[], Any]:
        return lambda: [e(i) for i in images]

    ms = alternating_ms({k: encode_all(e) for k, e in encoders.items()}, n)
    return {"images": len(images), "size": list(images[0].shape),
            **{k: {"bytes": sum(len(e(i)) for i in images), "encode_ms": ms[k]} for k, e in encoders.items()}}


def _service(model_dir: Path, **settings: Any) -> Any:
    from handlers.runtime.service import ExplainerService
    from handlers.runtime.settings import HandlerSettings
    return ExplainerService.load(model_dir, HandlerSettings(**settings), None)


def _test_png(data: Path) -> bytes:
    return sorted((data / "test").glob("*/*.png"))[0].read_bytes()


def overlap_modes(bundle_dir: Path, data: Path, n: int, tmp: Path) -> dict[str, float] | None:
    """Median ms of one explanation (every view, images on) through the in-process service:
    every view in line (``overlap_views: false``), ClaDec on the helper thread with the
    concept graphs in line, and ClaDec and the concept graphs sharing the helper (shipped)."""
    from handlers.runtime.service import RawRequest
    if "cladec" not in load_bundle(bundle_dir).metadata.extra:
        return None
    model_dir = tmp / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "bundle").symlink_to(Path(bundle_dir).resolve())
    image = _test_png(data)
    shared, cladec_only, serial = _service(model_dir), _service(model_dir), _service(model_dir, overlap_views=False)
    if cladec_only.concepts is not None:
        cladec_only.concepts.use_helper(None)

    def explain(service: Any) -> Callable[[], Any]:
        return lambda: service.handle_batch([RawRequest(image, "image/png", True)])

    try:
        return alternating_ms({"in line": explain(serial), "ClaDec on the helper": explain(cladec_only),
                               "ClaDec and concept graphs on the helper": explain(shared)}, n)
    finally:
        for service in (shared, cladec_only, serial):
            service.close()


def _peak_of_batches(model_dir: str, image: bytes, chunk_rows: int, out: Any) -> None:
    """In a fresh process: load the service, explain 6 batches of 8, put (peak MB, median ms)."""
    import threading

    import psutil

    from handlers.runtime.service import RawRequest
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    service = _service(Path(model_dir), cladec_chunk_rows=chunk_rows)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        service.handle_batch([RawRequest(image, "image/png", True)] * 8)
        times.append((time.perf_counter() - t) * 1000)
    done.set()
    # close before the process exits: a background verification still running inside
    # onnxruntime at interpreter teardown aborts the process ("terminate called ...")
    service.close()
    out.put((round(peak[0] / 2**20, 1), round(statistics.median(times[1:]), 1)))


def chunk_memory(bundle_dir: Path, data: Path, tmp: Path, repeats: int = 3) -> dict[str, Any] | None:
    """Peak RSS (MB) and median batch ms of a fresh process explaining batches of 8, with the
    ClaDec graphs run on the whole batch (0) and 2 rows at a time (the default);
    ``repeats`` processes per setting, alternating (a peak depends on whether the reference
    thread's largest buffers meet the classifier's, so single runs differ by 50 MB):
    medians, and every run's peak."""
    import multiprocessing
    if "cladec" not in load_bundle(bundle_dir).metadata.extra:
        return None
    model_dir = tmp / "model_chunks"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "bundle").symlink_to(Path(bundle_dir).resolve())
    ctx = multiprocessing.get_context("spawn")
    runs: dict[int, list[tuple[float, float]]] = {0: [], 2: []}
    for r in range(repeats):
        for rows in ((0, 2) if r % 2 == 0 else (2, 0)):
            queue = ctx.Queue()
            p = ctx.Process(target=_peak_of_batches, args=(str(model_dir), _test_png(data), rows, queue))
            p.start()
            runs[rows].append(queue.get(timeout=600))
            p.join()
    return {f"chunk_rows_{rows}": {"peak_rss_mb": round(statistics.median(p for p, _ in v), 1),
                                   "batch8_ms": round(statistics.median(ms for _, ms in v), 1),
                                   "peaks_mb": [p for p, _ in v]}
            for rows, v in runs.items()}


def measure(bundle_dir: Path, data: Path, n: int = 50) -> dict[str, Any]:
    """Every lever above on one bundle."""
    bundle = load_bundle(bundle_dir)
    inputs = load_inputs(bundle, data)
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        return {"int8_vs_float": int8_vs_float(bundle, inputs, n, Path(tmp)),
                "merged_concept_encoders": merged_encoders(bundle, inputs, n * 4, Path(tmp)),
                "saved_optimisation": saved_optimisation(bundle, inputs, n, Path(tmp)),
                "image_formats": image_formats(bundle, inputs, n),
                "overlap_modes": overlap_modes(bundle_dir, data, n, Path(tmp)),
                "chunk_memory": chunk_memory(bundle_dir, data, Path(tmp))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="build/shapes/bundle")
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    print(json.dumps(measure(Path(args.bundle), Path(args.data), args.runs), indent=2))


if __name__ == "__main__":
    main()
