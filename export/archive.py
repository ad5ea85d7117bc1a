"""Build the artifact bundle (atomically) and archive it into a TorchServe ``.mar``."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import handlers
from handlers.runtime.bundle import METADATA, ModelMetadata, verify_bundle, write_manifest

HANDLER_PACKAGE = Path(handlers.__file__).resolve().parent
HANDLER_MODULE = "concept_handler.py"
DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent / "model-config.yaml"


def write_bundle(out_dir: str | Path, fill: Callable[[Path], ModelMetadata], base: str | Path | None = None) -> Path:
    """Create a bundle atomically: ``fill(tmp_dir)`` writes the artifacts and returns the
    metadata; then metadata and manifest are written and the folder renamed into place.
    With ``base``, the temporary folder starts as a copy of that (verified) bundle, so a
    later export step adds its artifacts to the earlier ones. An interrupted export leaves
    any previous bundle at ``out_dir`` intact."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if base is not None:
            verify_bundle(base)
            shutil.copytree(base, tmp, dirs_exist_ok=True)
        meta = fill(tmp)
        (tmp / METADATA).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        write_manifest(tmp)
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_handlers(dst: Path) -> None:
    shutil.copytree(HANDLER_PACKAGE, dst / "handlers",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build_mar(bundle_dir: str | Path, name: str, version: str, model_store: str | Path,
              model_config: str | Path | None = None) -> Path:
    """Archive ``bundle_dir`` with torch-model-archiver into ``model_store/NAME.mar``.

    The archive is self-contained: the ``handlers`` package travels inside it (TorchServe
    puts the model folder first on the worker's PYTHONPATH), so serving needs only
    TorchServe, onnxruntime, numpy and Pillow.
    """
    with tempfile.TemporaryDirectory(prefix="mar-stage-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        _copy_handlers(stage)
        shutil.copytree(Path(bundle_dir).resolve(), stage / "bundle")
        return archive_folder(stage, stage / "handlers" / HANDLER_MODULE, name, version, model_store, model_config)


def archive_folder(stage: str | Path, handler: str | Path, name: str, version: str, model_store: str | Path,
                   model_config: str | Path | None = None) -> Path:
    """Run torch-model-archiver on a staged folder (its contents become the model folder)
    with ``handler`` as the entry point; returns ``model_store/NAME.mar``."""
    store = Path(model_store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    archiver = (shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent))
                or shutil.which("torch-model-archiver"))
    if archiver is None:
        raise RuntimeError("torch-model-archiver is not installed")
    cmd = [archiver,
           "--model-name", name, "--version", version,
           "--handler", str(handler),
           "--extra-files", str(stage),
           "--config-file", str(model_config or DEFAULT_MODEL_CONFIG),
           "--export-path", str(store), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(stage).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return store / f"{name}.mar"
