"""One real TorchServe for the integration tests, serving two archives built in the session:
``tiny`` (classifier only) and ``tinyx`` (with every explanation artifact)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.integration.server import TorchServe


@pytest.fixture(scope="session")
def server(tiny_mar: Path, tiny_explainer_mar: Path, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    for mar in (tiny_mar, tiny_explainer_mar):
        shutil.copy(mar, store / mar.name)
    with TorchServe(tmp_path_factory.mktemp("ts"), store,
                    {"tiny": tiny_mar.name, "tinyx": tiny_explainer_mar.name}) as ts:
        yield ts
