"""Concept heatmaps: a concept's code map upsampled to the input, as an overlay palette PNG's
levels or blended over the input (numpy only)."""
from __future__ import annotations

import functools

import numpy as np

_ANCHORS = np.array([[0.0, 0.0, 0.5], [0.0, 0.4, 1.0], [0.0, 0.9, 0.9], [0.6, 1.0, 0.3],
                     [1.0, 0.8, 0.0], [1.0, 0.2, 0.0], [0.6, 0.0, 0.0]])


def colormap(v: np.ndarray) -> np.ndarray:
    """Blue-to-red colour map: values in [0, 1] (any shape) -> RGB floats (..., 3)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return _ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t


@functools.lru_cache(maxsize=64)
def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) 1-D bilinear interpolation weights, align-corners=False, edges clamped."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = pos - i0
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), i0), 1 - frac)
    np.add.at(weights, (np.arange(n_out), i1), frac)
    weights.flags.writeable = False
    return weights


def upsample(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one map (h, w) -> (height, width), align-corners=False.

    Bilinear interpolation is separable: rows then columns, as two small matrix products
    (much faster than gathering the four neighbours of every output cell)."""
    h, w = m.shape
    return _bilinear_weights(h, height) @ np.asarray(m, dtype=np.float64) @ _bilinear_weights(w, width).T


def _scaled_map(code_map: np.ndarray, scale: float, height: int, width: int) -> np.ndarray:
    """A code map (h, w) upsampled to (height, width), divided by ``scale`` and clipped to
    [0, 1]; non-finite cells count as inactive (through the matrix products of
    :func:`upsample` one would spread over the whole map)."""
    finite = np.nan_to_num(np.asarray(code_map, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(upsample(finite, height, width) / max(scale, 1e-8), 0.0, 1.0)


HEATMAP_LEVELS = 64
HEATMAP_MAX_OPACITY = 0.75


def heatmap_palette(levels: int = HEATMAP_LEVELS, max_opacity: float = HEATMAP_MAX_OPACITY) -> tuple[np.ndarray, np.ndarray]:
    """The overlay heatmap's palette: uint8 colours (levels, 3) of :func:`colormap` and
    uint8 opacities (levels,) rising linearly from 0 (inactive: the input shows through)."""
    v = np.linspace(0.0, 1.0, levels)
    return ((colormap(v) * 255).round().astype(np.uint8),
            (v * max_opacity * 255).round().astype(np.uint8))


def heatmap_levels(code_map: np.ndarray, scale: float, height: int, width: int,
                   levels: int = HEATMAP_LEVELS) -> np.ndarray:
    """The concept's code map (h, w) >= 0, upsampled to (height, width), divided by ``scale``
    (the concept's top typical value, so maps compare across images), clipped to [0, 1] and
    quantised to palette indices uint8 (height, width) in 0..levels-1.

    In float32, scaled before the upsampling (both are linear) and rounded in place, which
    is faster than float64 at 224 px; a cell can differ by one level from the float64 result
    only within float32 rounding of a level boundary."""
    finite = np.nan_to_num(np.asarray(code_map, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    rows = _bilinear_weights(finite.shape[0], height).astype(np.float32)
    cols = _bilinear_weights(finite.shape[1], width).astype(np.float32)
    up = rows @ (finite * np.float32((levels - 1) / max(scale, 1e-8))) @ cols.T
    np.clip(up, 0.0, levels - 1, out=up)
    return np.rint(up, out=up).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, code_map: np.ndarray, scale: float, alpha: float = 0.55) -> np.ndarray:
    """The concept's code map, upsampled to the image and blended over it.

    image uint8 (H, W, C); code_map (h, w) >= 0; ``scale`` maps code values to [0, 1]
    (use the concept's top typical value so maps are comparable across images).
    Returns uint8 (H, W, 3).
    """
    h, w = image.shape[:2]
    base = image.astype(np.float64) / 255.0
    if base.shape[2] == 1:
        base = np.repeat(base, 3, axis=2)
    heat = colormap(_scaled_map(code_map, scale, h, w))
    return np.clip((1 - alpha) * base + alpha * heat, 0, 1).__mul__(255).round().astype(np.uint8)
