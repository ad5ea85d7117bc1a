"""Handler settings, read once from the ``handler:`` section of ``model-config.yaml``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class HandlerSettings:
    """Serving knobs. Every field can be set in ``model-config.yaml`` under ``handler:``.

    Attributes:
        bundle_dir: artifact bundle folder, relative to the extracted model directory.
        top_k: predictions returned per request (capped at the number of classes).
        top_concepts: concepts returned per explanation unless the request asks otherwise.
        monitor_fraction: share of /predictions requests whose concept states are counted
            (concept encoders only) for drift monitoring; 0 turns monitoring off.
        max_request_bytes: largest accepted request body (413 above it).
        max_image_pixels: largest accepted decoded image, width x height (413 above it).
        allowed_formats: image formats accepted (Pillow format names).
        intra_op_threads: onnxruntime intra-op threads per worker (0 = onnxruntime decides).
        cladec_reference: ClaDec entries carry the reference autoencoder's reconstruction
            unless the request sets ``reference``; each RefAE repeats the classifier up to
            its layer (at 224 px the two demo layers' RefAEs cost 1.8 classifier runs).
        overlap_views: run ClaDec's reference autoencoders (they need only the input) on a
            second thread, beside the classifier and the concept view (onnxruntime and zlib
            release the GIL); lowers explanation latency when a core is free.
        providers: onnxruntime execution providers, in order of preference; providers
            not available on the machine are skipped, CPU is always the last resort.
    """

    bundle_dir: str = "bundle"
    top_k: int = 5
    top_concepts: int = 8
    monitor_fraction: float = 0.1
    max_request_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG")
    intra_op_threads: int = 1
    cladec_reference: bool = True
    overlap_views: bool = True
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> "HandlerSettings":
        """Build from the ``handler:`` mapping; unknown keys are rejected loudly."""
        section = dict(section or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise ValueError(f"unknown handler settings {unknown}; known: {sorted(fields)}")
        values: dict[str, Any] = {}
        for name, value in section.items():
            default = getattr(cls, name)
            if isinstance(default, tuple):
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                value = tuple(str(v) for v in value)
            elif isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, int):
                value = int(value)
            else:
                value = str(value)
            values[name] = value
        settings = cls(**values)
        if settings.top_k < 1 or settings.max_request_bytes < 1 or settings.max_image_pixels < 1:
            raise ValueError("top_k, max_request_bytes and max_image_pixels must be >= 1")
        if not 0.0 <= settings.monitor_fraction <= 1.0:
            raise ValueError("monitor_fraction must be between 0 and 1")
        return settings
