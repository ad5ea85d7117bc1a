"""Shared fixtures: a tiny rendered data set, a briefly trained classifier, its bundle and .mar.

Everything is built once per test session in a temporary folder (no downloads, no
committed artifacts). The tiny model is trained for a few steps only: tests check that
serving reproduces the exported network exactly, not that the network is accurate.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from export import pipeline
from export.cladec import ClaDecConfig
from export.concepts import ConceptConfig
from export.pipeline import ModelSource
from export.quantize import QuantizeConfig
from export.train import TrainConfig

TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.data.renderer import render_dataset
    out = tmp_path_factory.mktemp("data") / "shapes"
    return render_dataset(out, n_train=300, n_test=100, size=TINY_SIZE, seed=7, workers=1, progress=False)


@pytest.fixture(scope="session")
def tiny_classifier(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "classifier"
    pipeline.train(pipeline.TrainStep(data=tiny_data, out=out, arch="demo_resnet",
                                      training=TrainConfig(epochs=1, batch_size=64, lr=4e-3, seed=0, max_steps=3)))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_classifier: Path) -> Path:
    out = tiny_classifier.parent / "bundle"
    pipeline.export_bundle(pipeline.ExportStep(out=out, model=ModelSource(classifier=tiny_classifier),
                                               name="tiny", version="0.1"))
    return out


@pytest.fixture(scope="session")
def tiny_concept_bundle(tiny_bundle: Path, tiny_classifier: Path, tiny_data: Path) -> Path:
    """The tiny bundle plus concept artifacts (4 concepts per layer, very short training)."""
    import shutil
    out = tiny_bundle.parent / "bundle_concepts"
    shutil.copytree(tiny_bundle, out)
    pipeline.add_concepts(pipeline.ConceptsStep(
        bundle=out, data=tiny_data, model=ModelSource(classifier=tiny_classifier),
        concepts=ConceptConfig(k=4, states=3, epochs=1, train_images=200, validity_images=20, max_indegree=2,
                               outcome_max_indegree=2, intervention_images=60, min_steps=0,
                               seed=0)))
    return out


@pytest.fixture(scope="session")
def tiny_full_bundle(tiny_concept_bundle: Path, tiny_classifier: Path, tiny_data: Path) -> Path:
    """The concept bundle plus ClaDec decoders and RefAEs (two alphas, very short training),
    the class-specific features, the 8-bit graphs that pass their checks, and concept names
    from the layer analysis."""
    import shutil
    out = tiny_concept_bundle.parent / "bundle_full"
    shutil.copytree(tiny_concept_bundle, out)
    model = ModelSource(classifier=tiny_classifier)
    pipeline.add_cladec(pipeline.ClaDecStep(
        bundle=out, data=tiny_data, model=model,
        cladec=ClaDecConfig(alphas=(0.0, 0.001), sweep_alphas=(0.0, 0.001), epochs=1, min_steps=0,
                            train_images=200, eval_images=50, fresh_classifier_epochs=1,
                            fresh_classifier_images=200, seed=0)))
    pipeline.add_features(pipeline.FeaturesStep(bundle=out, data=tiny_data, model=model))
    pipeline.quantize(pipeline.QuantizeStep(bundle=out, data=tiny_data, quantize=QuantizeConfig(
        calibration_images=64, eval_images=50, timing_runs=3)))
    pipeline.analyze(pipeline.AnalyzeStep(bundle=out, data=tiny_data, model=model, images=300, pca_dims=3,
                                          out=out.parent / "analysis"))
    return out


@pytest.fixture(scope="session")
def tiny_mar(tiny_bundle: Path) -> Path:
    """The classifier-only archive (predictions; explanations answer 501)."""
    store = tiny_bundle.parent / "model_store"
    pipeline.archive(pipeline.ArchiveStep(bundle=tiny_bundle, name="tiny", version="0.1", model_store=store,
                                          accept_failed_checks=True))  # a 3-step model fails the targets
    return store / "tiny.mar"


@pytest.fixture(scope="session")
def tiny_explainer_mar(tiny_full_bundle: Path) -> Path:
    """The archive with every explanation artifact built so far."""
    store = tiny_full_bundle.parent / "model_store_explain"
    pipeline.archive(pipeline.ArchiveStep(bundle=tiny_full_bundle, name="tinyx", version="0.1", model_store=store,
                                          accept_failed_checks=True))  # a 3-step model fails the targets
    return store / "tinyx.mar"


@pytest.fixture(scope="session")
def sample_pngs(tiny_data: Path) -> list[bytes]:
    """Ten test images' PNG bytes, one per class folder."""
    files = sorted((tiny_data / "test").glob("*/*.png"))
    by_class: dict[str, Path] = {}
    for f in files:
        by_class.setdefault(f.parent.name, f)
    return [p.read_bytes() for p in by_class.values()]
