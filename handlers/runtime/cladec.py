"""The ClaDec view (method 2) at serve time: decode the classifier's activations into an
image, beside the reference autoencoder's reconstruction of the same input."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from handlers.runtime.bundle import Bundle
from handlers.runtime.classifier import make_session
from handlers.runtime.errors import ArtifactError
from handlers.runtime.imaging import encode_png

FORMAT = "cladec/1"


@dataclass(frozen=True)
class DecoderEntry:
    layer: str
    alpha: float
    decoder_file: str
    refae_file: str


def to_uint8_images(x: np.ndarray) -> np.ndarray:
    """[0, 1] float (N, C, H, W) -> uint8 (N, H, W, C)."""
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(0, 2, 3, 1)


class ClaDecView:
    """ClaDec decoders and RefAEs as onnxruntime sessions."""

    def __init__(self, entries: Sequence[DecoderEntry], decoders: dict[str, Any], refaes: dict[str, Any]) -> None:
        self.entries = tuple(entries)
        self.decoders = decoders
        self.refaes = refaes
        self.layers = tuple(dict.fromkeys(e.layer for e in entries))

    @classmethod
    def load(cls, bundle: Bundle, file: str, providers: Sequence[str], threads: int) -> "ClaDecView":
        doc = json.loads(bundle.path(file).read_text())
        if doc.get("format") != FORMAT:
            raise ArtifactError(f"{file} is not a {FORMAT} document")
        outputs = {l.name for l in bundle.metadata.layers}
        entries = [DecoderEntry(d["layer"], float(d["alpha"]), d["decoder_file"], d["refae_file"])
                   for d in doc["decoders"]]
        for e in entries:
            if e.layer not in outputs:
                raise ArtifactError(f"ClaDec layer {e.layer} is not an output of the classifier graph")
        decoders = {e.decoder_file: make_session(bundle.path(e.decoder_file), providers, threads) for e in entries}
        refaes = {e.refae_file: make_session(bundle.path(e.refae_file), providers, threads) for e in entries}
        return cls(entries, decoders, refaes)

    def wanted(self, layers: Sequence[str] | None) -> list[DecoderEntry]:
        """The entries for ``layers`` (None: all), in archive order."""
        return [e for e in self.entries if layers is None or e.layer in layers]

    def references(self, x: np.ndarray, rows: Sequence[int], layers: Sequence[str] | None) -> dict[str, list[str]]:
        """The reference autoencoders' images: RefAE file -> base64 PNG per row, one RefAE run
        per layer (shared by its alphas). Needs only the input x, normalised (N, C, H, W), so
        it can run beside the classifier."""
        rows = list(rows)
        out: dict[str, list[str]] = {}
        for e in self.wanted(layers):
            if e.refae_file not in out:
                ref = self.refaes[e.refae_file]
                ref_u8 = to_uint8_images(ref.run(None, {ref.get_inputs()[0].name: x[rows]})[0])
                out[e.refae_file] = [base64.b64encode(encode_png(img)).decode() for img in ref_u8]
        return out

    def reconstructions(self, activations: dict[str, np.ndarray], rows: Sequence[int],
                        layers: Sequence[str] | None) -> list[list[dict[str, Any]]]:
        """Per row, the ``cladec`` entries without references (layer, alpha, base64 PNG).

        activations: layer -> (N, ...) from the classifier run."""
        rows = list(rows)
        out: list[list[dict[str, Any]]] = [[] for _ in rows]
        for e in self.wanted(layers):
            dec = self.decoders[e.decoder_file]
            rec_u8 = to_uint8_images(dec.run(None, {dec.get_inputs()[0].name: activations[e.layer][rows]})[0])
            for j in range(len(rows)):
                out[j].append({"layer": e.layer, "alpha": e.alpha,
                               "reconstruction_png": base64.b64encode(encode_png(rec_u8[j])).decode()})
        return out

    def attach_references(self, entries: list[list[dict[str, Any]]], references: dict[str, list[str]],
                          layers: Sequence[str] | None) -> None:
        """Add ``reference_png`` to the entries of :meth:`reconstructions` (same rows, layers)."""
        wanted = self.wanted(layers)
        for j, row_entries in enumerate(entries):
            for entry, e in zip(row_entries, wanted):
                entry["reference_png"] = references[e.refae_file][j]
