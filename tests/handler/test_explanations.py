"""/explanations through the handler with a mock context: the concepts view, options, errors."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handlers.concept_handler import ConceptExplainerHandler
from handlers.runtime.heatmaps import heatmap_palette
from tests.answer_schema import assert_answer, is_explain
from tests.handler.mock_context import make_context, prepare_batch, wire_request
from tests.pgmpy_reference import do_query, load_pgmpy
from tests.reference import offline_anchor, offline_evidence, offline_network_interventions


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> ConceptExplainerHandler:
    h = ConceptExplainerHandler()
    h.initialize(make_context(model_dir))
    return h


FACTORS = {"shape", "texture", "hue", "scale", "rotation", "pos_x", "pos_y", "light", "background"}


def run(handler, model_dir, batch):
    ctx = make_context(model_dir)
    bodies = handler.handle(prepare_batch(ctx, batch), ctx)
    out = [(ctx.get_response_status(i)[0], json.loads(b)) for i, b in enumerate(bodies)]
    for req, (status, body) in zip(batch, out):
        assert_answer(status, body, is_explain(req))
    return out


def explain(handler, model_dir, png: bytes, **options):
    if options:
        req = wire_request(json.dumps({"data": base64.b64encode(png).decode(), **options}), "application/json",
                           explain=True)
    else:
        req = wire_request(png, explain=True)
    return run(handler, model_dir, [req])[0]


def test_concepts_view_structure(handler, model_dir, sample_pngs):
    status, body = explain(handler, model_dir, sample_pngs[0])
    assert status == 200
    assert set(body) >= {"predictions", "target", "concepts", "model", "timings_ms"}
    assert body["target"]["index"] == body["predictions"][0]["index"]
    concepts = body["concepts"]
    classes = json.loads((model_dir / "bundle" / "metadata.json").read_text())["classes"]
    assert len(concepts) == 8  # model-config.yaml's top_concepts (of 3 layers x 4 concepts)
    effects = [abs(c["effect"]) for c in concepts]
    assert effects == sorted(effects, reverse=True)
    for c in concepts:
        assert c["id"] == f"{c['layer']}/c{c['channel']}" and 0 <= c["state"] < 3
        head = c["name"].split(" · ")[0]  # the class it fires for and its share, or "any class"
        assert c["name"] == c["id"] or head == "any class" or (
            head.rsplit(" ", 1)[0] in classes and re.fullmatch(r"\d+%", head.rsplit(" ", 1)[1]))
        assert c["name_bits"] is None or any(f in c["name"] for f in FACTORS)
        assert "atlas" not in c  # only on request
        assert len(c["interventions"]) == 3
        assert sum(1 for i in c["interventions"] if 0 <= i["probability"] <= 1) == 3
        png = Image.open(io.BytesIO(base64.b64decode(c["heatmap_png"])))
        assert png.size == (32, 32) and png.mode == "P" and "transparency" in png.info  # an overlay
    assert len(body["model"]["artifact_sha256"]) == 64
    assert {"decode", "classifier", "concepts", "causal", "encode"} <= set(body["timings_ms"])


def test_heatmap_styles_show_the_same_map(handler, model_dir, sample_pngs):
    """The default overlay is the quantised code map with the colour map as palette; the
    blended style is that map over the input. Where the overlay is transparent (inactive),
    the blended image is the input dimmed by the blend."""
    _, overlay = explain(handler, model_dir, sample_pngs[0], top_concepts=3)
    _, blended = explain(handler, model_dir, sample_pngs[0], top_concepts=3, heatmap="blended")
    assert [c["id"] for c in overlay["concepts"]] == [c["id"] for c in blended["concepts"]]
    palette, opacity = heatmap_palette()
    source = np.asarray(Image.open(io.BytesIO(sample_pngs[0])).convert("RGB"), dtype=np.float64)
    for o, b in zip(overlay["concepts"], blended["concepts"]):
        po = Image.open(io.BytesIO(base64.b64decode(o["heatmap_png"])))
        pb = Image.open(io.BytesIO(base64.b64decode(b["heatmap_png"])))
        assert pb.mode == "RGB" and pb.size == po.size
        idx = np.asarray(po)
        np.testing.assert_array_equal(np.frombuffer(po.info["transparency"], np.uint8), opacity)
        np.testing.assert_array_equal(np.asarray(po.getpalette(), np.uint8).reshape(-1, 3)[:len(palette)], palette)
        idle = idx == 0
        if idle.any():  # heatmap value 0 is blue at 45% over the input: no red anywhere
            expected = 0.45 * source[idle] + 0.55 * 255 * np.array([0.0, 0.0, 0.5])
            assert np.abs(np.asarray(pb, np.float64)[idle] - expected).max() <= 4.0  # v < 1/126 rounds to index 0


def test_bad_heatmap_style_is_a_400(handler, model_dir, sample_pngs):
    status, body = explain(handler, model_dir, sample_pngs[0], heatmap="jet")
    assert status == 400 and body["error"]["type"] == "InvalidOption" and "heatmap" in body["error"]["message"]


@pytest.mark.parametrize("network_concepts", ["all", 8])
def test_effects_equal_offline_pgmpy_and_torch_computations(network_concepts, model_dir, tiny_concept_bundle,
                                                            tiny_full_bundle, tiny_classifier, sample_pngs):
    """Concepts the network answers at every state equal torch's interventions in the
    classifier; those it answers at the bundle's probes equal torch's at the probed states and
    the interpolation of torch's numbers elsewhere; the others equal pgmpy's answer on the
    Bayesian network moved to the level of torch's spliced classifier; all use the network's
    weights pi."""
    from handlers.runtime.concepts import interpolate_states, probe_states
    handler = ConceptExplainerHandler()
    handler.initialize(make_context(model_dir, {"network_concepts": network_concepts}))
    # the tables are compiled at load only where they answer (a count); with "all" never
    compiled = set(handler.service.concepts.network._plans)
    assert compiled == (set() if network_concepts == "all" else set(handler.service.concepts.network.concepts))
    model = load_pgmpy(tiny_concept_bundle / "causal_network.json")
    spec = json.loads((tiny_full_bundle / "concepts.json").read_text())
    layers = {l["layer"]: l for l in spec["layers"]}
    for png in sample_pngs[:3]:
        status, body = explain(handler, model_dir, png, images=False, top_concepts=12)
        assert status == 200 and len(body["concepts"]) == 12
        sources = [c["source"] for c in body["concepts"]]
        asked = 12 if network_concepts == "all" else 8
        assert all(s in ("network", "network_interpolated") for s in sources[:asked])
        assert sources[asked:] == ["bayesian_network"] * (12 - asked)
        for part in (body["concepts"][:asked], body["concepts"][asked:]):
            effects = [abs(c["effect"]) for c in part]
            assert effects == sorted(effects, reverse=True)
        evidence, predicted = offline_evidence(tiny_full_bundle, png, int8=True)
        assert body["target"]["index"] == predicted
        for c in body["concepts"]:
            assert c["state"] == evidence[c["id"]]
            probes = layers[c["layer"]].get("probes") or 3
            if c["source"] != "bayesian_network":  # a layer probed at every state is answered exactly
                assert c["source"] == {3: "network"}.get(probes, c["source"])
            if c["source"] == "network":
                p = offline_network_interventions(tiny_full_bundle, tiny_classifier, png, c["id"], predicted)
            elif c["source"] == "network_interpolated":
                exact = offline_network_interventions(tiny_full_bundle, tiny_classifier, png, c["id"], predicted)
                typical = np.array(layers[c["layer"]]["typical"])[c["channel"]][None]
                peak = np.array([c["activation"]])
                probed = probe_states(typical, peak, probes)
                level = offline_anchor(tiny_full_bundle, tiny_classifier, png, c["layer"], predicted)
                p = interpolate_states(typical, peak, level, probed, exact[None, probed[0]])[0]
                np.testing.assert_allclose(p[probed[0]], exact[probed[0]])
            else:  # the tables' differences, anchored at the spliced network's P(target)
                p = np.array([do_query(model, c["id"], s, evidence)[predicted] for s in range(3)])
                level = offline_anchor(tiny_full_bundle, tiny_classifier, png, c["layer"], predicted)
                p = np.clip(level + p - p[c["state"]], 0, 1)
            atol = 1e-5 if c["source"] != "network_interpolated" else 1e-4  # the peak is rounded to 5 decimals
            np.testing.assert_allclose([i["probability"] for i in c["interventions"]], p, atol=atol)
            parents = model.get_parents(c["id"])
            cpd = model.get_cpds(c["id"])
            pi = cpd.reduce([(q, evidence[q]) for q in parents], inplace=False).values if parents else cpd.values
            assert c["effect"] == pytest.approx(p[c["state"]] - float(pi @ p), abs=atol)


def test_target_by_label_and_index(handler, model_dir, tiny_concept_bundle, sample_pngs):
    classes = json.loads((tiny_concept_bundle / "metadata.json").read_text())["classes"]
    s1, b1 = explain(handler, model_dir, sample_pngs[1], target=classes[3], images=False)
    s2, b2 = explain(handler, model_dir, sample_pngs[1], target=3, images=False)
    assert s1 == s2 == 200
    assert b1["target"] == {"index": 3, "label": classes[3]}
    assert b1["concepts"] == b2["concepts"]


def test_options_top_concepts_and_images(handler, model_dir, sample_pngs):
    status, body = explain(handler, model_dir, sample_pngs[2], top_concepts=3, images=False)
    assert status == 200 and len(body["concepts"]) == 3
    assert all("heatmap_png" not in c for c in body["concepts"])
    full = explain(handler, model_dir, sample_pngs[2], images=False, top_concepts=12)[1]
    assert body["concepts"] == full["concepts"][:3]


@pytest.mark.parametrize("options, etype", [
    ({"target": "no-such-class"}, "UnknownTarget"),
    ({"target": 99}, "UnknownTarget"),
    ({"target": 1.5}, "InvalidOption"),
    ({"top_concepts": -1}, "InvalidOption"),
    ({"top_concepts": 10**9}, "InvalidOption"),
    ({"views": ["nonsense"]}, "InvalidOption"),
    ({"images": "yes"}, "InvalidOption"),
    ({"colour": "red"}, "InvalidOption"),
])
def test_bad_options_are_400(handler, model_dir, sample_pngs, options, etype):
    status, body = explain(handler, model_dir, sample_pngs[0], **options)
    assert status == 400 and body["error"]["type"] == etype and body["error"]["message"]


def test_mixed_batch_predictions_explanations_and_errors(handler, model_dir, sample_pngs):
    batch = [wire_request(sample_pngs[0], idx=0), wire_request(sample_pngs[0], explain=True, idx=1),
             wire_request(b"junk", explain=True, idx=2),
             wire_request(json.dumps({"data": base64.b64encode(sample_pngs[0]).decode(), "target": "zzz"}),
                          "application/json", explain=True, idx=3)]
    out = run(handler, model_dir, batch)
    assert [s for s, _ in out] == [200, 200, 400, 400]
    assert "concepts" not in out[0][1] and out[1][1]["concepts"]
    assert out[0][1]["predictions"] == out[1][1]["predictions"]


def references_once_per_layer(entries: list[dict]) -> bool:
    """The reference image is on the first entry of each layer and on no other."""
    seen: set[str] = set()
    for e in entries:
        if ("reference_png" in e) == (e["layer"] in seen):
            return False
        seen.add(e["layer"])
    return True


def test_cladec_view(handler, model_dir, sample_pngs):
    status, body = explain(handler, model_dir, sample_pngs[0])
    assert status == 200
    entries = body["cladec"]
    # by default each layer's lowest alpha (cladec_alphas: lowest); "alphas" asks for others
    assert [(e["layer"], e["alpha"]) for e in entries] == [("layer2", 0.0), ("avgpool", 0.0)]
    status, body = explain(handler, model_dir, sample_pngs[0], alphas="all")
    entries = body["cladec"]
    assert [(e["layer"], e["alpha"]) for e in entries] == [("layer2", 0.0), ("layer2", 0.001),
                                                          ("avgpool", 0.0), ("avgpool", 0.001)]
    for e in entries:
        for key in ("reconstruction_png", "reference_png"):
            if key in e:
                img = Image.open(io.BytesIO(base64.b64decode(e[key])))
                assert img.size == (32, 32) and img.mode == "RGB"
    assert references_once_per_layer(entries)  # one RefAE per layer, sent with the layer's first entry
    assert "cladec" in body["timings_ms"]


def test_cladec_equals_onnxruntime_offline(handler, model_dir, tiny_full_bundle, sample_pngs):
    """Reconstruction = the decoder ONNX applied to the classifier ONNX's activation."""
    from tests.reference import offline_activations
    doc = json.loads((tiny_full_bundle / "cladec.json").read_text())
    status, body = explain(handler, model_dir, sample_pngs[1], layers=["avgpool"], alphas="all")
    assert status == 200 and [e["layer"] for e in body["cladec"]] == ["avgpool", "avgpool"]
    acts, x = offline_activations(tiny_full_bundle, sample_pngs[1])
    for entry, spec in zip(body["cladec"], [d for d in doc["decoders"] if d["layer"] == "avgpool"]):
        import onnxruntime as ort
        dec = ort.InferenceSession(str(tiny_full_bundle / spec["decoder_file"]), providers=["CPUExecutionProvider"])
        rec = dec.run(None, {"activation": acts["avgpool"]})[0][0]
        expected = (np.clip(rec, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["reconstruction_png"]))))
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_cladec_alphas_and_jpeg(handler, model_dir, sample_pngs):
    """Archived alphas by value; JPEG images in the *_jpeg fields, close to the PNG ones."""
    status, png = explain(handler, model_dir, sample_pngs[0], alphas=[0.001], reference=True)
    assert status == 200 and [(e["layer"], e["alpha"]) for e in png["cladec"]] == [("layer2", 0.001),
                                                                                  ("avgpool", 0.001)]
    status, jpeg = explain(handler, model_dir, sample_pngs[0], alphas=[0.001], reference=True, image_format="jpeg")
    assert status == 200
    for p, j in zip(png["cladec"], jpeg["cladec"], strict=True):
        assert set(j) == {"layer", "alpha", "reconstruction_jpeg", "reference_jpeg"}
        for kind in ("reconstruction", "reference"):
            a = np.asarray(Image.open(io.BytesIO(base64.b64decode(p[f"{kind}_png"]))), dtype=float)
            b = Image.open(io.BytesIO(base64.b64decode(j[f"{kind}_jpeg"])))
            assert b.format == "JPEG" and b.size == (32, 32)
            # the same image: Pillow's own quality-90 JPEG of the PNG's pixels decodes to the
            # same pixels (a bound on the mean difference failed on noisy decoders)
            ref = io.BytesIO()
            Image.fromarray(a.astype(np.uint8)).save(ref, "JPEG", quality=90)
            assert np.array_equal(np.asarray(b), np.asarray(Image.open(ref)))


