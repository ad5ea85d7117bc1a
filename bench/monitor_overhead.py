"""Overhead of concept monitoring on /predictions, measured side by side.

    python -m bench.monitor_overhead --bundle build/shapes/bundle --image data/shapes/test/star/016000.png

Archives the bundle twice (``monitor_fraction`` 0 and 1), serves both from one TorchServe on
free loopback ports, and alternates sequential /predictions requests between them; reports
p50/p99 of each and the p50 ratio, and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.server import TorchServe, post
from bench.stats import percentile, write_json
from export.archive import DEFAULT_MODEL_CONFIG, build_mar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="build/shapes/bundle")
    ap.add_argument("--image", required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", default="bench/results/monitor_overhead.json")
    args = ap.parse_args()
    image = Path(args.image).read_bytes()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = tmp / "store"
        for name, fraction in (("m0", 0.0), ("m1", 1.0)):
            cfg = yaml.safe_load(DEFAULT_MODEL_CONFIG.read_text())
            cfg["handler"]["monitor_fraction"] = fraction
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            build_mar(args.bundle, name, "1.0", store, tmp / f"{name}.yaml")
        lat: dict[str, list[float]] = {"m0": [], "m1": []}
        with TorchServe(tmp / "ts", store, {"m0": "m0.mar", "m1": "m1.mar"}) as ts:
            for i in range(20 + args.requests):
                for m in (("m0", "m1") if i % 2 == 0 else ("m1", "m0")):
                    t = time.perf_counter()
                    r = post(ts, image, model=m)
                    dt = (time.perf_counter() - t) * 1000
                    if r.status_code != 200:
                        raise SystemExit(f"{m}: HTTP {r.status_code} {r.text}")
                    if i >= 20:
                        lat[m].append(dt)
    p50 = {m: statistics.median(v) for m, v in lat.items()}
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "requests_each": args.requests,
           "monitor_fraction_0": {"p50_ms": round(p50["m0"], 2), "p99_ms": round(percentile(lat["m0"], 99), 2)},
           "monitor_fraction_1": {"p50_ms": round(p50["m1"], 2), "p99_ms": round(percentile(lat["m1"], 99), 2)},
           "p50_ratio": round(p50["m1"] / p50["m0"], 3)}
    write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
