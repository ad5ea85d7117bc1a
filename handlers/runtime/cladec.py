"""The ClaDec view (method 2) at serve time: decode the classifier's activations into an
image, beside the reference autoencoder's reconstruction of the same input.

:class:`ClaDecView` holds the sessions; :class:`ClaDecRunner` runs them for batches (the
reference autoencoders optionally on the worker's helper thread beside the classifier), one
:class:`ClaDecJob` per batch, whose :class:`ClaDecOutcome` maps rows to their entries."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.runtime.answer import ClaDecImage
from handlers.runtime.bundle import Bundle, read_document
from handlers.runtime.classifier import GraphOpener
from handlers.runtime.errors import ArtifactError
from handlers.runtime.helper import HelperThread
from handlers.runtime.imaging import encode_jpeg, encode_png
from handlers.runtime.request import AlphaChoice, ClaDecOptions, same_alpha

FORMAT = "cladec/1"

#: row -> decoder or RefAE file -> encoded image bytes
RowImages = dict[int, dict[str, bytes]]
#: The alphas a request gets: "all", "lowest" (each layer's lowest archived alpha; alpha 0 is
#: pure ClaDec), or alpha values.
#: Image encoders by ``image_format``: uint8 (H, W, C) -> bytes.
ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {"png": encode_png, "jpeg": encode_jpeg}


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

    def __init__(self, entries: Sequence[DecoderEntry], decoders: dict[str, Any], refaes: dict[str, Any],
                 chunk_rows: int = 0) -> None:
        """chunk_rows: rows per decoder or RefAE run (0: the whole batch at once)."""
        self.entries = tuple(entries)
        self.chunk_rows = chunk_rows
        self.decoders = decoders
        self.refaes = refaes
        self.layers = tuple(dict.fromkeys(e.layer for e in entries))
        self.alphas = tuple(sorted(dict.fromkeys(e.alpha for e in entries)))

    @classmethod
    def load(cls, bundle: Bundle, file: str, open_graph: GraphOpener, chunk_rows: int = 0) -> ClaDecView:
        """The ClaDec view of ``bundle`` (``file``: its cladec.json); ``open_graph`` opens a
        listed ONNX file as a session; ``chunk_rows``: as in :meth:`__init__`."""
        doc = read_document(bundle.path(file), FORMAT)
        outputs = {l.name for l in bundle.metadata.layers}
        entries = [DecoderEntry(d["layer"], float(d["alpha"]), d["decoder_file"], d["refae_file"])
                   for d in doc["decoders"]]
        for e in entries:
            if e.layer not in outputs:
                raise ArtifactError(f"ClaDec layer {e.layer} is not an output of the classifier graph")
        decoders = {e.decoder_file: open_graph(e.decoder_file) for e in entries}
        refaes = {e.refae_file: open_graph(e.refae_file) for e in entries}
        return cls(entries, decoders, refaes, chunk_rows)

    def _run(self, session: Any, inputs: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, C) of a decoder or RefAE on ``inputs`` (N, ...), run
        ``chunk_rows`` rows at a time: their intermediate activations dominate a worker's peak
        memory at 224 px (a full batch of 8 through a RefAE holds about 25 MB per layer)."""
        name = session.get_inputs()[0].name
        step = self.chunk_rows or len(inputs)
        return np.concatenate([to_uint8_images(session.run(None, {name: inputs[i:i + step]})[0])
                               for i in range(0, len(inputs), step)])

    def wanted(self, layers: Sequence[str] | None, alphas: AlphaChoice = "all") -> list[DecoderEntry]:
        """The entries for ``layers`` (None: all) and ``alphas`` ("all"; "lowest": each layer's
        lowest archived alpha; or alpha values), in archive order."""
        entries = [e for e in self.entries if layers is None or e.layer in layers]
        if alphas == "all":
            return entries
        if alphas == "lowest":
            lowest: dict[str, float] = {}
            for e in entries:
                lowest[e.layer] = min(lowest.get(e.layer, math.inf), e.alpha)
            return [e for e in entries if e.alpha == lowest[e.layer]]
        if isinstance(alphas, str):
            raise ValueError(f'alphas must be "all", "lowest" or values, got {alphas!r}')
        return [e for e in entries if any(same_alpha(e.alpha, a) for a in alphas)]

    def references(self, x: np.ndarray, rows: Sequence[int], entries: Sequence[DecoderEntry],
                   image_format: str = "png") -> RowImages:
        """The reference autoencoders' images: row -> RefAE file -> encoded image, one RefAE run
        per layer of ``entries`` (shared by its alphas). Needs only the input x, normalised
        (N, C, H, W), so it can run beside the classifier. rows: rows of x."""
        rows = list(rows)
        out: RowImages = {r: {} for r in rows}
        for refae_file in dict.fromkeys(e.refae_file for e in entries):
            ref = self.refaes[refae_file]
            ref_u8 = self._run(ref, x[rows])
            for r, img in zip(rows, ref_u8, strict=True):
                out[r][refae_file] = ENCODERS[image_format](img)
        return out

    def reconstructions(self, activations: dict[str, np.ndarray], rows: Sequence[int],
                        entries: Sequence[DecoderEntry], image_format: str = "png") -> RowImages:
        """The decoders' images: row -> decoder file -> encoded image.

        activations: layer -> (N, ...) from the classifier run; rows: rows of the activations."""
        rows = list(rows)
        out: RowImages = {r: {} for r in rows}
        for e in entries:
            dec = self.decoders[e.decoder_file]
            rec_u8 = self._run(dec, activations[e.layer][rows])
            for r, img in zip(rows, rec_u8, strict=True):
                out[r][e.decoder_file] = ENCODERS[image_format](img)
        return out

    @staticmethod
    def images(entries: Sequence[DecoderEntry], image_format: str, reconstructions: Mapping[str, bytes],
               references: Mapping[str, bytes] | None) -> list[ClaDecImage]:
        """One image's ``cladec`` entries (``entries`` in archive order), from its row of
        :meth:`reconstructions` and of :meth:`references` (None: without reference images). A
        reference autoencoder's image comes once, on the first entry of its layer (the other
        alphas share it)."""
        out, sent = [], set()
        for e in entries:
            reference = None
            if references is not None and e.refae_file not in sent:
                reference = references[e.refae_file]
                sent.add(e.refae_file)
            out.append(ClaDecImage.encoded(e.layer, e.alpha, image_format, reconstructions[e.decoder_file], reference))
        return out


