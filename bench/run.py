"""Benchmark suite (partial, see issue 7): explanation cost against plain inference, measured
side by side in one run on a real TorchServe, plus onnxruntime vs torch eager, the compiled
causal model vs pgmpy, response sizes and worker memory.

    python bench/run.py --bundle build/shapes/bundle --classifier build/shapes/classifier \\
        --image data/shapes/test/star/016000.png            # make bench
    python bench/run.py ... --smoke                          # make bench-smoke: tiny counts

Writes bench/results/latest.json and bench/results/latest.md (a markdown table).
Each A/B comparison alternates A and B in one run and reports medians, p99 and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stats import summary  # noqa: E402
from export.archive import build_mar  # noqa: E402
from tests.integration.server import TorchServe, post  # noqa: E402


def endpoint_comparison(ts: TorchServe, model: str, image: bytes, n: int, concurrency: int) -> dict:
    """/predictions vs /explanations, alternating, at the given concurrency."""
    lat: dict[str, list[float]] = {"predictions": [], "explanations": []}
    sizes: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(2 * n))

    def worker(k: int) -> None:
        for i in counter:
            endpoint = ("predictions", "explanations")[(i + k) % 2]
            t = time.perf_counter()
            r = post(ts, image, endpoint=endpoint, model=model)
            dt = (time.perf_counter() - t) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"{endpoint}: HTTP {r.status_code}")
            with lock:
                lat[endpoint].append(dt)
                sizes[endpoint] = len(r.content)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    out = {e: {**summary(v), "response_bytes": sizes[e]} for e, v in lat.items()}
    out["ratio_p50"] = round(out["explanations"]["p50_ms"] / out["predictions"]["p50_ms"], 2)
    out["throughput_rps"] = round(2 * n / seconds, 1)
    return out


def worker_peak_rss(ts: TorchServe, model: str, image: bytes, endpoint: str, n: int) -> float:
    """Peak resident memory (MB) of the model's worker while serving n requests of one kind."""
    status, desc = ts.client.describe(model)
    proc = psutil.Process(int(desc[0]["workers"][0]["pid"]))
    peak = proc.memory_info().rss
    for _ in range(n):
        post(ts, image, endpoint=endpoint, model=model)
        peak = max(peak, proc.memory_info().rss)
    return round(peak / 2**20, 1)


def ort_vs_torch(classifier_dir: Path, bundle: Path, n: int) -> dict:
    """The classifier with every explanation layer's activation: onnxruntime vs torch eager,
    batch 1, one thread each, alternating. (The concept encoders are stored only as ONNX, so
    their torch comparison is left to the full benchmark.)"""
    import torch
    from export.cli import _load_classifier
    from export.concepts import capture
    from handlers.runtime.classifier import make_session
    from handlers.runtime.concepts import ConceptSpec
    torch.set_num_threads(1)
    model, spec, _, _ = _load_classifier(argparse.Namespace(classifier=classifier_dir))
    meta = json.loads((bundle / "metadata.json").read_text())
    sess = make_session(bundle / meta["classifier"]["file"], ("CPUExecutionProvider",), 1)
    x = np.random.default_rng(0).normal(size=(1, spec.channels, spec.height, spec.width)).astype(np.float32)
    tx = torch.from_numpy(x)
    times = {"classifier_onnxruntime": [], "classifier_torch": []}
    with torch.no_grad():
        for i in range(n):
            for name in (("classifier_onnxruntime", "classifier_torch") if i % 2 else ("classifier_torch", "classifier_onnxruntime")):
                t = time.perf_counter()
                if name.endswith("onnxruntime"):
                    sess.run(None, {meta["classifier"]["input"]: x})
                else:
                    capture(model, [l["name"] for l in meta["layers"]], tx)
                times[name].append((time.perf_counter() - t) * 1000)
    out = {k: summary(v) for k, v in times.items()}
    out["classifier_speedup"] = round(out["classifier_torch"]["p50_ms"] / out["classifier_onnxruntime"]["p50_ms"], 2)
    return out


def markdown(r: dict) -> str:
    rows = ["| comparison | A | B | B / A |", "|---|---|---|---|"]
    for c in ("concurrency_1", "concurrency_8"):
        if c in r:
            p, e = r[c]["predictions"], r[c]["explanations"]
            rows.append(f"| /predictions vs /explanations p50 ({c.replace('_', ' ')}) | {p['p50_ms']} ms | "
                        f"{e['p50_ms']} ms | {r[c]['ratio_p50']}x |")
            rows.append(f"| ... p99 ({c.replace('_', ' ')}) | {p['p99_ms']} ms | {e['p99_ms']} ms | |")
            rows.append(f"| ... response size | {p['response_bytes']} B | {e['response_bytes']} B | |")
    if "worker_peak_rss_mb" in r:
        m = r["worker_peak_rss_mb"]
        rows.append(f"| worker peak RSS, predictions only vs explanations | {m['predictions_only']} MB | "
                    f"{m['explanations']} MB | {round(m['explanations'] / m['predictions_only'], 2)}x |")
    o = r.get("onnxruntime_vs_torch")
    if o:
        rows.append(f"| classifier + activations, torch eager vs onnxruntime p50 | {o['classifier_torch']['p50_ms']} ms | "
                    f"{o['classifier_onnxruntime']['p50_ms']} ms | {o['classifier_speedup']}x faster |")
    if r.get("demo_export_seconds"):
        rows.append(f"| whole demo export (data, training, all artifacts, archive) | {r['demo_export_seconds']} s | | |")
    return f"Measured {r['date']} on {r['machine']}{' (smoke counts)' if r['smoke'] else ''}.\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="build/shapes/bundle")
    ap.add_argument("--classifier", default="build/shapes/classifier")
    ap.add_argument("--image", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny request counts (seconds, not minutes)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    n = 10 if args.smoke else 200
    image = Path(args.image).read_bytes()
    bundle = Path(args.bundle)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_mar(bundle, "bench", "1.0", tmp / "store")
        build_mar(bundle, "benchp", "1.0", tmp / "store")  # same archive; its worker only predicts
        with TorchServe(tmp / "ts", tmp / "store", {"bench": "bench.mar", "benchp": "benchp.mar"}) as ts:
            # memory first, on fresh workers: one serving predictions only, one explanations
            results["worker_peak_rss_mb"] = {
                "predictions_only": worker_peak_rss(ts, "benchp", image, "predictions", n),
                "explanations": worker_peak_rss(ts, "bench", image, "explanations", n)}
            results["concurrency_1"] = endpoint_comparison(ts, "bench", image, n, 1)
            results["concurrency_8"] = endpoint_comparison(ts, "bench", image, max(n, 40), 8)
    results["onnxruntime_vs_torch"] = ort_vs_torch(Path(args.classifier), bundle, 20 if args.smoke else 300)
    report = bundle.parent / "build-report.json"
    if report.is_file():
        results["demo_export_seconds"] = json.loads(report.read_text()).get("seconds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
