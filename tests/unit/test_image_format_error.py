"""bench.image_format_error: what JPEG costs the served ClaDec images, per layer and kind."""
from __future__ import annotations

from pathlib import Path

from bench.image_format_error import measure
from tests.handler.mock_context import model_dir_from_bundle


def test_every_cladec_image_is_measured_against_the_input_and_its_png(tiny_full_bundle: Path, tiny_data: Path,
                                                                         tmp_path: Path):
    rows = measure(model_dir_from_bundle(tiny_full_bundle, tmp_path / "model"), tiny_data, 3)
    assert set(rows) == {f"{layer}/{kind}" for layer in ("layer2", "avgpool") for kind in ("reconstruction", "reference")}
    for key, r in rows.items():
        assert r["images"] == 3, key  # one entry per layer (the lowest alpha), each with its reference
        assert 0.0 < r["rms_png_vs_input"] < 1.0 and 0.0 < r["rms_jpeg_vs_png"] < 0.1, (key, r)
        assert 0.0 <= r["added_share_median"] <= r["added_share_max"], (key, r)
        assert 0 < r["jpeg_bytes"] and 0 < r["png_bytes"], (key, r)
