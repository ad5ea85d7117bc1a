"""Reliability against a real TorchServe: a mixed stream of malformed and valid requests,
and a worker killed with SIGKILL mid-traffic."""
from __future__ import annotations

import base64
import json
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests

from export.client import read_keys
from tests.answer_schema import assert_answer, assert_valid
from tests.integration.server import TorchServe, concurrently, post, workers

pytestmark = pytest.mark.integration


def bomb_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def malformed_requests(good: bytes, n: int, seed: int = 0) -> list[tuple[bytes, str, str, int]]:
    """(body, content type, endpoint, expected status) for n hostile requests."""
    rng = np.random.default_rng(seed)
    b64 = base64.b64encode(good).decode()
    kinds = [
        lambda: (rng.bytes(int(rng.integers(1, 400))), "image/png", 400),
        lambda: (good[: int(rng.integers(8, len(good) - 40))], "image/png", 400),
        lambda: (b"{\"data\": " + rng.bytes(5), "application/json", 400),
        lambda: (json.dumps({"data": "!!" + b64[:50]}).encode(), "application/json", 400),
        lambda: (json.dumps({"data": b64, "top_k": int(rng.integers(-5, 0))}).encode(), "application/json", 400),
        lambda: (json.dumps({"data": b64, "target": "no-such-class"}).encode(), "application/json", 400),
        lambda: (json.dumps({"data": b64, "views": ["nope"]}).encode(), "application/json", 400),
        lambda: (json.dumps({"data": b64, "top_concepts": 10**9}).encode(), "application/json", 400),
        lambda: (json.dumps([1, 2, 3]).encode(), "application/json", 400),
        lambda: (bomb_png(60_000, 60_000), "image/png", 413),
        lambda: (b"GIF89a" + rng.bytes(30), "image/gif", 415),
        lambda: (good, "text/plain", 415),
    ]
    out = []
    for i in range(n):
        body, ctype, status = kinds[i % len(kinds)]()
        endpoint = "explanations" if rng.random() < 0.5 else "predictions"
        if endpoint == "predictions" and b"target" in body or b"views" in body or b"top_concepts" in body:
            endpoint = "explanations"
        out.append((body, ctype, endpoint, status))
    return out


def test_1000_malformed_mixed_with_valid(server, sample_pngs):
    good = sample_pngs[0]
    reference = post(server, good, endpoint="explanations", model="tinyx").json()
    assert_valid(reference, "explanations")
    before = workers(server, "tinyx")
    bad = malformed_requests(good, 1000)
    jobs = []
    for i, item in enumerate(bad):
        jobs.append(item)
        if i % 5 == 0:
            jobs.append((good, "image/png", "explanations" if i % 10 else "predictions", 200))
    key = read_keys(server.workdir / "key_file.json")["inference"]

    def send(job):
        body, ctype, endpoint, _ = job
        r = requests.post(f"{server.client.url}/{endpoint}/tinyx", data=body, timeout=60,
                          headers={"Content-Type": ctype, "Authorization": f"Bearer {key}"})
        return r.status_code, r.content

    results, seconds = concurrently(send, jobs)
    wrong = []
    for (body, ctype, endpoint, expected), (status, content) in zip(jobs, results):
        if status != expected:
            wrong.append((endpoint, ctype, expected, status, content[:200]))
            continue
        doc = json.loads(content)
        assert_answer(status, doc, endpoint == "explanations")
        if expected == 200:
            if doc["predictions"] != reference["predictions"]:
                wrong.append(("wrong answer", endpoint))
            if endpoint == "explanations" and doc["concepts"] != reference["concepts"]:
                wrong.append(("wrong explanation", endpoint))
        elif not (doc["error"]["type"] and doc["error"]["message"]):
            wrong.append(("no error body", content[:200]))
    assert not wrong, wrong[:5]
    assert workers(server, "tinyx") == before, "a worker restarted"
    print(f"\n{len(jobs)} requests ({len(bad)} malformed) in {seconds:.1f} s, 0 wrong, 0 worker restarts")


@pytest.fixture()
def lone_server(tiny_mar: Path, tmp_path):
    import shutil
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(tiny_mar, store / tiny_mar.name)
    with TorchServe(tmp_path / "ts", store, {"tiny": tiny_mar.name}) as ts:
        yield ts


def test_sigkilled_worker_is_replaced(lone_server, sample_pngs):
    ts = lone_server
    good = sample_pngs[1]
    expected = post(ts, good).json()
    assert_valid(expected, "predictions")
    status, desc = ts.client.describe("tiny")
    pid = int(desc[0]["workers"][0]["pid"])
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    failures = 0
    seen = []
    while True:
        try:
            r = post(ts, good)
            seen.append(r.status_code)
            if r.status_code == 200:
                break
        except requests.RequestException as exc:  # the frontend may drop the in-flight request
            seen.append(type(exc).__name__)
        failures += 1
        assert time.monotonic() - t0 < 90, f"no recovery within 90 s: {seen[-10:]}"
        time.sleep(0.05)
    recovery = time.monotonic() - t0
    assert r.json() == expected
    after = [post(ts, good) for _ in range(50)]
    bad = [(r.status_code, r.text[:200]) for r in after if r.status_code != 200 or r.json() != expected]
    assert not bad, f"requests failed after recovery (statuses before recovery {seen}): {bad[:3]}"
    status, desc = ts.client.describe("tiny")
    assert int(desc[0]["workers"][0]["pid"]) != pid
    print(f"\nworker {pid} killed: requests succeed again after {recovery:.2f} s ({failures} failed meanwhile)")
