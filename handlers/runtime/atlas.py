"""The concept atlas: each concept's face, as the training images where it fires most.

At build time (:mod:`export.atlas`) every concept gets a *strip*: up to ``columns``
thumbnails (``thumb`` x ``thumb`` pixels) of the training images with the highest pooled
value, each cropped around the code map's peak and mapped back to input pixels through the
layer's receptive field; a concept whose lowest state is not "absent" gets a second strip of
its lowest images. All strips of a layer are rows of one PNG sprite in the bundle; its
index (which row, which images, their values) sits in ``concepts.json`` under the layer's
``atlas``. Serving cuts each strip out once at load (:class:`AtlasStrips`) and hands it to an
answer only when a request asks (``"atlas": true``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.runtime.answer import ConceptAtlas
from handlers.runtime.errors import ArtifactError


@dataclass(frozen=True)
class Strip:
    """One row of a layer's sprite: its ``row`` index and the training images in it (paths
    relative to the data folder, best first) with their pooled values."""

    row: int
    images: tuple[str, ...]
    values: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "images": list(self.images), "values": [round(v, 5) for v in self.values]}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Strip | None:
        if d is None:
            return None
        images, values = tuple(str(p) for p in d["images"]), tuple(float(v) for v in d["values"])
        if len(images) != len(values) or not images:
            raise ArtifactError(f"atlas strip at row {d.get('row')}: {len(images)} images but {len(values)} values")
        return cls(int(d["row"]), images, values)


@dataclass(frozen=True)
class LayerAtlas:
    """The atlas index of one concept layer.

    file: the sprite PNG (rows of ``thumb`` pixels, ``columns`` thumbnails wide); top: per
    concept its strip of highest images (None: the concept never fires on a training image);
    low: per concept its strip of lowest images, or None where the lowest state means
    "absent"; crop: the input pixels (height, width) one thumbnail shows; stride: input
    pixels per code-map cell (height, width)."""

    file: str
    thumb: int
    columns: int
    top: tuple[Strip | None, ...]
    low: tuple[Strip | None, ...]
    crop: tuple[int, int]
    stride: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "thumb": self.thumb, "columns": self.columns,
                "crop": list(self.crop), "stride": [round(s, 4) for s in self.stride],
                "top": [None if s is None else s.to_json() for s in self.top],
                "low": [None if s is None else s.to_json() for s in self.low]}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None, k: int) -> LayerAtlas | None:
        """The index, checked against the layer's ``k`` concepts; None when absent."""
        if d is None:
            return None
        top = tuple(Strip.from_json(s) for s in d["top"])
        low = tuple(Strip.from_json(s) for s in d["low"])
        if len(top) != k or len(low) != k:
            raise ArtifactError(f"atlas {d.get('file')}: {len(top)} top and {len(low)} low strips for {k} concepts")
        columns = int(d["columns"])
        if any(s is not None and len(s.images) > columns for s in (*top, *low)):
            raise ArtifactError(f"atlas {d.get('file')}: a strip has more than {columns} images")
        return cls(str(d["file"]), int(d["thumb"]), columns, top, low,
                   (int(d["crop"][0]), int(d["crop"][1])), (float(d["stride"][0]), float(d["stride"][1])))

    def rows(self) -> int:
        """Rows the sprite must have."""
        return 1 + max((s.row for s in (*self.top, *self.low) if s is not None), default=-1)


def cut_strip(sprite: np.ndarray, atlas: LayerAtlas, strip: Strip) -> np.ndarray:
    """The pixels of one strip: sprite uint8 (rows*thumb, columns*thumb, C) ->
    (thumb, len(images)*thumb, C)."""
    t = atlas.thumb
    return sprite[strip.row * t:(strip.row + 1) * t, :len(strip.images) * t]


def encode_strip(pixels: np.ndarray) -> bytes:
    """A strip as PNG bytes (RGB, best compression: strips are encoded once per load)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def decode_sprite(data: bytes, atlas: LayerAtlas) -> np.ndarray:
    """The sprite's RGB pixels, checked against the index's size. Raises :class:`ArtifactError`."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ArtifactError(f"atlas {atlas.file} is not a readable PNG: {exc}") from None
    need = (atlas.rows() * atlas.thumb, atlas.columns * atlas.thumb)
    if pixels.shape[0] < need[0] or pixels.shape[1] < need[1]:
        raise ArtifactError(f"atlas {atlas.file} is {pixels.shape[1]}x{pixels.shape[0]} px; "
                            f"its index needs at least {need[1]}x{need[0]}")
    return pixels


class AtlasStrips:
    """Every concept's atlas of one bundle, cut out, PNG-encoded and built into its answer part
    once at load: ``get(layer, channel)`` -> the :class:`ConceptAtlas` an answer carries with
    ``"atlas": true``, or None where the layer has no atlas or the concept never fires."""

    def __init__(self, layers: dict[str, tuple[LayerAtlas, np.ndarray]]) -> None:
        self._parts: dict[tuple[str, int], ConceptAtlas] = {}
        for name, (atlas, sprite) in layers.items():
            for c, (top, low) in enumerate(zip(atlas.top, atlas.low)):
                if top is None:
                    continue
                lows: dict[str, Any] = {} if low is None else {
                    "low_png": encode_strip(cut_strip(sprite, atlas, low)), "low_images": list(low.images),
                    "low_values": list(low.values)}
                self._parts[(name, c)] = ConceptAtlas(
                    thumb=atlas.thumb, crop_px=list(atlas.crop), top_png=encode_strip(cut_strip(sprite, atlas, top)),
                    top_images=list(top.images), top_values=list(top.values), **lows)

    def get(self, layer: str, channel: int) -> ConceptAtlas | None:
        return self._parts.get((layer, channel))

    def __len__(self) -> int:
        return len(self._parts)
