"""8-bit explanation graphs: the report's figures recomputed, acceptance, and what a worker opens."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.archive import write_manifest
from export.data.loader import load_image_folder
from export.quantize import QuantizeConfig, pick, psnr_db
from handlers.runtime import service as service_module
from handlers.runtime.bundle import load_bundle
from handlers.runtime.concepts import ConceptSpec
from handlers.runtime.errors import ArtifactError
from handlers.runtime.quantized import INT8_SUFFIX, int8_variants
from handlers.runtime.service import ExplainerService
from handlers.runtime.settings import HandlerSettings
from tests.handler.mock_context import model_dir_from_bundle


def _doc(bundle: Path) -> dict:
    return json.loads((bundle / "quantization.json").read_text())


def test_psnr_is_the_textbook_formula():
    a = np.zeros((2, 3, 4, 4))
    assert psnr_db(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01 at peak 1
    assert psnr_db(a, a + 0.01) == pytest.approx(40.0)
    assert psnr_db(a, a) == float("inf")
    assert psnr_db(a, a - 5) == float("inf")  # clipped to [0, 1] first


def test_every_explanation_graph_is_judged_and_only_accepted_ones_are_kept(tiny_full_bundle):
    doc = _doc(tiny_full_bundle)
    manifest = json.loads((tiny_full_bundle / "manifest.json").read_text())["files"]
    meta = json.loads((tiny_full_bundle / "metadata.json").read_text())
    spec = ConceptSpec.from_file(tiny_full_bundle / meta["concepts"])
    refaes = {d["refae_file"] for d in json.loads((tiny_full_bundle / meta["cladec"]).read_text())["decoders"]}
    assert meta["quantization"] == "quantization.json"
    assert sorted(g["source"] for g in doc["graphs"]) == sorted([l.encoder_file for l in spec.layers] + list(refaes))
    assert meta["classifier"]["file"] not in {g["source"] for g in doc["graphs"]}  # never the classifier
    for g in doc["graphs"]:
        assert g["accepted"] == (g["value"] >= g["threshold"])
        assert g["file"] == Path(g["source"]).stem + INT8_SUFFIX
        assert (g["file"] in manifest) == g["accepted"] == (tiny_full_bundle / g["file"]).is_file()
        assert g["source_sha256"] == manifest[g["source"]]
        assert g["metric"] == ("concept_state_agreement" if g["kind"] == "concept_encoder" else "psnr_db_vs_float")
    assert any(g["accepted"] for g in doc["graphs"])  # the fixture exercises the 8-bit path


def test_reported_quality_is_recomputed_from_the_graphs(tiny_full_bundle, tiny_data):
    """The held-out figures again, from the float and 8-bit ONNX files (8-bit files of rejected
    graphs are gone, so only accepted ones are checked)."""
    doc = _doc(tiny_full_bundle)
    cfg = QuantizeConfig(**doc["config"])
    bundle = load_bundle(tiny_full_bundle)
    meta = bundle.metadata
    test = load_image_folder(tiny_data, meta.input, "test")
    from handlers.runtime.imaging import normalize
    x = normalize(test.pixels[pick(len(test), cfg.eval_images)], meta.input)
    assert len(x) == doc["eval_images"]
    clf = ort.InferenceSession(str(tiny_full_bundle / meta.classifier_file), providers=["CPUExecutionProvider"])
    acts = dict(zip([o.name for o in clf.get_outputs()], clf.run(None, {meta.input_name: x})))
    spec = ConceptSpec.from_file(bundle.path(meta.extra["concepts"]))
    checked = 0
    for g in doc["graphs"]:
        if not g["accepted"]:
            continue
        f = ort.InferenceSession(str(tiny_full_bundle / g["source"]), providers=["CPUExecutionProvider"])
        q = ort.InferenceSession(str(tiny_full_bundle / g["file"]), providers=["CPUExecutionProvider"])
        if g["kind"] == "reference_autoencoder":
            a, b = f.run(None, {f.get_inputs()[0].name: x})[0], q.run(None, {q.get_inputs()[0].name: x})[0]
            mse = np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2)
            expected = min(10 * np.log10(1 / mse), 999.0) if mse > 0 else 999.0
        else:
            layer = next(l for l in spec.layers if l.encoder_file == g["source"])
            act = acts[layer.activation]
            a, b = f.run(None, {f.get_inputs()[0].name: act})[0], q.run(None, {q.get_inputs()[0].name: act})[0]
            edges = layer.edges[None, :, :]
            states = [(z.max(axis=(2, 3))[:, :, None] > edges).sum(axis=2) for z in (a, b)]
            expected = float(np.mean(states[0] == states[1]))
        assert g["value"] == pytest.approx(expected, abs=2e-3), g["source"]  # batches of 16 vs one batch
        checked += 1
    assert checked >= 1


def _opened(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = service_module.make_session

    def record(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(service_module, "make_session", record)
    return opened


def test_a_worker_opens_the_accepted_8bit_graphs_unless_switched_off(tiny_full_bundle, tmp_path, monkeypatch):
    accepted = {g["source"]: g["file"] for g in _doc(tiny_full_bundle)["graphs"] if g["accepted"]}
    model_dir = model_dir_from_bundle(tiny_full_bundle, tmp_path / "m")
    opened = _opened(monkeypatch)
    svc = ExplainerService.load(model_dir, HandlerSettings(), None)
    assert svc.model_info.int8_graphs == sorted(accepted)
    assert set(accepted.values()) <= set(opened) and not set(accepted) & set(opened)
    assert svc.model_info.wire()["int8_graphs"] == sorted(accepted)
    opened.clear()
    svc = ExplainerService.load(model_dir, HandlerSettings(cpu_int8=False), None)
    assert svc.model_info.int8_graphs == [] and not any(n.endswith(INT8_SUFFIX) for n in opened)
    assert set(accepted) <= set(opened)


def test_a_stale_8bit_graph_is_not_served(tiny_full_bundle, tmp_path, caplog):
    """A float graph rewritten after quantization (its hash changed) is served in float."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_full_bundle, bundle)
    doc = _doc(bundle)
    stale = next(g for g in doc["graphs"] if g["accepted"])
    stale["source_sha256"] = "0" * 64
    (bundle / "quantization.json").write_text(json.dumps(doc))
    write_manifest(bundle)
    with caplog.at_level(logging.WARNING):
        variants = int8_variants(load_bundle(bundle))
    assert stale["source"] not in variants and "stale" in caplog.text
    assert set(variants) == {g["source"] for g in doc["graphs"] if g["accepted"]} - {stale["source"]}


@pytest.mark.parametrize("damage", ["unlisted", "format", "shape"])
def test_a_malformed_quantization_document_fails_the_load(tiny_full_bundle, tmp_path, damage):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_full_bundle, bundle)
    doc = _doc(bundle)
    if damage == "unlisted":
        next(g for g in doc["graphs"] if g["accepted"])["file"] = "../elsewhere.onnx"
    elif damage == "format":
        doc["format"] = "quantization/0"
    else:
        del doc["graphs"][0]["source"]
    (bundle / "quantization.json").write_text(json.dumps(doc))
    write_manifest(bundle)
    with pytest.raises(ArtifactError):
        int8_variants(load_bundle(bundle))
