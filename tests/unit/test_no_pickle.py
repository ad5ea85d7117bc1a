"""No pickle anywhere in the serving code or the artifact formats."""
from __future__ import annotations

import ast
from pathlib import Path

import handlers

FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
FORBIDDEN_CALLS = {"load", "loads"}


def python_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]


def test_serving_code_never_imports_or_calls_pickle():
    offenders = []
    for path in python_files(Path(handlers.__file__).parent):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                offenders += [(path, a.name) for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                offenders.append((path, node.module))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in {"torch", "np", "numpy"} and node.func.attr in FORBIDDEN_CALLS:
                    offenders.append((path, f"{owner.id}.{node.func.attr}"))
    assert not offenders, offenders


def test_torch_loads_in_export_use_weights_only():
    import export
    for path in python_files(Path(export.__file__).parent):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, path


def test_bundle_holds_only_portable_files(tiny_full_bundle: Path):
    files = [p for p in tiny_full_bundle.rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".onnx", ".json", ".png"}, suffixes
    pngs = [p for p in files if p.suffix == ".png"]  # the concept atlas sprites, and nothing posing as one
    assert pngs and all(p.name.startswith("atlas_") and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
