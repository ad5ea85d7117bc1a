"""8-bit versions of the explanation-only graphs, kept only where they stay close to float.

The classifier is never quantized: predictions and the activations every view explains come
from the float graph. What is quantized are graphs that only *describe* those activations:

* the concept encoders (method 1): accepted when the concept states they give (the evidence
  of the causal network) agree with the float encoder's on held-out images;
* the reference autoencoders (method 2): accepted when their images stay close to the float
  RefAE's (PSNR) on held-out images.

The ClaDec decoders stay float: they are mostly ``ConvTranspose``, for which onnxruntime's
CPU provider has no 8-bit kernel, so an 8-bit decoder is no faster and only less exact
(``make bench`` measures it, docs/benchmarks.md).

Weights are quantized per channel (int8), activations per tensor (uint8) with ranges from
calibration images of the training split, in onnxruntime's QDQ format, restricted to the
operators with 8-bit CPU kernels (``Conv``, ``Gemm``, ``MatMul``). The report
(``quantization.json``) records, per graph, the float file and its sha256, the 8-bit file,
the quality measure against its threshold and the batch-1 latency of both; serving uses an
8-bit graph only when it was accepted and its float source is unchanged
(:mod:`handlers.runtime.quantized`).
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.runtime.bundle import Bundle, sha256_file
from handlers.runtime.classifier import OnnxClassifier, make_session
from handlers.runtime.concepts import ConceptSpec, discretise, pooled_values
from handlers.runtime.imaging import normalize
from handlers.runtime.quantized import FORMAT, INT8_SUFFIX

#: Operators quantized (those with 8-bit kernels on onnxruntime's CPU provider).
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class QuantizeConfig:
    """Calibration, evaluation and acceptance thresholds of the 8-bit graphs.

    calibration_images: training images whose activations set the 8-bit ranges;
    eval_images: held-out images the quality is measured on;
    min_state_agreement: share of (image, concept) pairs whose state must equal the float
        encoder's for an 8-bit concept encoder to be kept;
    min_psnr_db: PSNR of an 8-bit reference autoencoder's images against the float RefAE's
        images (peak 1.0) for it to be kept;
    timing_runs: batch-1 runs per graph for the latency columns of the report.
    """

    calibration_images: int = 128
    eval_images: int = 256
    min_state_agreement: float = 0.99
    min_psnr_db: float = 30.0
    timing_runs: int = 20
    batch_size: int = 16


def quantize_graph(source: Path, out: Path, calibration: Iterator[dict[str, np.ndarray]]) -> Path:
    """Write an 8-bit QDQ copy of ONNX graph ``source`` to ``out``. calibration: input feeds
    (input name -> batch) whose activation ranges set the 8-bit scales."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(calibration, None)

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the tool logs advice on every call
    try:
        quantize_static(str(source), str(out), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS))
    finally:
        logging.getLogger().setLevel(quiet)
    return out


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, peak 1.0) of two image batches in [0, 1] (values outside are clipped), over
    all their pixels; inf when identical."""
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def batch1_ms(run: Callable[[], Any], n: int) -> float:
    """Median milliseconds of ``run()`` over ``n`` calls after two warm-up calls."""
    run()
    run()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


@dataclass(frozen=True)
class GraphResult:
    """One graph's entry in ``quantization.json``."""

    source: str
    source_sha256: str
    file: str
    kind: str
    metric: str
    value: float
    threshold: float
    accepted: bool
    float_ms: float
    int8_ms: float
    float_bytes: int
    int8_bytes: int


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def _run(session: Any, x: np.ndarray, size: int) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b})[0] for b in _batches(x, size)])