def test_cladec_format_auto_follows_the_image_size(model_dir, sample_pngs, monkeypatch):
    """The default "auto" sends the 32 px test model's ClaDec images as PNG; a worker whose
    threshold its size reaches sends JPEG by default, and a request's image_format still wins."""
    import handlers.runtime.imaging as imaging

    def first_entry(h: ConceptExplainerHandler, **options) -> set[str]:
        status, body = explain(h, model_dir, sample_pngs[0], **options)
        assert status == 200
        return set(body["cladec"][0])

    small = ConceptExplainerHandler()
    small.initialize(make_context(model_dir))
    assert first_entry(small) == {"layer", "alpha", "reconstruction_png", "reference_png"}
    monkeypatch.setattr(imaging, "AUTO_JPEG_MIN_SIDE", 32)
    large = ConceptExplainerHandler()
    large.initialize(make_context(model_dir))
    assert first_entry(large) == {"layer", "alpha", "reconstruction_jpeg", "reference_jpeg"}
    assert first_entry(large, image_format="png") == {"layer", "alpha", "reconstruction_png", "reference_png"}


@pytest.mark.parametrize("options", [{"alphas": [0.5]}, {"alphas": "some"}, {"alphas": []}, {"alphas": [True]},
                                     {"image_format": "gif"}, {"image_format": 1}])
