"""The concept atlas at build time: for each concept, the training images where it fires most.

For every concept of a layer (pooled value = the code map's spatial max) the ``columns``
training images with the highest value become a strip of thumbnails, each a crop of the
input centred on the code map's peak cell; where a concept's lowest state is not "absent"
(its typical value is above :data:`LOW_STRIP_SHARE` of the top state's) a second strip shows
its lowest images the same way. The crop size is the layer's *effective* receptive field,
measured rather than derived from the architecture: the gradient of one code-map cell (all
concepts summed) with respect to the input, averaged in magnitude over a few training
images, and the smallest window centred on the cell that holds :data:`RF_MASS` of it
(:func:`receptive_field`). A theoretical receptive field of a deep layer covers the whole
image; the effective one is where the cell actually looks.

The strips of a layer are rows of one PNG sprite (``atlas_<layer>.png``); the index
(:class:`handlers.runtime.atlas.LayerAtlas`) goes into ``concepts.json``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from export.concepts import capture
from export.data.loader import ImageDataset
from export.device import device_of
from handlers.runtime.atlas import LayerAtlas, Strip
from handlers.runtime.imaging import InputSpec, normalize

RF_MASS = 0.9  # share of the input-gradient mass the crop holds
RF_IMAGES = 16  # training images the gradient is averaged over
LOW_STRIP_SHARE = 0.1  # a lowest state whose typical value is above this share of the top one is not "absent"
THUMB = 48  # thumbnail side in pixels, whatever the input size
COLUMNS = 8  # images per strip


def receptive_field(model: nn.Module, encoder: nn.Module, layer: str, x: torch.Tensor,
                    mass: float = RF_MASS) -> tuple[tuple[int, int], tuple[float, float]]:
    """The effective receptive field of a concept code-map cell, in input pixels.

    x: normalised inputs (B, C, H, W). The gradient of the centre cell of the code map
    (``encoder`` applied to ``layer``'s output, every concept summed) with respect to the
    input, |.| summed over channels and averaged over the batch, gives a map (H, W); the crop
    is the smallest window centred on the cell's centre, grown half a pixel per side at a time
    in each axis separately, whose rows (columns) hold ``mass`` of the map's row (column)
    marginal. Returns ((crop_h, crop_w), (stride_h, stride_w)): the crop is at least two
    cells and at most the image (two cells where the gradient is zero everywhere, as for an
    untrained model's silent encoder); stride = input pixels per code-map cell."""
    was_training = model.training
    model.eval()
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        _, acts = capture(model, [layer], x)
        z = encoder(acts[layer])
        h, w = int(z.shape[2]), int(z.shape[3])
        z[:, :, h // 2, w // 2].sum().backward()
    model.zero_grad(set_to_none=True)
    encoder.zero_grad(set_to_none=True)
    model.train(was_training)
    assert x.grad is not None
    g = x.grad.abs().sum(dim=1).mean(dim=0).cpu().numpy().astype(np.float64)  # (H, W)
    H, W = g.shape
    stride = (H / h, W / w)
    centre = ((h // 2 + 0.5) * stride[0], (w // 2 + 0.5) * stride[1])
    sizes = []
    for marginal, c, n, s in ((g.sum(axis=1), centre[0], H, stride[0]), (g.sum(axis=0), centre[1], W, stride[1])):
        total = marginal.sum()
        size = int(round(2 * s))  # no gradient at all (a silent encoder): two cells
        if total > 0:
            size = n
            for r in np.arange(0.5, n + 0.5, 0.5):
                lo, hi = int(np.floor(c - r)), int(np.ceil(c + r))
                if marginal[max(lo, 0):min(hi, n)].sum() >= mass * total:
                    size = hi - lo
                    break
        sizes.append(int(min(n, max(size, round(2 * s)))))
    return (sizes[0], sizes[1]), stride


def crop_box(peak: int, map_shape: tuple[int, int], image_shape: tuple[int, int], crop: tuple[int, int]
             ) -> tuple[int, int, int, int]:
    """The crop (left, top, right, bottom) in input pixels around code-map cell ``peak`` (flat
    index into ``map_shape``), of size ``crop`` (h, w), shifted to lie inside the image."""
    h, w = map_shape
    H, W = image_shape
    i, j = divmod(int(peak), w)
    cy, cx = (i + 0.5) * H / h, (j + 0.5) * W / w
    ch, cw = min(crop[0], H), min(crop[1], W)
    top = int(round(min(max(cy - ch / 2, 0), H - ch)))
    left = int(round(min(max(cx - cw / 2, 0), W - cw)))
    return left, top, left + cw, top + ch


def thumbnail(pixels: np.ndarray, box: tuple[int, int, int, int], thumb: int = THUMB) -> np.ndarray:
    """The crop ``box`` of uint8 (H, W, C) pixels resized to (thumb, thumb, 3): box filter when
    shrinking, nearest when enlarging (a small input stays crisp instead of blurred)."""
    img = Image.fromarray(pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0]).convert("RGB").crop(box)
    resample = Image.Resampling.BOX if max(img.size) >= thumb else Image.Resampling.NEAREST
    return np.asarray(img.resize((thumb, thumb), resample))


def strip_order(values: np.ndarray, columns: int, lowest: bool = False) -> np.ndarray:
    """Indices of the strip's images: the ``columns`` highest values among those above zero
    (ties: the earlier image first), or with ``lowest`` the ``columns`` lowest values.
    values: (N,). Returns (n,), n <= columns."""
    if lowest:
        return np.argsort(values, kind="stable")[:columns]
    order = np.argsort(-values, kind="stable")
    return order[values[order] > 0][:columns]


def layer_atlas(layer: str, values: np.ndarray, peaks: np.ndarray, map_shape: tuple[int, int],
                typical: np.ndarray, ds: ImageDataset, crop: tuple[int, int], stride: tuple[float, float],
                out: Path, columns: int = COLUMNS, thumb: int = THUMB) -> LayerAtlas:
    """Build one layer's strips and write its sprite ``atlas_<layer>.png`` into ``out``.

    values, peaks: (N, K) pooled values and peak cells of ``ds``'s images; typical (K, S):
    each state's typical value (decides whether a low strip is shown)."""
    k = values.shape[1]
    strips: list[tuple[str, int, np.ndarray]] = []
    for c in range(k):
        idx = strip_order(values[:, c], columns)
        if idx.size:
            strips.append(("top", c, idx))
    for c in range(k):
        if typical[c, -1] > 0 and typical[c, 0] > LOW_STRIP_SHARE * typical[c, -1]:
            strips.append(("low", c, strip_order(values[:, c], columns, lowest=True)))
    sprite = np.full((max(len(strips), 1) * thumb, columns * thumb, 3), 255, dtype=np.uint8)
    top: list[Strip | None] = [None] * k
    low: list[Strip | None] = [None] * k
    image_shape = ds.pixels.shape[1:3]
    for row, (kind, c, idx) in enumerate(strips):
        for col, i in enumerate(idx):
            box = crop_box(int(peaks[i, c]), map_shape, image_shape, crop)
            sprite[row * thumb:(row + 1) * thumb, col * thumb:(col + 1) * thumb] = thumbnail(ds.pixels[i], box, thumb)
        strip = Strip(row, tuple(ds.paths[i] for i in idx), tuple(float(values[i, c]) for i in idx))
        (top if kind == "top" else low)[c] = strip
    name = f"atlas_{layer}.png"
    Image.fromarray(sprite).save(out / name, format="PNG", optimize=True)
    return LayerAtlas(name, thumb, columns, tuple(top), tuple(low), crop, stride)


def build_atlas(model: nn.Module, encoders: dict[str, nn.Module], ds: ImageDataset, spec: InputSpec,
                values: dict[str, np.ndarray], peaks: dict[str, np.ndarray], map_shapes: dict[str, tuple[int, int]],
                typical: dict[str, np.ndarray], out: Path, columns: int = COLUMNS, thumb: int = THUMB
                ) -> dict[str, LayerAtlas]:
    """Every layer's atlas (sprites written into ``out``): layer -> index. ``encoders``: layer ->
    the concept encoder (activations -> codes); values, peaks: of ``ds``'s images, per layer."""
    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(len(ds))[:RF_IMAGES])
    x = torch.from_numpy(normalize(ds.pixels[pick], spec)).to(device_of(model))
    atlases = {}
    for layer, enc in encoders.items():
        crop, stride = receptive_field(model, enc, layer, x)
        atlases[layer] = layer_atlas(layer, values[layer], peaks[layer], map_shapes[layer], typical[layer], ds,
                                     crop, stride, out, columns, thumb)
    return atlases


def write_atlas(bundle_dir: Path, out: Path) -> Path:
    """A bundle's atlas as files a person opens: per concept ``<layer>_c<k>_top.png`` (and
    ``_low.png``), and ``index.html`` listing every concept with its name, strips and images.
    Returns the index. Raises :class:`handlers.runtime.errors.ArtifactError` for a bundle
    without concepts or without an atlas."""
    import html

    from handlers.runtime.atlas import cut_strip, decode_sprite, encode_strip
    from handlers.runtime.bundle import load_bundle
    from handlers.runtime.concepts import ConceptSpec
    from handlers.runtime.errors import ArtifactError
    bundle = load_bundle(bundle_dir)
    if "concepts" not in bundle.metadata.extra:
        raise ArtifactError(f"bundle {bundle_dir} has no concepts, so no atlas")
    spec = ConceptSpec.from_file(bundle.path(bundle.metadata.extra["concepts"]))
    if all(l.atlas is None for l in spec.layers):
        raise ArtifactError(f"bundle {bundle_dir} was built without a concept atlas; rebuild its concepts")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for layer in spec.layers:
        if layer.atlas is None:
            continue
        sprite = decode_sprite(bundle.path(layer.atlas.file).read_bytes(), layer.atlas)
        for c in range(layer.k):
            name = layer.names[c] or f"{layer.layer}/c{c}"
            cells = []
            for kind, strip in (("top", layer.atlas.top[c]), ("low", layer.atlas.low[c])):
                if strip is None:
                    continue
                file = f"{layer.layer}_c{c}_{kind}.png"
                (out / file).write_bytes(encode_strip(cut_strip(sprite, layer.atlas, strip)))
                words = "fires most" if kind == "top" else "is lowest"
                cells.append(f'<div>{words}: <img src="{file}" alt="{layer.layer}/c{c} {kind}" '
                             f'title="{html.escape(", ".join(strip.images))}"></div>')
            rows.append(f'<tr><td>{layer.layer}/c{c}</td><td>{html.escape(name)}</td>'
                        f'<td>{"".join(cells) or "never fires on a training image"}</td></tr>')
    index = out / "index.html"
    index.write_text('<!doctype html><meta charset="utf-8"><title>Concept atlas</title>'
                     '<style>body{font:14px system-ui,sans-serif}td{padding:4px 8px;border-bottom:1px solid #ddd}'
                     'img{height:48px;image-rendering:pixelated}</style>'
                     f'<h1>Concept atlas of {html.escape(bundle.metadata.name)}</h1>'
                     '<table><tr><th>concept</th><th>name</th><th>training images</th></tr>'
                     + "".join(rows) + "</table>\n")
    return index
