"""A small set of real images for checks: scikit-learn's handwritten digits as an image folder.

scikit-learn ships, inside its wheel, 1,797 scans of handwritten digits (UCI "Optical
Recognition of Handwritten Digits": 8x8 blocks counting dark pixels, 0..16, written by 43
people). They are real scans, not rendered by this project, so the offline pipeline can be
tried on data it did not generate without downloading anything. The 8x8 grids are scaled
to ``size`` px (bicubic) and written as grayscale PNGs in the layout the loader reads::

    out/train/<digit>/<n>.png, out/test/<digit>/<n>.png
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = tuple(str(d) for d in range(10))


def digits_arrays(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 images (1797, size, size) in 0..255 (ink bright) and labels (1797,)."""
    from sklearn.datasets import load_digits  # scikit-learn is a dev/test dependency only
    d = load_digits()
    grids = (np.asarray(d.images, dtype=np.float64) / 16.0 * 255.0).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(g, mode="L").resize((size, size), Image.Resampling.BICUBIC))
                       for g in grids])
    return images, np.asarray(d.target, dtype=np.int64)


def write_digits_folder(out: str | Path, size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> Path:
    """Write the digits as an image folder with a fixed train/test split (stratified by class,
    shuffled with ``seed``). Rewrites nothing when ``out`` already holds the same split."""
    out = Path(out)
    marker = out / ".digits"
    stamp = f"size={size} test_fraction={test_fraction} seed={seed}\n"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    images, labels = digits_arrays(size)
    rng = np.random.default_rng(seed)
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        for split, part in (("test", idx[:n_test]), ("train", idx[n_test:])):
            folder = out / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    marker.write_text(stamp)
    return out
