"""Property-based tests: no input, however hostile, gets anything but a 4xx JSON error or a
correct answer, and no input kills the handler."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from handlers.concept_handler import ConceptExplainerHandler
from tests.answer_schema import assert_answer, is_explain
from tests.handler.mock_context import make_context, prepare_batch, wire_request

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> ConceptExplainerHandler:
    h = ConceptExplainerHandler()
    h.initialize(make_context(model_dir, {"max_request_bytes": 200_000, "max_image_pixels": 512 * 512}))
    return h


def answer(handler, model_dir, requests):
    ctx = make_context(model_dir)
    bodies = handler.handle(prepare_batch(ctx, requests), ctx)
    out = []
    for i, b in enumerate(bodies):
        status = ctx.get_response_status(i)[0]
        body = json.loads(b)
        assert status == 200 or 400 <= status < 500, (status, body)
        assert_answer(status, body, is_explain(requests[i]))
        if status != 200:
            assert body["error"]["type"] and body["error"]["message"]
        out.append((status, body))
    return out


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 128)) + chunk(b"IEND", b""))


images = st.builds(
    lambda w, h, mode, seed: Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode),
    st.integers(1, 150), st.integers(1, 150), st.sampled_from(["RGB", "L", "P", "CMYK", "RGBA", "LA", "1"]),
    st.integers(0, 2**16))
valid_formats = {"RGB": ["PNG", "JPEG"], "L": ["PNG", "JPEG"], "P": ["PNG"], "CMYK": ["JPEG"], "RGBA": ["PNG"],
                 "LA": ["PNG"], "1": ["PNG"]}


@SETTINGS
@given(st.binary(max_size=2048), st.sampled_from(["image/png", "image/jpeg", "application/octet-stream",
                                                   "application/json", "text/plain", "image/gif"]),
       st.booleans())
def test_random_bytes(handler, model_dir, data, ctype, explain):
    answer(handler, model_dir, [wire_request(data, ctype, explain=explain)])


@SETTINGS
@given(images, st.data(), st.booleans())
def test_any_size_mode_and_format_is_answered(handler, model_dir, img, data, explain):
    fmt = data.draw(st.sampled_from(valid_formats[img.mode]))
    [(status, body)] = answer(handler, model_dir, [wire_request(encode(img, fmt), explain=explain)])
    assert status == 200 and body["predictions"]


@SETTINGS
@given(images, st.sampled_from(["PNG", "JPEG", "GIF", "WEBP"]), st.floats(0.0, 0.99), st.integers(0, 255),
       st.booleans())
def test_truncated_and_corrupted_files(handler, model_dir, img, fmt, cut, flip, explain):
    img = img.convert("RGB") if fmt in ("JPEG", "WEBP") else img.convert("P" if fmt == "GIF" else "RGB")
    data = bytearray(encode(img, fmt))
    data = data[: max(1, int(len(data) * cut))]
    if len(data) > 20:
        data[len(data) // 2] ^= flip
    answer(handler, model_dir, [wire_request(bytes(data), explain=explain)])


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                    max_leaves=12),
       st.booleans())
def test_arbitrary_json(handler, model_dir, doc, explain):
    answer(handler, model_dir, [wire_request(json.dumps(doc), "application/json", explain=explain)])


@SETTINGS
@given(st.fixed_dictionaries({}, optional={
    "target": st.one_of(st.integers(-5, 50), st.text(max_size=12), st.floats(allow_nan=False), st.none(), st.booleans()),
    "top_concepts": st.one_of(st.integers(-10, 10**12), st.floats(allow_nan=False), st.text(max_size=5)),
    "top_k": st.one_of(st.integers(-10, 10**6), st.text(max_size=5)),
    "images": st.one_of(st.booleans(), st.integers(), st.text(max_size=4)),
    "views": st.one_of(st.lists(st.sampled_from(["concepts", "cladec", "features", "saliency", ""]), max_size=4),
                       st.integers(), st.text(max_size=8)),
    "layers": st.one_of(st.lists(st.sampled_from(["layer2", "avgpool", "layer9", ""]), max_size=3), st.integers()),
    "heatmap": st.one_of(st.sampled_from(["overlay", "blended", "jet", ""]), st.integers(), st.none()),
    "reference": st.one_of(st.booleans(), st.none(), st.integers(), st.text(max_size=4)),
}), st.sampled_from([True, False]))
def test_option_combinations(handler, model_dir, sample_pngs, options, explain):
    body = json.dumps({"data": base64.b64encode(sample_pngs[0]).decode(), **options})
    [(status, out)] = answer(handler, model_dir, [wire_request(body, "application/json", explain=explain)])
    if status == 200:
        assert out["predictions"]


@pytest.mark.parametrize("data, status", [
    (bomb_png(100_000, 100_000), 413),
    (bomb_png(1000, 1000), 413),  # 1e6 pixels > this handler's 512 x 512 limit
    (b"", 400),
    (b"\x89PNG\r\n\x1a\n", 400),
])
def test_bombs_and_empty_bodies(handler, model_dir, data, status):
    [(got, body)] = answer(handler, model_dir, [wire_request(data, explain=True)])
    assert got == status, body


def test_oversized_base64_and_body(handler, model_dir):
    big = json.dumps({"data": "A" * 400_000})
    [(s1, b1)] = answer(handler, model_dir, [wire_request(big, "application/json")])
    [(s2, b2)] = answer(handler, model_dir, [wire_request(b"\x89PNG" + b"\x00" * 300_000)])
    assert s1 == s2 == 413 and b1["error"]["type"] == b2["error"]["type"] == "PayloadTooLarge"


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("1", "PNG")])
def test_exotic_modes_answered(handler, model_dir, mode, fmt):
    base = np.random.default_rng(0).integers(0, 256, (40, 90), dtype=np.uint8)
    img = Image.fromarray((base.astype(np.uint16) * 257).astype("<u2")) if mode == "I;16" else Image.fromarray(base).convert(mode)
    [(status, body)] = answer(handler, model_dir, [wire_request(encode(img, fmt), explain=True)])
    assert status == 200 and body["concepts"]


def test_extreme_aspect_ratios(handler, model_dir):
    for w, h in [(1, 1), (1, 300), (300, 1), (512, 2)]:
        img = Image.fromarray(np.full((h, w, 3), 128, np.uint8))
        [(status, _)] = answer(handler, model_dir, [wire_request(encode(img, "PNG"), explain=True)])
        assert status == 200


def test_batch_with_every_kind_of_bad_request_keeps_good_ones(handler, model_dir, sample_pngs):
    good = sample_pngs[0]
    batch = [wire_request(good, idx=0), wire_request(bomb_png(9000, 9000), idx=1),
             wire_request(b"\xff\xd8\xff" + b"\x00" * 50, idx=2), wire_request("[]", "application/json", idx=3),
             wire_request(good, explain=True, idx=4),
             wire_request(json.dumps({"data": base64.b64encode(good).decode(), "top_concepts": -1}),
                          "application/json", explain=True, idx=5),
             wire_request(good, idx=6)]
    out = answer(handler, model_dir, batch)
    assert [s for s, _ in out] == [200, 413, 400, 400, 200, 400, 200]
    assert out[0][1]["predictions"] == out[6][1]["predictions"] == out[4][1]["predictions"]
