"""A corrupted artifact inside a .mar: TorchServe never serves the model, and the worker log
names the file with the expected and actual sha256."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests

from export.archive import build_mar
from handlers.runtime.bundle import sha256_file
from tests.integration.server import TorchServe, post

pytestmark = pytest.mark.integration


def test_flipped_byte_in_archive_refuses_to_load(tiny_concept_bundle: Path, tmp_path, sample_pngs):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_concept_bundle, bundle)
    victim = bundle / "causal_network.json"
    expected = json.loads((bundle / "manifest.json").read_text())["files"]["causal_network.json"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    actual = sha256_file(victim)
    store = tmp_path / "store"
    build_mar(bundle, "broken", "0.1", store)  # archive without verifying, as a tampered file would arrive
    ts = TorchServe(tmp_path / "ts", store, {"broken": "broken.mar"})
    try:
        ts.start(wait=False)
        deadline = time.monotonic() + 60
        while actual not in ts.log():
            assert time.monotonic() < deadline, "no log line naming the corrupted file"
            time.sleep(0.5)
        line = next(l for l in ts.log().splitlines() if actual in l)
        assert "causal_network.json" in line and expected in line
        try:  # no worker ever becomes ready: the request fails or is never answered
            r = post(ts, sample_pngs[0], model="broken", timeout=5)
            assert r.status_code >= 500 and "predictions" not in r.text
        except requests.Timeout:
            pass
        status, desc = ts.client.describe("broken")
        assert status == 200 and not any(w["status"] == "READY" for w in desc[0]["workers"])
    finally:
        ts.stop()
