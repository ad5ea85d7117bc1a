"""Request parsing (the REST contract's requests), independent of TorchServe; the answers
are typed in :mod:`handlers.runtime.answer`.

A request is raw image bytes (``image/png``, ``image/jpeg``) or JSON
``{"data": "<base64 image>", ...options}``. TorchServe hands JSON bodies over already
decoded (a dict) and everything else as bytes; both arrive here as ``value``.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from handlers.runtime.answer import CLADEC_IMAGE_FORMATS
from handlers.runtime.errors import InvalidOption, InvalidRequest, PayloadTooLarge, UnknownTarget, UnsupportedMediaType

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")
JSON_TYPES = ("application/json",)
PREDICT_OPTIONS = ("data", "top_k")
EXPLAIN_OPTIONS = ("data", "top_k", "target", "top_concepts", "images", "heatmap", "views", "layers", "reference",
                   "alphas", "image_format", "verify", "atlas")
HEATMAP_STYLES = ("overlay", "blended")
ALPHA_CHOICES = ("all", "lowest")  # ClaDec alphas by name; otherwise archived values


#: ClaDec alphas a request asks for: "all", "lowest" or archived values.
AlphaChoice = str | tuple[float, ...]


@dataclass(frozen=True)
class ClaDecOptions:
    """What one image asks of ClaDec: the layers (None: all), whether with reference images,
    which alphas and the images' encoding ("png" or "jpeg")."""

    layers: tuple[str, ...] | None
    reference: bool
    alphas: AlphaChoice = "all"
    image_format: str = "png"


