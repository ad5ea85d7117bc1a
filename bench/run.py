"""Benchmark suite: the cost of explanations against plain inference, TorchServe's own Captum
explanations, pgmpy and torch eager, at two model sizes, measured side by side in one run.

    make bench          # the demo model (make build) and a ResNet-18-sized model at 224 px
    make bench-smoke    # tiny request counts, the demo size only (the test suite runs it)

Per model size, on one real TorchServe on loopback (the shipped config, token auth on):
1. /predictions vs /explanations (all views, images on), alternating, at concurrency 1 and 8
   with TorchServe batching (model-config.yaml: batchSize 8, maxBatchDelay 5 ms);
2. our /explanations vs a Captum Integrated Gradients handler (bench/captum_handler.py:
   what TorchServe's VisionHandler does, n_steps=15, attributions as a JSON list, torch's
   default threads) on the same classifier and model-config, alternating;
3. response sizes; peak resident memory of a worker serving explanations vs a worker of an
   archive without explanation artifacts serving predictions;
and offline: 4. the compiled causal model vs pgmpy (the full per-request table), 5. onnxruntime
vs torch eager for the classifier and the concept encoders (batch 1, one thread each). Medians,
p99 and ratios go to bench/results/latest.json and latest.md (the tables docs/benchmarks.md embeds, through bench.figures).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests

from bench import verify_cost
from bench.server import REPO, KServeServer, TorchServe, post
from bench.stats import alternating_times, summary
from export.archive import archive_folder, build_mar, write_bundle
from export.client import read_keys
from handlers.runtime.bundle import ModelMetadata

STAGES = ("decode", "classifier", "concepts", "causal", "encode", "cladec", "features")


# -- archives ---------------------------------------------------------------------------------

def predictions_only_bundle(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` with the classifier only: what a deployment without explanations
    would serve (its worker's memory is the baseline)."""
    meta = json.loads((bundle / "metadata.json").read_text())
    for key in ("concepts", "cladec", "features", "quantization"):
        meta.pop(key, None)

    def fill(tmp: Path) -> ModelMetadata:
        shutil.copy2(bundle / meta["classifier"]["file"], tmp / meta["classifier"]["file"])
        return ModelMetadata.from_json(meta)

    return write_bundle(out, fill)


