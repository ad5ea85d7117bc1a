"""Decoding untrusted bytes and preprocessing, against Pillow/numpy computed by hand."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from handlers.runtime.errors import (
    ExplanationsUnavailable,
    InvalidImage,
    InvalidOption,
    InvalidRequest,
    PayloadTooLarge,
    UnknownTarget,
    UnsupportedMediaType,
    to_answer,
)
from handlers.runtime.imaging import InputSpec, decode_image, encode_indexed_png, encode_png, normalize, sniff_format, to_pixels

FORMATS = ("PNG", "JPEG")
RGB = InputSpec(32, 32, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
GRAY = InputSpec(32, 32, 1, (0.5,), (0.25,))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_image(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but carries almost no data (a 'bomb')."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decode_png_and_jpeg_roundtrip():
    img = rgb_image()
    out = decode_image(encode(img), max_pixels=10**6, allowed_formats=FORMATS)
    assert np.array_equal(np.asarray(out), np.asarray(img))
    jpg = decode_image(encode(img, "JPEG", quality=95), max_pixels=10**6, allowed_formats=FORMATS)
    assert jpg.size == img.size and jpg.format == "JPEG"


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x00" * 100, b"{json"])
def test_not_an_image_is_invalid(data):
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=10**6, allowed_formats=FORMATS)


@pytest.mark.parametrize("cut", [8, 30, 60, 0.5, 0.9])
def test_truncated_png_is_invalid(cut):
    data = encode(rgb_image(64, 64))
    cut = cut if isinstance(cut, int) else int(len(data) * cut)
    with pytest.raises(InvalidImage):
        decode_image(data[:cut], max_pixels=10**6, allowed_formats=FORMATS)


def test_corrupt_png_body_is_invalid():
    data = bytearray(encode(rgb_image(64, 64)))
    data[60:90] = b"\xff" * 30
    with pytest.raises(InvalidImage):
        decode_image(bytes(data), max_pixels=10**6, allowed_formats=FORMATS)


def _bad_bodies() -> list[bytes]:
    good = encode(rgb_image(64, 64))
    corrupt = bytearray(good)
    corrupt[60:90] = b"\xff" * 30
    jpeg = encode(rgb_image(64, 64), "JPEG")
    return [good[:8], good[:30], good[:60], good[: len(good) // 2], bytes(corrupt), jpeg[:20], jpeg[: len(jpeg) // 2]]


@pytest.mark.parametrize("data", _bad_bodies())
def test_bad_image_messages_name_no_internal_object(data):
    """Pillow's own message names the BytesIO it read (``<_io.BytesIO object at 0x...>``);
    what a client reads must not."""
    with pytest.raises(InvalidImage) as info:
        decode_image(data, max_pixels=10**6, allowed_formats=FORMATS)
    message = info.value.message
    assert "0x" not in message and "BytesIO" not in message and "object at" not in message, message
    assert message.startswith(("corrupt or truncated", "body is not"))


@pytest.mark.parametrize("error", [InvalidImage, InvalidOption, InvalidRequest, UnknownTarget, UnsupportedMediaType,
                                   PayloadTooLarge, ExplanationsUnavailable])
def test_every_client_error_drops_object_reprs_and_addresses(error):
    exc = error("cannot identify image file <_io.BytesIO object at 0x7f528bffe6b0>: at 0x7f528bffe6b0 too")
    assert exc.message == str(exc) == "cannot identify image file: at too"
    status, answer = to_answer(exc)
    assert status == error.status and "0x" not in answer.error.message


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF"])
def test_other_formats_are_unsupported_media(fmt):
    data = encode(rgb_image().convert("P") if fmt == "GIF" else rgb_image(), fmt)
    assert sniff_format(data) == fmt
    with pytest.raises(UnsupportedMediaType):
        decode_image(data, max_pixels=10**6, allowed_formats=FORMATS)


def test_decompression_bomb_rejected_from_header():
    data = png_header_only(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(PayloadTooLarge, match="pixel"):
        decode_image(data, max_pixels=4096 * 4096, allowed_formats=FORMATS)


def test_pixel_limit_is_configurable():
    data = encode(rgb_image(40, 30))
    decode_image(data, max_pixels=1200, allowed_formats=FORMATS)
    with pytest.raises(PayloadTooLarge):
        decode_image(data, max_pixels=1199, allowed_formats=FORMATS)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1", "I", "F"])
def test_every_mode_converts_to_model_channels(mode):
    base = rgb_image(50, 20)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype("<u2"))
        assert img.mode == "I;16"
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    for spec in (RGB, GRAY):
        px = to_pixels(img, spec)
        assert px.shape == (spec.height, spec.width, spec.channels) and px.dtype == np.uint8


def test_16bit_gray_scales_to_8bit():
    arr8 = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    img = Image.fromarray((arr8 * 257).astype("<u2"))
    assert img.mode == "I;16"
    px = to_pixels(img, InputSpec(16, 16, 1, (0.0,), (1.0,)))
    assert np.array_equal(px[:, :, 0], arr8.astype(np.uint8))


def test_resize_matches_pillow_bilinear():
    img = rgb_image(80, 50)
    expected = np.asarray(img.resize((32, 32), Image.BILINEAR))
    assert np.array_equal(to_pixels(img, RGB), expected)


def test_normalize_is_affine_per_channel():
    px = np.random.default_rng(1).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    x = normalize(px, RGB)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32
    for c in range(3):
        ref = (px[..., c] / 255.0 - RGB.mean[c]) / RGB.std[c]
        np.testing.assert_allclose(x[:, c], ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), channels=st.sampled_from([1, 2, 3, 4]),
       smooth=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_encode_png_roundtrips_through_pillow(h, w, channels, smooth, seed):
    """Our Sub-filter encoder against Pillow's decoder (an independent implementation),
    on noise and on smooth ramps (where wrap-around of the filter's mod-256 arithmetic shows)."""
    rng = np.random.default_rng(seed)
    if smooth:
        arr = (np.add.outer(np.arange(h), np.arange(w))[:, :, None] * rng.integers(1, 40, channels)) % 256
    else:
        arr = rng.integers(0, 256, (h, w, channels))
    arr = arr.astype(np.uint8)
    img = Image.open(io.BytesIO(encode_png(arr)))
    img.load()
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    assert img.mode == mode and img.size == (w, h)
    np.testing.assert_array_equal(np.asarray(img).reshape(h, w, channels), arr)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(arr[:, :, 0])))), arr[:, :, 0])


