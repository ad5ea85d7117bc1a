"""Handler-test fixtures: an extracted-archive folder with every explanation artifact.

``test_handler.py`` overrides ``model_dir`` with the classifier-only bundle.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.handler.mock_context import model_dir_from_bundle


@pytest.fixture(scope="session")
def model_dir(tiny_full_bundle: Path, tmp_path_factory) -> Path:
    return model_dir_from_bundle(tiny_full_bundle, tmp_path_factory.mktemp("model_full"))
