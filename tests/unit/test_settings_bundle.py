"""Settings from model-config.yaml, and the verified artifact bundle."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from export.archive import DEFAULT_MODEL_CONFIG, write_bundle
from handlers.runtime.bundle import LayerInfo, ModelMetadata, load_bundle, sha256_file, verify_bundle
from handlers.runtime.errors import ArtifactError
from handlers.runtime.imaging import InputSpec
from handlers.runtime.settings import HandlerSettings


def test_shipped_model_config_parses():
    cfg = yaml.safe_load(DEFAULT_MODEL_CONFIG.read_text())
    s = HandlerSettings.from_mapping(cfg["handler"])
    assert s.allowed_formats == ("PNG", "JPEG") and s.top_k == 5 and s.max_image_pixels == 4096 * 4096
    assert cfg["batchSize"] > 1


def test_settings_conversions_and_unknown_keys():
    s = HandlerSettings.from_mapping({"top_k": "3", "allowed_formats": "PNG, JPEG", "max_request_bytes": 10})
    assert s.top_k == 3 and s.allowed_formats == ("PNG", "JPEG") and s.max_request_bytes == 10
    assert HandlerSettings.from_mapping(None) == HandlerSettings()
    with pytest.raises(ValueError, match="unknown handler settings"):
        HandlerSettings.from_mapping({"topk": 3})
    with pytest.raises(ValueError):
        HandlerSettings.from_mapping({"top_k": 0})
    with pytest.raises(Exception):
        s.top_k = 4  # frozen


def _meta() -> ModelMetadata:
    return ModelMetadata("m", "1", ("a", "b"), InputSpec(8, 8, 1, (0.5,), (0.5,)), "net.onnx", "image",
                         "logits", (LayerInfo("layer1", "act_layer1", (4, 8, 8)),), {"source": {"x": 1}})


def _bundle(tmp_path: Path) -> Path:
    def fill(d: Path) -> ModelMetadata:
        (d / "net.onnx").write_bytes(b"onnx bytes")
        (d / "extra").mkdir()
        (d / "extra" / "table.json").write_text('{"a": 1}')
        return _meta()
    return write_bundle(tmp_path / "bundle", fill)


def test_bundle_roundtrip(tmp_path):
    b = load_bundle(_bundle(tmp_path))
    assert b.metadata == _meta()
    manifest = json.loads((b.root / "manifest.json").read_text())
    assert set(manifest["files"]) == {"net.onnx", "extra/table.json", "metadata.json"}
    assert manifest["files"]["net.onnx"] == sha256_file(b.root / "net.onnx")


@pytest.mark.parametrize("name", ["net.onnx", "extra/table.json", "metadata.json"])
def test_flipped_byte_refuses_to_load_and_names_file(tmp_path, name):
    root = _bundle(tmp_path)
    expected = json.loads((root / "manifest.json").read_text())["files"][name]
    data = bytearray((root / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as info:
        load_bundle(root)
    msg = str(info.value)
    assert name in msg and expected in msg and sha256_file(root / name) in msg


def test_missing_file_and_missing_manifest(tmp_path):
    root = _bundle(tmp_path)
    (root / "extra" / "table.json").unlink()
    with pytest.raises(ArtifactError, match="extra/table.json is missing"):
        verify_bundle(root)
    (root / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        verify_bundle(root)


def test_manifest_edit_is_detected(tmp_path):
    root = _bundle(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["net.onnx"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="net.onnx"):
        verify_bundle(root)


def test_interrupted_export_keeps_previous_bundle(tmp_path):
    root = _bundle(tmp_path)
    before = (root / "manifest.json").read_text()

    def failing(d: Path) -> ModelMetadata:
        (d / "net.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_bundle(root, failing)
    assert (root / "manifest.json").read_text() == before
    load_bundle(root)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
