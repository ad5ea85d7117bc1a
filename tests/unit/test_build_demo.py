"""`concept-explainer build-demo` end to end on a tiny data set: every step, one archive."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from export import cli
from export.concepts import failed_checks
from export.cladec import ClaDecConfig
from export.concepts import ConceptConfig
from export.pipeline import PARITY_TOLERANCE, BuildDemoStep, build_demo, demo_cladec_config


@pytest.mark.slow
def test_build_demo_produces_a_complete_archive(tmp_path):
    data, build, store = tmp_path / "data", tmp_path / "build", tmp_path / "store"
    # A one-epoch model may miss the concept validity targets: accept them here, and check below
    # that the report names exactly the failed checks and that a plain archive refuses them.
    step = BuildDemoStep(data=data, build=build, model_store=store, n_train=200, n_test=80, epochs=1, name="mini",
                         accept_failed_checks=True)
    small_concepts = ConceptConfig(k=4, epochs=1, train_images=200, validity_images=20, intervention_images=40,
                                   min_steps=0)
    small_cladec = ClaDecConfig(alphas=(0.0,), sweep_alphas=(0.0,), epochs=1, min_steps=0, train_images=200,
                                eval_images=40, fresh_classifier_epochs=1, fresh_classifier_images=200)
    build_demo(step, concepts=small_concepts, cladec=small_cladec)
    report = json.loads((build / "build-report.json").read_text())
    assert {"render", "train", "export", "concepts", "cladec", "features", "analysis", "archive"} <= set(report)

    # render and train: the counts asked for, on disk and in the report
    assert report["render"]["images"] == 280 and (data / "factors.csv").is_file()
    assert len(list((data / "train").glob("*/*.png"))) == 200 and len(list((data / "test").glob("*/*.png"))) == 80
    training = report["train"]["training"]
    assert (training["epochs"], training["train_images"], training["test_images"]) == (1, 200, 80)
    assert 0.0 <= training["test_accuracy"] <= 1.0
    assert json.loads((build / "classifier" / "classifier.json").read_text())["training"] == training

    # export and the methods: one bundle holding every artifact, layers as reported
    bundle = build / "bundle"
    meta = json.loads((bundle / "metadata.json").read_text())
    assert (meta["name"], meta["version"]) == ("mini", "1.0")
    assert [l["name"] for l in meta["layers"]] == report["export"]["layers"]
    assert report["export"]["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert {meta["concepts"], meta["cladec"], meta["features"], meta["quantization"]} == {
        "concepts.json", "cladec.json", "features.json", "quantization.json"}
    quantization = json.loads((bundle / "quantization.json").read_text())
    assert quantization["graphs"] == report["quantization"]["graphs"] and len(quantization["graphs"]) == 5
    concepts = json.loads((bundle / "concepts.json").read_text())
    assert concepts["report"]["checks"] == report["concepts"]["checks"]
    features = json.loads((bundle / "features.json").read_text())["report"]
    for key in ("subset_sizes", "agreement_decomposed_vs_full", "test_images"):
        assert features[key] == report["features"][key]
    # the analysis ran on factors.csv and wrote its concept names into the bundle
    analysis = json.loads((build / "analysis" / "layer_analysis.json").read_text())
    for layer in concepts["layers"]:
        assert layer["names"] == [e["name"] for e in analysis["concept_names"][layer["layer"]]]

    # archive: the .mar holds this bundle, its failed checks are the bundle's
    mar_path = store / "mini.mar"
    assert Path(report["archive"]["mar"]).resolve() == mar_path.resolve()
    assert report["archive"]["failed_checks"] == [c["name"] for c in failed_checks(concepts["report"])]
    with zipfile.ZipFile(mar_path) as mar:
        names = set(mar.namelist())
        assert mar.read("bundle/manifest.json") == (bundle / "manifest.json").read_bytes()
    assert {"concept_handler.py", "model-config.yaml", "bundle/manifest.json", "bundle/classifier.onnx",
            "bundle/concepts.json", "bundle/causal_network.json", "bundle/cladec.json", "bundle/features.json",
            "handlers/runtime/service.py"} <= names
    assert not any(n.endswith((".pkl", ".pt", ".pyc")) for n in names)
    # every layer's atlas sprite is in the archive and the manifest lists it with its hash
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    for layer in concepts["layers"]:
        sprite = layer["atlas"]["file"]
        assert f"bundle/{sprite}" in names and sprite in manifest
        assert manifest[sprite] == hashlib.sha256((bundle / sprite).read_bytes()).hexdigest()
    assert concepts["report"]["atlas"]["bytes"] == sum((bundle / l["atlas"]["file"]).stat().st_size
                                                       for l in concepts["layers"])

    # without --accept-failed-checks, archive exits non-zero exactly when checks failed
    again = tmp_path / "store2"
    status = cli.main(["archive", "--bundle", str(bundle), "--model-store", str(again)])
    assert status == (1 if report["archive"]["failed_checks"] else 0)
    assert (again / "mini.mar").is_file() == (status == 0)


def test_the_demo_trains_only_the_served_cladec_alphas_unless_asked_to_sweep():
    """The demo leaves the evaluation (report-only alphas, fresh classifiers) out unless asked,
    and gives its decoders the time saved: more steps than the plain default either way."""
    quick, full = demo_cladec_config(False), demo_cladec_config(True)
    assert quick.sweep_alphas == quick.alphas == ClaDecConfig().alphas and quick.fresh_classifier_epochs == 0
    assert set(full.alphas) < set(full.sweep_alphas) and full.fresh_classifier_epochs == ClaDecConfig().fresh_classifier_epochs
    assert quick.min_steps == full.min_steps > ClaDecConfig().min_steps
    assert BuildDemoStep().cladec_sweep is False
