"""Settings from model-config.yaml, and the verified artifact bundle."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from export.archive import DEFAULT_MODEL_CONFIG, write_bundle
from handlers.runtime.bundle import (LayerInfo, ModelMetadata, UnlistedArtifact, _bundle_digest, load_bundle,
                                     sha256_file, verify_bundle)
from handlers.runtime.errors import ArtifactError
from handlers.runtime.imaging import InputSpec
from handlers.runtime.settings import HandlerSettings, SettingsError


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


@pytest.mark.parametrize("name", ["cladec_reference", "overlap_views"])
@pytest.mark.parametrize("value, expected", [
    ("false", False), ("False", False), ("FALSE", False), ("no", False), ("off", False), ("0", False),
    (" false ", False), (False, False), (0, False),
    ("true", True), ("True", True), ("yes", True), ("ON", True), ("1", True), (True, True), (1, True),
])
def test_boolean_settings_parse_strictly(name, value, expected):
    """A quoted "false" in model-config.yaml is false (Python's bool("false") would be true)."""
    assert getattr(HandlerSettings.from_mapping({name: value}), name) is expected


def test_boolean_settings_from_yaml_text():
    section = yaml.safe_load('cladec_reference: "false"\noverlap_views: "off"\n')
    s = HandlerSettings.from_mapping(section)
    assert s.cladec_reference is False and s.overlap_views is False


@pytest.mark.parametrize("name", ["cladec_reference", "overlap_views", "cpu_int8"])
@pytest.mark.parametrize("value", ["flase", "", "2", 2, -1, 0.5, None, [], {}])
def test_boolean_settings_reject_anything_else(name, value):
    with pytest.raises(SettingsError, match=name):
        HandlerSettings.from_mapping({name: value})


@pytest.mark.parametrize("name", ["top_concepts", "top_k", "max_request_bytes", "max_image_pixels"])
@pytest.mark.parametrize("value", [0, -1, "0", "-3"])
def test_counts_below_one_are_rejected_naming_the_setting(name, value):
    """A count is >= 1: 0 must not silently mean "all" (nor -3 "all but 3").
    A value above the number of concepts is capped, which is how to ask for all of them."""
    with pytest.raises(SettingsError, match=name):
        HandlerSettings.from_mapping({name: value})
    assert HandlerSettings.from_mapping({"top_concepts": 10**6}).top_concepts == 10**6


@pytest.mark.parametrize("name, value", [
    ("top_k", 3.7), ("top_k", "3.5"), ("top_k", True), ("top_k", None), ("top_k", "five"),
    ("top_concepts", float("nan")), ("max_request_bytes", [1]), ("intra_op_threads", -1),
    ("blas_threads", -1), ("blas_threads", 1.5),
    ("intra_op_threads", False), ("monitor_fraction", True), ("monitor_fraction", "nan"),
    ("monitor_fraction", float("inf")), ("monitor_fraction", 1.5), ("monitor_fraction", -0.1),
    ("monitor_fraction", None), ("monitor_fraction", "lots"),
    ("bundle_dir", None), ("bundle_dir", ""), ("bundle_dir", 7),
    ("allowed_formats", None), ("allowed_formats", []), ("allowed_formats", "JPG"), ("allowed_formats", [1]),
    ("allowed_formats", 5), ("providers", "CUDAExecutionprovider"), ("providers", [None]), ("providers", 3),
    ("cladec_alphas", "highest"), ("cladec_alphas", 0.0), ("cladec_alphas", None), ("cladec_image_format", "webp"),
    ("cladec_image_format", ""), ("cladec_image_format", 3), ("cladec_chunk_rows", -1), ("cladec_chunk_rows", 1.5),
    ("network_concepts", -1), ("network_concepts", "every"), ("network_concepts", True),
    ("max_inflight", 0), ("max_inflight", "many"),
    ("verify_fraction", 1.5), ("verify_fraction", -0.01), ("verify_fraction", "often"), ("verify_fraction", True),
    ("verify_fraction_predictions", 2), ("verify_fraction_predictions", None), ("verify_queue", 0),
    ("verify_queue", "big"),
])
def test_malformed_values_name_the_setting(name, value):
    with pytest.raises(SettingsError, match=name):
        HandlerSettings.from_mapping({name: value})


def test_lenient_but_exact_conversions():
    s = HandlerSettings.from_mapping({"max_request_bytes": 1.0e7, "top_concepts": " 4 ", "monitor_fraction": "0.5",
                                      "intra_op_threads": 0, "allowed_formats": ["png", "Jpeg"],
                                      "providers": "CPUExecutionProvider", "cladec_image_format": " JPEG ",
                                      "cladec_alphas": "all", "cladec_chunk_rows": "0", "network_concepts": "0"})
    assert (s.cladec_image_format, s.cladec_alphas, s.cladec_chunk_rows) == ("jpeg", "all", 0)
    assert s.network_concepts == 0
    assert HandlerSettings.from_mapping({"network_concepts": " All "}).network_concepts is None  # every concept
    assert HandlerSettings().network_concepts is None
    assert s.max_request_bytes == 10_000_000 and s.top_concepts == 4 and s.intra_op_threads == 0
    assert s.allowed_formats == ("PNG", "JPEG") and s.providers == ("CPUExecutionProvider",)
    assert s.monitor_fraction == 0.5 and HandlerSettings.from_mapping({"monitor_fraction": 0}).monitor_fraction == 0.0
    with pytest.raises(SettingsError, match="handler section"):
        HandlerSettings.from_mapping(["top_k", 3])
    with pytest.raises(SettingsError, match="top_concepts"):
        HandlerSettings(top_concepts=0)


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


def test_bundle_path_opens_listed_files_only(tmp_path):
    """A file the manifest does not list was opened unverified by Bundle.path; now it is refused."""
    root = _bundle(tmp_path)
    (root / "unlisted.json").write_text('{"evil": 1}')  # added after the manifest was written
    b = load_bundle(root)
    assert b.path("net.onnx") == root / "net.onnx"
    assert b.path("extra/table.json") == root / "extra" / "table.json"
    assert b.path("./extra/table.json") == root / "extra" / "table.json"
    with pytest.raises(UnlistedArtifact, match="unlisted.json is not listed in the manifest"):
        b.path("unlisted.json")
    assert issubclass(UnlistedArtifact, ArtifactError)  # the load fails like any other bundle error


@pytest.mark.parametrize("name", ["../outside.json", "extra/../../outside.json", "extra/../net.onnx",
                                  "/etc/passwd", "", ".", "extra\\table.json"])
def test_bundle_path_refuses_names_escaping_the_bundle(tmp_path, name):
    root = _bundle(tmp_path)
    (tmp_path / "outside.json").write_text("{}")
    b = load_bundle(root)
    with pytest.raises(UnlistedArtifact):
        b.path(name)


def test_bundle_path_refuses_absolute_path_to_a_listed_file(tmp_path):
    b = load_bundle(_bundle(tmp_path))
    with pytest.raises(UnlistedArtifact):
        b.path(str(b.root / "net.onnx"))


def test_bundle_path_refuses_listed_symlink_out_of_the_bundle(tmp_path):
    root = _bundle(tmp_path)
    (tmp_path / "outside.json").write_text('{"a": 1}')
    (root / "extra" / "table.json").unlink()
    (root / "extra" / "table.json").symlink_to(tmp_path / "outside.json")
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["extra/table.json"] = sha256_file(tmp_path / "outside.json")
    m["bundle_sha256"] = _bundle_digest(m["files"])
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnlistedArtifact, match="extra/table.json resolves outside the bundle"):
        load_bundle(root)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "not_normal"])
