"""`concept-explainer build` on a model the project did not define: a user's own CNN
(blocks block1..3, pool, flat, fc), trained here, saved as a state dict and archived as an
eager .mar with torch-model-archiver, as TorchServe users hold their models."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import pipeline
from export.cladec import ClaDecConfig
from export.concepts import ConceptConfig
from export.errors import PipelineError
from handlers.runtime.service import ExplainerService, RawRequest
from handlers.runtime.settings import HandlerSettings
from handlers.runtime.source import from_mar

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

NET = '''
import torch
from torch import nn


def block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.block1, self.block2, self.block3 = block(3, 8), block(8, 16), block(16, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.block3(self.block2(self.block1(x))))))
'''
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SMALL_CONCEPTS = ConceptConfig(k=3, states=3, epochs=1, train_images=120, validity_images=10, max_indegree=2,
                               outcome_max_indegree=2, intervention_images=30, min_steps=0, seed=0)
SMALL_CLADEC = ClaDecConfig(alphas=(0.0,), sweep_alphas=(0.0,), epochs=1, min_steps=0, train_images=120,
                            eval_images=30, fresh_classifier_epochs=0, seed=0)


def archiver(*args: str) -> None:
    exe = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or "torch-model-archiver"
    proc = subprocess.run([exe, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def user_mar(tiny_data: Path, tmp_path_factory) -> Path:
    """The user's model, trained a few steps on the tiny data, archived as an eager .mar."""
    from export.data.loader import load_image_folder
    from handlers.runtime.imaging import InputSpec
    from handlers.runtime.imaging import normalize as norm
    work = tmp_path_factory.mktemp("user")
    (work / "net.py").write_text(NET)
    sys.path.insert(0, str(work))
    try:
        import importlib
        net_module = importlib.import_module("net")
    finally:
        sys.path.remove(str(work))
    classes = sorted(p.name for p in (tiny_data / "train").iterdir())
    torch.manual_seed(0)
    model = net_module.Net(len(classes))
    size = next((tiny_data / "test").glob("*/*.png"))
    from PIL import Image
    px = Image.open(size).size[0]
    spec = InputSpec(px, px, 3, MEAN, STD)
    ds = load_image_folder(tiny_data, spec, "train", limit=200)
    x = torch.from_numpy(norm(ds.pixels, spec))
    y = torch.from_numpy(ds.labels).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), work / "net.pt")
    (work / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(classes)}))
    archiver("--model-name", "usernet", "--version", "2.0", "--model-file", str(work / "net.py"),
             "--serialized-file", str(work / "net.pt"), "--handler", "image_classifier",
             "--extra-files", str(work / "index_to_name.json"), "--export-path", str(work))
    return work / "usernet.mar"


@pytest.fixture(scope="module")
def built(user_mar: Path, tiny_data: Path, tmp_path_factory) -> tuple[dict, Path]:
    """The explaining archive of the user's .mar (the tiny images are smaller than
    image_classifier's 224 px: the size and statistics are given as flags)."""
    from PIL import Image
    out = tmp_path_factory.mktemp("build")
    px = Image.open(next((tiny_data / "test").glob("*/*.png"))).size[0]
    step = pipeline.BuildStep(data=tiny_data, name="usernet", from_mar=user_mar,
                              model=pipeline.ModelSource(mean=MEAN, std=STD, size=px),
                              build=out / "usernet", model_store=out / "store", accept_failed_checks=True)
    return pipeline.build(step, concepts=SMALL_CONCEPTS, cladec=SMALL_CLADEC), out


def test_build_chooses_layers_from_the_model_and_archives(built, sample_pngs, tmp_path):
    report, out = built
    assert report["layout"] == {"head": "fc", "penultimate": "pool", "concept_layers": ["block1", "block2", "block3"],
                                "cladec_layers": ["block2", "pool"]}
    meta = json.loads((out / "usernet" / "bundle" / "metadata.json").read_text())
    assert meta["source"]["model_class"] == "Net" and meta["source"]["weights"].endswith("net.pt")
    assert meta["input"]["mean"] == list(MEAN) and meta["version"] == "2.0"  # the .mar's version
    assert {"concepts", "cladec", "features"} <= set(meta)
    mar = Path(report["archive"]["mar"])
    src = from_mar(mar, tmp_path / "served")
    service = ExplainerService.load(src.model_dir, HandlerSettings.from_mapping(src.handler), None)
    try:
        (reply,) = service.handle_batch([RawRequest(sample_pngs[0], "image/png", True)])
    finally:
        service.close()
    assert reply.status == 200
    body = reply.body
    assert {c["layer"] for c in body["concepts"]} <= {"block1", "block2", "block3"}
    assert body["features"]["layer"] == "pool" and {e["layer"] for e in body["cladec"]} == {"block2", "pool"}


def test_later_steps_need_only_the_bundle(built, tiny_data):
    """The model is recorded in the bundle: `features` runs with --bundle and --data alone."""
    _, out = built
    proc = subprocess.run([sys.executable, "-m", "export.cli", "features", "--bundle", str(out / "usernet" / "bundle"),
                           "--data", str(tiny_data), "--layer", "pool", "--head", "fc", "--finetune-epochs", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selectivity" in proc.stdout.lower()


def test_archives_that_cannot_be_explained_are_refused_clearly(tmp_path, tiny_data):
    (tmp_path / "two.py").write_text(NET + "\n\nclass Other(nn.Module):\n    pass\n")
    torch.save({}, tmp_path / "w.pt")
    archiver("--model-name", "two", "--version", "1", "--model-file", str(tmp_path / "two.py"),
             "--serialized-file", str(tmp_path / "w.pt"), "--handler", "image_classifier",
             "--export-path", str(tmp_path))
    with pytest.raises(PipelineError, match="defines 2 nn.Module classes"):
        pipeline.source_from_mar(tmp_path / "two.mar", tmp_path / "x", pipeline.ModelSource())
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="not a .mar"):
        pipeline.source_from_mar(tmp_path / "junk.mar", tmp_path / "y", pipeline.ModelSource())
