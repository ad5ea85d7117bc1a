"""The concept atlas: receptive fields against analytic ones, crops, strips, the sprite and its index."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from export.atlas import crop_box, layer_atlas, receptive_field, strip_order, thumbnail
from export.data.loader import ImageDataset
from handlers.runtime.atlas import AtlasStrips, LayerAtlas, Strip, cut_strip, decode_sprite, encode_strip
from handlers.runtime.errors import ArtifactError


class _Net(nn.Module):
    """One linear conv named ``conv`` (all-ones kernel) and a head, so the receptive field is known."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel, stride=stride, padding=kernel // 2, bias=False)
        nn.init.ones_(self.conv.weight)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_receptive_field_of_a_5x5_conv_is_5_pixels():
    # the centre cell's input gradient is uniform over its 5x5 window: 3 rows hold 60 %, 5 rows 100 %
    net = _Net(5, 1)
    crop, stride = receptive_field(net, nn.Identity(), "conv", torch.randn(4, 3, 16, 16))
    assert crop == (5, 5) and stride == (1.0, 1.0)
    crop, _ = receptive_field(net, nn.Identity(), "conv", torch.randn(4, 3, 16, 16), mass=0.5)
    assert crop == (3, 3)  # 3 rows hold 60 % >= 50 %; 1 row holds 20 %
    assert all(p.grad is None for p in net.parameters())  # no gradients left behind


def test_receptive_field_of_a_strided_conv_and_its_floor():
    # a 3x3 conv of stride 2 sees 3 input pixels; the window centred on the cell's centre needs 4
    crop, stride = receptive_field(_Net(3, 2), nn.Identity(), "conv", torch.randn(2, 3, 16, 16))
    assert stride == (2.0, 2.0) and crop == (4, 4)
    # a 1x1 conv sees one pixel, but a crop is at least two cells
    crop, stride = receptive_field(_Net(1, 2), nn.Identity(), "conv", torch.randn(2, 3, 16, 16))
    assert crop == (4, 4)


def test_receptive_field_without_gradient_is_two_cells():
    # a silent encoder (all-zero weights) has no input gradient: two cells, not the whole image
    silent = nn.Conv2d(2, 2, 1)
    nn.init.zeros_(silent.weight)
    nn.init.zeros_(silent.bias)
    crop, stride = receptive_field(_Net(3, 2), silent, "conv", torch.randn(2, 3, 32, 32))
    assert stride == (2.0, 2.0) and crop == (4, 4)


def test_crop_box_centres_on_the_peak_and_stays_inside():
    # map 4x4 over a 32x32 image: cell (1, 2) is centred at (12, 20)
    assert crop_box(1 * 4 + 2, (4, 4), (32, 32), (8, 8)) == (16, 8, 24, 16)
    # a corner cell: the 16-pixel crop is shifted inside, keeping its size
    assert crop_box(0, (4, 4), (32, 32), (16, 16)) == (0, 0, 16, 16)
    assert crop_box(15, (4, 4), (32, 32), (16, 16)) == (16, 16, 32, 32)
    # a crop larger than the image is the image
    assert crop_box(5, (4, 4), (32, 32), (64, 40)) == (0, 0, 32, 32)


def test_strip_order():
    v = np.array([0.0, 2.0, 1.0, 2.0, -1.0, 0.5])
    assert strip_order(v, 3).tolist() == [1, 3, 2]  # highest first, ties: earlier image first
    assert strip_order(v, 10).tolist() == [1, 3, 2, 5]  # never an image where it does not fire
    assert strip_order(v, 2, lowest=True).tolist() == [4, 0]
    assert strip_order(np.zeros(4), 3).size == 0