def test_bad_cladec_choices_are_400(handler, model_dir, sample_pngs, options):
    status, body = explain(handler, model_dir, sample_pngs[0], **options)
    assert status == 400 and body["error"]["type"] == "InvalidOption", body
    assert ("archived: [0.0, 0.001]" in body["error"]["message"]) == (options.get("alphas") == [0.5])


@pytest.mark.parametrize("options, etype", [({"layers": ["layer9"]}, "InvalidOption"),
                                            ({"layers": "layer2"}, None),
                                            ({"views": ["cladec"], "images": False}, None)])
def test_cladec_options(handler, model_dir, sample_pngs, options, etype):
    status, body = explain(handler, model_dir, sample_pngs[0], **options)
    if etype:
        assert status == 400 and body["error"]["type"] == etype and "layer2" in body["error"]["message"]
    elif options.get("images") is False:
        assert status == 200 and "cladec" not in body and "concepts" not in body
    else:
        assert status == 200 and {e["layer"] for e in body["cladec"]} == {"layer2"}


def test_features_view(handler, model_dir, tiny_full_bundle, sample_pngs):
    from tests.reference import offline_activations
    doc = json.loads((tiny_full_bundle / "features.json").read_text())
    status, body = explain(handler, model_dir, sample_pngs[4], views=["features"], target=2)
    assert status == 200 and set(body) >= {"features", "predictions"} and "concepts" not in body
    f = body["features"]
    assert f["layer"] == "avgpool" and f["subset_size"] == 5
    acts, _ = offline_activations(tiny_full_bundle, sample_pngs[4])
    h = acts["avgpool"][0].reshape(-1)
    w = np.asarray(doc["weight"])
    assert sorted(c["index"] for c in f["contributions"]) == doc["subsets"][2]
    for c in f["contributions"]:
        assert c["contribution"] == pytest.approx(w[2, c["index"]] * h[c["index"]], abs=1e-5)
    b = np.asarray(doc["bias"])
    full = w @ h + b
    outside = [w[2, i] * h[i] for i in range(len(h)) if i not in doc["subsets"][2]]
    assert f["outside_subset"]["features"] == len(h) - 5
    assert f["outside_subset"]["positive"] == pytest.approx(sum(t for t in outside if t > 0), abs=1e-4)
    assert f["outside_subset"]["negative"] == pytest.approx(sum(t for t in outside if t < 0), abs=1e-4)
    assert sum(c["contribution"] for c in f["contributions"]) + f["outside_subset"]["total"] == pytest.approx(
        full[2] - b[2], abs=1e-4)
    order = [int(i) for i in np.argsort(-full, kind="stable")]
    runner_up = order[1] if order[0] == 2 else order[0]
    classes = json.loads((tiny_full_bundle / "metadata.json").read_text())["classes"]
    ru = f["runner_up"]
    assert ru["index"] == runner_up and ru["label"] == classes[runner_up]
    assert ru["logit"] == pytest.approx(full[runner_up], abs=1e-4)
    assert sorted(c["index"] for c in ru["contributions"]) == doc["subsets"][runner_up]
    dec_ru = sum(w[runner_up, i] * h[i] for i in doc["subsets"][runner_up]) + b[runner_up]
    assert ru["decomposed_logit"] == pytest.approx(dec_ru, abs=1e-4)
    assert ru["outside_subset"]["total"] == pytest.approx(full[runner_up] - dec_ru, abs=1e-4)
    report = doc["report"]
    assert f["decomposed_agreement_held_out"] == pytest.approx(report["agreement_decomposed_vs_full"], abs=1e-6)
    assert f["held_out_images"] == report["test_images"]
    by_class = report["agreement_decomposed_vs_full_by_predicted_class"][order[0]]
    assert f["decomposed_agreement_held_out_class"] == (None if by_class is None else pytest.approx(by_class, abs=1e-6))


