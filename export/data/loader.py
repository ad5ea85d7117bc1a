"""Generic image-folder loader: any tree of class subfolders, RGB or grayscale, any size >= 28 px.

Layouts accepted:
- ``root/train/<class>/*`` and ``root/test/<class>/*`` (explicit split), or
- ``root/<class>/*`` (split deterministically by a hash of each file's path).

An optional ``root/factors.csv`` (column ``path`` relative to root, other columns
numeric or text) attaches generative factors to images. Nothing here knows the demo data.
Images go through :func:`handlers.runtime.imaging.to_pixels`, the serving code path.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from handlers.runtime.imaging import InputSpec, to_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MIN_SIZE = 28


@dataclass
class ImageDataset:
    """Images of one split, already preprocessed to the model's input size.

    pixels: uint8 (N, H, W, C); labels: int64 (N,); paths: N paths relative to the root;
    factors: factor name -> (N,) array (float64 for numeric columns, str otherwise), or None.
    """

    pixels: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    paths: list[str]
    factors: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "ImageDataset":
        """The images at integer positions ``idx`` (factors included), in that order."""
        factors = None if self.factors is None else {k: v[idx] for k, v in self.factors.items()}
        return ImageDataset(self.pixels[idx], self.labels[idx], self.classes, [self.paths[i] for i in idx], factors)


def _split_of(rel: str, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def scan_image_folder(root: str | Path, test_fraction: float = 0.2) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
    """Find classes and files. Returns ``(classes, {"train": [(rel_path, label)], "test": [...]})``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    explicit = (root / "train").is_dir()
    base = root / "train" if explicit else root
    classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        raise ValueError(f"{base} needs at least two class subfolders, found {list(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    split_dirs = [("train", root / "train"), ("test", root / "test")] if explicit else [(None, root)]
    for split, folder in split_dirs:
        if not folder.is_dir():
            continue
        for cdir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if cdir.name not in index:
                raise ValueError(f"class folder {cdir} is not among the training classes {list(classes)}")
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    rel = f.relative_to(root).as_posix()
                    splits[split or _split_of(rel, test_fraction)].append((rel, index[cdir.name]))
    if not splits["train"]:
        raise ValueError(f"no training images found under {root}")
    return classes, splits


def read_factors(root: str | Path) -> dict[str, dict[str, str]] | None:
    """``factors.csv`` as {relative path: {column: text}}, or None when absent."""
    path = Path(root) / "factors.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{path} needs a 'path' column")
        return {row["path"]: row for row in reader}


def read_factor_kinds(root: str | Path) -> dict[str, dict] | None:
    """The factors' kinds (``factors.json``: type, levels, period), or None without the file."""
    import json
    path = Path(root) / "factors.json"
    return json.loads(path.read_text())["factors"] if path.is_file() else None


def _factor_arrays(rows: list[dict[str, str] | None]) -> dict[str, np.ndarray]:
    names = [k for k in next((r for r in rows if r), {}) if k not in ("path", "split", "label")]
    out: dict[str, np.ndarray] = {}
    for name in names:
        texts = [(r or {}).get(name, "") for r in rows]
        try:
            out[name] = np.array([float(t) if t != "" else np.nan for t in texts], dtype=np.float64)
        except ValueError:
            out[name] = np.array(texts, dtype=str)
    return out


def infer_input_spec(root: str | Path, size: int | None = None, channels: int | None = None,
                     sample: int = 512) -> InputSpec:
    """Input spec from the data: size of the first image (or ``size``), channels (1 if all
    sampled images are grayscale), and per-channel mean and std over a sample of train images."""
    root = Path(root)
    _, splits = scan_image_folder(root)
    files = splits["train"]
    rng = np.random.default_rng(0)
    picks = [files[i] for i in rng.choice(len(files), size=min(sample, len(files)), replace=False)]
    w = h = 0
    for rel, _ in picks:
        try:
            with Image.open(root / rel) as im:
                w, h = im.size
            break
        except (OSError, UnidentifiedImageError, SyntaxError):
            continue
    if size is not None:
        w = h = int(size)
    if min(w, h) < MIN_SIZE:
        raise ValueError(f"images must be at least {MIN_SIZE} px; {picks[0][0]} is {w}x{h}")
    if channels is None:
        gray = True
        for rel, _ in picks[:64]:
            try:
                with Image.open(root / rel) as im:
                    gray &= im.mode in ("L", "I;16", "I", "F", "1", "LA")
            except (OSError, UnidentifiedImageError, SyntaxError):
                continue
        channels = 1 if gray else 3
    probe = InputSpec(h, w, channels, (0.0,) * channels, (1.0,) * channels)
    arrays = []
    for rel, _ in picks:
        try:
            with Image.open(root / rel) as im:
                arrays.append(to_pixels(im, probe))
        except (OSError, UnidentifiedImageError, SyntaxError):
            continue  # unreadable: load_image_folder counts it
    if not arrays:
        raise ValueError(f"no readable training image under {root}")
    pix = np.stack(arrays).astype(np.float64) / 255
    mean = tuple(round(float(v), 4) for v in pix.mean(axis=(0, 1, 2)))
    std = tuple(round(max(float(v), 1e-3), 4) for v in pix.std(axis=(0, 1, 2)))
    return InputSpec(h, w, channels, mean, std)


def load_image_folder(root: str | Path, spec: InputSpec, split: str = "train",
                      test_fraction: float = 0.2, limit: int | None = None,
                      progress: bool = True) -> ImageDataset:
    """Load one split, resized to ``spec``. ``limit`` keeps an evenly spaced subset."""
    root = Path(root)
    classes, splits = scan_image_folder(root, test_fraction)
    files = splits[split]
    if not files:
        raise ValueError(f"split {split!r} of {root} is empty")
    if limit is not None and limit < len(files):
        idx = np.linspace(0, len(files) - 1, limit).round().astype(int)
        files = [files[i] for i in idx]
    pixels = np.empty((len(files), spec.height, spec.width, spec.channels), dtype=np.uint8)
    kept: list[tuple[str, int]] = []
    skipped: list[str] = []
    for rel, label in tqdm(files, desc=f"load {split}", disable=not progress, unit="img"):
        try:
            with Image.open(root / rel) as im:
                if min(im.size) < MIN_SIZE:
                    raise ValueError(f"{rel} is {im.size[0]}x{im.size[1]}; images must be at least {MIN_SIZE} px")
                pixels[len(kept)] = to_pixels(im, spec)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as exc:
            skipped.append(f"{rel} ({type(exc).__name__})")  # unreadable: counted, the build goes on
            continue
        kept.append((rel, label))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) of the {split} split, e.g. {skipped[0]}")
    if not kept:
        raise ValueError(f"no readable image in split {split!r} of {root}")
    files = kept
    pixels = pixels[:len(kept)]
    labels = np.array([lab for _, lab in files], dtype=np.int64)
    table = read_factors(root)
    factors = _factor_arrays([table.get(rel) for rel, _ in files]) if table else None
    return ImageDataset(pixels, labels, classes, [rel for rel, _ in files], factors)