def build_quantized(bundle: Bundle, calibration_pixels: np.ndarray, eval_pixels: np.ndarray, out_dir: Path,
                    cfg: QuantizeConfig) -> dict[str, Any]:
    """Quantize the bundle's concept encoders and reference autoencoders into ``out_dir`` (a
    copy of the bundle being written), keep the accepted ones and return the report.

    calibration_pixels / eval_pixels: uint8 (N, H, W, C) model-input images of the training
    and held-out splits."""
    t0 = time.perf_counter()
    meta = bundle.metadata
    providers = ("CPUExecutionProvider",)
    classifier = OnnxClassifier.from_bundle(bundle, providers, 0)
    x_cal, x_eval = normalize(calibration_pixels, meta.input), normalize(eval_pixels, meta.input)
    a_cal, a_eval = classifier.activations(x_cal, cfg.batch_size), classifier.activations(x_eval, cfg.batch_size)
    results: list[GraphResult] = []

    def judge(source: str, kind: str, cal: np.ndarray, ev: np.ndarray,
              quality: Callable[[np.ndarray, np.ndarray], tuple[str, float, float, bool]]) -> None:
        target = out_dir / (Path(source).stem + INT8_SUFFIX)
        src = out_dir / source
        session = make_session(src, providers, 1)
        input_name = session.get_inputs()[0].name
        quantize_graph(src, target, iter({input_name: b} for b in _batches(cal, cfg.batch_size)))
        q = make_session(target, providers, 1)
        metric, value, threshold, ok = quality(_run(session, ev, cfg.batch_size), _run(q, ev, cfg.batch_size))
        one = {input_name: ev[:1]}
        results.append(GraphResult(
            source=source, source_sha256=sha256_file(src), file=target.name, kind=kind, metric=metric,
            value=round(value, 4), threshold=threshold, accepted=ok,
            float_ms=batch1_ms(lambda: session.run(None, one), cfg.timing_runs),
            int8_ms=batch1_ms(lambda: q.run(None, one), cfg.timing_runs),
            float_bytes=src.stat().st_size, int8_bytes=target.stat().st_size))
        if not ok:
            target.unlink()

    if "concepts" in meta.extra:
        spec = ConceptSpec.from_file(bundle.path(meta.extra["concepts"]))
        for layer in spec.layers:
            def states(float_codes: np.ndarray, int8_codes: np.ndarray,
                       edges: np.ndarray = layer.edges) -> tuple[str, float, float, bool]:
                same = float(np.mean(discretise(pooled_values(float_codes), edges)
                                     == discretise(pooled_values(int8_codes), edges)))
                return "concept_state_agreement", same, cfg.min_state_agreement, same >= cfg.min_state_agreement
            judge(layer.encoder_file, "concept_encoder", a_cal[layer.layer], a_eval[layer.layer], states)
    if "cladec" in meta.extra:
        doc = json.loads(bundle.path(meta.extra["cladec"]).read_text())
        for refae in dict.fromkeys(d["refae_file"] for d in doc["decoders"]):
            def close(float_images: np.ndarray, int8_images: np.ndarray) -> tuple[str, float, float, bool]:
                value = psnr_db(float_images, int8_images)
                return "psnr_db_vs_float", min(value, 999.0), cfg.min_psnr_db, value >= cfg.min_psnr_db
            judge(refae, "reference_autoencoder", x_cal, x_eval, close)
    return {"format": FORMAT, "config": asdict(cfg), "calibration_images": len(calibration_pixels),
            "eval_images": len(eval_pixels), "graphs": [asdict(r) for r in results],
            "seconds": round(time.perf_counter() - t0, 1)}


def format_report(report: Mapping[str, Any]) -> str:
    """The report as lines: per graph its measure against the threshold, latency and size."""
    lines = [f"8-bit graphs ({report['calibration_images']} calibration, {report['eval_images']} held-out images):"]
    for g in report["graphs"]:
        lines.append(f"  {g['source']:<34} {g['metric']} {g['value']} (>= {g['threshold']}: "
                     f"{'kept' if g['accepted'] else 'FAILED, float kept'}); batch 1 {g['float_ms']} -> "
                     f"{g['int8_ms']} ms; {g['float_bytes'] / 1e6:.2f} -> {g['int8_bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)


def pick(n_available: int, n: int) -> np.ndarray:
    """``n`` evenly spaced positions out of ``n_available`` (all when fewer)."""
    if n >= n_available:
        return np.arange(n_available)
    return np.linspace(0, n_available - 1, n).round().astype(np.int64)