def test_overlapped_cladec_gives_the_same_answers(handler, model_dir, sample_pngs):
    """overlap_views renders ClaDec on a second thread: same bodies, batch order and errors
    as rendering in line (timings aside)."""
    serial = ConceptExplainerHandler()
    serial.initialize(make_context(model_dir, {"overlap_views": False}))
    assert handler.service.settings.overlap_views and not serial.service.settings.overlap_views
    batch = [wire_request(sample_pngs[0], explain=True, idx=0), wire_request(b"junk", explain=True, idx=1),
             wire_request(sample_pngs[1], idx=2),
             wire_request(json.dumps({"data": base64.b64encode(sample_pngs[2]).decode(), "layers": ["avgpool"]}),
                          "application/json", explain=True, idx=3)]
    a, b = run(handler, model_dir, batch), run(serial, model_dir, batch)
    assert [s for s, _ in a] == [s for s, _ in b] == [200, 400, 200, 200]
    for (_, x), (_, y) in zip(a, b):
        x.pop("timings_ms", None), y.pop("timings_ms", None)
        assert x == y
    assert [e["layer"] for e in a[3][1]["cladec"]] == ["avgpool"]


def test_reference_images_are_optional(handler, model_dir, sample_pngs):
    """"reference": false drops the RefAE images (and their cost), not the reconstructions;
    an archive can make that the default (cladec_reference) and a request can still ask."""
    _, full = explain(handler, model_dir, sample_pngs[0], views=["cladec"])
    _, lean = explain(handler, model_dir, sample_pngs[0], views=["cladec"], reference=False)
    assert references_once_per_layer(full["cladec"])
    assert [set(e) for e in lean["cladec"]] == [{"layer", "alpha", "reconstruction_png"}] * len(full["cladec"])
    assert [e["reconstruction_png"] for e in lean["cladec"]] == [e["reconstruction_png"] for e in full["cladec"]]
    lean_default = ConceptExplainerHandler()
    lean_default.initialize(make_context(model_dir, {"cladec_reference": False}))
    assert all("reference_png" not in e for e in explain(lean_default, model_dir, sample_pngs[0])[1]["cladec"])
    assert references_once_per_layer(explain(lean_default, model_dir, sample_pngs[0], reference=True)[1]["cladec"])
    status, body = explain(handler, model_dir, sample_pngs[0], reference="no")
    assert status == 400 and body["error"]["type"] == "InvalidOption"