def captum_mar(classifier_dir: Path, name: str, store: Path) -> Path:
    """The Captum IG baseline archive: bench/captum_handler.py plus the torch classifier
    (classifier.json, weights.safetensors), with the same model-config.yaml as ours."""
    with tempfile.TemporaryDirectory(prefix="captum-stage-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        for f in ("classifier.json", "weights.safetensors"):
            shutil.copy2(classifier_dir / f, stage / f)
        return archive_folder(stage, Path(__file__).with_name("captum_handler.py"), name, "bench", store)


# -- measurements against the server ----------------------------------------------------------

def alternate(calls: dict[str, Callable[[], Any]], n: int, concurrency: int = 1,
              block: int = 1) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, float]]:
    """Run each call ``n`` times in alternating blocks: ``block`` requests of A, then of B,
    then B, A, ... (the order flips every round), each block sent by ``concurrency`` clients.
    Blocks keep the kinds apart under concurrency (TorchServe would otherwise batch a
    prediction with explanations and make it wait for them); alternating them gives both
    the same machine state. Returns latencies (ms), the last response and the seconds spent
    in each call's blocks."""
    from concurrent.futures import ThreadPoolExecutor
    names = list(calls)
    lat: dict[str, list[float]] = {k: [] for k in names}
    last: dict[str, Any] = {}
    wall = dict.fromkeys(names, 0.0)

    def one(name: str) -> None:
        t = time.perf_counter()
        r = calls[name]()
        dt = (time.perf_counter() - t) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"{name}: HTTP {r.status_code}: {r.text[:200]}")
        lat[name].append(dt)
        last[name] = r

    with ThreadPoolExecutor(concurrency) as pool:
        for r in range(-(-n // block)):
            for name in (names if r % 2 == 0 else names[::-1]):
                count = min(block, n - len(lat[name]))
                t0 = time.perf_counter()
                for f in [pool.submit(one, name) for _ in range(count)]:
                    f.result()
                wall[name] += time.perf_counter() - t0
    return lat, last, wall


#: /explanations variants measured beside the default at concurrency 1: the request options
#: (JSON body) of each, or the archive ("model") that serves it.
VARIANTS: dict[str, dict[str, Any]] = {
    "explanations_without_reference": {"options": {"reference": False}},
    "explanations_all_alphas": {"options": {"alphas": "all"}},
    "explanations_jpeg": {"options": {"image_format": "jpeg"}},
    "explanations_png": {"options": {"image_format": "png"}},
    "explanations_float_graphs": {"model": "xf"},
}


def endpoint_comparison(ts: TorchServe, model: str, image: bytes, n: int, concurrency: int) -> dict:
    """/predictions vs /explanations of one model, alternating, at the given concurrency; at
    concurrency 1 also the :data:`VARIANTS` of the explanation."""
    def image_call(e: str, m: str = model) -> Callable[[], Any]:
        def call() -> Any:
            return post(ts, image, endpoint=e, model=m)
        return call

    def json_call(options: dict[str, Any]) -> Callable[[], Any]:
        body = json.dumps({"data": base64.b64encode(image).decode(), **options}).encode()

        def call() -> Any:
            return post(ts, body, "application/json", endpoint="explanations", model=model)
        return call

    calls: dict[str, Callable[[], Any]] = {e: image_call(e) for e in ("predictions", "explanations")}
    if concurrency == 1:
        for name, v in VARIANTS.items():
            calls[name] = json_call(v["options"]) if "options" in v else image_call("explanations", v["model"])
    for call in calls.values():  # warm-up
        call()
    lat, last, wall = alternate(calls, n, concurrency, block=1 if concurrency == 1 else 5 * concurrency)
    out: dict[str, Any] = {e: {**summary(v), "response_bytes": len(last[e].content),
                               "throughput_rps": round(len(v) / wall[e], 1)} for e, v in lat.items()}
    out["ratio_p50"] = round(out["explanations"]["p50_ms"] / out["predictions"]["p50_ms"], 2)
    for name in VARIANTS:
        if name in out:
            out[name]["ratio_p50"] = round(out[name]["p50_ms"] / out["predictions"]["p50_ms"], 2)
    out["concurrency"] = concurrency
    return out


def kserve_comparison(ts: TorchServe, ks: KServeServer, image: bytes, n: int, concurrency: int) -> dict:
    """The same archive on TorchServe and on KServe's Python model server, KServe v1 protocol
    (one image per request), predict and explain alternating, at the given concurrency."""
    body = json.dumps({"instances": [{"data": base64.b64encode(image).decode()}]}).encode()
    token = read_keys(ts.workdir / "key_file.json")["inference"]
    session = requests.Session()

    def call(url: str, headers: dict[str, str]) -> Callable[[], Any]:
        def send() -> Any:
            return session.post(url, data=body, headers={"Content-Type": "application/json", **headers}, timeout=60)
        return send

    calls: dict[str, Callable[[], Any]] = {}
    for verb in ("predict", "explain"):
        calls[f"torchserve_{verb}"] = call(f"{ts.client.url}/v1/models/x:{verb}", {"Authorization": f"Bearer {token}"})
        calls[f"kserve_{verb}"] = call(f"{ks.url}/v1/models/x:{verb}", {})
    for c in calls.values():  # warm-up
        c()
    lat, _, wall = alternate(calls, n, concurrency, block=1 if concurrency == 1 else 5 * concurrency)
    out: dict[str, Any] = {k: {**summary(v), "throughput_rps": round(len(v) / wall[k], 1)} for k, v in lat.items()}
    for verb in ("predict", "explain"):
        out[f"{verb}_ratio_p50"] = round(out[f"kserve_{verb}"]["p50_ms"] / out[f"torchserve_{verb}"]["p50_ms"], 2)
    out["concurrency"] = concurrency
    return out


def stage_medians(ts: TorchServe, model: str, image: bytes, n: int) -> dict[str, float]:
    """Median in-worker milliseconds of each explanation stage (the response's timings_ms)."""
    seen: dict[str, list[float]] = {}
    for _ in range(n):
        body = post(ts, image, endpoint="explanations", model=model).json()
        for k, v in body["timings_ms"].items():
            if k in STAGES:
                seen.setdefault(k, []).append(v)
    return {k: round(statistics.median(seen[k]), 3) for k in STAGES if k in seen}


def captum_comparison(ts: TorchServe, ours: str, captum: str, image: bytes, n: int) -> dict:
    """Our /explanations vs the Captum IG baseline's, alternating, concurrency 1."""
    calls = {"concept_explainer": lambda: post(ts, image, endpoint="explanations", model=ours),
             "captum_ig": lambda: post(ts, image, endpoint="explanations", model=captum)}
    for call in calls.values():
        call()
    lat, last, _ = alternate(calls, n)
    attributions = np.asarray(json.loads(last["captum_ig"].content))
    out: dict[str, Any] = {k: {**summary(v), "response_bytes": len(last[k].content)} for k, v in lat.items()}
    out["captum_ig"]["attribution_shape"] = list(attributions.shape)
    out["speedup_p50"] = round(out["captum_ig"]["p50_ms"] / out["concept_explainer"]["p50_ms"], 1)
    out["size_ratio"] = round(out["captum_ig"]["response_bytes"] / out["concept_explainer"]["response_bytes"], 1)
    return out


def worker_peak_rss(ts: TorchServe, model: str, image: bytes, endpoint: str, n: int, concurrency: int = 1) -> float:
    """Peak resident memory (MB) of the model's worker while it serves n requests of one
    kind from ``concurrency`` clients (8 fills TorchServe's batches): sampled every 2 ms by
    a thread, so the peaks inside a request count too."""
    _, desc = ts.client.describe(model)
    proc = psutil.Process(int(desc[0]["workers"][0]["pid"]))
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        alternate({endpoint: lambda: post(ts, image, endpoint=endpoint, model=model)}, n, concurrency,
                  block=max(n, 1))
    finally:
        done.set()
        sampler.join()
    return round(peak[0] / 2**20, 1)


# -- offline comparisons ----------------------------------------------------------------------

def _timed_alternating(fns: dict[str, Callable[[], Any]], n: int) -> dict[str, dict[str, float]]:
    return {k: summary(v) for k, v in alternating_times(fns, n).items()}


def torch_encoder(onnx_file: Path):
    """The concept encoder as a torch module, its weights read from the ONNX initializers
    (only the ONNX graph is kept in the bundle)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from export.concepts import ConceptAutoencoder
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(onnx_file)).graph.initializer}
    hidden, channels = weights["0.weight"].shape[:2]
    enc = ConceptAutoencoder(int(channels), int(weights["2.weight"].shape[0]), int(hidden)).encoder
    enc.load_state_dict(weights)
    return enc.eval()


def ort_vs_torch(classifier_dir: Path, bundle: Path, n: int) -> dict:
    """onnxruntime vs torch eager, batch 1, one thread each, alternating: the classifier with
    the explanation layers' activations, and all concept encoders on those activations."""
    import torch

    from export.concepts import capture
    from export.pipeline import ModelSource, load_classifier
    from handlers.runtime.classifier import make_session
    torch.set_num_threads(1)
    loaded = load_classifier(ModelSource(classifier=classifier_dir))
    model, spec = loaded.model, loaded.spec
    meta = json.loads((bundle / "metadata.json").read_text())
    providers = ("CPUExecutionProvider",)
    sess = make_session(bundle / meta["classifier"]["file"], providers, 1)
    x = np.random.default_rng(0).normal(size=(1, spec.channels, spec.height, spec.width)).astype(np.float32)
    layer_names = [l["name"] for l in meta["layers"]]
    out_names = [o.name for o in sess.get_outputs()]
    with torch.no_grad():
        fns = {"torch": lambda: capture(model, layer_names, torch.from_numpy(x)),
               "onnxruntime": lambda: sess.run(None, {meta["classifier"]["input"]: x})}
        result: dict[str, Any] = {"classifier": _timed_alternating(fns, n)}
        concepts_doc = meta.get("concepts") and json.loads((bundle / meta["concepts"]).read_text())
        if concepts_doc:
            acts = dict(zip(out_names, sess.run(None, {meta["classifier"]["input"]: x})))
            by_layer = {l["name"]: l["output"] for l in meta["layers"]}
            encoders = []
            for layer in concepts_doc["layers"]:
                f = bundle / layer["encoder_file"]
                a = acts[by_layer[layer["layer"]]]
                s = make_session(f, providers, 1)
                encoders.append((torch_encoder(f), s, s.get_inputs()[0].name, a, torch.from_numpy(a)))
            result["concept_encoders"] = _timed_alternating({
                "torch": lambda: [e(ta) for e, _, _, _, ta in encoders],
                "onnxruntime": lambda: [s.run(None, {name: a}) for _, s, name, a, _ in encoders]}, n)
    for part in result.values():
        part["speedup"] = round(part["torch"]["p50_ms"] / part["onnxruntime"]["p50_ms"], 2)
    return result


# -- one model size ---------------------------------------------------------------------------

def float_graphs_config(out: Path) -> Path:
    """The shipped model-config.yaml with ``cpu_int8: false`` (every graph in float)."""
    import yaml
    cfg = yaml.safe_load((REPO / "export" / "model-config.yaml").read_text())
    cfg["handler"]["cpu_int8"] = False
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg))
    return out


