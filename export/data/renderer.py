"""Deterministic controlled-factor image renderer (demo data set).

Every image shows one object on a flat grey background. The class is the
object's shape. The other generative factors are drawn independently and
uniformly for each image. They are the ground truth for a later
mutual-information analysis, so each one visibly changes the pixels and is
recorded exactly: continuous factors are quantised to 6 decimals when they are
sampled, so the value written to ``factors.csv`` is the value that was rendered.

Factors (see :data:`FACTOR_NAMES`):

==============  ===========================================================
``shape``       int index into :data:`SHAPES` (also the class label)
``texture``     int index into :data:`TEXTURES`; the pattern is in the object's
                own rotated frame, with a period of about 6 px at 64 px
``hue``         object hue in [0, 1) (saturation 0.8, value 0.9 before shading)
``scale``       object radius in [0.45, 0.9] as a fraction of ``0.3 * size``
``rotation``    degrees in [0, 360), counter-clockwise
``pos_x/pos_y`` centre offset in [-1, 1] as a fraction of the free room at
                this scale; +x is right, +y is **up**
``light``       degrees in [0, 360), counter-clockwise from +x: the bright
                side of a linear shading gradient (factor 0.7 to 1.15)
``background``  grey level of the background in [0.1, 0.9]
==============  ===========================================================

Geometry conventions: pixel ``k`` covers the continuous interval ``[k, k+1)``.
Array images are ``(H, W, 3)`` (row = y going down, column = x going right),
but angles and ``pos_y`` use the usual mathematical y-up orientation.
The shape mask is drawn with Pillow at 4x resolution and box-downsampled, and
the texture is supersampled 2x2, so edges are anti-aliased.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
import os
import shutil
import uuid
from dataclasses import astuple, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "TEXTURES",
    "FACTOR_NAMES",
    "CATEGORICAL_FACTORS",
    "CONTINUOUS_FACTORS",
    "FACTOR_RANGES",
    "CSV_COLUMNS",
    "Factors",
    "sample_factors",
    "shape_mask",
    "image_rng",
    "render",
    "render_dataset",
]

SHAPES: tuple[str, ...] = (
    "circle",
    "triangle",
    "square",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "diamond",
    "crescent",
    "arrow",
)
TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots", "checker")
FACTOR_NAMES: tuple[str, ...] = (
    "shape",
    "texture",
    "hue",
    "scale",
    "rotation",
    "pos_x",
    "pos_y",
    "light",
    "background",
)
CATEGORICAL_FACTORS: tuple[str, ...] = ("shape", "texture")
CONTINUOUS_FACTORS: tuple[str, ...] = tuple(n for n in FACTOR_NAMES if n not in CATEGORICAL_FACTORS)

#: Sampling range of each continuous factor, ``(low, high)``. ``hue``,
#: ``rotation`` and ``light`` are half-open ``[low, high)``; the others closed.
FACTOR_RANGES: dict[str, tuple[float, float]] = {
    "hue": (0.0, 1.0),
    "scale": (0.45, 0.9),
    "rotation": (0.0, 360.0),
    "pos_x": (-1.0, 1.0),
    "pos_y": (-1.0, 1.0),
    "light": (0.0, 360.0),
    "background": (0.1, 0.9),
}

#: Kind of each factor, written to ``factors.json`` beside ``factors.csv`` so analyses
#: know which factors are categorical and which are angles (circular, with a period).
FACTOR_TYPES: dict[str, dict] = {
    "shape": {"type": "categorical", "levels": list(SHAPES)},
    "texture": {"type": "categorical", "levels": list(TEXTURES)},
    "hue": {"type": "circular", "period": 1.0},
    "scale": {"type": "continuous"},
    "rotation": {"type": "circular", "period": 360.0},
    "pos_x": {"type": "continuous"},
    "pos_y": {"type": "continuous"},
    "light": {"type": "circular", "period": 360.0},
    "background": {"type": "continuous"},
}

#: Header of ``factors.csv``.
CSV_COLUMNS: tuple[str, ...] = ("path", "split", "label") + FACTOR_NAMES

# Rendering constants (fractions are relative to the image size).
MAX_RADIUS_FRAC = 0.3  # max object radius = 0.3 * size
MARGIN_FRAC = 1.0 / 64.0  # keep the object ~1 px (at 64 px) off the border
TEXTURE_PERIOD_FRAC = 6.0 / 64.0  # texture period = 6 px at 64 px
TEXTURE_DARK = 0.55  # value factor on the dark part of a texture
SATURATION = 0.8
VALUE = 0.9
SHADE_MIN, SHADE_MAX = 0.7, 1.15
NOISE_SIGMA = 0.02
MASK_SUPERSAMPLE = 4
TEXTURE_SUPERSAMPLE = 2
_QUANTUM = 1e6  # continuous factors are quantised to 6 decimals


@dataclass(frozen=True)
class Factors:
    """Generative factors of one image (field order = :data:`FACTOR_NAMES`)."""

    shape: int
    texture: int
    hue: float
    scale: float
    rotation: float
    pos_x: float
    pos_y: float
    light: float
    background: float


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


def _uniform_quantised(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """``n`` uniform draws in ``[lo, hi)`` floored to 6 decimals, shape ``(n,)``.

    Flooring keeps half-open upper bounds; the clip guards the lower bound
    against floating-point round-off. Each value survives a ``%.6f`` round trip
    bit for bit.
    """
    v = rng.uniform(lo, hi, n)
    v = np.floor(v * _QUANTUM) / _QUANTUM
    return np.clip(v, lo, hi)


def sample_factors(rng: np.random.Generator, n: int) -> list[Factors]:
    """Draw ``n`` independent factor sets, every factor uniform over its range.

    The draws are made column by column (all shapes, then all textures, ...), so
    the result for ``n`` is *not* a prefix of the result for a larger ``n``.
    Continuous values are quantised to 6 decimals (see module docstring).

    Args:
        rng: source of randomness (consumed).
        n: number of factor sets, ``n >= 0``.

    Returns:
        A list of ``n`` :class:`Factors` holding plain Python ``int``/``float``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shape = rng.integers(0, len(SHAPES), n)
    texture = rng.integers(0, len(TEXTURES), n)
    cols = {name: _uniform_quantised(rng, *FACTOR_RANGES[name], n) for name in CONTINUOUS_FACTORS}
    return [
        Factors(
            shape=int(shape[i]),
            texture=int(texture[i]),
            **{name: float(cols[name][i]) for name in CONTINUOUS_FACTORS},
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def _regular(k: int, start_deg: float = 90.0) -> np.ndarray:
    """Regular ``k``-gon with circumradius 1, shape ``(k, 2)``, y up."""
    a = np.deg2rad(start_deg) + 2.0 * np.pi * np.arange(k) / k
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    """Star with ``points`` tips at radius 1, shape ``(2 * points, 2)``, y up."""
    a = np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(w: float = 0.3) -> np.ndarray:
    """Plus sign with arm half-width ``w`` and reach 1, shape ``(12, 2)``."""
    return np.array(
        [
            (w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
            (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1),
        ],
        dtype=np.float64,
    )


def _unit(pts: np.ndarray) -> np.ndarray:
    """Scale an outline ``(k, 2)`` so its farthest vertex is at radius 1."""
    return pts / np.linalg.norm(pts, axis=1).max()


# Outlines in the object frame (y up) with circumradius 1 about the origin, so
# every shape fits the unit disc; "circle" and "crescent" are drawn from discs.
_RAW_POLYGONS: dict[str, np.ndarray] = {
    "triangle": _regular(3),
    "square": _regular(4, start_deg=45.0),
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "star": _star(),
    "cross": _cross(),
    "diamond": np.array([(0, 1), (0.55, 0), (0, -1), (-0.55, 0)], dtype=np.float64),
    "arrow": np.array(
        [(0, 1), (0.75, 0.1), (0.3, 0.1), (0.3, -1), (-0.3, -1), (-0.3, 0.1), (-0.75, 0.1)],
        dtype=np.float64,
    ),
}
_POLYGONS: dict[str, np.ndarray] = {k: _unit(v) for k, v in _RAW_POLYGONS.items()}
# Crescent = unit disc minus a disc of this radius centred at this offset (+x).
_CRESCENT_CUT_RADIUS = 0.8
_CRESCENT_CUT_OFFSET = 0.45


# Pillow fills pixels whose centre lies on the outline too, which grows shapes by
# about half a pixel of the drawing grid; outlines are pulled in by this much.
_HALF_PIXEL = 0.5


def _inset(pts: np.ndarray, d: float) -> np.ndarray:
    """Move every edge of a simple polygon ``(k, 2)`` inwards by ``d`` (mitred joins).

    Works for either orientation and for reflex vertices; returns ``(k, 2)``.
    """
    x, y = pts[:, 0], pts[:, 1]
    signed_area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    e = np.roll(pts, -1, axis=0) - pts  # edge i: vertex i -> i+1
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    # outward normal: right of the edge for counter-clockwise (positive area) order
    sign = 1.0 if signed_area > 0 else -1.0
    n_out = sign * np.stack([e[:, 1], -e[:, 0]], axis=1)
    n_prev = np.roll(n_out, 1, axis=0)  # edge ending at vertex i
    denom = 1.0 + np.sum(n_out * n_prev, axis=1, keepdims=True)
    return pts - d * (n_out + n_prev) / denom


def _validate(f: Factors, size: int) -> None:
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if not 0 <= f.shape < len(SHAPES):
        raise ValueError(f"shape index out of range: {f.shape}")
    if not 0 <= f.texture < len(TEXTURES):
        raise ValueError(f"texture index out of range: {f.texture}")


def _placement(f: Factors, size: int) -> tuple[float, float, float]:
    """Object centre ``(cx, cy)`` in continuous image coords (y down) and radius ``r`` in px."""
    r = f.scale * MAX_RADIUS_FRAC * size
    room = max(size / 2.0 - r - MARGIN_FRAC * size, 0.0)
    cx = size / 2.0 + f.pos_x * room
    cy = size / 2.0 - f.pos_y * room  # pos_y is y-up
    return cx, cy, r


def _box_sum(a: np.ndarray, s: int, dtype: type) -> np.ndarray:
    """Sum over non-overlapping ``s x s`` blocks: ``(n*s, n*s)`` -> ``(n, n)`` in ``dtype``.

    Plain strided adds; several times faster than ``reshape(...).mean(axis=(1, 3))``.
    """
    rows, cols = a.shape
    v = a.reshape(rows, cols // s, s)
    h: np.ndarray = v[:, :, 0].astype(dtype)
    for i in range(1, s):
        h += v[:, :, i]
    w = h.reshape(rows // s, s, cols // s)
    out = w[:, 0].copy()
    for i in range(1, s):
        out += w[:, i]
    return out


def shape_mask(f: Factors, size: int = 64) -> np.ndarray:
    """Anti-aliased coverage mask of the object.

    Uses ``shape``, ``scale``, ``rotation``, ``pos_x`` and ``pos_y`` only.

    Returns:
        ``(size, size)`` float32 array in [0, 1] (fraction of each pixel covered).
    """
    _validate(f, size)
    s = MASK_SUPERSAMPLE
    cx, cy, r = _placement(f, size)
    th = math.radians(f.rotation)
    c, sn = math.cos(th), math.sin(th)

    def to_hi(pts: np.ndarray) -> list[tuple[float, float]]:
        # object frame (y up, unit radius) -> hi-res Pillow coords (pixel centres on integers)
        x = cx + r * (pts[:, 0] * c - pts[:, 1] * sn)
        y = cy - r * (pts[:, 0] * sn + pts[:, 1] * c)
        return list(zip((x * s - 0.5).tolist(), (y * s - 0.5).tolist()))

    def disc(draw: ImageDraw.ImageDraw, ox: float, oy: float, rad: float, fill: int) -> None:
        (px, py), = to_hi(np.array([[ox, oy]]))
        # Pillow fills the bounding box inclusively (one extra pixel across), so
        # pull it in by half a hi-res pixel on each side.
        rr = rad * r * s - _HALF_PIXEL
        draw.ellipse((px - rr, py - rr, px + rr, py + rr), fill=fill)

    img = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(img)
    name = SHAPES[f.shape]
    if name == "circle":
        disc(draw, 0.0, 0.0, 1.0, 255)
    elif name == "crescent":
        disc(draw, 0.0, 0.0, 1.0, 255)
        disc(draw, _CRESCENT_CUT_OFFSET, 0.0, _CRESCENT_CUT_RADIUS, 0)
    else:
        hi_pts = _inset(np.asarray(to_hi(_POLYGONS[name])), _HALF_PIXEL)
        draw.polygon([tuple(p) for p in hi_pts.tolist()], fill=255)
    cover = _box_sum(np.asarray(img), s, np.uint16)  # (size, size), 0 .. 255 * s * s
    return cover.astype(np.float32) * np.float32(1.0 / (255.0 * s * s))


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample coordinates (x right, y down), read-only.

    Returns ``(xs, ys, xt, yt)``: pixel centres, each ``(size, size)``, and the
    texture sub-sample points, each ``(size * t, size * t)`` with
    ``t = TEXTURE_SUPERSAMPLE``.
    """
    c = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(c, c, indexing="ij")
    t = TEXTURE_SUPERSAMPLE
    ct = (np.arange(size * t, dtype=np.float32) + 0.5) / t
    yt, xt = np.meshgrid(ct, ct, indexing="ij")
    out = (xs, ys, xt, yt)
    for a in out:
        a.setflags(write=False)
    return out


def _texture_factor(f: Factors, size: int, cx: float, cy: float) -> np.ndarray:
    """Multiplicative value factor of the texture, ``(size, size)`` float32.

    1.0 on the light part of the pattern, :data:`TEXTURE_DARK` on the dark part,
    averaged over 2x2 sub-samples per pixel. The pattern is anchored at the
    object centre and turns with ``rotation``.
    """
    name = TEXTURES[f.texture]
    if name == "solid":
        return np.ones((size, size), dtype=np.float32)
    _, _, xt, yt = _grids(size)
    p = TEXTURE_PERIOD_FRAC * size
    th = math.radians(f.rotation)
    c, sn = math.cos(th), math.sin(th)
    dx = xt - np.float32(cx)
    dy = np.float32(cy) - yt  # y up
    # image offset -> object frame (inverse rotation), in periods
    u = (dx * np.float32(c) + dy * np.float32(sn)) * np.float32(1.0 / p)
    v = (dy * np.float32(c) - dx * np.float32(sn)) * np.float32(1.0 / p)
    if name == "stripes":
        dark = (u - np.floor(u)) < 0.5
    elif name == "dots":
        fu = u - np.floor(u) - 0.5
        fv = v - np.floor(v) - 0.5
        dark = fu * fu + fv * fv < 0.3**2
    elif name == "checker":
        dark = (np.floor(2.0 * u) + np.floor(2.0 * v)) % 2 == 0
    else:  # pragma: no cover - guarded by _validate
        raise ValueError(name)
    t = TEXTURE_SUPERSAMPLE
    frac_dark = _box_sum(dark.view(np.uint8), t, np.uint8).astype(np.float32) * np.float32(1.0 / (t * t))
    return np.float32(1.0) - np.float32(1.0 - TEXTURE_DARK) * frac_dark


def render(f: Factors, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one image.

    Args:
        f: the generative factors.
        size: side length in pixels (>= 8).
        rng: if given, Gaussian pixel noise (sigma :data:`NOISE_SIGMA` in [0, 1]
            units) is drawn from it; if ``None`` the image is noise-free.

    Returns:
        ``(size, size, 3)`` uint8 RGB array.
    """
    _validate(f, size)
    cx, cy, r = _placement(f, size)
    mask = shape_mask(f, size)  # (size, size)

    xs, ys, _, _ = _grids(size)
    phi = math.radians(f.light)
    proj = ((xs - np.float32(cx)) * np.float32(math.cos(phi)) + (np.float32(cy) - ys) * np.float32(math.sin(phi))) * np.float32(
        1.0 / r
    )
    np.clip(proj, -1.0, 1.0, out=proj)
    mid, half = (SHADE_MAX + SHADE_MIN) / 2.0, (SHADE_MAX - SHADE_MIN) / 2.0
    shade = np.float32(mid) + np.float32(half) * proj  # (size, size), 0.7 .. 1.15

    value = shade * _texture_factor(f, size, cx, cy)  # (size, size)
    base = np.asarray(colorsys.hsv_to_rgb(f.hue, SATURATION, VALUE), dtype=np.float32)  # (3,)
    obj = np.clip(value[:, :, None] * base, 0.0, 1.0)  # (size, size, 3)

    m = mask[:, :, None]
    img = np.float32(f.background) * (np.float32(1.0) - m) + obj * m
    if rng is not None:
        img = img + rng.normal(0.0, NOISE_SIGMA, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def render_on_colour(f: Factors, background_rgb: Sequence[float], size: int = 64,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """The image of :func:`render` with its background replaced by one RGB colour (each
    channel in [0, 1]) instead of a grey level: the same objects on backgrounds the training
    data never shows, for testing a model off its training distribution.

    Returns:
        ``(size, size, 3)`` uint8 RGB array.
    """
    img = render(f, size, None).astype(np.float32) / np.float32(255.0)
    m = shape_mask(f, size)[:, :, None]
    img = img * m + np.asarray(background_rgb, dtype=np.float32)[None, None, :] * (np.float32(1.0) - m)
    if rng is not None:
        img = img + rng.normal(0.0, NOISE_SIGMA, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


# --------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------

# (image id, relative path, factors)
_Job = tuple[int, str, Factors]


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """Per-image noise generator, a function of ``(seed, image_id)`` only.

    The trailing ``1`` keeps it from coinciding with ``default_rng(seed)``
    (``SeedSequence`` pads entropy with zeros), which draws the factors.
    """
    return np.random.default_rng([seed, image_id, 1])


def _render_chunk(args: tuple[str, int, int, Sequence[_Job]]) -> int:
    """Render and write a chunk of images; returns how many were written."""
    root, size, seed, jobs = args
    for image_id, rel, f in jobs:
        arr = render(f, size=size, rng=image_rng(seed, image_id))
        Image.fromarray(arr).save(os.path.join(root, rel), format="PNG", compress_level=6)
    return len(jobs)


def _chunks(jobs: Sequence[_Job], chunk: int) -> Iterable[Sequence[_Job]]:
    for i in range(0, len(jobs), chunk):
        yield jobs[i : i + chunk]


def _format_row(rel: str, split: str, f: Factors) -> list[str]:
    vals = astuple(f)
    row = [rel, split, SHAPES[f.shape]]
    for name, v in zip(FACTOR_NAMES, vals):
        row.append(str(v) if name in CATEGORICAL_FACTORS else f"{v:.6f}")
    return row


def render_dataset(
    out_dir: str | Path,
    n_train: int = 16000,
    n_test: int = 4000,
    size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Render an image-folder data set plus its ground-truth factors.

    Layout::

        out_dir/train/<shape name>/<id:06d>.png   ids 0 .. n_train-1
        out_dir/test/<shape name>/<id:06d>.png    ids n_train .. n_train+n_test-1
        out_dir/factors.csv                       one row per image, in id order

    ``factors.csv`` has the columns :data:`CSV_COLUMNS`: ``path`` relative to
    ``out_dir`` with forward slashes, ``split``, ``label`` (shape name), the
    categorical factors as ints and the continuous ones with 6 decimals (which
    is exact, see :func:`sample_factors`). All 10 shape folders are created in
    both splits, even if a tiny data set leaves some empty.

    Determinism: the factors are ``sample_factors(np.random.default_rng(seed),
    n_train + n_test)`` (first ``n_train`` for train, rest for test) and the
    noise of image ``i`` comes from :func:`image_rng` ``(seed, i)``, so the
    output is byte-identical for any ``workers``.

    Atomicity: everything is written to a hidden temporary sibling of
    ``out_dir`` which is renamed into place only when complete; an existing
    ``out_dir`` is replaced only then. On error the temporary tree is removed.

    Args:
        out_dir: destination directory.
        n_train, n_test: number of images per split (>= 0).
        size: image side in pixels.
        seed: non-negative integer seed.
        workers: worker processes (default ``os.cpu_count()``); ``1`` renders in
            this process.
        progress: show a tqdm progress bar.

    Returns:
        ``Path(out_dir)``.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_total = n_train + n_test
    factors = sample_factors(np.random.default_rng(seed), n_total)

    jobs: list[_Job] = []
    rows: list[list[str]] = []
    for i, f in enumerate(factors):
        split = "train" if i < n_train else "test"
        rel = f"{split}/{SHAPES[f.shape]}/{i:06d}.png"
        jobs.append((i, rel, f))
        rows.append(_format_row(rel, split, f))

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        for split in ("train", "test"):
            for name in SHAPES:
                (tmp / split / name).mkdir(parents=True, exist_ok=True)

        from tqdm import tqdm

        chunk = max(1, min(256, math.ceil(n_total / (workers * 8)))) if n_total else 1
        tasks = [(str(tmp), size, seed, c) for c in _chunks(jobs, chunk)]
        with tqdm(total=n_total, unit="img", desc="render", disable=not progress) as bar:
            if workers == 1 or len(tasks) <= 1:
                for t in tasks:
                    bar.update(_render_chunk(t))
            else:
                import multiprocessing as mp

                with mp.get_context().Pool(min(workers, len(tasks))) as pool:
                    for done in pool.imap_unordered(_render_chunk, tasks):
                        bar.update(done)

        with open(tmp / "factors.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(CSV_COLUMNS)
            w.writerows(rows)
        (tmp / "factors.json").write_text(json.dumps({"factors": FACTOR_TYPES}, indent=1) + "\n")

        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous tree back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