def test_encode_png_rejects_what_png_cannot_hold():
    for bad in (np.zeros((0, 3, 3)), np.zeros((2, 2, 5)), np.zeros(4)):
        with pytest.raises(ValueError):
            encode_png(bad)


def test_indexed_png_roundtrips_with_transparency():
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (20, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, 20, dtype=np.uint8)
    idx = rng.integers(0, 20, (13, 17), dtype=np.uint8)
    img = Image.open(io.BytesIO(encode_indexed_png(idx, palette, alpha)))
    assert img.mode == "P" and img.size == (17, 13)
    np.testing.assert_array_equal(np.asarray(img), idx)
    np.testing.assert_array_equal(np.asarray(img.getpalette(), np.uint8).reshape(-1, 3)[:20], palette)
    rgba = np.asarray(img.convert("RGBA"))
    np.testing.assert_array_equal(rgba[..., :3], palette[idx])
    np.testing.assert_array_equal(rgba[..., 3], alpha[idx])
    assert Image.open(io.BytesIO(encode_indexed_png(idx, palette))).info.get("transparency") is None
    with pytest.raises(ValueError):
        encode_indexed_png(idx, palette[:5])  # indices beyond the palette
    with pytest.raises(ValueError):
        encode_indexed_png(idx, palette, alpha[:3])
    for bad in (idx.astype(np.int16) + 300, idx.astype(np.int16) - 1, idx.astype(np.float32)):
        with pytest.raises(ValueError):  # not wrapped into range by a cast
            encode_indexed_png(bad, np.zeros((256, 3), np.uint8))


def test_input_spec_validates():
    with pytest.raises(ValueError):
        InputSpec(32, 32, 2, (0, 0), (1, 1))
    with pytest.raises(ValueError):
        InputSpec(32, 32, 3, (0,), (1,))
    assert InputSpec.from_json(RGB.to_json()) == RGB
