"""`concept-explainer explain` and `report`: in-process answers equal the handler's, the HTML
report opens in a real headless Chromium (no console errors, every image decodes, one
heatmap per concept, one triplet per ClaDec entry, a screenshot that is not blank), and bad
input gets one line and a non-zero exit."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.answer_schema import assert_valid
from tests.browser import Chromium, find_chromium
from tests.handler.mock_context import make_context, prepare_batch, wire_request

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def images(tiny_data: Path, tmp_path_factory) -> list[Path]:
    """Two test images of the tiny model, and one of them scaled to 224 px (a large input)."""
    files = sorted((tiny_data / "test").glob("*/*.png"))
    picks = [files[0], files[-1]]
    big = tmp_path_factory.mktemp("img") / "large_224.png"
    Image.open(picks[0]).resize((224, 224), Image.Resampling.BILINEAR).save(big)
    return [*picks, big]


@pytest.fixture(scope="module")
def explained(tiny_explainer_mar: Path, images, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("explain")
    proc = cli("explain", "--image", *map(str, images), "--mar", str(tiny_explainer_mar), "--atlas",
               "--json", str(out / "answers.json"), "--html", str(out / "report.html"))
    return out / "answers.json", out / "report.html", proc


def untimed(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timings_ms"}


def test_explain_answers_equal_the_handlers(explained, images, tiny_full_bundle, tmp_path):
    answers_path, _, proc = explained
    assert proc.returncode == 0, proc.stderr
    assert "predictions:" in proc.stdout and "HTML report:" in proc.stdout
    answers = json.loads(answers_path.read_text())
    assert len(answers) == 3
    from handlers.concept_handler import ConceptExplainerHandler
    from tests.handler.mock_context import model_dir_from_bundle
    model_dir = model_dir_from_bundle(tiny_full_bundle, tmp_path / "m")
    handler = ConceptExplainerHandler()
    ctx = make_context(model_dir)
    handler.initialize(ctx)
    try:
        batch = [wire_request(json.dumps({"data": base64.b64encode(p.read_bytes()).decode(), "atlas": True}),
                              "application/json", explain=True, idx=i) for i, p in enumerate(images)]
        bodies = [json.loads(b) for b in handler.handle(prepare_batch(ctx, batch), ctx)]
    finally:
        handler.close()
    for ours, theirs in zip(answers, bodies):
        assert_valid(ours, "explanations")
        assert untimed(ours) == untimed(theirs)


def test_explain_with_options_writes_the_single_body(tiny_explainer_mar, images, tmp_path):
    proc = cli("explain", "--image", str(images[0]), "--mar", str(tiny_explainer_mar), "--target", "2",
               "--top-concepts", "3", "--alphas", "all", "--image-format", "jpeg", "--json", str(tmp_path / "a.json"),
               "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    body = json.loads((tmp_path / "a.json").read_text())
    assert body["target"]["index"] == 2 and len(body["concepts"]) == 3
    assert [set(e) - {"layer", "alpha"} for e in body["cladec"]] == [
        {"reconstruction_jpeg", "reference_jpeg"}, {"reconstruction_jpeg"}] * 2  # two layers, two alphas each
    page = (tmp_path / "r.html").read_text()  # the report shows JPEG entries like PNG ones
    assert page.count("data:image/jpeg;base64,") == 4 + 2 * 2  # reconstructions; each layer's reference twice
    assert page.count('class="triplet"') == 4
    assert "verification" not in body and 'data-verified="' not in page


def test_explain_verify_prints_and_draws_the_networks_answers(tiny_explainer_mar, images, tmp_path):
    proc = cli("explain", "--image", str(images[0]), "--mar", str(tiny_explainer_mar), "--top-concepts", "4",
               "--verify", "--json", str(tmp_path / "a.json"), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    body = json.loads((tmp_path / "a.json").read_text())
    assert_valid(body, "explanations")
    assert body["verification"]["concepts"] == 4 and all("verified" in c for c in body["concepts"])
    assert proc.stdout.count("verified: P(target | do(state)) served") == 4 and "verification over 4 concepts" in proc.stdout
    page = (tmp_path / "r.html").read_text()
    ids = [c["id"] for c in body["concepts"]]
    assert [page.count(f'data-verified="{i}"') for i in ids] == [1] * 4  # the network's bars beside each card
    assert 'class="label verification"' in page


@pytest.mark.parametrize("make_args, message", [
    (lambda d, mar, img: ["explain", "--image", str(d / "missing.png"), "--mar", str(mar)], "cannot read image"),
    (lambda d, mar, img: ["explain", "--image", str(d / "not_an_image.png"), "--mar", str(mar)], "InvalidImage"),
    (lambda d, mar, img: ["explain", "--image", str(img), "--mar", str(d / "not_an_image.png")],
     "cannot load the model"),
    (lambda d, mar, img: ["report", "--answer", str(d / "wrong.json"), "--image", str(img), "--out",
                          str(d / "r.html")], "is not an /explanations answer"),
    (lambda d, mar, img: ["report", "--answer", str(d / "not_json.json"), "--image", str(img), "--out",
                          str(d / "r.html")], "is not JSON"),
    (lambda d, mar, img: ["report", "--answer", str(d / "missing.json"), "--image", str(img), "--out",
                          str(d / "r.html")], "cannot read"),
])
def test_bad_input_gets_one_line_and_a_non_zero_exit(tmp_path, tiny_explainer_mar, images, make_args, message):
    (tmp_path / "not_an_image.png").write_bytes(b"hello, not a picture")
    (tmp_path / "wrong.json").write_text(json.dumps({"predictions": [], "target": 3}))
    (tmp_path / "not_json.json").write_text("{")
    proc = cli(*make_args(tmp_path, tiny_explainer_mar, images[0]))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.html").exists()


def test_report_command_renders_a_saved_answer(explained, images, tmp_path):
    answers_path, _, _ = explained
    one = tmp_path / "one.json"
    one.write_text(json.dumps(json.loads(answers_path.read_text())[1]))
    proc = cli("report", "--answer", str(one), "--image", str(images[1]), "--out", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r.html").read_text()
    assert page.count('<section class="image"') == 1
    assert "<script" not in page and "http://" not in page and "https://" not in page


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.skip("chromium is not installed (make test installs Debian's package where it can)")
    with Chromium() as b:
        yield b


@pytest.mark.parametrize("javascript", [True, False])
def test_the_report_in_headless_chromium(browser, explained, tmp_path, javascript):
    answers_path, report, proc = explained
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(answers_path.read_text())
    browser.open(report.as_uri(), javascript=javascript)
    assert browser.console_errors() == []
    assert [u for u in browser.requested_urls() if not u.startswith(("file:", "data:"))] == []
    assert browser.evaluate("document.scripts.length") == 0
    n_images = browser.evaluate("document.images.length")
    decoded = browser.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
    assert n_images > 0 and decoded == n_images
    sections = browser.evaluate("[...document.querySelectorAll('section.image')].map(s => ({"
                                "concepts: s.querySelectorAll('.concept').length,"
                                "heat: s.querySelectorAll('.concept img.heat').length,"
                                "triplets: s.querySelectorAll('.triplet').length,"
                                "inputWidth: s.querySelector('img.input').getBoundingClientRect().width}))")
    assert len(sections) == len(answers) == 3
    # every atlas strip decodes, is a thumbnail high per image, and sits inside its own concept's card
    strips = browser.evaluate(
        "[...document.querySelectorAll('section.image')].map(s => [...s.querySelectorAll('.concept')].map(c => {"
        "const box = c.getBoundingClientRect();"
        "return [...c.querySelectorAll('img.atlas-top, img.atlas-low')].map(i => {"
        "const r = i.getBoundingClientRect();"
        "return {concept: c.dataset.concept, of: i.dataset.atlas, kind: i.className, w: i.naturalWidth,"
        "h: i.naturalHeight, inside: r.left >= box.left && r.right <= box.right + 0.5 && r.top >= box.top"
        " && r.bottom <= box.bottom + 0.5 && r.width > 0};});}))")
    for section_strips, body in zip(strips, answers):
        assert len(section_strips) == len(body["concepts"])
        for card, c in zip(section_strips, body["concepts"]):
            a = c.get("atlas")
            want = [] if a is None else ["atlas-top"] + (["atlas-low"] if "low_png" in a else [])
            assert [s["kind"] for s in card] == want
            for s in card:
                images_in = a["top_images"] if s["kind"] == "atlas-top" else a["low_images"]
                assert s["of"] == s["concept"] == c["id"] and s["inside"]
                assert (s["w"], s["h"]) == (a["thumb"] * len(images_in), a["thumb"])
    assert any(c.get("atlas") for body in answers for c in body["concepts"])
    for section, body in zip(sections, answers):
        assert section["concepts"] == section["heat"] == len(body["concepts"])
        assert section["triplets"] == len(body["cladec"])
        assert section["inputWidth"] == 194  # 192 px + border at 32 px and at 224 px inputs alike
    shot = np.asarray(Image.open(io.BytesIO(browser.screenshot(tmp_path / "report.png"))).convert("RGB"))
    assert shot.shape[0] > 800 and shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200


def test_the_heatmap_switch_works_without_javascript(browser, explained):
    _, report, _ = explained
    browser.open(report.as_uri(), javascript=False)
    visible = "[...document.querySelectorAll('section.image')[0].querySelectorAll('img.heat')]" \
              ".filter(i => getComputedStyle(i).display !== 'none').length"
    shown = browser.evaluate(visible)
    assert shown > 0
    browser.evaluate("document.querySelector('section.image label.switch').click()")
    assert browser.evaluate(visible) == 0


def test_atlas_command_writes_every_strip(tiny_full_bundle, tiny_bundle, tmp_path):
    proc = cli("atlas", "--bundle", str(tiny_full_bundle), "--out", str(tmp_path / "atlas"))
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((tiny_full_bundle / "concepts.json").read_text())
    index = (tmp_path / "atlas" / "index.html").read_text()
    for layer in spec["layers"]:
        a = layer["atlas"]
        for c, (top, low) in enumerate(zip(a["top"], a["low"])):
            assert f"{layer['layer']}/c{c}" in index
            for kind, strip in (("top", top), ("low", low)):
                path = tmp_path / "atlas" / f"{layer['layer']}_c{c}_{kind}.png"
                assert path.is_file() == (strip is not None)
                if strip is not None:
                    assert Image.open(path).size == (a["thumb"] * len(strip["images"]), a["thumb"])
                    assert f'src="{path.name}"' in index
    proc = cli("atlas", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "none"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "has no concepts" in proc.stderr
