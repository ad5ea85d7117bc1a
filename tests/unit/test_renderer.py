"""Unit tests for export.data.renderer (the controlled-factor demo data set)."""

from __future__ import annotations

import csv
import json
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.data import renderer as R
from export.data.renderer import (
    CATEGORICAL_FACTORS,
    FACTOR_NAMES,
    SHAPES,
    TEXTURES,
    Factors,
    image_rng,
    render,
    render_dataset,
    sample_factors,
    shape_mask,
)

SHAPE = {name: i for i, name in enumerate(SHAPES)}
TEXTURE = {name: i for i, name in enumerate(TEXTURES)}

# A pose with no symmetry to hide behind: arrow, striped, rotated, lit diagonally.
BASE = Factors(
    shape=SHAPE["arrow"],
    texture=TEXTURE["stripes"],
    hue=0.1,
    scale=0.7,
    rotation=30.0,
    pos_x=0.0,
    pos_y=0.0,
    light=45.0,
    background=0.5,
)


def _plain(**kw: object) -> Factors:
    """Solid circle in the centre, overridden by ``kw``."""
    base = dict(shape=SHAPE["circle"], texture=TEXTURE["solid"], hue=0.6, scale=0.6,
                rotation=0.0, pos_x=0.0, pos_y=0.0, light=0.0, background=0.5)
    base.update(kw)
    return Factors(**base)  # type: ignore[arg-type]


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid in pixel-centre coords (y down) of a (H, W) weight map."""
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    tot = mask.sum()
    return float((mask * xs).sum() / tot), float((mask * ys).sum() / tot)


def _object_pixels(img: np.ndarray, background: float) -> np.ndarray:
    """(H, W) bool: pixels of a noise-free render that differ from the background."""
    bg = int(background * 255 + 0.5)
    return np.any(img.astype(int) != bg, axis=2)


# --------------------------------------------------------------------------- API


def test_constants() -> None:
    assert FACTOR_NAMES == ("shape", "texture", "hue", "scale", "rotation",
                            "pos_x", "pos_y", "light", "background")
    assert tuple(f.name for f in dataclasses.fields(Factors)) == FACTOR_NAMES
    assert CATEGORICAL_FACTORS == ("shape", "texture")
    assert len(SHAPES) == 10 and len(set(SHAPES)) == 10
    assert TEXTURES == ("solid", "stripes", "dots", "checker")
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASE.hue = 0.2  # type: ignore[misc]


# ---------------------------------------------------------------------- sampling


def test_sample_factors_ranges_and_types() -> None:
    fs = sample_factors(np.random.default_rng(123), 3000)
    assert len(fs) == 3000
    cols = {n: np.array([getattr(f, n) for f in fs]) for n in FACTOR_NAMES}
    assert all(type(f.shape) is int and type(f.texture) is int for f in fs)
    assert all(type(getattr(f, n)) is float for f in fs for n in R.CONTINUOUS_FACTORS)
    assert set(cols["shape"].tolist()) == set(range(10))
    assert set(cols["texture"].tolist()) == set(range(4))
    assert 0.0 <= cols["hue"].min() and cols["hue"].max() < 1.0
    assert 0.45 <= cols["scale"].min() and cols["scale"].max() <= 0.9
    assert 0.0 <= cols["rotation"].min() and cols["rotation"].max() < 360.0
    assert 0.0 <= cols["light"].min() and cols["light"].max() < 360.0
    for n in ("pos_x", "pos_y"):
        assert -1.0 <= cols[n].min() and cols[n].max() <= 1.0
    assert 0.1 <= cols["background"].min() and cols["background"].max() <= 0.9
    # uniform draws actually cover their ranges
    assert cols["rotation"].min() < 5 and cols["rotation"].max() > 355
    assert cols["pos_x"].min() < -0.95 and cols["pos_x"].max() > 0.95
    assert abs(np.mean(cols["shape"] == 3) - 0.1) < 0.03
    # the factors are independent: no sizeable correlation between any two
    corr = np.corrcoef(np.stack([cols[n].astype(float) for n in FACTOR_NAMES]))
    assert np.abs(corr - np.eye(len(FACTOR_NAMES))).max() < 0.1
    # continuous values are exactly representable with 6 decimals
    for n in R.CONTINUOUS_FACTORS:
        assert all(float(f"{v:.6f}") == v for v in cols[n][:500].tolist())


def test_sample_factors_deterministic() -> None:
    a = sample_factors(np.random.default_rng(7), 50)
    b = sample_factors(np.random.default_rng(7), 50)
    c = sample_factors(np.random.default_rng(8), 50)
    assert a == b
    assert a != c
    assert sample_factors(np.random.default_rng(7), 0) == []


# --------------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [64, 32, 100])
def test_render_shape_dtype(size: int) -> None:
    img = render(BASE, size=size)
    assert img.shape == (size, size, 3)
    assert img.dtype == np.uint8
    assert img.flags.c_contiguous


def test_render_default_size_and_noise() -> None:
    clean = render(BASE)
    assert clean.shape == (64, 64, 3)
    np.testing.assert_array_equal(clean, render(BASE))  # no rng -> no noise
    n1 = render(BASE, rng=np.random.default_rng(5))
    n2 = render(BASE, rng=np.random.default_rng(5))
    n3 = render(BASE, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(n1, n2)
    assert not np.array_equal(n1, n3)
    diff = n1.astype(float) - clean.astype(float)
    assert 3.0 < diff.std() < 7.0  # sigma 0.02 * 255 = 5.1 grey levels
    assert abs(diff.mean()) < 0.5
    # a noise-free background is exactly the requested grey
    assert np.all(clean[:3, :3] == 128)


@pytest.mark.parametrize(
    "name,value",
    [
        ("shape", SHAPE["star"]),
        ("texture", TEXTURE["checker"]),
        ("hue", 0.6),
        ("scale", 0.5),
        ("rotation", 100.0),
        ("pos_x", 0.8),
        ("pos_y", -0.8),
        ("light", 225.0),
        ("background", 0.2),
    ],
)
def test_each_factor_changes_pixels(name: str, value: float) -> None:
    assert name in FACTOR_NAMES
    f = dataclasses.replace(BASE, **{name: value})
    a = render(BASE).astype(float)
    b = render(f).astype(float)
    changed = np.any(a != b, axis=2)
    assert changed.mean() > 0.02, f"{name}: only {changed.mean():.3%} of pixels changed"
    # not a faint flicker: the changed pixels move by many grey levels on average
    assert np.abs(a - b).max(axis=2)[changed].mean() > 8.0


@pytest.mark.parametrize("shape", range(10))
@pytest.mark.parametrize("texture", range(4))
def test_non_geometric_factors_change_every_shape(shape: int, texture: int) -> None:
    f = _plain(shape=shape, texture=texture)
    a = render(f).astype(float)
    inside = shape_mask(f) > 0.5
    outside = shape_mask(f) == 0.0
    for name, value in (("hue", 0.1), ("light", 180.0), ("background", 0.8)):
        b = render(dataclasses.replace(f, **{name: value})).astype(float)
        diff = np.abs(a - b).mean(axis=2)
        region = outside if name == "background" else inside
        assert diff[region].mean() > 5.0, (SHAPES[shape], TEXTURES[texture], name)
        if name != "background":
            assert np.all(diff[outside] == 0)  # object factors leave the background alone


def test_background_level_direction() -> None:
    means = []
    for bg in (0.1, 0.3, 0.5, 0.7, 0.9):
        img = render(_plain(background=bg), rng=np.random.default_rng(0)).astype(float)
        corners = np.concatenate([img[:6, :6], img[:6, -6:], img[-6:, :6], img[-6:, -6:]])
        means.append(corners.mean())
        assert abs(corners.mean() - bg * 255) < 1.5
    assert np.all(np.diff(means) > 40)


@pytest.mark.parametrize("axis", ["pos_x", "pos_y"])
def test_position_moves_centroid(axis: str) -> None:
    xs_img, ys_img, xs_mask, ys_mask = [], [], [], []
    for p in (-1.0, -0.5, 0.0, 0.5, 1.0):
        f = _plain(**{axis: p})
        cx, cy = _centroid(_object_pixels(render(f), f.background).astype(float))
        xs_img.append(cx)
        ys_img.append(cy)
        mx, my = _centroid(shape_mask(f))
        xs_mask.append(mx)
        ys_mask.append(my)
    if axis == "pos_x":  # right is +x
        moved, still = (xs_img, xs_mask), (ys_img, ys_mask)
        assert np.all(np.diff(xs_mask) > 3) and np.all(np.diff(xs_img) > 3)
    else:  # pos_y is y-up, image rows go down
        moved, still = (ys_img, ys_mask), (xs_img, xs_mask)
        assert np.all(np.diff(ys_mask) < -3) and np.all(np.diff(ys_img) < -3)
    assert abs(moved[1][2] - 32.0) < 0.2  # centred at pos 0
    for s in still:
        assert np.ptp(s) < 0.2


def test_scale_increases_area() -> None:
    scales = (0.45, 0.55, 0.65, 0.75, 0.9)
    for shape in range(10):
        areas = [shape_mask(_plain(shape=shape, scale=s, rotation=20.0)).sum() for s in scales]
        assert np.all(np.diff(areas) > 0), SHAPES[shape]
        # area grows like scale**2
        assert areas[-1] / areas[0] == pytest.approx((0.9 / 0.45) ** 2, rel=0.08)
    img_areas = [_object_pixels(render(_plain(scale=s)), 0.5).sum() for s in scales]
    assert np.all(np.diff(img_areas) > 0)
    # circle area matches pi r^2 with r = scale * 0.3 * size
    r = 0.6 * 0.3 * 64
    assert shape_mask(_plain(scale=0.6)).sum() == pytest.approx(np.pi * r * r, rel=0.02)


def test_mask_is_antialiased() -> None:
    m = shape_mask(_plain(scale=0.7, rotation=13.0, shape=SHAPE["pentagon"]))
    assert m.dtype == np.float32 and m.shape == (64, 64)
    assert m.min() == 0.0 and m.max() == 1.0
    partial = (m > 0) & (m < 1)
    assert partial.sum() > 40  # a soft edge all round, not a binary mask
    img = render(_plain(scale=0.7, rotation=13.0, shape=SHAPE["pentagon"]))
    assert len(np.unique(img[..., 0][partial])) > 10


def test_object_always_fits() -> None:
    for shape in range(10):
        for rot in (0.0, 45.0, 137.0, 290.0):
            for px, py in ((-1, -1), (1, 1), (-1, 1), (1, -1)):
                m = shape_mask(_plain(shape=shape, scale=0.9, rotation=rot, pos_x=px, pos_y=py))
                border = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
                assert border.max() == 0.0, (SHAPES[shape], rot, px, py)
                assert m.sum() > 100


def test_light_direction() -> None:
    def bright_side(light: float) -> tuple[float, float]:
        f = _plain(scale=0.8, light=light)
        v = render(f).astype(float).sum(axis=2)
        inside = shape_mask(f) == 1.0
        h = v.shape[0] // 2
        right = v[:, h:][inside[:, h:]].mean() - v[:, :h][inside[:, :h]].mean()
        top = v[:h][inside[:h]].mean() - v[h:][inside[h:]].mean()
        return right, top

    right, top = bright_side(0.0)
    assert right > 40 and abs(top) < 5
    right, top = bright_side(90.0)  # y-up: 90 degrees lights the top
    assert top > 40 and abs(right) < 5
    right, top = bright_side(180.0)
    assert right < -40
    # range of the shading factor: 0.7 .. 1.15 of the base value (clipped at 1)
    f = _plain(scale=0.8, light=0.0, hue=0.0)  # red: R = 0.9 * shade
    img = render(f).astype(float)
    inside = shape_mask(f) == 1.0
    red = img[..., 0][inside] / 255.0
    assert red.min() == pytest.approx(0.9 * 0.7, abs=0.03)
    assert red.max() == pytest.approx(1.0, abs=0.01)


def test_hue_sets_colour() -> None:
    for hue, channel in ((0.0, 0), (1 / 3, 1), (2 / 3, 2)):
        f = _plain(hue=hue)
        img = render(f).astype(float)
        inside = shape_mask(f) == 1.0
        mean_rgb = img[inside].mean(axis=0)
        assert np.argmax(mean_rgb) == channel
        # saturation 0.8: the weakest channel is ~20 % of the strongest
        assert mean_rgb.min() / mean_rgb.max() == pytest.approx(0.2, abs=0.05)


def test_textures_distinct_and_periodic() -> None:
    imgs = {t: render(_plain(texture=TEXTURE[t], scale=0.9)).astype(float) for t in TEXTURES}
    inside = shape_mask(_plain(scale=0.9)) == 1.0
    # relative to solid, a pattern multiplies the colour by 1 or by ~0.55
    for t, dark_share in (("stripes", (0.35, 0.65)), ("dots", (0.15, 0.45)), ("checker", (0.35, 0.65))):
        ratio = imgs[t][..., 2][inside] / imgs["solid"][..., 2][inside]
        assert ratio.min() == pytest.approx(0.55, abs=0.03), t
        assert ratio.max() == pytest.approx(1.0, abs=0.02), t
        assert dark_share[0] < np.mean(ratio < 0.8) < dark_share[1], t
    for i, a in enumerate(TEXTURES):
        for b in TEXTURES[i + 1:]:
            assert np.abs(imgs[a] - imgs[b]).mean() > 2.0, (a, b)
    # stripes at rotation 0: a vertical pattern with a ~6 px period along x
    row = imgs["stripes"][32, 14:50, 2] / _plain_shading_row()
    spectrum = np.abs(np.fft.rfft(row - row.mean()))
    period = len(row) / np.argmax(spectrum)
    assert 5.0 <= period <= 7.0
    col = imgs["stripes"][14:50, 32, 2]
    assert np.ptp(col) < 10  # constant along y


def _plain_shading_row() -> np.ndarray:
    return render(_plain(scale=0.9)).astype(float)[32, 14:50, 2]


def test_texture_rotates_with_object() -> None:
    # A centred object turned by 90 degrees (with the light turned too) is the
    # original image rotated by 90 degrees, texture included.
    for shape in (SHAPE["square"], SHAPE["arrow"]):
        for tex in ("stripes", "dots", "checker"):
            f0 = _plain(shape=shape, texture=TEXTURE[tex], scale=0.85, rotation=10.0, light=20.0)
            f90 = dataclasses.replace(f0, rotation=100.0, light=110.0)
            a = np.rot90(render(f0)).astype(float)  # counter-clockwise
            b = render(f90).astype(float)
            obj = shape_mask(f90) > 0.5
            assert np.abs(a - b)[obj].mean() < 3.0, (SHAPES[shape], tex)
            # while the unrotated original does not match
            assert np.abs(render(f0).astype(float) - b)[obj].mean() > 8.0
    # circle: the outline is invariant, so any change comes from the texture
    c0 = render(_plain(texture=TEXTURE["stripes"], rotation=0.0)).astype(float)
    c1 = render(_plain(texture=TEXTURE["stripes"], rotation=45.0)).astype(float)
    disc = shape_mask(_plain()) > 0.5
    assert np.abs(c0 - c1)[disc].mean() > 10.0
    assert np.all(c0[~(shape_mask(_plain()) > 0)] == c1[~(shape_mask(_plain()) > 0)])


@pytest.mark.parametrize("scale", [0.45, 0.9])
def test_shapes_pairwise_distinct(scale: float) -> None:
    masks = [shape_mask(_plain(shape=s, scale=scale)) for s in range(10)]
    for i in range(10):
        assert masks[i].sum() > 50
        for j in range(i + 1, 10):
            inter = np.minimum(masks[i], masks[j]).sum()
            union = np.maximum(masks[i], masks[j]).sum()
            assert inter / union < 0.9, (SHAPES[i], SHAPES[j], inter / union)
            assert np.abs(masks[i] - masks[j]).sum() > 0.1 * min(masks[i].sum(), masks[j].sum())


def test_diamond_is_not_a_rotated_square() -> None:
    d = shape_mask(_plain(shape=SHAPE["diamond"], scale=0.9))
    rows, cols = np.nonzero(d > 0.5)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert width / height == pytest.approx(0.55, abs=0.08)


def test_invalid_factors_rejected() -> None:
    with pytest.raises(ValueError):
        render(_plain(shape=10))
    with pytest.raises(ValueError):
        render(_plain(texture=-1))
    with pytest.raises(ValueError):
        render(_plain(), size=4)


# ----------------------------------------------------------------------- dataset

N_TRAIN, N_TEST, SEED = 30, 12, 11


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "demo"
    ret = render_dataset(out, n_train=N_TRAIN, n_test=N_TEST, seed=SEED, workers=1, progress=False)
    assert ret == out
    return out


def test_dataset_layout(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == ["factors.csv", "factors.json", "test", "train"]
    kinds = json.loads((dataset / "factors.json").read_text())["factors"]
    assert list(kinds) == list(FACTOR_NAMES) and kinds["shape"]["levels"] == list(SHAPES)
    for split in ("train", "test"):
        assert sorted(p.name for p in (dataset / split).iterdir()) == sorted(SHAPES)
    pngs = sorted(dataset.rglob("*.png"))
    assert len(pngs) == N_TRAIN + N_TEST
    assert sorted(p.stem for p in pngs) == [f"{i:06d}" for i in range(N_TRAIN + N_TEST)]
    with Image.open(pngs[0]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    # no temporary siblings left behind
    assert [p.name for p in dataset.parent.iterdir()] == ["demo"]


def test_factors_csv_round_trip(dataset: Path) -> None:
    with open(dataset / "factors.csv", newline="", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "path,split,label,shape,texture,hue,scale,rotation,pos_x,pos_y,light,background"
    with open(dataset / "factors.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_TRAIN + N_TEST

    expected = sample_factors(np.random.default_rng(SEED), N_TRAIN + N_TEST)
    for i, (row, f) in enumerate(zip(rows, expected)):
        split = "train" if i < N_TRAIN else "test"
        assert row["split"] == split
        assert row["path"] == f"{split}/{SHAPES[f.shape]}/{i:06d}.png"
        path = dataset / row["path"]
        assert path.is_file()
        assert row["label"] == SHAPES[f.shape] == path.parent.name
        assert path.parent.parent.name == split
        parsed = Factors(
            **{n: (int(row[n]) if n in CATEGORICAL_FACTORS else float(row[n])) for n in FACTOR_NAMES}
        )
        assert parsed == f  # exact, not approximate
        for n in R.CONTINUOUS_FACTORS:
            assert len(row[n].split(".")[1]) == 6
        # the image is exactly the render of the recorded factors
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(im), render(f, 64, rng=image_rng(SEED, i)))


def test_dataset_workers_and_seed_determinism(dataset: Path, tmp_path: Path) -> None:
    ref = _tree(dataset)
    two = render_dataset(tmp_path / "w2", N_TRAIN, N_TEST, seed=SEED, workers=2, progress=False)
    assert _tree(two) == ref  # byte-identical, whatever the worker count
    other = render_dataset(tmp_path / "s2", N_TRAIN, N_TEST, seed=SEED + 1, workers=2, progress=False)
    other_tree = _tree(other)
    assert other_tree["factors.csv"] != ref["factors.csv"]
    common = (set(other_tree) & set(ref)) - {"factors.json"}  # factor kinds do not depend on the seed
    assert sum(other_tree[k] != ref[k] for k in common) == len(common)


def test_dataset_replaces_existing_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds"
    render_dataset(out, 4, 2, size=32, seed=1, workers=1, progress=False)
    first = _tree(out)
    # an existing tree is replaced by a complete new one
    render_dataset(out, 5, 3, size=32, seed=2, workers=1, progress=False)
    second = _tree(out)
    assert len([k for k in second if k.endswith(".png")]) == 8
    assert second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    # an interrupted run leaves the previous tree untouched and no debris
    calls = {"n": 0}
    real = R._render_chunk

    def failing(args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(args)

    monkeypatch.setattr(R, "_render_chunk", failing)
    with pytest.raises(RuntimeError, match="boom"):
        render_dataset(out, 40, 10, size=32, seed=3, workers=1, progress=False)
    assert calls["n"] == 2
    assert _tree(out) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        render_dataset(tmp_path / "fresh", 40, 10, size=32, seed=3, workers=1, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        render_dataset(tmp_path / "x", n_train=-1, progress=False)
    with pytest.raises(ValueError):
        render_dataset(tmp_path / "x", n_train=2, n_test=1, seed=-3, progress=False)
    assert not (tmp_path / "x").exists()