def meta_has_concepts(bundle: Path) -> bool:
    """Whether the bundle has the concepts view (verification needs it)."""
    return bool(json.loads((bundle / "metadata.json").read_text()).get("concepts"))


def bench_size(label: str, bundle: Path, classifier: Path, data: Path, image: bytes, n: int, n_captum: int,
               smoke: bool, tmp: Path, kserve: bool = False) -> dict:
    from bench.causal_speed import compare
    from bench.levers import measure
    store = tmp / label / "store"
    build_mar(bundle, "x", "1.0", store)
    build_mar(bundle, "xf", "1.0", store, model_config=float_graphs_config(tmp / label / "float" / "model-config.yaml"))
    build_mar(predictions_only_bundle(bundle, tmp / label / "bundle_p"), "p", "1.0", store)
    captum_mar(classifier, "ig", store)
    verify_models = verify_cost.archives(bundle, store, tmp / label) if meta_has_concepts(bundle) else {}
    meta = json.loads((bundle / "metadata.json").read_text())
    res: dict[str, Any] = {"label": label, "input": f"{meta['input']['height']}x{meta['input']['width']}",
                           "requests_per_endpoint": n}
    models = {"x": "x.mar", "xf": "xf.mar", "p": "p.mar", "ig": "ig.mar", **verify_models}
    with TorchServe(tmp / label / "ts", store, models, timeout=300) as ts:
        # memory first, on fresh workers: one request at a time, then full batches of 8
        for key, c in (("worker_peak_rss_mb", 1), ("worker_peak_rss_mb_concurrency_8", 8)):
            m = {"predictions_only": worker_peak_rss(ts, "p", image, "predictions", max(n // 4, 5) * c, c),
                 "explanations": worker_peak_rss(ts, "x", image, "explanations", max(n // 4, 5) * c, c),
                 "explanations_float_graphs": worker_peak_rss(ts, "xf", image, "explanations", max(n // 4, 5) * c, c)}
            m["ratio"] = round(m["explanations"] / m["predictions_only"], 2)
            res[key] = m
        res["concurrency_1"] = endpoint_comparison(ts, "x", image, n, 1)
        res["concurrency_8"] = endpoint_comparison(ts, "x", image, max(n, 40), 8)
        res["explanation_stages_ms"] = stage_medians(ts, "x", image, max(n // 4, 5))
        res["captum"] = captum_comparison(ts, "x", "ig", image, n_captum)
        if verify_models:
            res["verify"] = verify_cost.measure(ts, image, n)
        if kserve:
            with KServeServer(tmp / label / "kserve", store / "x.mar", "x", timeout=300) as ks:
                res["kserve"] = {f"concurrency_{c}": kserve_comparison(ts, ks, image, n if c == 1 else max(n, 40), c)
                                 for c in (1, 8)}
    res["onnxruntime_vs_torch"] = ort_vs_torch(classifier, bundle, 10 if smoke else 100)
    res["levers"] = measure(bundle, data, 5 if smoke else 50)
    if meta.get("concepts"):
        res["causal"] = compare(bundle, 3 if smoke else 10)
    report = bundle.parent / "build-report.json"
    if report.is_file():
        built = json.loads(report.read_text())
        # a resumed build (bench/build_model.py --reuse-classifier) adds up every step's seconds
        res["build_seconds"] = built.get("seconds_all_steps", built.get("seconds"))
    return res


# -- report -----------------------------------------------------------------------------------

def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗ missed")


def _table(sizes: list[dict], rows: list[tuple[str, Callable[[dict], str], str]], first: str = "measure") -> list[str]:
    """A markdown table: one column per model size plus a target column; a cell whose data is
    missing (KeyError, TypeError: a smoke run or a bundle without that view) stays empty."""
    out = [f"| {first} | " + " | ".join(f"{s['label']} ({s['input']})" for s in sizes) + " | target |",
           "|---" * (len(sizes) + 2) + "|"]
    for name, fn, target in rows:
        cells = []
        for s in sizes:
            try:
                cells.append(fn(s))
            except (KeyError, TypeError):
                cells.append("")
        out.append(f"| {name} | " + " | ".join(cells) + f" | {target} |")
    return out


def _targets() -> list[tuple[str, Callable[[dict], str], str]]:
    """The targets ``make bench`` checks: each cell is the measured ratio and whether it meets
    the limit (at most or at least; some apply at 224 px only)."""
    def at(key: str, limit: float, most: bool, only224: bool = False) -> Callable[[dict], str]:
        def cell(s: dict) -> str:
            node: Any = s
            for k in key.split("."):
                if k not in node:
                    return "–"  # not measured for this size (e.g. a bundle without concepts)
                node = node[k]
            value = float(node)
            applies = not only224 or s["input"] == "224x224"
            ok = (value <= limit if most else value >= limit) if applies else None
            return f"**{value}x**{_mark(ok)}"
        return cell

    def sampling(s: dict) -> str:
        if "verify" not in s:
            return "–"
        v = s["verify"]["concurrency_8"]
        ok = abs(v["p50_change"]) <= 0.05 and abs(v["throughput_change"]) <= 0.05
        return f"**{v['p50_change']:+.1%} / {v['throughput_change']:+.1%}**{_mark(ok)}"

    return [("/explanations p50 / /predictions p50, concurrency 1", at("concurrency_1.ratio_p50", 1.8, True), "≤ 1.8x"),
            ("same, concurrency 8 (CPU work per request)", at("concurrency_8.ratio_p50", 2.0, True), "≤ 2x"),
            ("Captum IG p50 / ours (default answer)", at("captum.speedup_p50", 10, False, True), "≥ 10x at 224 px"),
            ("Captum IG bytes / ours (default answer)", at("captum.size_ratio", 20, False, True), "≥ 20x at 224 px"),
            ("worker peak RSS / predictions-only worker, concurrency 1", at("worker_peak_rss_mb.ratio", 1.3, True), "≤ 1.3x"),
            ("same, concurrency 8", at("worker_peak_rss_mb_concurrency_8.ratio", 1.3, True), "≤ 1.3x"),
            ("compiled causal table / pgmpy CausalInference", at("causal.speedup_vs_causal_inference", 100, False),
             "≥ 100x"),
            ('`"verify": true` p50 / default /explanations p50, concurrency 1',
             at("verify.concurrency_1.verify_over_explanation_p50", 2.0, True), "≤ 2x (one explanation's cost)"),
            ("`verify_fraction: 0.01` vs 0: /explanations p50 / throughput change, concurrency 8", sampling, "≤ 5 %")]


def _variant(s: dict, name: str) -> str:
    v, base = s["concurrency_1"][name], s["concurrency_1"]["explanations"]
    return (f"{v['p50_ms']} ms ({v['ratio_p50']}x predictions; default {base['p50_ms']} ms), "
            f"{v['response_bytes']:,} B (default {base['response_bytes']:,} B)")


def _int8(s: dict, kind: str) -> str:
    rows = [r for r in s["levers"]["int8_vs_float"] if r["kind"] == kind]
    if not rows:
        return ""
    f, q = sum(r["float_ms"] for r in rows), sum(r["int8_ms"] for r in rows)
    judged = [r for r in rows if "accepted" in r]
    verdict = ""
    if judged:
        verdict = "; judged " + ", ".join(f"{r['value']}" + (" ✓" if r["accepted"] else " ✗") for r in judged)
    return f"{round(f, 2)} → {round(q, 2)} ms ({round(f / q, 2)}x, {len(rows)} graphs{verdict})"


def _levers() -> list[tuple[str, Callable[[dict], str], str]]:
    def rss(s: dict) -> str:
        m = s["worker_peak_rss_mb"]
        return f"{m['explanations_float_graphs']} → {m['explanations']} MB"

    def merged(s: dict) -> str:
        m = s["levers"]["merged_concept_encoders"]
        return f"{m['separate_ms']} → {m['merged_ms']} ms ({m['speedup']}x)"

    def saved(s: dict) -> str:
        return "; ".join(f"{r['file']}: load {r['load_ms']['at load']} → {r['load_ms']['saved, extended']} ms, "
                         f"run {r['run_ms']['at load']} → {r['run_ms']['saved, extended']} ms"
                         for r in s["levers"]["saved_optimisation"])

    def overlap(s: dict) -> str:
        m = s["levers"]["overlap_modes"]
        return " / ".join(f"{v} ms" for v in m.values())

    def chunks(s: dict) -> str:
        m = s["levers"]["chunk_memory"]
        return (f"{m['chunk_rows_0']['peak_rss_mb']} → {m['chunk_rows_2']['peak_rss_mb']} MB (medians of "
                f"{', '.join(map(str, m['chunk_rows_0']['peaks_mb']))} and {', '.join(map(str, m['chunk_rows_2']['peaks_mb']))}), "
                f"{m['chunk_rows_0']['batch8_ms']} → {m['chunk_rows_2']['batch8_ms']} ms")

    def formats(s: dict) -> str:
        f = s["levers"]["image_formats"]
        return ", ".join(f"{k} {v['bytes']:,} B / {v['encode_ms']} ms" for k, v in f.items() if isinstance(v, dict)) + \
            f" ({f['images']} images)"

    return [
        ("8-bit concept encoders, batch 1 (kept: state agreement ≥ 0.99 on held-out images)",
         lambda s: _int8(s, "concept_encoder"), "kept where they pass"),
        ("8-bit reference autoencoders, batch 1 (kept: PSNR vs float ≥ 30 dB)",
         lambda s: _int8(s, "reference_autoencoder"), "kept where they pass"),
        ("8-bit ClaDec decoders, batch 1 (not shipped: ConvTranspose has no 8-bit CPU kernel)",
         lambda s: _int8(s, "cladec_decoder"), "dropped"),
        ("served with every graph in float (`cpu_int8: false`): p50, bytes", lambda s: _variant(s, "explanations_float_graphs"),
         ""),
        ("worker peak RSS, float graphs → shipped graphs, concurrency 1", rss, ""),
        ("every archived alpha (`\"alphas\": \"all\"`, the old default): p50, bytes",
         lambda s: _variant(s, "explanations_all_alphas"), "default: lowest alpha"),
        ("ClaDec images as JPEG (`\"image_format\": \"jpeg\"`): p50, bytes", lambda s: _variant(s, "explanations_jpeg"),
         "default from 128 px"),
        ("ClaDec images as PNG (`\"image_format\": \"png\"`): p50, bytes", lambda s: _variant(s, "explanations_png"),
         "default below 128 px"),
        ("without ClaDec reference images (`\"reference\": false`): p50, bytes",
         lambda s: _variant(s, "explanations_without_reference"), "on request"),
        ("ClaDec images of one answer: PNG, lossless WebP, JPEG q90", formats,
         "auto: PNG below 128 px, JPEG from 128 px"),
        ("the helper thread, one explanation in process: every view in line, ClaDec on the helper, ClaDec and "
         "the concept graphs sharing it (shipped)", overlap, "kept"),
        ("ClaDec graphs on a batch of 8 in fresh processes: whole batch vs 2 rows at a time "
         "(`cladec_chunk_rows: 2`, shipped): peak RSS, batch ms", chunks, "kept (small)"),
        ("concept encoders merged into one graph vs one session each", merged, "dropped"),
        ("graph optimisation saved at export (extended) vs at load", saved, "dropped"),
    ]


def markdown(r: dict) -> str:
    sizes = r["sizes"]
    rows: list[tuple[str, Callable[[dict], str], str]] = []
    for c in ("concurrency_1", "concurrency_8"):
        k = c[-1]

        def predictions_latency(s: dict, c: str = c) -> str:
            return f"{s[c]['predictions']['p50_ms']} / {s[c]['predictions']['p99_ms']} ms"

        def explanations_latency(s: dict, c: str = c) -> str:
            return f"{s[c]['explanations']['p50_ms']} / {s[c]['explanations']['p99_ms']} ms"

        def throughput(s: dict, c: str = c) -> str:
            return f"{s[c]['predictions']['throughput_rps']} / {s[c]['explanations']['throughput_rps']} req/s"

        rows += [(f"/predictions p50 / p99, concurrency {k}", predictions_latency, ""),
                 (f"/explanations p50 / p99, concurrency {k}", explanations_latency, ""),
                 (f"throughput predictions / explanations, concurrency {k}", throughput, "")]
    rows += [
        ("explanation stages in the worker (median ms)",
         lambda s: ", ".join(f"{k} {v}" for k, v in s["explanation_stages_ms"].items()), ""),
        ("Captum IG (n_steps=15) /explanations p50 / p99",
         lambda s: f"{s['captum']['captum_ig']['p50_ms']} / {s['captum']['captum_ig']['p99_ms']} ms", ""),
        ("response bytes: /predictions, /explanations, Captum IG",
         lambda s: f"{s['concurrency_1']['predictions']['response_bytes']:,}, "
                   f"{s['captum']['concept_explainer']['response_bytes']:,}, {s['captum']['captum_ig']['response_bytes']:,}",
         ""),
        ("causal table: compiled vs pgmpy CausalInference (median)",
         lambda s: f"{s['causal']['median_ms']['compiled']} vs {s['causal']['median_ms']['pgmpy_causal_inference']} ms "
                   f"(do + variable elimination: {s['causal']['median_ms']['pgmpy_do_ve']} ms, {s['causal']['speedup_vs_do_ve']}x)",
         ""),
        ("classifier + activations: torch eager vs onnxruntime p50",
         lambda s: f"{s['onnxruntime_vs_torch']['classifier']['torch']['p50_ms']} vs "
                   f"{s['onnxruntime_vs_torch']['classifier']['onnxruntime']['p50_ms']} ms "
                   f"({s['onnxruntime_vs_torch']['classifier']['speedup']}x)", ""),
        ("concept encoders: torch eager vs onnxruntime p50",
         lambda s: f"{s['onnxruntime_vs_torch']['concept_encoders']['torch']['p50_ms']} vs "
                   f"{s['onnxruntime_vs_torch']['concept_encoders']['onnxruntime']['p50_ms']} ms "
                   f"({s['onnxruntime_vs_torch']['concept_encoders']['speedup']}x)", "")]
    for key, label in (("worker_peak_rss_mb", "concurrency 1"), ("worker_peak_rss_mb_concurrency_8", "concurrency 8")):
        def peak_rss(s: dict, key: str = key) -> str:
            return f"{s[key]['predictions_only']} vs {s[key]['explanations']} MB"

        rows.append((f"worker peak RSS, predictions-only archive vs explanations, {label}", peak_rss, ""))
    for c in ("concurrency_1", "concurrency_8"):
        def kserve_row(s: dict, c: str = c) -> str:
            k = s["kserve"][c]
            return (f"predict {k['torchserve_predict']['p50_ms']} vs {k['kserve_predict']['p50_ms']} ms "
                    f"({k['torchserve_predict']['throughput_rps']} vs {k['kserve_predict']['throughput_rps']} req/s); "
                    f"explain {k['torchserve_explain']['p50_ms']} vs {k['kserve_explain']['p50_ms']} ms "
                    f"({k['torchserve_explain']['throughput_rps']} vs {k['kserve_explain']['throughput_rps']} req/s)")

        rows.append((f"KServe v1, TorchServe vs KServe's model server: p50 (throughput), concurrency {c[-1]}",
                     kserve_row, ""))
    rows.append(("build: all artifacts (s)", lambda s: f"{s['build_seconds']} s", ""))
    notes = [f"Measured {r['date']} on {r['machine']} with `{r['command']}`"
             f"{' (smoke counts: not figures)' if r['smoke'] else ''}."]
    if len(sizes) > 1 and "untrained" in sizes[1]["label"]:
        notes.append("The second model is untrained (one training step; one-epoch autoencoders and decoders "
                     "on a few hundred rendered images): its timings and sizes are real, its explanations "
                     "are not meaningful, and its ClaDec images are high-frequency noise that PNG barely compresses.")
    elif len(sizes) > 1:
        notes.append("The second model is trained (`make model-224`; its build and held-out figures are in "
                     "its `build-report.json` and the README).")
    return "\n".join([
        " ".join(notes), "", "**Targets**", "", *_table(sizes, _targets(), "target"), "",
        "**Levers** (each measured in this run; kept or dropped as the last column says)", "",
        *_table(sizes, _levers(), "lever"), "", "**Everything else**", "", *_table(sizes, rows)]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="build/shapes/bundle")
    ap.add_argument("--classifier", default="build/shapes/classifier")
    ap.add_argument("--image", help="the PNG sent in every request (default: the first test image under --data)")
    ap.add_argument("--data", default="data/shapes", help="the demo model's image folder")
    ap.add_argument("--large", default="build/bench/resnet18_224",
                    help="folder of the second model size (make model-224 builds the trained one; a missing "
                         "folder gets bench.build_model's untrained timing model)")
    ap.add_argument("--no-large", action="store_true", help="the demo size only")
    ap.add_argument("--smoke", action="store_true", help="tiny request counts (seconds, not minutes)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    image = Path(args.image or sorted((Path(args.data) / "test").glob("*/*.png"))[0]).read_bytes()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                               "command": "make bench-smoke" if args.smoke else "make bench",
                               "smoke": args.smoke, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        results["sizes"].append(bench_size("demo, trained", Path(args.bundle), Path(args.classifier), Path(args.data), image,
                                           10 if args.smoke else 200, 3 if args.smoke else 60, args.smoke, Path(tmp),
                                           kserve=True))
        if not args.no_large:
            large = Path(args.large)
            if not (large / "bundle" / "manifest.json").is_file():
                from bench.build_model import build
                build(large)
            sample = sorted((large / "data" / "test").glob("*/*.png"))[0]  # a rendered 224 px image
            built = json.loads((large / "build-report.json").read_text())
            trained = built.get("counts", {}).get("epochs", 0) > 0
            results["sizes"].append(bench_size(f"{built['arch']}, {'trained' if trained else 'untrained'}",
                                               large / "bundle", large / "classifier",
                                               large / "data", sample.read_bytes(), 10 if args.smoke else 60, 3 if args.smoke else 20,
                                               args.smoke, Path(tmp)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
