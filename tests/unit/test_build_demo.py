"""`concept-explainer build-demo` end to end on a tiny data set: every step, one archive."""
from __future__ import annotations

import json
import zipfile

import pytest

from export import cli


@pytest.mark.slow
def test_build_demo_produces_a_complete_archive(tmp_path):
    assert cli.main(["build-demo", "--data", str(tmp_path / "data"), "--build", str(tmp_path / "build"),
                     "--model-store", str(tmp_path / "store"), "--n-train", "200", "--n-test", "80",
                     "--epochs", "1", "--name", "mini"]) == 0
    report = json.loads((tmp_path / "build" / "build-report.json").read_text())
    assert {"render", "train", "export", "concepts", "cladec", "features", "analysis", "archive"} <= set(report)
    meta = json.loads((tmp_path / "build" / "bundle" / "metadata.json").read_text())
    assert {"concepts", "cladec", "features"} <= set(meta)
    with zipfile.ZipFile(tmp_path / "store" / "mini.mar") as mar:
        names = set(mar.namelist())
    assert {"concept_handler.py", "model-config.yaml", "bundle/manifest.json", "bundle/classifier.onnx",
            "bundle/concepts.json", "bundle/causal_network.json", "bundle/cladec.json", "bundle/features.json",
            "handlers/runtime/service.py"} <= names
    assert not any(n.endswith((".pkl", ".pt", ".pyc")) for n in names)