@pytest.mark.parametrize("broken_part", ["reconstructions", "references"])
@pytest.mark.parametrize("overlap", [True, False])
def test_a_cladec_failure_fails_only_the_requests_that_wanted_cladec(model_dir, sample_pngs, monkeypatch, overlap,
                                                                     broken_part):
    """A fault inside ClaDec (threaded or not) answers 500 to the ClaDec requests of the batch;
    predictions and explanations without ClaDec in the same batch are answered, and the
    next batch works."""
    h = ConceptExplainerHandler()
    h.initialize(make_context(model_dir, {"overlap_views": overlap}))
    good = getattr(h.service.cladec, broken_part)

    def broken(*args, **kwargs):
        raise RuntimeError("decoder fell over")

    monkeypatch.setattr(h.service.cladec, broken_part, broken)
    no_cladec = json.dumps({"data": base64.b64encode(sample_pngs[1]).decode(), "views": ["concepts"]})
    batch = [wire_request(sample_pngs[0], explain=True, idx=0), wire_request(sample_pngs[1], idx=1),
             wire_request(no_cladec, "application/json", explain=True, idx=2)]
    out = run(h, model_dir, batch)
    assert [s for s, _ in out] == [500, 200, 200]
    assert out[0][1]["error"]["type"] == "InternalError" and "decoder" not in out[0][1]["error"]["message"]
    assert "concepts" in out[2][1] and "cladec" not in out[2][1]
    monkeypatch.setattr(h.service.cladec, broken_part, good)
    assert [s for s, _ in run(h, model_dir, batch)] == [200, 200, 200]