def same_alpha(a: float, b: float) -> bool:
    """Alphas compare equal up to float noise (JSON round trips of 0.001 and the like)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class PredictRequest:
    """A parsed request: the image bytes and the options that apply to it."""

    image: bytes
    top_k: int | None = None


@dataclass(frozen=True)
class ExplainRequest:
    """A parsed ``/explanations`` request.

    target: class index, label, or None (the predicted class); views: None = all available.
    """

    image: bytes
    top_k: int | None = None
    target: int | str | None = None
    top_concepts: int | None = None
    images: bool = True
    heatmap: str = "overlay"
    views: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    reference: bool | None = None  # ClaDec: also the reference autoencoder's image (None: the archive's default)
    alphas: str | tuple[float, ...] | None = None  # ClaDec: "all", "lowest" or values (None: the archive's default)
    image_format: str | None = None  # ClaDec images: "png" or "jpeg" (None: the archive's default)
    verify: bool | int = False  # check the answer's concepts (True: all of them; n: the first n) in the network
    atlas: bool = False  # each concept's atlas strips (training images where it fires most)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _parse_json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"malformed JSON body: {exc}") from None


def _b64(data: Any, max_bytes: int) -> bytes:
    if not isinstance(data, str):
        raise InvalidRequest(f'"data" must be a base64 string, got {type(data).__name__}')
    if len(data) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f'"data" decodes to more than {max_bytes} bytes')
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f'"data" is not valid base64: {exc}') from None


def body_to_json_or_image(value: Any, content_type: str | None, max_bytes: int) -> tuple[dict | None, bytes | None]:
    """Classify a request body: ``(json_object, None)`` or ``(None, image_bytes)``.

    Raises:
        InvalidRequest: empty body, malformed JSON, JSON that is not an object.
        UnsupportedMediaType: a content type that is neither an image nor JSON.
        PayloadTooLarge: a body above ``max_bytes``.
    """
    media = _media_type(content_type)
    if value is None:
        raise InvalidRequest("empty request body: expected an image or a JSON object")
    if isinstance(value, (bytes, bytearray)):
        if len(value) > max_bytes:
            raise PayloadTooLarge(f"request body is {len(value)} bytes; the limit is {max_bytes}")
        value = bytes(value)
        if not value:
            raise InvalidRequest("empty request body: expected an image or a JSON object")
        if media in JSON_TYPES or (media not in IMAGE_TYPES and value.lstrip()[:1] in (b"{", b"[")):
            value = _parse_json(value)
        elif media and media not in IMAGE_TYPES and not media.startswith("image/"):
            raise UnsupportedMediaType(
                f"content type {media!r} is not accepted; send image/png, image/jpeg or application/json")
        else:
            return None, value
    elif isinstance(value, str):
        if len(value) > max_bytes:
            raise PayloadTooLarge(f"request body is {len(value)} characters; the limit is {max_bytes}")
        if media in JSON_TYPES or value.lstrip()[:1] in ("{", "["):
            value = _parse_json(value)
        else:
            raise UnsupportedMediaType(
                f"content type {media or 'text'!r} is not accepted; send image/png, image/jpeg or application/json")
    if not isinstance(value, dict):
        raise InvalidRequest(f"JSON body must be an object with a \"data\" field, got {type(value).__name__}")
    return value, None


def _int_option(obj: dict, key: str, low: int, high: int) -> int | None:
    if key not in obj or obj[key] is None:
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidOption(f'"{key}" must be an integer, got {json.dumps(v)[:40]}')
    if not low <= v <= high:
        raise InvalidOption(f'"{key}" must be between {low} and {high}, got {v}')
    return v


def _options_or_image(value: Any, content_type: str | None, max_bytes: int, allowed: Sequence[str],
                      endpoint: str) -> tuple[dict | None, bytes]:
    """(None, image bytes) for a raw image body; (options, b"") for a JSON body whose fields
    are all in ``allowed`` and that carries ``data``."""
    obj, image = body_to_json_or_image(value, content_type, max_bytes)
    if obj is None:
        assert image is not None
        return None, image
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise InvalidOption(f"unknown fields {unknown}; {endpoint} accepts {list(allowed)}")
    if "data" not in obj:
        raise InvalidRequest('JSON body needs a "data" field with the base64 image')
    return obj, b""


def parse_predict(value: Any, content_type: str | None, *, max_bytes: int, num_classes: int) -> PredictRequest:
    """Parse a ``/predictions`` request. Options: ``top_k`` (1..number of classes)."""
    obj, image = _options_or_image(value, content_type, max_bytes, PREDICT_OPTIONS, "/predictions")
    if obj is None:
        return PredictRequest(image=image)
    return PredictRequest(image=_b64(obj["data"], max_bytes), top_k=_int_option(obj, "top_k", 1, num_classes))


def _str_list(obj: dict, key: str, allowed: Sequence[str]) -> tuple[str, ...] | None:
    if key not in obj or obj[key] is None:
        return None
    v = obj[key]
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise InvalidOption(f'"{key}" must be a list of strings, got {json.dumps(v)[:60]}')
    unknown = [s for s in v if s not in allowed]
    if unknown:
        raise InvalidOption(f'unknown {key} {unknown}; available: {list(allowed)}')
    return tuple(dict.fromkeys(v))


def _alphas(obj: dict[str, Any], archived: Sequence[float]) -> str | tuple[float, ...] | None:
    """``alphas``: "all", "lowest", or a list of archived alpha values (null: the default)."""
    v = obj.get("alphas")
    if v is None or v in ALPHA_CHOICES:
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
        raise InvalidOption(f'"alphas" must be "all", "lowest" or a list of numbers, got {json.dumps(v)[:60]}')
    unknown = [a for a in v if not any(same_alpha(a, b) for b in archived)]
    if unknown:
        raise InvalidOption(f"unknown alphas {unknown}; archived: {list(archived)}")
    return tuple(float(a) for a in dict.fromkeys(v))


def parse_explain(value: Any, content_type: str | None, *, max_bytes: int, classes: Sequence[str],
                  num_concepts: int, views: Sequence[str], layers: Sequence[str],
                  alphas: Sequence[float] = ()) -> ExplainRequest:
    """Parse an ``/explanations`` request (raw image, or JSON with options).

    Options: ``target`` (class index or label), ``top_k``, ``top_concepts`` (1..number of
    concepts), ``images`` (bool), ``heatmap`` ("overlay": a transparent palette PNG
    to draw over the input, or "blended": an RGB PNG of the heatmap over the input), ``reference``
    (bool: ClaDec's reference-autoencoder images; they cost a run of the classifier's
    layers up to each ClaDec layer), ``views`` (subset of the available views), ``layers``,
    ``alphas`` (ClaDec: "all", "lowest" or archived values ``alphas``), ``image_format``
    (ClaDec images: "png" or "jpeg"), ``verify`` (true, or how many of the answer's first
    concepts to check against the network's own interventions) and ``atlas`` (bool: each
    listed concept's atlas strips).
    """
    obj, image = _options_or_image(value, content_type, max_bytes, EXPLAIN_OPTIONS, "/explanations")
    if obj is None:
        return ExplainRequest(image=image)
    target = obj.get("target")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            raise InvalidOption(f'"target" must be a class index or label, got {json.dumps(target)[:40]}')
        if isinstance(target, int) and not 0 <= target < len(classes):
            raise UnknownTarget(f'target index {target} is out of range 0..{len(classes) - 1}')
        if isinstance(target, str) and target not in classes:
            raise UnknownTarget(f'unknown target label {target[:80]!r}; labels: {list(classes)}')
    images = obj.get("images", True)
    if not isinstance(images, bool):
        raise InvalidOption(f'"images" must be true or false, got {json.dumps(images)[:40]}')
    atlas = obj.get("atlas", False)
    if atlas is None:
        atlas = False
    if not isinstance(atlas, bool):
        raise InvalidOption(f'"atlas" must be true or false, got {json.dumps(atlas)[:40]}')
    reference = obj.get("reference")
    if reference is not None and not isinstance(reference, bool):
        raise InvalidOption(f'"reference" must be true or false, got {json.dumps(reference)[:40]}')
    heatmap = obj.get("heatmap")
    if heatmap is None:  # absent or null: the default, like the other options
        heatmap = "overlay"
    if heatmap not in HEATMAP_STYLES:
        raise InvalidOption(f'"heatmap" must be one of {list(HEATMAP_STYLES)}, got {json.dumps(heatmap)[:40]}')
    verify: bool | int = False
    if isinstance(obj.get("verify"), bool):
        verify = obj["verify"]
    elif obj.get("verify") is not None:
        verify = _int_option(obj, "verify", 1, max(num_concepts, 1)) or False
    image_format = obj.get("image_format")
    if image_format is not None and image_format not in CLADEC_IMAGE_FORMATS:
        raise InvalidOption(f'"image_format" must be one of {list(CLADEC_IMAGE_FORMATS)}, got {json.dumps(image_format)[:40]}')
    return ExplainRequest(
        image=_b64(obj["data"], max_bytes),
        top_k=_int_option(obj, "top_k", 1, len(classes)),
        target=target,
        top_concepts=_int_option(obj, "top_concepts", 1, max(num_concepts, 1)),
        images=images,
        heatmap=heatmap,
        views=_str_list(obj, "views", views),
        layers=_str_list(obj, "layers", layers),
        reference=reference,
        alphas=_alphas(obj, alphas),
        image_format=image_format,
        verify=verify,
        atlas=atlas,
    )


# -- resolution: every option settled once -----------------------------------------------------

#: The explanation target of a request that named none: the predicted class.
PREDICTED = "predicted"


@dataclass(frozen=True)
class ResolvedPredict:
    """A ``/predictions`` request with every option settled: the image and how many classes to return."""

    image: bytes
    top_k: int


@dataclass(frozen=True)
class ResolvedExplain:
    """An ``/explanations`` request with every option settled against the archive and the
    handler settings; nothing is left for later code to default.

    target: a class index, or :data:`PREDICTED`; views: the views to run; top_concepts:
    concepts listed (0 without the concepts view); pixels_wanted: heatmaps and reconstructions;
    cladec: what ClaDec renders for this image (None: no ClaDec images); verify: how many of
    the listed concepts to check against the network (0: none); atlas: the listed concepts
    carry their atlas strips."""

    image: bytes
    top_k: int
    target: int | str
    views: tuple[str, ...]
    top_concepts: int
    images: bool
    heatmap: str
    cladec: ClaDecOptions | None
    verify: int
    atlas: bool = False

    def target_index(self, probabilities: Any) -> int:
        """The class explained, given the image's class probabilities (K,)."""
        import numpy as np
        return int(np.argmax(probabilities)) if self.target == PREDICTED else int(self.target)

    def wants(self, view: str) -> bool:
        return view in self.views


@dataclass(frozen=True)
class Defaults:
    """What a request that sets nothing gets: the archive's views and sizes and the handler
    settings' defaults (``cladec_*`` ones for ClaDec)."""

    classes: tuple[str, ...]
    views: tuple[str, ...]
    num_concepts: int
    top_k: int
    top_concepts: int
    cladec_reference: bool
    cladec_alphas: str
    cladec_image_format: str


def resolve_predict(req: PredictRequest, defaults: Defaults) -> ResolvedPredict:
    return ResolvedPredict(image=req.image, top_k=min(req.top_k or defaults.top_k, len(defaults.classes)))


def resolve_explain(req: ExplainRequest, defaults: Defaults) -> ResolvedExplain:
    """Settle every option of a parsed ``/explanations`` request.

    Raises:
        InvalidOption: ``verify`` without the concepts view, or for more concepts than the
            answer lists (``top_concepts``)."""
    views = req.views or defaults.views
    top = min(req.top_concepts or defaults.top_concepts, defaults.num_concepts) if "concepts" in views else 0
    if isinstance(req.target, str):
        target: int | str = defaults.classes.index(req.target)
    else:
        target = PREDICTED if req.target is None else int(req.target)
    verify = 0
    if req.verify is not False:
        if "concepts" not in views or defaults.num_concepts == 0:
            raise InvalidOption('"verify" checks the concepts view: ask for it in "views"')
        verify = top if req.verify is True else int(req.verify)
        if verify > top:
            raise InvalidOption(f'"verify" asks for {verify} concepts but the answer lists {top} '
                                f'(top_concepts); verify at most those')
    cladec = None
    if "cladec" in views and req.images:
        cladec = ClaDecOptions(req.layers, defaults.cladec_reference if req.reference is None else req.reference,
                            defaults.cladec_alphas if req.alphas is None else req.alphas,
                            req.image_format or defaults.cladec_image_format)
    return ResolvedExplain(image=req.image, top_k=min(req.top_k or defaults.top_k, len(defaults.classes)),
                           target=target, views=views, top_concepts=top, images=req.images, heatmap=req.heatmap,
                           cladec=cladec, verify=verify, atlas=req.atlas and top > 0)