def test_manifest_listing_a_path_outside_the_bundle_refuses_to_load(tmp_path, kind):
    """Even with the right hash, a manifest name must be a normal relative path inside the bundle."""
    root = _bundle(tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text('{"a": 1}')
    name = {"dotdot": "../outside.json", "absolute": str(outside), "not_normal": "extra/../net.onnx"}[kind]
    m = json.loads((root / "manifest.json").read_text())
    m["files"][name] = sha256_file(root / name)
    m["bundle_sha256"] = _bundle_digest(m["files"])
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnlistedArtifact, match="outside.json|net.onnx"):
        load_bundle(root)


def test_metadata_pointing_at_an_unlisted_file_refuses_to_load(tmp_path):
    """The service opens metadata's files (classifier, concepts, cladec, features) via
    Bundle.path; an artifact named in metadata but missing from the manifest fails the load."""
    def fill(d: Path) -> ModelMetadata:
        (d / "net.onnx").write_bytes(b"onnx bytes")
        return dataclasses.replace(_meta(), extra={"concepts": "concepts.json"})
    b = load_bundle(write_bundle(tmp_path / "bundle", fill))
    (b.root / "concepts.json").write_text("{}")
    with pytest.raises(ArtifactError, match="concepts.json is not listed"):
        b.path(b.metadata.extra["concepts"])

    def fill_escaping(d: Path) -> ModelMetadata:
        (d / "net.onnx").write_bytes(b"onnx bytes")
        return dataclasses.replace(_meta(), classifier_file="../net.onnx")
    with pytest.raises(UnlistedArtifact, match="net.onnx"):
        load_bundle(write_bundle(tmp_path / "bundle2", fill_escaping))


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


