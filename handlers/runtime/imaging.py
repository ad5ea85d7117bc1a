"""Image decoding, validation and preprocessing: one implementation for serving and export.

Serving decodes untrusted bytes with :func:`decode_image` (format sniffing, size limits
before pixels are decoded, truncation checks). Both serving and the training data loader
turn a Pillow image into model input with :func:`to_pixels` then :func:`normalize`, so
the network sees identical preprocessing offline and online.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from handlers.runtime.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

# Magic numbers of the formats we can name in an error message. Anything else is "not an image".
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)


@dataclass(frozen=True)
class InputSpec:
    """What the classifier expects: (channels, height, width) and per-channel normalisation.

    ``mean`` and ``std`` are in [0, 1] pixel units, one value per channel.
    """

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if min(self.height, self.width) < 1:
            raise ValueError("height and width must be positive")

    def to_json(self) -> dict:
        return {"height": self.height, "width": self.width, "channels": self.channels,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        return cls(int(d["height"]), int(d["width"]), int(d["channels"]),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


def sniff_format(data: bytes) -> str | None:
    """Return the image format named by the file's magic number, or None."""
    for magic, offset, name in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            if name == "WEBP" and data[:4] != b"RIFF":
                continue
            return name
    return None


def decode_image(data: bytes, *, max_pixels: int, allowed_formats: tuple[str, ...]) -> Image.Image:
    """Decode untrusted bytes into a fully loaded Pillow image.

    Raises:
        InvalidImage: empty, unrecognised, truncated or corrupt data.
        UnsupportedMediaType: a recognised format that is not in ``allowed_formats``.
        PayloadTooLarge: declared width x height above ``max_pixels`` (checked from the
            header, before any pixel is decoded, so decompression bombs cost nothing).
    """
    if not data:
        raise InvalidImage("empty request body: expected an image")
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidImage("body is not a recognised image (expected PNG or JPEG bytes)")
    if fmt not in allowed_formats:
        raise UnsupportedMediaType(f"image format {fmt} is not accepted; accepted: {', '.join(allowed_formats)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidImage(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
            image.load()
    except (InvalidImage, PayloadTooLarge):
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image exceeds the decoder's pixel limit: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"corrupt or truncated {fmt} image: the decoder cannot read it") from None
    except (OSError, SyntaxError, ValueError, EOFError,
            IndexError, TypeError, struct.error) as exc:
        raise InvalidImage(f"corrupt or truncated {fmt} image: {exc}") from None
    return image


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode (16-bit, float, palette, CMYK, alpha) to L or RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    target = "RGB" if channels == 3 else "L"
    return image.convert(target) if image.mode != target else image


def to_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Convert to the model's channels and resize (bilinear, antialiased) to its input size.

    Returns uint8 array (spec.height, spec.width, spec.channels).
    """
    image = _to_mode(image, spec.channels)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (N, H, W, C) or (H, W, C) -> float32 (N, C, H, W) or (C, H, W), normalised."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib level of the explanation images. On the 12 images of a demo answer (8 heatmaps, 4 ClaDec
# images) level 1 took 0.60 ms and 29.6 KB, level 3 0.86 ms and 28.8 KB, the default 6 2.08 ms
# and 27.3 KB; ``make bench`` measures the image formats.
PNG_LEVEL = 1
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_idat(rows: np.ndarray, bpp: int, level: int) -> bytes:
    """Sub-filtered (PNG filter type 1: each byte minus the byte one pixel to its left)
    scanlines of uint8 rows (H, W * bpp), zlib-compressed."""
    x = np.ascontiguousarray(rows, dtype=np.uint8)
    f = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.uint8)
    f[:, 0] = 1
    f[:, 1:bpp + 1] = x[:, :bpp]
    np.subtract(x[:, bpp:], x[:, :-bpp], out=f[:, bpp + 1:])  # wraps mod 256, as PNG wants
    return zlib.compress(f.tobytes(), level)


def encode_png(pixels: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """uint8 (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) -> PNG bytes (8-bit grey,
    grey + alpha, RGB or RGBA).

    Every row uses the Sub filter and the image is one zlib stream: 3-4x faster than
    Pillow's adaptive filtering on the small images of an explanation, and as small on
    smooth images (reconstructions, heatmaps); up to ~15% larger on noisy photographs.
    """
    arr = np.asarray(pixels, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in _PNG_COLOUR_TYPES or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"cannot encode an array of shape {arr.shape} as PNG")
    h, w, ch = arr.shape
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPES[ch], 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", _png_idat(arr.reshape(h, w * ch), ch, level)) + _png_chunk(b"IEND", b""))


#: JPEG quality of explanation images sent as JPEG: on the demo's 64 px and the 224 px bench
#: model's ClaDec images, 5-11x fewer bytes than PNG and 2-4x faster to encode (bench/run.py,
#: "image formats"); 4:2:0 chroma subsampling, Pillow's default.
JPEG_QUALITY = 90

#: Shorter image side from which ClaDec images are JPEG unless a model or request says
#: otherwise (setting ``cladec_image_format: auto``). ``python -m bench.image_format_error``
#: on 12 held-out images of each model: at 224 px JPEG q90 adds a median 0-3 % (at most 7 %)
#: to a ClaDec or reference image's squared error against the input, and an image shrinks from
#: 37-67 KB to 2-6.5 KB; at 64 px the PNGs are 4.5-8 KB, and JPEG would add a median 16 % (up
#: to 27 %) to the reference autoencoder's, whose images are close to the input (RMS 0.032),
#: its 4:2:0 chroma at 32 px blurring the shape's colour; so small images stay lossless.
AUTO_JPEG_MIN_SIDE = 128

#: What the setting ``cladec_image_format`` accepts: an encoding, or "auto" (by image size).
CLADEC_FORMAT_SETTINGS = ("auto", "png", "jpeg")


def cladec_image_format(setting: str, height: int, width: int) -> str:
    """The encoding ("png" or "jpeg") of ClaDec images of ``height`` x ``width`` px for the
    setting ``setting`` (one of :data:`CLADEC_FORMAT_SETTINGS`): "auto" is JPEG when the
    shorter side is at least :data:`AUTO_JPEG_MIN_SIDE`, else PNG.

    Raises:
        ValueError: an unknown setting."""
    if setting not in CLADEC_FORMAT_SETTINGS:
        raise ValueError(f"cladec image format must be one of {list(CLADEC_FORMAT_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "jpeg" if min(height, width) >= AUTO_JPEG_MIN_SIDE else "png"


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> baseline JPEG bytes (grey or RGB)."""
    arr = np.asarray(pixels, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or arr.size == 0:
        raise ValueError(f"cannot encode an array of shape {arr.shape} as JPEG")
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=quality)
    return out.getvalue()


def encode_indexed_png(indices: np.ndarray, palette: np.ndarray, alpha: np.ndarray | None = None,
                       level: int = PNG_LEVEL) -> bytes:
    """Palette PNG: indices uint8 (H, W) into palette uint8 (P, 3), P <= 256; optional
    per-entry opacity uint8 (P,) (a tRNS chunk). One byte per pixel: a quantised heatmap
    compresses to a few KB even at 224 px."""
    raw = np.asarray(indices)
    pal = np.asarray(palette, dtype=np.uint8)
    if raw.ndim != 2 or raw.size == 0 or pal.ndim != 2 or pal.shape[1] != 3 or not 0 < len(pal) <= 256:
        raise ValueError(f"indices {raw.shape} / palette {pal.shape} are not a palette image")
    if not np.issubdtype(raw.dtype, np.integer) or int(raw.min()) < 0 or int(raw.max()) >= len(pal):
        raise ValueError(f"indices must be integers in 0..{len(pal) - 1}")  # checked before any cast wraps
    idx = raw.astype(np.uint8)
    h, w = idx.shape
    out = _PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
    out += _png_chunk(b"PLTE", pal.tobytes())
    if alpha is not None:
        a = np.asarray(alpha, dtype=np.uint8)
        if a.shape != (len(pal),):
            raise ValueError("alpha needs one entry per palette colour")
        out += _png_chunk(b"tRNS", a.tobytes())
    return out + _png_chunk(b"IDAT", _png_idat(idx, 1, level)) + _png_chunk(b"IEND", b"")
