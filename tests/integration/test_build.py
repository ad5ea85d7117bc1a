"""`concept-explainer build` on a model the project did not define, on real images: a user's
own 1-channel CNN with nested module names (``body.0..2``, ``pool``, ``head.1``), trained here
on scikit-learn's handwritten digits, saved as a state dict and archived as an eager .mar with
torch-model-archiver, as TorchServe users hold their models; then served by a real TorchServe
and checked against the in-process runtime. Bad input gets one line, never a traceback."""
from __future__ import annotations

import base64
import importlib.util
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
from export.data.digits import write_digits_folder
from export.errors import PipelineError
from handlers.runtime.service import ExplainerService, RawRequest
from handlers.runtime.settings import HandlerSettings
from handlers.runtime.source import from_mar
from tests.integration.server import TorchServe, post

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

NET = '''
from torch import nn


def block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.body(x)))
'''
NO_LINEAR = NET.replace("nn.Sequential(nn.Flatten(), nn.Linear(2 * width, num_classes))", "nn.Flatten()")
SIZE, MEAN, STD = 28, (0.25,), (0.35,)
SMALL_CONCEPTS = ConceptConfig(k=3, states=3, epochs=1, train_images=150, validity_images=10, max_indegree=2,
                               outcome_max_indegree=2, intervention_images=30, min_steps=0, seed=0)
SMALL_CLADEC = ClaDecConfig(alphas=(0.0,), sweep_alphas=(0.0,), epochs=1, min_steps=0, train_images=150,
                            eval_images=30, fresh_classifier_epochs=0, seed=0)


def archiver(*args: str) -> None:
    exe = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or "torch-model-archiver"
    proc = subprocess.run([exe, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The real digits at 28 px, plus one corrupt file the build must skip and count."""
    root = write_digits_folder(tmp_path_factory.mktemp("digits") / "digits", size=SIZE)
    (next((root / "train").iterdir()) / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def user_model(digits: Path, tmp_path_factory) -> Path:
    """The user's folder: net.py, net.pt (trained a little on the digits) and usernet.mar."""
    from export.data.loader import load_image_folder
    from handlers.runtime.imaging import InputSpec, normalize
    work = tmp_path_factory.mktemp("user")
    (work / "net.py").write_text(NET)
    torch.manual_seed(0)
    model = _module(work / "net.py").Net(10)
    spec = InputSpec(SIZE, SIZE, 1, MEAN, STD)
    ds = load_image_folder(digits, spec, "train", limit=600, progress=False)
    x, y = torch.from_numpy(normalize(ds.pixels, spec)), torch.from_numpy(ds.labels).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), work / "net.pt")
    classes = sorted(p.name for p in (digits / "train").iterdir())
    (work / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(classes)}))
    archiver("--model-name", "usernet", "--version", "2.0", "--model-file", str(work / "net.py"),
             "--serialized-file", str(work / "net.pt"), "--handler", "image_classifier",
             "--extra-files", str(work / "index_to_name.json"), "--export-path", str(work))
    return work


