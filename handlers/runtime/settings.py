"""Handler settings, read once from the ``handler:`` section of ``model-config.yaml``.

Values are parsed strictly: a value of the wrong type or out of range fails the model load
with a :class:`SettingsError` naming the setting, rather than being coerced into something
the operator did not mean (``"false"`` is false, not a truthy string; ``3.7`` is not 3).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from handlers.runtime.imaging import _SIGNATURES

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
#: Formats :func:`handlers.runtime.imaging.decode_image` can recognise (Pillow format names).
DECODABLE_FORMATS: tuple[str, ...] = tuple(dict.fromkeys(name for _, _, name in _SIGNATURES))


class SettingsError(ValueError):
    """A ``handler:`` setting in ``model-config.yaml`` is unknown, malformed or out of range."""


def _show(value: Any) -> str:
    return repr(value)[:60]


def _parse_bool(name: str, value: Any) -> bool:
    """Real bools, 0/1, and the strings true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise SettingsError(f"handler setting {name} must be a boolean (true/false, yes/no, on/off, 1/0), "
                        f"got {_show(value)}")


def _parse_int(name: str, value: Any) -> int:
    """Integers, integral floats (``1.0e+7``) and strings holding an integer; never bools."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        return value
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
    elif isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise SettingsError(f"handler setting {name} must be an integer, got {_show(value)}")


def _parse_count_or_all(name: str, value: Any) -> int | None:
    """``"all"`` (None) or an integer as :func:`_parse_int` reads it."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    return _parse_int(name, value)


def _parse_float(name: str, value: Any) -> float:
    """Finite numbers or strings holding one; never bools."""
    out: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            out = None
    if out is None or not math.isfinite(out):
        raise SettingsError(f"handler setting {name} must be a finite number, got {_show(value)}")
    return out


def _parse_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"handler setting {name} must be a non-empty string, got {_show(value)}")
    return value.strip()


def _parse_names(name: str, value: Any) -> tuple[str, ...]:
    """A YAML list of strings, or one comma-separated string."""
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise SettingsError(f"handler setting {name} must be a list of names, got {_show(value)}")
    if not all(isinstance(v, str) and v.strip() for v in items):
        raise SettingsError(f"handler setting {name} must be a list of non-empty strings, got {_show(value)}")
    return tuple(v.strip() for v in items)


def _parse_formats(name: str, value: Any) -> tuple[str, ...]:
    formats = tuple(v.upper() for v in _parse_names(name, value))
    unknown = [f for f in formats if f not in DECODABLE_FORMATS]
    if unknown or not formats:
        raise SettingsError(f"handler setting {name} must list one or more of {list(DECODABLE_FORMATS)}, "
                            f"got {_show(value)}")
    return formats


def _parse_providers(name: str, value: Any) -> tuple[str, ...]:
    import onnxruntime as ort
    providers = _parse_names(name, value)
    known = ort.get_all_providers()
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise SettingsError(f"handler setting {name}: unknown onnxruntime execution providers {unknown}; "
                            f"known: {known}")
    return providers


def _parse_alpha_choice(name: str, value: Any) -> str:
    from handlers.runtime.request import ALPHA_CHOICES
    if value not in ALPHA_CHOICES:
        raise SettingsError(f"handler setting {name} must be one of {list(ALPHA_CHOICES)}, got {_show(value)}")
    return str(value)


