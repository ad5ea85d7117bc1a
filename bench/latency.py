"""Latency of /predictions and /explanations on a running TorchServe, measured side by side.

    python -m bench.latency --model shapes --image data/shapes/test/star/016000.png [--requests 200]

Sequential requests (concurrency 1), alternating the two endpoints so both see the same
machine state; reports p50/p99 in ms, the ratio of p50s and response sizes, and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from bench.stats import percentile
from export.client import TorchServeClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--image", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--key-file", default="key_file.json")
    ap.add_argument("--out", default="bench/results/latency.json")
    args = ap.parse_args()
    client = TorchServeClient(args.url, key_file=args.key_file)
    client.wait_ready(args.model)
    image = Path(args.image).read_bytes()
    endpoints = ("predictions", "explanations")
    lat: dict[str, list[float]] = {e: [] for e in endpoints}
    size: dict[str, int] = {}
    for i in range(args.warmup + args.requests):
        for e in (endpoints if i % 2 == 0 else endpoints[::-1]):
            t0 = time.perf_counter()
            status, body = client.post_image(e, args.model, image)
            dt = (time.perf_counter() - t0) * 1000
            if status != 200:
                raise SystemExit(f"{e}: HTTP {status}: {body}")
            if i >= args.warmup:
                lat[e].append(dt)
                size[e] = len(json.dumps(body, separators=(",", ":")))
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "model": args.model, "requests_per_endpoint": args.requests, "concurrency": 1,
           **{e: {"p50_ms": round(statistics.median(v), 2), "p99_ms": round(percentile(v, 99), 2),
                  "response_bytes": size[e]} for e, v in lat.items()}}
    out["explanations_over_predictions_p50"] = round(out["explanations"]["p50_ms"] / out["predictions"]["p50_ms"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
