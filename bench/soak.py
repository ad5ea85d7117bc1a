"""Bounded load test on loopback: concurrent clients on /explanations and /predictions.

    python -m bench.soak --model shapes --image data/shapes/test/star/016000.png [--seconds 120 --clients 8]

Stops by itself after ``--seconds`` or ``--max-requests``. Reports requests, errors, p50/p99
per endpoint, worker restarts (management API) and the worker's resident memory, sampled
every 0.5 s: mean of the first vs the last ``--window`` seconds. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.stats import percentile
from export.client import TorchServeClient


def worker_state(client: TorchServeClient, model: str) -> list[tuple[str, int, str]]:
    status, body = client.describe(model)
    if status != 200:
        raise RuntimeError(f"describe {model}: HTTP {status}: {body}")
    return [(w["id"], int(w["pid"]), w["startTime"]) for w in body[0]["workers"]]


def soak(client: TorchServeClient, model: str, image: bytes, seconds: float, clients: int,
         max_requests: int, window: float, warmup: int = 40) -> dict[str, Any]:
    for i in range(warmup):
        client.post_image("explanations" if i % 2 else "predictions", model, image)
    before = worker_state(client, model)
    procs = [psutil.Process(pid) for _, pid, _ in before]
    samples: list[tuple[float, int]] = []
    lat: dict[str, list[float]] = {"predictions": [], "explanations": []}
    errors: list[tuple[str, int]] = []
    lock = threading.Lock()
    stop = threading.Event()
    sent = 0
    t0 = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            try:
                rss = sum(p.memory_info().rss for p in procs)
            except psutil.Error:
                rss = -1
            samples.append((time.monotonic() - t0, rss))
            stop.wait(0.5)

    def client_loop(k: int) -> None:
        nonlocal sent
        i = 0
        while not stop.is_set():
            with lock:
                if sent >= max_requests or time.monotonic() - t0 >= seconds:
                    stop.set()
                    return
                sent += 1
            endpoint = "explanations" if (i + k) % 2 else "predictions"
            i += 1
            t = time.perf_counter()
            status, _ = client.post_image(endpoint, model, image)
            dt = (time.perf_counter() - t) * 1000
            with lock:
                if status == 200:
                    lat[endpoint].append(dt)
                else:
                    errors.append((endpoint, status))

    threads = [threading.Thread(target=sampler)] + [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    duration = time.monotonic() - t0
    after = worker_state(client, model)
    first = [r for t, r in samples if t <= window and r > 0]
    last = [r for t, r in samples if t >= duration - window and r > 0]
    rss_first, rss_last = statistics.mean(first), statistics.mean(last)
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": model, "clients": clients, "seconds": round(duration, 1), "requests": sent,
        "errors": len(errors), "error_statuses": sorted({s for _, s in errors}),
        "worker_restarts": int(before != after),
        **{e: {"requests": len(v), "p50_ms": round(statistics.median(v), 2) if v else None,
               "p99_ms": round(percentile(v, 99), 2) if v else None} for e, v in lat.items()},
        "throughput_rps": round(sum(len(v) for v in lat.values()) / duration, 1),
        "worker_rss_mb_first_window": round(rss_first / 2**20, 1),
        "worker_rss_mb_last_window": round(rss_last / 2**20, 1),
        "worker_rss_growth_pct": round((rss_last - rss_first) / rss_first * 100, 2),
        "window_seconds": window,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--image", required=True)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--window", type=float, default=30)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--management-url", default="http://127.0.0.1:8081")
    ap.add_argument("--key-file", default="key_file.json")
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args()
    client = TorchServeClient(args.url, args.management_url, key_file=args.key_file)
    client.wait_ready(args.model)
    result = soak(client, args.model, Path(args.image).read_bytes(), args.seconds, args.clients,
                  args.max_requests, args.window)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if result["errors"] or result["worker_restarts"] or result["worker_rss_growth_pct"] >= 5:
        raise SystemExit("soak failed: errors, a worker restart, or memory growth >= 5%")


if __name__ == "__main__":
    main()
