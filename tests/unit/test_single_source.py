"""Values written once: handler defaults (HandlerSettings, mirrored and checked in the shipped
model-config.yaml) and artifact format versions (the serving readers' constants, which the
export steps import)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

import export
from export.archive import DEFAULT_MODEL_CONFIG
from handlers.runtime import causal, cladec, concepts, features
from handlers.runtime.settings import HandlerSettings

EXPORT = Path(export.__file__).resolve().parent


def test_model_config_handler_section_is_the_settings_defaults():
    """HandlerSettings is the source of the defaults; the yaml lists every setting (it is the
    operator's reference) with exactly the default value."""
    section = yaml.safe_load(DEFAULT_MODEL_CONFIG.read_text())["handler"]
    assert list(section) == [f.name for f in dataclasses.fields(HandlerSettings)]
    assert HandlerSettings.from_mapping(section) == HandlerSettings()


def test_export_writes_no_format_literals_of_its_own():
    """Format versions are the readers' FORMAT constants; no export module spells one out."""
    formats = {m.FORMAT for m in (causal, cladec, concepts, features)}
    for path in EXPORT.rglob("*.py"):
        text = path.read_text()
        for fmt in formats:
            assert not re.search(rf"[\"']{re.escape(fmt)}[\"']", text), f"{path} spells out {fmt!r}"