def _parse_image_format(name: str, value: Any) -> str:
    from handlers.runtime.imaging import CLADEC_FORMAT_SETTINGS
    word = _parse_str(name, value).lower()
    if word not in CLADEC_FORMAT_SETTINGS:
        raise SettingsError(f"handler setting {name} must be one of {list(CLADEC_FORMAT_SETTINGS)}, got {_show(value)}")
    return word


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "bundle_dir": _parse_str,
    "top_k": _parse_int,
    "top_concepts": _parse_int,
    "monitor_fraction": _parse_float,
    "max_request_bytes": _parse_int,
    "max_image_pixels": _parse_int,
    "max_instances": _parse_int,
    "max_inflight": _parse_int,
    "allowed_formats": _parse_formats,
    "intra_op_threads": _parse_int,
    "blas_threads": _parse_int,
    "cladec_reference": _parse_bool,
    "overlap_views": _parse_bool,
    "providers": _parse_providers,
    "cpu_int8": _parse_bool,
    "cladec_alphas": _parse_alpha_choice,
    "cladec_image_format": _parse_image_format,
    "cladec_chunk_rows": _parse_int,
    "network_concepts": _parse_count_or_all,
    "verify_fraction": _parse_float,
    "verify_fraction_predictions": _parse_float,
    "verify_queue": _parse_int,
}


