"""The onnxruntime flavours are exclusive: each resolves exactly one onnxruntime package, and
the GPU flavour's onnxruntime offers CUDA (no GPU needed to see it), in fresh virtual
environments created from the project."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]
RUNTIMES = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"}


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def run(python: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def resolve(python: Path, target: str, report: Path) -> dict[str, str]:
    """What ``pip install target`` would install: name -> version (pip's dry-run report)."""
    proc = run(python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), target)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict[str, str]]:
    base = tmp_path_factory.mktemp("flavours")
    python = fresh_venv(base / "resolver")
    return {flavour: resolve(python, f".[{flavour}]", base / f"{flavour}.json") for flavour in ("cpu", "gpu")}


@pytest.mark.parametrize("flavour, runtime", [("cpu", "onnxruntime"), ("gpu", "onnxruntime-gpu")])
def test_each_flavour_resolves_exactly_one_onnxruntime(resolved, flavour, runtime):
    assert set(resolved[flavour]) & RUNTIMES == {runtime}


@pytest.mark.parametrize("flavour, runtime, cuda", [("gpu", "onnxruntime-gpu", True), ("cpu", "onnxruntime", False)])
def test_the_flavours_onnxruntime_offers_cuda_only_on_gpu(resolved, tmp_path, flavour, runtime, cuda):
    """Install the flavour's onnxruntime exactly as resolved (the rest of the project does not
    touch it: the resolution above shows no other onnxruntime) and ask it for its providers,
    and what a worker with GPU 1 would plan."""
    python = fresh_venv(tmp_path / flavour)
    proc = run(python, "-m", "pip", "install", "--quiet", f"{runtime}=={resolved[flavour][runtime]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = ("import json, sys, onnxruntime as ort; sys.path.insert(0, '.');"
             "from handlers.runtime.devices import plan_devices;"
             "p = plan_devices(['CUDAExecutionProvider', 'CPUExecutionProvider'], 1, ort.get_available_providers());"
             "print(json.dumps({'providers': ort.get_available_providers(), 'device': p.device}))")
    out = run(python, "-c", probe)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert ("CUDAExecutionProvider" in answer["providers"]) is cuda
    assert answer["device"] == ("cuda:1" if cuda else "cpu")


def test_the_running_environment_has_one_flavour():
    """This test environment itself (make venv) holds exactly one onnxruntime distribution."""
    from importlib.metadata import distributions
    names = {d.metadata["Name"].lower() for d in distributions()}
    assert len(names & RUNTIMES) == 1, names & RUNTIMES
    assert sys.prefix != sys.base_prefix  # a virtual environment