@pytest.fixture(scope="module")
def built(user_model: Path, digits: Path, tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("build")
    step = pipeline.BuildStep(data=digits, name="usernet", from_mar=user_model / "usernet.mar",
                              model=pipeline.ModelSource(channels=1, size=SIZE, mean=MEAN, std=STD),
                              build=out / "usernet", model_store=out / "store", accept_failed_checks=True)
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = pipeline.build(step, concepts=SMALL_CONCEPTS, cladec=SMALL_CLADEC)
    return report, out, printed.getvalue()


def test_build_chooses_layers_from_the_model_and_says_why(built):
    report, out, printed = built
    assert report["layout"] == {"head": "head.1", "penultimate": "pool",
                                "concept_layers": ["body.0", "body.1", "body.2"], "cladec_layers": ["body.1", "pool"]}
    assert "head: head.1 (the last nn.Linear called" in printed and "[7/7] archive" in printed
    assert "skipped 1 unreadable image(s) of the train split" in printed  # the corrupt file, and it went on
    meta = json.loads((out / "usernet" / "bundle" / "metadata.json").read_text())
    assert meta["source"]["model_class"] == "Net" and meta["source"]["weights"].endswith("net.pt")
    assert meta["input"]["channels"] == 1 and meta["input"]["mean"] == list(MEAN)
    assert meta["version"] == "2.0" and meta["classes"] == [str(i) for i in range(10)]
    assert {"concepts", "cladec", "features"} <= set(meta)


def test_the_built_archive_on_a_real_torchserve_answers_like_the_runtime(built, digits, tmp_path):
    report, _, _ = built
    mar = Path(report["archive"]["mar"])
    png = next((digits / "test" / "3").glob("*.png")).read_bytes()
    src = from_mar(mar, tmp_path / "served")
    service = ExplainerService.load(src.model_dir, HandlerSettings.from_mapping(src.handler), None)
    try:
        (reply,) = service.handle_batch([RawRequest(png, "image/png", True)])
    finally:
        service.close()
    expected = reply.body
    assert {c["layer"] for c in expected["concepts"]} <= {"body.0", "body.1", "body.2"}
    assert expected["features"]["layer"] == "pool" and {e["layer"] for e in expected["cladec"]} == {"body.1", "pool"}
    with TorchServe(tmp_path / "ts", mar.parent, {"usernet": mar.name}) as ts:
        r = post(ts, png, endpoint="explanations", model="usernet")
    assert r.status_code == 200, r.text
    got = r.json()
    assert {k: v for k, v in got.items() if k != "timings_ms"} == {k: v for k, v in expected.items()
                                                                   if k != "timings_ms"}
    assert base64.b64decode(got["cladec"][0]["reconstruction_png"]).startswith(b"\x89PNG")


def test_later_steps_need_only_the_bundle(built, digits):
    """The model is recorded in the bundle: `features` runs with --bundle and --data alone."""
    _, out, _ = built
    proc = cli("features", "--bundle", str(out / "usernet" / "bundle"), "--data", str(digits),
               "--layer", "pool", "--head", "head.1", "--finetune-epochs", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selectivity body.0" in proc.stdout


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_gets_one_clear_line(user_model, digits, tmp_path):
    model = ["--model-file", str(user_model / "net.py"), "--model-class", "Net", "--weights",
             str(user_model / "net.pt"), "--mean", "0.25", "--std", "0.35"]
    base = ["build", "--data", str(digits), "--name", "x", "--build", str(tmp_path / "b"),
            "--model-store", str(tmp_path / "s")]
    _one_line(cli(*base, *model, "--layers", "body.9"), "unknown layers ['body.9']", "body.0")
    _one_line(cli(*base, *model[:6], "--channels", "3"), "does not take inputs of 3x28x28", "--channels")
    (tmp_path / "wide.py").write_text(NET.replace("width=8", "width=12"))
    _one_line(cli(*base, *model[:1], str(tmp_path / "wide.py"), *model[2:]), "net.pt does not fit Net",
              "body.0.0.weight")
    (tmp_path / "nolinear.py").write_text(NO_LINEAR)
    torch.save(_module(tmp_path / "nolinear.py").Net().state_dict(), tmp_path / "nolinear.pt")
    _one_line(cli(*base, "--model-file", str(tmp_path / "nolinear.py"), "--model-class", "Net",
                  "--weights", str(tmp_path / "nolinear.pt")), "no nn.Linear")
    one = tmp_path / "one_class"
    shutil.copytree(digits / "train" / "3", one / "train" / "3")
    _one_line(cli(*base[:2], str(one), *base[3:], *model), "at least two class subfolders")
    _one_line(cli(*base, "--from-mar", str(user_model / "net.py")), "not a .mar")


def test_archives_that_cannot_be_explained_are_refused_clearly(tmp_path):
    (tmp_path / "two.py").write_text(NET + "\n\nclass Other(nn.Module):\n    pass\n")
    torch.save({}, tmp_path / "w.pt")
    archiver("--model-name", "two", "--version", "1", "--model-file", str(tmp_path / "two.py"),
             "--serialized-file", str(tmp_path / "w.pt"), "--handler", "image_classifier",
             "--export-path", str(tmp_path))
    with pytest.raises(PipelineError, match="defines 2 nn.Module classes"):
        pipeline.source_from_mar(tmp_path / "two.mar", tmp_path / "x", pipeline.ModelSource())
