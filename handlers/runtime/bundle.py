"""The artifact bundle: a folder of portable files (ONNX, JSON, the atlas PNGs) plus ``manifest.json``.

``manifest.json`` lists every file with its sha256. :func:`load_bundle` verifies every
hash before anything is used, so a corrupted or partial bundle refuses to load (with a
message naming the file, the expected and the actual hash) instead of serving wrong
answers. Export writes bundles with :func:`write_manifest`; serving reads them with
:func:`load_bundle` and opens files only through :meth:`Bundle.path`, which refuses (with
:class:`UnlistedArtifact`, an :class:`ArtifactError`) any name the manifest does not list and
any path that would leave the bundle, so no unverified file is ever read. No pickles anywhere.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from handlers.runtime.errors import ArtifactError
from handlers.runtime.imaging import InputSpec


def checked_document(doc: Any, fmt: str, what: str) -> dict[str, Any]:
    """``doc`` if it is a JSON object of format ``fmt`` (its ``"format"`` field).

    Raises:
        ArtifactError: anything else, naming ``what`` (a file name) and the format found."""
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(f"{what} is not a {fmt} document (format {found!r})")
    return doc


def read_document(path: str | Path, fmt: str) -> dict[str, Any]:
    """The JSON document at ``path``, checked to be of format ``fmt`` (:func:`checked_document`).

    Raises:
        ArtifactError: unreadable, not JSON, or another format."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path.name} cannot be read as JSON: {exc}") from None
    return checked_document(doc, fmt, path.name)

MANIFEST = "manifest.json"
METADATA = "metadata.json"
FORMAT_VERSION = 1


class UnlistedArtifact(ArtifactError):
    """The runtime asked for a bundle file that the manifest does not list, or a name that
    is not a plain relative path inside the bundle (absolute, ``..``, escaping symlink).

    A subclass of :class:`ArtifactError`, so like any other bundle error it fails the load.
    """


def _check_name(root: Path, name: Any) -> str:
    """``name`` as a normalised relative POSIX path inside the bundle, or UnlistedArtifact."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise UnlistedArtifact(f"bundle {root}: file name {name!r} is not a relative path inside the bundle")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or pure.parts == (".",):
        raise UnlistedArtifact(f"bundle {root}: file name {name!r} is not a relative path inside the bundle")
    return pure.as_posix()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_digest(files: dict[str, str]) -> str:
    """One hash for the whole bundle: sha256 over the sorted ``name:hash`` lines."""
    lines = "".join(f"{name}:{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Hash every file under ``bundle_dir`` (except the manifest) and write the manifest."""
    root = Path(bundle_dir)
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "files": files,
                "bundle_sha256": _bundle_digest(files)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Check every file listed in the manifest; return the manifest.

    Raises:
        ArtifactError: manifest missing or malformed, a listed file missing, or a hash
            mismatch (message names the file, expected and actual sha256).
    """
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"bundle {root}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
        files: dict[str, str] = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"bundle {root}: {MANIFEST} is malformed: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"bundle {root}: unsupported format_version {manifest.get('format_version')}")
    for name, expected in sorted(files.items()):
        if _check_name(root, name) != name:
            raise UnlistedArtifact(f"bundle {root}: manifest name {name!r} is not in normal form")
        file = root / name
        if file.exists() and not file.resolve().is_relative_to(root.resolve()):
            raise UnlistedArtifact(f"bundle {root}: file {name} resolves outside the bundle")
        if not file.is_file():
            raise ArtifactError(f"bundle {root}: file {name} is missing (expected sha256 {expected})")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"bundle {root}: file {name} has sha256 {actual}, manifest expects {expected}")
    if manifest.get("bundle_sha256") != _bundle_digest(files):
        raise ArtifactError(f"bundle {root}: bundle_sha256 does not match the listed files")
    return manifest


@dataclass(frozen=True)
class LayerInfo:
    """A layer available for explanations: module name, ONNX output name, activation shape (C, H, W) or (D,)."""

    name: str
    output: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """Everything serving needs to know about the classifier (from ``metadata.json``)."""

    name: str
    version: str
    classes: tuple[str, ...]
    input: InputSpec
    classifier_file: str
    input_name: str
    logits_name: str
    layers: tuple[LayerInfo, ...]
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "name": self.name, "version": self.version,
            "classes": list(self.classes), "input": self.input.to_json(),
            "classifier": {"file": self.classifier_file, "input": self.input_name,
                           "logits": self.logits_name},
            "layers": [{"name": l.name, "output": l.output, "shape": list(l.shape)} for l in self.layers],
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelMetadata:
        known = {"format_version", "name", "version", "classes", "input", "classifier", "layers"}
        try:
            return cls(
                name=str(d["name"]), version=str(d["version"]),
                classes=tuple(str(c) for c in d["classes"]),
                input=InputSpec.from_json(d["input"]),
                classifier_file=str(d["classifier"]["file"]),
                input_name=str(d["classifier"]["input"]),
                logits_name=str(d["classifier"]["logits"]),
                layers=tuple(LayerInfo(str(l["name"]), str(l["output"]), tuple(int(s) for s in l["shape"]))
                             for l in d["layers"]),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{METADATA} is malformed: {exc!r}") from None


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. ``files``: the manifest's name -> sha256 (all verified at load)."""

    root: Path
    metadata: ModelMetadata
    sha256: str
    files: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def path(self, name: str) -> Path:
        """The path of ``name``, a file the manifest lists (and :func:`load_bundle` verified).

        Raises:
            UnlistedArtifact: ``name`` is not listed in the manifest, is absolute, contains
                ``..``, or resolves (through a symlink) outside the bundle.
        """
        key = _check_name(self.root, name)
        if key not in self.files:
            raise UnlistedArtifact(f"bundle {self.root}: file {name} is not listed in the manifest "
                                   f"(only listed, verified files may be opened)")
        path = self.root / key
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise UnlistedArtifact(f"bundle {self.root}: file {name} resolves outside the bundle")
        return path


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Verify the manifest, then read the metadata. Raises :class:`ArtifactError`."""
    root = Path(bundle_dir)
    manifest = verify_bundle(root)
    if METADATA not in manifest["files"]:
        raise ArtifactError(f"bundle {root}: {METADATA} is not listed in the manifest")
    metadata = ModelMetadata.from_json(json.loads((root / METADATA).read_text()))
    bundle = Bundle(root, metadata, manifest["bundle_sha256"], MappingProxyType(dict(manifest["files"])))
    bundle.path(metadata.classifier_file)  # listed and inside the bundle, or UnlistedArtifact
    return bundle