def test_bundle_documents_are_read_and_checked_in_one_place(tmp_path):
    """Every JSON document of a bundle (concepts, causal network, ClaDec, features, quantization)
    goes through one reader: another format, a list, or broken JSON is an ArtifactError naming the file."""
    from handlers.runtime.bundle import checked_document, read_document
    from handlers.runtime.causal import CompiledCausalModel
    from handlers.runtime.concepts import ConceptSpec
    good = tmp_path / "cladec.json"
    good.write_text('{"format": "cladec/1", "decoders": []}')
    assert read_document(good, "cladec/1")["decoders"] == []
    for text, found in (('{"format": "cladec/2"}', "cladec/2"), ("[1, 2]", "list"), ("{broken", "JSON")):
        good.write_text(text)
        with pytest.raises(ArtifactError, match=f"cladec.json.*{found}"):
            read_document(good, "cladec/1")
    with pytest.raises(ArtifactError, match="the concept spec is not a concepts/1 document"):
        ConceptSpec.from_json({"format": "causal-bn/1"})
    with pytest.raises(ArtifactError, match="causal-bn/1"):
        CompiledCausalModel.from_json({"format": "concepts/1"})
    assert checked_document({"format": "x"}, "x", "doc") == {"format": "x"}


def test_blas_threads_limit_numpy_in_the_process():
    """The service's BLAS limit, in a fresh interpreter (it is process-wide): 1 thread after
    limit_blas_threads(1) whatever the default was; 0 leaves the library alone."""
    import subprocess
    import sys
    code = ("from threadpoolctl import threadpool_info\n"
            "import numpy\n"
            "from handlers.runtime.service import limit_blas_threads\n"
            "blas = lambda: sorted(p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas')\n"
            "before = blas()\n"
            "assert limit_blas_threads(0) is None and blas() == before\n"
            "assert limit_blas_threads(1) == 1 and set(blas()) == {1}, blas()\n"
            "print('ok', before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "2"},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok [2]")


@pytest.mark.parametrize("setting, side, expected", [
    ("auto", 32, "png"), ("auto", 64, "png"), ("auto", 127, "png"), ("auto", 128, "jpeg"), ("auto", 224, "jpeg"),
    ("png", 224, "png"), ("jpeg", 32, "jpeg")])
def test_cladec_image_format_auto_is_jpeg_from_128_px(setting, side, expected):
    from handlers.runtime.imaging import cladec_image_format
    assert cladec_image_format(setting, side, side) == expected
    assert cladec_image_format(setting, side, 1000) == expected  # the shorter side decides
    assert HandlerSettings().cladec_image_format == "auto"
    assert HandlerSettings.from_mapping({"cladec_image_format": " Auto "}).cladec_image_format == "auto"


def test_cladec_image_format_rejects_other_settings():
    from handlers.runtime.imaging import cladec_image_format
    with pytest.raises(ValueError, match="webp"):
        cladec_image_format("webp", 224, 224)
