"""bench/build_model.py's resumed builds: which steps run again and what the report says."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench import build_model
from bench.build_model import Counts, build, reusable_training

COUNTS = Counts(n_train=30, n_test=10, ae_images=20, epochs=2)
STEPS = ("render", "train", "export_bundle", "add_concepts", "add_cladec", "add_features", "quantize", "analyze")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every pipeline step replaced by one that records its name."""
    seen: list[str] = []
    for name in STEPS:
        def fake(step: Any, name: str = name) -> dict[str, Any]:
            seen.append(name)
            return {"seconds": 1.0}
        monkeypatch.setattr(build_model.pipeline, name, fake)
    return seen


def _trained_folder(out: Path, epochs: int = 2, arch: str = "resnet18_like") -> None:
    (out / "classifier").mkdir(parents=True)
    (out / "data").mkdir()
    (out / "data" / "factors.csv").write_text("file,shape\n")
    record = {"epochs": epochs, "train_images": COUNTS.n_train, "test_images": COUNTS.n_test, "seconds": 600.0,
              "test_accuracy": 0.99, "history": []}
    (out / "classifier" / "classifier.json").write_text(json.dumps(
        {"architecture": arch, "input": {"height": 32}, "training": record}))


def test_a_matching_classifier_is_found_and_a_different_one_is_not(tmp_path: Path):
    assert reusable_training(tmp_path, "resnet18_like", 32, COUNTS) is None
    _trained_folder(tmp_path / "same")
    assert reusable_training(tmp_path / "same", "resnet18_like", 32, COUNTS)["seconds"] == 600.0
    assert reusable_training(tmp_path / "same", "resnet18_like", 64, COUNTS) is None
    assert reusable_training(tmp_path / "same", "demo_resnet", 32, COUNTS) is None
    _trained_folder(tmp_path / "other", epochs=3)
    assert reusable_training(tmp_path / "other", "resnet18_like", 32, COUNTS) is None


def _method_counts(out: Path, counts: Counts) -> None:
    """The record a build with ``counts`` (at 32 px, the default architecture) leaves beside its bundle."""
    (out / build_model.METHOD_COUNTS).write_text(json.dumps(
        {"arch": "resnet18_like", "size": 32, "precision": "bf16", "counts": dataclasses.asdict(counts)}))


def _resume_after_concepts(out: Path, recorded: Counts | None) -> dict[str, Any]:
    """A trained classifier and a bundle whose concept step is done (built with ``recorded``
    counts; None: no record), resumed with :data:`COUNTS`; returns the build report."""
    _trained_folder(out)
    if recorded is not None:
        _method_counts(out, recorded)
    bundle = out / "bundle"
    bundle.mkdir()
    (bundle / "metadata.json").write_text("{}")
    (bundle / "concepts.json").write_text(json.dumps({"report": {"seconds": 1304.0}}))
    return build(out, size=32, counts=COUNTS, reuse_classifier=True)


def test_a_resumed_build_skips_the_classifier_and_the_steps_in_the_bundle(tmp_path: Path, calls: list[str]):
    report = _resume_after_concepts(tmp_path, COUNTS)
    assert calls == ["add_cladec", "add_features", "quantize", "analyze"]
    assert report["train"]["reused"] and report["concepts"] == {"reused": True, "seconds": 1304.0}
    assert report["step_seconds"]["train"] == 600.0 and report["step_seconds"]["concepts"] == 1304.0
    assert report["seconds_all_steps"] == pytest.approx(600.0 + 1304.0 + sum(
        report["step_seconds"][s] for s in ("cladec", "features", "quantization", "analysis")))
    assert json.loads((tmp_path / "build-report.json").read_text())["reused_classifier"] is True


def test_without_reuse_every_step_runs(tmp_path: Path, calls: list[str]):
    _trained_folder(tmp_path)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "concepts.json").write_text(json.dumps({"report": {"seconds": 1.0}}))
    report = build(tmp_path, size=32, counts=COUNTS)
    assert calls == list(STEPS)
    assert "reused_classifier" not in report and "seconds_all_steps" not in report


@pytest.mark.parametrize("recorded", [None, dataclasses.replace(COUNTS, intervention_images=COUNTS.intervention_images + 1)])
def test_method_steps_built_with_other_or_unknown_counts_run_again(tmp_path: Path, calls: list[str], recorded):
    """Only the classifier is kept when the bundle's steps were built with other counts (or
    nothing says with which); the new counts are recorded for the next resume."""
    report = _resume_after_concepts(tmp_path, recorded)
    assert calls == ["add_concepts", "add_cladec", "add_features", "quantize", "analyze"]
    assert report["train"]["reused"] and "reused" not in report["concepts"]
    assert json.loads((tmp_path / build_model.METHOD_COUNTS).read_text())["counts"] == dataclasses.asdict(COUNTS)
