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
    def from_json(cls, d: dict) -> "InputSpec":
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
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
        image = image.resize((spec.width, spec.height), Image.BILINEAR)
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


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes."""
    arr = np.asarray(pixels, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
