"""Where a served model comes from: an archive (``.mar``) or a bundle folder, with the
``handler:`` settings to serve it with. Used by the front doors that are not TorchServe
(KServe's model server, the in-process ``concept-explainer explain``)."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ServedModel:
    """Where a model comes from: ``model_dir`` holds ``bundle/`` (an extracted ``.mar``
    or a folder around a bundle), ``config`` the ``handler:`` section to serve it with."""

    name: str
    model_dir: Path
    handler: dict[str, Any]


def from_mar(mar: Path, into: Path) -> ServedModel:
    """Extract a ``.mar`` (a zip) into ``into``; its manifest names the model and its
    model-config.yaml holds the handler settings. Only data is read: nothing is unpickled.

    Raises:
        ValueError: not a zip, no TorchServe manifest, or a member outside the archive.
        OSError: the file cannot be read.
    """
    try:
        with zipfile.ZipFile(mar) as zf:
            for member in zf.namelist():
                target = (into / member).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise ValueError(f"{mar}: member {member!r} points outside the archive")
            zf.extractall(into)
    except zipfile.BadZipFile:
        raise ValueError(f"{mar} is not a .mar (not a zip archive)") from None
    try:
        manifest = json.loads((into / "MAR-INF" / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        raise ValueError(f"{mar} has no readable MAR-INF/MANIFEST.json: not a TorchServe archive") from None
    model = manifest.get("model", {})
    config_file = manifest.get("configFile")
    config = yaml.safe_load((into / config_file).read_text()) if config_file else {}
    return ServedModel(model.get("modelName") or mar.stem, into, (config or {}).get("handler") or {})


def read_handler_section(config: Path) -> dict[str, Any]:
    """The ``handler:`` section of a model-config.yaml (empty when it has none)."""
    return dict((yaml.safe_load(config.read_text()) or {}).get("handler") or {})


def from_bundle(bundle: Path, name: str | None, config: Path | None) -> ServedModel:
    """A bundle folder served as it is; settings from ``config`` (a model-config.yaml) or defaults."""
    section = read_handler_section(config) if config else {}
    section["bundle_dir"] = bundle.name
    meta = json.loads((bundle / "metadata.json").read_text())
    return ServedModel(name or meta.get("name") or bundle.name, bundle.parent, section)
