"""Bounded soak of the KServe door, then a SIGKILL and a supervisor's restart, on loopback.

    python -m bench.kserve_soak --mar model_store/shapes.mar --image data/shapes/test/star/016000.png \\
        [--seconds 120 --clients 8]

Starts ``concept-explainer-kserve`` on a free loopback port; ``--clients`` threads alternate
v1 ``:predict`` and ``:explain`` for ``--seconds`` (or ``--max-requests``); the server's
resident memory is sampled every 0.5 s and the first and last ``--window`` seconds compared.
Then the server is killed with SIGKILL and started again, as Kubernetes' kubelet (or any
supervisor) would: the seconds until it is ready and until it answers the same prediction
again. Prints JSON (and writes it with ``--out``).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import requests

from bench.server import KServeServer
from bench.stats import percentile


def soak(ks: KServeServer, image: bytes, seconds: float, clients: int, max_requests: int, window: float
         ) -> dict[str, Any]:
    """Run the load against a started server; latencies in ms, RSS in MB."""
    body = json.dumps({"instances": [{"data": base64.b64encode(image).decode()}]}).encode()
    proc = psutil.Process(ks.proc.pid if ks.proc else 0)
    deadline = time.monotonic() + seconds
    latencies: dict[str, list[float]] = {"predict": [], "explain": []}
    errors: list[str] = []
    count = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        with requests.Session() as session:
            i = k
            while time.monotonic() < deadline:
                with lock:
                    if count[0] >= max_requests:
                        return
                    count[0] += 1
                verb = "explain" if i % 2 else "predict"
                t0 = time.perf_counter()
                try:
                    r = session.post(f"{ks.url}/v1/models/{ks.name}:{verb}", data=body, timeout=60,
                                     headers={"Content-Type": "application/json"})
                    ok = r.status_code == 200
                    outcome = "" if ok else f"HTTP {r.status_code}"
                except requests.RequestException as exc:
                    ok, outcome = False, type(exc).__name__
                with lock:
                    if ok:
                        latencies[verb].append((time.perf_counter() - t0) * 1000)
                    else:
                        errors.append(outcome)
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    rss: list[tuple[float, float]] = []
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - start, proc.memory_info().rss / 2**20))
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    first = statistics.mean(m for t, m in rss if t <= window)
    last = statistics.mean(m for t, m in rss if t >= rss[-1][0] - window)
    done = sum(len(v) for v in latencies.values())
    return {"seconds": round(elapsed, 1), "clients": clients, "requests": done + len(errors), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "throughput_rps": round(done / elapsed, 1),
            "latency_ms": {k: {"p50": round(percentile(v, 50), 2), "p99": round(percentile(v, 99), 2)}
                           for k, v in latencies.items() if v},
            "rss_mb": {"first": round(first, 1), "last": round(last, 1), "growth": round(last / first - 1, 4),
                       "window_s": window}}


def kill_and_restart(ks: KServeServer, image: bytes) -> dict[str, Any]:
    """SIGKILL the server, start it again, and time readiness and the first equal answer."""
    body = {"instances": [{"data": base64.b64encode(image).decode()}]}
    url = f"{ks.url}/v1/models/{ks.name}:predict"
    before = requests.post(url, json=body, timeout=60).json()
    assert ks.proc is not None
    os.kill(ks.proc.pid, signal.SIGKILL)
    ks.proc.wait(timeout=10)
    t0 = time.monotonic()
    ks.start()  # returns once the model answers ready
    ready = time.monotonic() - t0
    after = requests.post(url, json=body, timeout=60).json()
    return {"ready_after_s": round(ready, 2), "answered_after_s": round(time.monotonic() - t0, 2),
            "same_answer": after == before}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mar", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--name", default="shapes")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--window", type=float, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    image = args.image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="kserve-soak-") as tmp, \
            KServeServer(Path(tmp), args.mar, args.name) as ks:
        result = {"soak": soak(ks, image, args.seconds, args.clients, args.max_requests, args.window),
                  "sigkill": kill_and_restart(ks, image)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