@dataclass(frozen=True)
class HandlerSettings:
    """Serving knobs. Every field can be set in ``model-config.yaml`` under ``handler:``.

    Attributes:
        bundle_dir: artifact bundle folder, relative to the extracted model directory.
        top_k: predictions returned per request (>= 1; capped at the number of classes).
        top_concepts: concepts returned per explanation unless the request asks otherwise
            (>= 1; capped at the number of concepts, so a large value means "all").
        monitor_fraction: share of requests (either endpoint) whose concept states are counted
            (concept encoders only) for drift monitoring, 0 to 1; 0 turns monitoring off.
        max_request_bytes: largest accepted request body (413 above it), >= 1.
        max_image_pixels: largest accepted decoded image, width x height (413 above it), >= 1.
        max_instances: most images in one KServe v1/v2 request (413 above it), >= 1.
        max_inflight: most inference requests the KServe door works on at once, >= 1; one more is
            answered 503 with ``Retry-After`` at once instead of queueing without bound (64: about
            1.3 s of explanations at the door's measured 50 per second on 2 cores). TorchServe's
            door has its frontend's ``job_queue_size`` for this.
        allowed_formats: image formats accepted (Pillow format names, any case; one or more
            of PNG, JPEG, GIF, WEBP, BMP, TIFF).
        intra_op_threads: onnxruntime intra-op threads per worker (0 = onnxruntime decides).
        blas_threads: threads of numpy's BLAS in the worker process (heatmap upsampling, the
            causal table's products), set when the service loads (0 = the library's default,
            one per core). A worker's parallelism is its own: the concept-graph and ClaDec
            threads beside the request thread. A BLAS pool of its own beside them makes every
            mid-sized product wait for busy cores: at 224 px one heatmap took 16 ms with the
            default pool on a loaded 2-core machine, 0.13 ms on one thread.
        cladec_reference: ClaDec entries carry the reference autoencoder's reconstruction
            unless the request sets ``reference``; each RefAE repeats the classifier up to
            its layer (at 224 px the two demo layers' RefAEs cost 1.8 classifier runs).
        overlap_views: one helper thread beside the request thread (onnxruntime and zlib
            release the GIL): ClaDec's reference autoencoders (they need only the input)
            beside the classifier, then whichever concept intervention graphs the request
            thread has not yet taken, then ClaDec's decoders; lowers explanation latency when
            a core is free. Off: every view in line on the request thread.
        providers: onnxruntime execution providers, in order of preference; providers
            not available on the machine are skipped, CPU is always the last resort.
            Names onnxruntime does not know at all (typos) are rejected.
        cpu_int8: on the CPU, open the 8-bit versions of the explanation graphs that the
            archive's ``quantization.json`` accepted (concept encoders, reference
            autoencoders; never the classifier); false: every graph in float. Ignored on a GPU.
        cladec_alphas: ClaDec entries per layer unless the request sets ``alphas``: "lowest"
            (the layer's lowest archived alpha; alpha 0 is pure ClaDec) or "all".
        cladec_image_format: encoding of the ClaDec images unless the request sets
            ``image_format``: "png" (lossless), "jpeg" (quality 90; several times smaller) or
            "auto" (JPEG from 128 px on the shorter side, PNG below:
            :func:`handlers.runtime.imaging.cladec_image_format` gives the measurements).
        cladec_chunk_rows: rows of a batch per ClaDec decoder or reference-autoencoder run
            (0: the whole batch at once); bounds their intermediate buffers for large
            ``batchSize`` (``make bench`` measures the effect on peak memory and latency).
        network_concepts: how many concepts per explanation the network itself answers (their
            ``P(target | do(state))`` comes from the archive's intervention graphs: code set,
            decoded, rest of the classifier run, at the states the archive's ``probes`` name);
            None ("all", the default): every concept. The others are answered by the Bayesian
            network, anchored at the network's level (one unchanged row per layer in the same
            run). Concepts are asked in the archive's screening order; 0: the Bayesian
            network answers every concept; capped at the number of concepts.
        verify_fraction: share of answered explanations that are verified after the reply has
            gone, 0 to 1: every concept's served ``P(target | do(state))`` against the network's
            own interventions, reported as metrics (``concept_explainer_verify_*``); 0 turns it off.
        verify_fraction_predictions: the same for /predictions answers (their predicted class,
            with the concepts an explanation would have served), 0 to 1.
        verify_queue: most verifications waiting at once (>= 1); a sampled answer that finds the
            queue full is not verified and is counted as dropped, never delayed.

    Booleans accept true/false, yes/no, on/off, 1/0 (any case, quoted or not); integers
    accept integral numbers and integer strings. Anything else raises :class:`SettingsError`.
    """

    bundle_dir: str = "bundle"
    top_k: int = 5
    top_concepts: int = 8
    monitor_fraction: float = 0.1
    max_request_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_instances: int = 32
    max_inflight: int = 64
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG")
    intra_op_threads: int = 1
    blas_threads: int = 1
    cladec_reference: bool = True
    overlap_views: bool = True
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    cpu_int8: bool = True
    cladec_alphas: str = "lowest"
    cladec_image_format: str = "auto"
    cladec_chunk_rows: int = 2
    network_concepts: int | None = None
    verify_fraction: float = 0.01
    verify_fraction_predictions: float = 0.0
    verify_queue: int = 64

    def __post_init__(self) -> None:
        if self.network_concepts is not None and self.network_concepts < 0:
            raise SettingsError(f"handler setting network_concepts must be >= 0 (0 = the Bayesian network answers "
                                f"every concept) or all, got {self.network_concepts}")
        if self.cladec_chunk_rows < 0:
            raise SettingsError(f"handler setting cladec_chunk_rows must be >= 0 (0 = the whole batch), "
                                f"got {self.cladec_chunk_rows}")
        for name in ("top_k", "top_concepts", "max_request_bytes", "max_image_pixels", "max_instances", "max_inflight",
                     "verify_queue"):
            if getattr(self, name) < 1:
                raise SettingsError(f"handler setting {name} must be >= 1, got {getattr(self, name)}")
        if self.intra_op_threads < 0:
            raise SettingsError(f"handler setting intra_op_threads must be >= 0 (0 = onnxruntime decides), "
                                f"got {self.intra_op_threads}")
        if self.blas_threads < 0:
            raise SettingsError(f"handler setting blas_threads must be >= 0 (0 = the library's default), "
                                f"got {self.blas_threads}")
        for name in ("monitor_fraction", "verify_fraction", "verify_fraction_predictions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"handler setting {name} must be between 0 and 1, got {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> HandlerSettings:
        """Build from the ``handler:`` mapping; unknown keys and bad values are rejected loudly."""
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise SettingsError(f"the handler section must be a mapping, got {_show(section)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == set(_PARSERS), "every setting needs a parser"
        unknown = sorted(set(section) - fields, key=str)
        if unknown:
            raise SettingsError(f"unknown handler settings {unknown}; known: {sorted(fields)}")
        values = {name: _PARSERS[name](name, value) for name, value in section.items()}
        return cls(**values)
