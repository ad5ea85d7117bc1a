"""Which graphs a worker opens in their 8-bit version (``quantization.json``, written offline
by ``concept-explainer quantize``; see :mod:`export.quantize` for how they are judged)."""
from __future__ import annotations

import logging

from handlers.runtime.bundle import Bundle, read_document
from handlers.runtime.errors import ArtifactError

log = logging.getLogger(__name__)

FORMAT = "quantization/1"
#: 8-bit graph file name: the float graph's stem plus this.
INT8_SUFFIX = ".int8.onnx"


def int8_variants(bundle: Bundle) -> dict[str, str]:
    """Float graph file -> its accepted 8-bit file, for the graphs whose float source is the
    one that was quantized (a later export step that rewrote a graph leaves its stale 8-bit
    copy unused, with a warning). Empty for a bundle without ``quantization.json``.

    Raises:
        ArtifactError: the document is malformed or names files the manifest does not list.
    """
    name = bundle.metadata.extra.get("quantization")
    if name is None:
        return {}
    doc = read_document(bundle.path(name), FORMAT)
    out: dict[str, str] = {}
    try:
        for g in doc["graphs"]:
            source, accepted, file = str(g["source"]), bool(g["accepted"]), str(g["file"])
            if not accepted:
                continue
            if bundle.files.get(source) != g["source_sha256"]:
                log.warning("8-bit %s is stale (its float source %s changed after quantization): serving float",
                            file, source)
                continue
            bundle.path(file)  # listed and inside the bundle, or UnlistedArtifact
            out[source] = file
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{name} is malformed: {exc!r}") from None
    return out
