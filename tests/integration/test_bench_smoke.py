"""`make bench-smoke`: the benchmark runs end to end on tiny models (no timing asserted).

Both model sizes' code paths run: the tiny demo bundle, and a tiny build of the second size
(bench/build_model.py with ResNet-18's layout at 32 px instead of 224)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke(tiny_full_bundle: Path, tiny_classifier: Path, tiny_data: Path, tmp_path):
    from bench.build_model import build
    large = tmp_path / "large"
    build(large, arch="resnet18_like", size=32, n_train=60, n_test=20, ae_images=40)
    image = sorted((tiny_data / "test").glob("*/*.png"))[0]
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--bundle", str(tiny_full_bundle),
                           "--classifier", str(tiny_classifier), "--data", str(tiny_data), "--image", str(image),
                           "--large", str(large),
                           "--smoke", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert [s["input"] for s in result["sizes"]] == ["32x32", "32x32"] and result["smoke"]
    for size in result["sizes"]:
        for c in ("concurrency_1", "concurrency_8"):
            assert size[c]["predictions"]["n"] > 0 and size[c]["explanations"]["n"] > 0
            assert size[c]["explanations"]["response_bytes"] > size[c]["predictions"]["response_bytes"]
        # the Captum baseline answered with one attribution per input value
        assert size["captum"]["captum_ig"]["attribution_shape"] == [3, 32, 32]
        assert size["worker_peak_rss_mb"]["explanations"] > 0 and size["worker_peak_rss_mb"]["predictions_only"] > 0
        assert {"classifier", "concept_encoders"} <= set(size["onnxruntime_vs_torch"])
        assert size["causal"]["max_abs_difference"] < 1e-9  # compiled and pgmpy agree
        assert {"classifier", "concepts", "causal", "cladec"} <= set(size["explanation_stages_ms"])
        # the variants of the default explanation, each answered and sized
        c1 = size["concurrency_1"]
        for v in ("explanations_without_reference", "explanations_all_alphas", "explanations_jpeg",
                  "explanations_png", "explanations_float_graphs"):
            assert c1[v]["n"] > 0 and c1[v]["response_bytes"] > c1["predictions"]["response_bytes"], v
        # the smoke models' 32 px is below the auto threshold: the default answer carries PNG (the
        # same bytes up to the digits of its timings), JPEG on request is smaller
        default_bytes = c1["explanations"]["response_bytes"]
        assert abs(c1["explanations_png"]["response_bytes"] - default_bytes) < 0.01 * default_bytes
        assert c1["explanations_jpeg"]["response_bytes"] < default_bytes
        assert c1["explanations_all_alphas"]["response_bytes"] > c1["explanations"]["response_bytes"]  # 2 alphas
        assert size["worker_peak_rss_mb"]["explanations_float_graphs"] > 0
        # the offline levers: every explanation graph in 8 bits, merged encoders, saved optimisation, formats
        levers = size["levers"]
        assert {r["kind"] for r in levers["int8_vs_float"]} == {"concept_encoder", "reference_autoencoder",
                                                                "cladec_decoder"}
        assert all(r["float_ms"] > 0 and r["int8_ms"] > 0 for r in levers["int8_vs_float"])
        assert levers["merged_concept_encoders"]["encoders"] == 3
        assert [r["file"] for r in levers["saved_optimisation"]][0] == "classifier.onnx"
        assert {"png", "webp_lossless", "jpeg_q90"} <= set(levers["image_formats"])
        assert len(levers["overlap_modes"]) == 3 and all(v > 0 for v in levers["overlap_modes"].values())
        assert all(levers["chunk_memory"][k]["peak_rss_mb"] > 0 for k in ("chunk_rows_0", "chunk_rows_2"))
    kserve = result["sizes"][0]["kserve"]  # the KServe-native server beside TorchServe, demo size only
    for c in ("concurrency_1", "concurrency_8"):
        for k in ("torchserve_predict", "kserve_predict", "torchserve_explain", "kserve_explain"):
            assert kserve[c][k]["n"] > 0 and kserve[c][k]["throughput_rps"] > 0
    table = (tmp_path / "out" / "latest.md").read_text()
    assert "KServe v1, TorchServe vs KServe's model server" in table
    assert "Captum IG p50 / ours" in table and "smoke counts" in table
    assert "**Targets**" in table and "**Levers**" in table and "8-bit reference autoencoders" in table