@dataclass(frozen=True)
class ClaDecOutcome:
    """ClaDec's part of a batch's answers.

    images: row -> its ``cladec`` entries; ms: milliseconds of the decoders plus the reference
    autoencoders (unrounded; the references may have run beside the classifier); error: the
    fault that stopped ClaDec, which then fails exactly the rows in ``wanted``.
    """

    wanted: frozenset[int] = frozenset()
    images: dict[int, list[ClaDecImage]] = field(default_factory=dict)
    ms: float = 0.0
    error: BaseException | None = None


class ClaDecJob:
    """One batch's ClaDec work: its rows grouped by what they ask, the reference images
    (started on the runner's thread, or made in :meth:`finish`), the decoders' images
    (started on that thread by :meth:`decode` once the classifier's activations exist, or
    made in :meth:`finish`) and the merge of both, keyed by row and file.

    Use as a context manager: leaving it waits for the runner's thread, so a job never runs
    into the next batch.
    """

    def __init__(self, view: ClaDecView | None, x: np.ndarray, wishes: Mapping[int, ClaDecOptions],
                 helper: HelperThread | None) -> None:
        """x: the normalised batch (N, C, H, W); wishes: row -> what it asks (rows absent want
        nothing); helper: the thread to start the reference images on now and the decoders
        later (None, or a closed helper: everything in :meth:`finish`)."""
        if wishes and view is None:
            raise ValueError("ClaDec wishes without a ClaDec view")
        self._view = view
        self._x = x
        self._wishes = dict(wishes)
        self._helper = helper if self._wishes else None
        self._groups: dict[ClaDecOptions, list[int]] = {}  # rows that ask the same
        for row, wish in self._wishes.items():
            self._groups.setdefault(wish, []).append(row)
        self._entries = {wish: view.wanted(wish.layers, wish.alphas) for wish in self._groups} if view else {}
        wants_references = any(wish.reference for wish in self._groups)
        self._job: Future[tuple[RowImages, float]] | None = (
            self._helper.submit(self._references) if self._helper is not None and wants_references else None)
        self._decoding: Future[tuple[RowImages, float]] | None = None

    def _references(self) -> tuple[RowImages, float]:
        """Row -> RefAE file -> image for the rows that ask for references, and the milliseconds."""
        assert self._view is not None
        t0 = time.perf_counter()
        out: RowImages = {}
        for wish, rows in self._groups.items():
            if wish.reference:
                out.update(self._view.references(self._x, rows, self._entries[wish], wish.image_format))
        return out, (time.perf_counter() - t0) * 1000

    def _reconstructions(self, activations: dict[str, np.ndarray]) -> tuple[RowImages, float]:
        """Row -> decoder file -> image for every row that wants ClaDec, and the milliseconds."""
        assert self._view is not None
        t0 = time.perf_counter()
        out: RowImages = {}
        for wish, rows in self._groups.items():
            out.update(self._view.reconstructions(activations, rows, self._entries[wish], wish.image_format))
        return out, (time.perf_counter() - t0) * 1000

    def decode(self, activations: dict[str, np.ndarray]) -> None:
        """Queue the decoders on the helper (after this batch's references and behind any
        urgent job, such as the concept graphs it shares), so they run beside the other views
        on the calling thread. Without a helper (or once it is closed) :meth:`finish` decodes
        in line."""
        if self._helper is not None and self._decoding is None:
            self._decoding = self._helper.submit(self._reconstructions, activations)  # None once closed

    def finish(self, activations: dict[str, np.ndarray]) -> ClaDecOutcome:
        """Take (or make) the decoders' and the references' images and merge them; activations:
        layer -> (N, ...) of the classifier run.

        Never raises for a fault inside ClaDec: the outcome carries it, to fail only the rows
        that wanted ClaDec."""
        wanted = frozenset(self._wishes)
        if not wanted:
            return ClaDecOutcome()
        assert self._view is not None
        try:
            recs, decode_ms = (self._decoding.result() if self._decoding is not None
                               else self._reconstructions(activations))
            refs, refs_ms = self._job.result() if self._job is not None else self._references()
            images = {row: self._view.images(self._entries[wish], wish.image_format, recs[row],
                                             refs[row] if wish.reference else None)
                      for row, wish in self._wishes.items()}
        except Exception as exc:  # noqa: BLE001 - fails the rows that wanted ClaDec, not the batch
            return ClaDecOutcome(wanted, error=exc)
        return ClaDecOutcome(wanted, images, decode_ms + refs_ms)

    def __enter__(self) -> ClaDecJob:
        return self

    def __exit__(self, *exc: object) -> None:
        wait([f for f in (self._job, self._decoding) if f is not None])


class ClaDecRunner:
    """ClaDec across batches: hands out one :class:`ClaDecJob` per batch, which makes the
    reference images beside the classifier and the decoder images beside the other views on
    ``helper`` (the worker's shared :class:`HelperThread`; None: in line).

    :meth:`close` stops the helper; after it, ClaDec runs in line.
    """

    def __init__(self, view: ClaDecView | None, helper: HelperThread | None) -> None:
        self.view = view
        self.helper = helper

    def begin(self, x: np.ndarray, wishes: Mapping[int, ClaDecOptions]) -> ClaDecJob:
        """Start one batch's ClaDec work. x: normalised (N, C, H, W); wishes: row -> what it asks."""
        return ClaDecJob(self.view, x, wishes, self.helper)

    def close(self) -> None:
        """Stop the helper (waits for its running and queued jobs). Idempotent."""
        if self.helper is not None:
            self.helper.close()