def test_thumbnail_sizes():
    px = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert thumbnail(px, (0, 0, 32, 32), 48).shape == (48, 48, 3)
    small = thumbnail(px, (4, 4, 12, 12), 48)  # enlarged: nearest keeps each pixel a 6x6 block
    assert np.array_equal(small[:6, :6], np.broadcast_to(px[4, 4], (6, 6, 3)))
    gray = thumbnail(px[..., :1], (0, 0, 32, 32), 16)
    assert gray.shape == (16, 16, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def _dataset(n: int = 12, size: int = 32) -> ImageDataset:
    rng = np.random.default_rng(1)
    return ImageDataset(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.zeros(n, dtype=np.int64),
                        ("a",), [f"train/a/{i:03d}.png" for i in range(n)])


def test_layer_atlas_sprite_and_index(tmp_path):
    ds = _dataset()
    rng = np.random.default_rng(2)
    values = np.stack([rng.random(12) + 0.5,  # concept 0: always on, lowest state not "absent"
                       np.where(np.arange(12) < 3, rng.random(12) + 1, 0.0),  # concept 1: fires on 3 images
                       np.zeros(12)], axis=1)  # concept 2: never fires
    peaks = rng.integers(0, 16, (12, 3)).astype(np.int32)
    typical = np.array([[0.6, 1.0, 1.4], [0.0, 0.0, 1.5], [0.0, 0.0, 0.0]])
    atlas = layer_atlas("layer1", values, peaks, (4, 4), typical, ds, (16, 16), (8.0, 8.0), tmp_path,
                        columns=4, thumb=20)
    assert atlas.top[2] is None and atlas.low[1] is None and atlas.low[2] is None
    assert atlas.top[0] is not None and atlas.low[0] is not None and atlas.top[1] is not None
    assert len(atlas.top[1].images) == 3  # only where it fires
    order = np.argsort(-values[:, 0], kind="stable")[:4]
    assert atlas.top[0].images == tuple(ds.paths[i] for i in order)
    assert atlas.top[0].values == tuple(float(values[i, 0]) for i in order)
    assert atlas.low[0].images == tuple(ds.paths[i] for i in np.argsort(values[:, 0], kind="stable")[:4])
    sprite = decode_sprite((tmp_path / atlas.file).read_bytes(), atlas)
    assert sprite.shape == (3 * 20, 4 * 20, 3)  # rows: two top strips, one low strip
    strip = cut_strip(sprite, atlas, atlas.top[0])
    for col, i in enumerate(order):  # every thumbnail is the crop around that image's peak
        box = crop_box(int(peaks[i, 0]), (4, 4), (32, 32), (16, 16))
        assert np.array_equal(strip[:, col * 20:(col + 1) * 20], thumbnail(ds.pixels[i], box, 20))
    # the index round-trips through JSON, and the strips cut at load equal the sprite's rows
    back = LayerAtlas.from_json(json.loads(json.dumps(atlas.to_json())), 3)
    assert back is not None and back.top[1] == Strip(atlas.top[1].row, atlas.top[1].images,
                                                     tuple(round(v, 5) for v in atlas.top[1].values))
    strips = AtlasStrips({"layer1": (back, sprite)})
    got = strips.get("layer1", 1)
    assert got is not None and got.low_png is None and got.top_images == list(atlas.top[1].images)
    assert got.thumb == 20 and got.crop_px == list(atlas.crop)
    img = np.asarray(Image.open(io.BytesIO(got.top_png)).convert("RGB"))
    assert img.shape == (20, 3 * 20, 3) and np.array_equal(img, cut_strip(sprite, atlas, atlas.top[1]))
    low = strips.get("layer1", 0)
    assert low is not None and low.low_png is not None and low.low_images == list(atlas.low[0].images)
    assert strips.get("layer1", 2) is None  # never fires: no strip, no atlas part
    assert strips.get("layer9", 0) is None and len(strips) == 2


def test_index_is_checked(tmp_path):
    d = LayerAtlas("atlas_l.png", 8, 2, (Strip(0, ("a", "b"), (2.0, 1.0)), None), (None, None),
                   (4, 4), (2.0, 2.0)).to_json()
    with pytest.raises(ArtifactError, match="for 3 concepts"):
        LayerAtlas.from_json(d, 3)
    bad = json.loads(json.dumps(d))
    bad["top"][0]["values"] = [1.0]
    with pytest.raises(ArtifactError, match="2 images but 1 values"):
        LayerAtlas.from_json(bad, 2)
    bad = json.loads(json.dumps(d))
    bad["columns"] = 1
    with pytest.raises(ArtifactError, match="more than 1 images"):
        LayerAtlas.from_json(bad, 2)
    atlas = LayerAtlas.from_json(d, 2)
    assert atlas is not None and LayerAtlas.from_json(None, 2) is None
    too_small = encode_strip(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ArtifactError, match="needs at least 16x8"):
        decode_sprite(too_small, atlas)
    with pytest.raises(ArtifactError, match="not a readable PNG"):
        decode_sprite(b"not a png", atlas)