def test_one_batch_mixes_cladec_options(handler, model_dir, sample_pngs):
    """Rows asking for different layers and references in one batch each get exactly theirs,
    equal to asking alone."""
    def req(i, **options):
        return wire_request(json.dumps({"data": base64.b64encode(sample_pngs[i % 3]).decode(), "views": ["cladec"],
                                        **options}), "application/json", explain=True, idx=i)
    variants = [{}, {"reference": False}, {"layers": ["avgpool"]}, {"layers": ["layer2"], "reference": False},
                {"reference": True, "heatmap": "blended"}]
    together = run(handler, model_dir, [req(i, **o) for i, o in enumerate(variants)])
    for i, o in enumerate(variants):
        [(status, alone)] = run(handler, model_dir, [req(i, **o)])
        assert together[i][0] == status == 200
        assert together[i][1]["cladec"] == alone["cladec"]
        layers = o.get("layers", ["layer2", "avgpool"])
        assert sorted({e["layer"] for e in alone["cladec"]}) == sorted(layers)
        if o.get("reference", True):
            assert references_once_per_layer(alone["cladec"])
        else:
            assert not any("reference_png" in e for e in alone["cladec"])


@pytest.mark.parametrize("chunk_rows", [0, 1, 3])
def test_cladec_in_chunks_gives_the_same_answers(handler, model_dir, sample_pngs, chunk_rows):
    """cladec_chunk_rows runs decoders and RefAEs a few rows at a time: same bodies as the
    default (2 rows) for a batch of five explanations (timings aside)."""
    other = ConceptExplainerHandler()
    other.initialize(make_context(model_dir, {"cladec_chunk_rows": chunk_rows}))
    assert other.service.cladec.chunk_rows == chunk_rows and handler.service.cladec.chunk_rows == 2
    batch = [wire_request(json.dumps({"data": base64.b64encode(png).decode(), "alphas": "all"}), "application/json",
                          explain=True, idx=i) for i, png in enumerate(sample_pngs[:5])]
    a, b = run(handler, model_dir, batch), run(other, model_dir, batch)
    assert [s for s, _ in a] == [s for s, _ in b] == [200] * 5
    for (_, x), (_, y) in zip(a, b):
        x.pop("timings_ms"), y.pop("timings_ms")
        assert x == y and len(x["cladec"]) == 4


def test_atlas_on_request(handler, model_dir, sample_pngs):
    """``"atlas": true`` adds each concept's strips and nothing else changes; without it no byte of them."""
    status, plain = explain(handler, model_dir, sample_pngs[1], top_concepts=12)
    status2, body = explain(handler, model_dir, sample_pngs[1], top_concepts=12, atlas=True)
    assert status == status2 == 200
    spec = json.loads((model_dir / "bundle" / "concepts.json").read_text())
    index = {f"{l['layer']}/c{c}": (l["atlas"], top, low) for l in spec["layers"]
             for c, (top, low) in enumerate(zip(l["atlas"]["top"], l["atlas"]["low"]))}
    with_strips = 0
    for a, b in zip(plain["concepts"], body["concepts"]):
        assert "atlas" not in a
        assert {k: v for k, v in b.items() if k != "atlas"} == a
        layer_atlas, top, low = index[b["id"]]
        if top is None:  # never fires on a training image: nothing to show
            assert "atlas" not in b
            continue
        with_strips += 1
        atlas = b["atlas"]
        assert atlas["top_images"] == top["images"] and atlas["top_values"] == top["values"]
        assert atlas["top_values"] == sorted(atlas["top_values"], reverse=True)
        assert atlas["thumb"] == layer_atlas["thumb"] and atlas["crop_px"] == layer_atlas["crop"]
        img = Image.open(io.BytesIO(base64.b64decode(atlas["top_png"])))
        assert img.format == "PNG" and img.size == (atlas["thumb"] * len(top["images"]), atlas["thumb"])
        assert ("low_png" in atlas) == (low is not None)
        if low is not None:
            assert atlas["low_images"] == low["images"]
            low_img = Image.open(io.BytesIO(base64.b64decode(atlas["low_png"])))
            assert low_img.size == (atlas["thumb"] * len(low["images"]), atlas["thumb"])
    assert with_strips >= 1  # the tiny model has silent concepts; those that fire carry strips
    status, err = explain(handler, model_dir, sample_pngs[1], atlas="yes")
    assert status == 400 and "atlas" in err["error"]["message"]
