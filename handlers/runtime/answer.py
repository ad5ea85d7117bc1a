"""The REST answers, defined once: typed models of the ``/predictions``, ``/explanations``
and error bodies, and the one place that formats them as JSON.

Views build these models from unrounded numbers and raw PNG bytes. :meth:`Answer.wire`
turns a model into its JSON body once, at the end: numbers are rounded (probabilities and
logits to 6 decimals, activations to 5, validity figures to 4, milliseconds to 3) and
images base64-encoded here and nowhere else; a part a request did not ask for (a view, a
heatmap, a reference image, a stage's timing) is left out of the body, while a ``null``
that carries meaning (a share of zero evidence, a figure the bundle lacks) stays.
Field order is the order on the wire.

The JSON Schemas in ``docs/schema`` are generated from these models::

    python -m handlers.runtime.answer --write docs/schema   # regenerate
    python -m handlers.runtime.answer --check docs/schema   # exit 1 if they differ
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, SkipJsonSchema
from pydantic_core import PydanticUndefined

# -- rounding and base64: the only place ---------------------------------------------------


def _rounded(digits: int) -> PlainSerializer:
    def serialize(value: float) -> float:
        return round(float(value), digits)
    return PlainSerializer(serialize, return_type=float, when_used="unless-none")


Decimals6 = Annotated[float, _rounded(6)]  # probabilities, logits, effects, contributions
Decimals5 = Annotated[float, _rounded(5)]  # concept activations
Decimals4 = Annotated[float, _rounded(4)]  # validity figures of the bundle
Millis = Annotated[float, _rounded(3)]  # stage timings


def _base64(png: bytes) -> str:
    return base64.b64encode(png).decode()


#: PNG bytes in the model, a base64 string on the wire.
Png = Annotated[bytes, PlainSerializer(_base64, return_type=str, when_used="unless-none"),
                WithJsonSchema({"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"})]
#: JPEG bytes in the model, a base64 string on the wire.
Jpeg = Annotated[bytes, PlainSerializer(_base64, return_type=str, when_used="unless-none"),
                 WithJsonSchema({"type": "string", "contentEncoding": "base64", "contentMediaType": "image/jpeg"})]


#: Encodings of the ClaDec images a request may ask for (``image_format``); without one, the
#: model's setting decides (:func:`handlers.runtime.imaging.cladec_image_format`).
CLADEC_IMAGE_FORMATS = ("png", "jpeg")


# -- the base model and fields that may be left out -----------------------------------------


def _omitted_marker(schema: dict[str, Any]) -> None:
    """Marks a field made by :func:`omitted` (as its ``json_schema_extra``); changes nothing."""


#: In a field's type: None in the model, absent from the body and from the schema (never ``null``).
Absent = SkipJsonSchema[None]


def on_wire(description: str | None = None, **constraints: Any) -> Any:
    """A required field whose JSON Schema states ``constraints`` (e.g. ``minimum=0``) about the
    rounded value on the wire; the model does not enforce them (an unrounded probability may
    exceed 1 by a rounding error)."""
    return Field(description=description, json_schema_extra=constraints)


def omitted(description: str) -> Any:
    """The default of a field that is left out of the body when None (type ``X | Absent``)."""
    return Field(default=None, description=description, json_schema_extra=_omitted_marker)


class Answer(BaseModel):
    """Base of the answer models: immutable, no extra fields, and fields declared with
    :func:`omitted` left out of the body when None."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _omitted_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._omitted_fields = frozenset(name for name, f in cls.model_fields.items()
                                        if f.json_schema_extra is _omitted_marker)

    # No return annotation: pydantic would take it as the schema of the serialised model.
    @model_serializer(mode="wrap", when_used="unless-none")
    def _leave_out_absent(self, serialize: SerializerFunctionWrapHandler):
        body = serialize(self)
        for name in self._omitted_fields:
            if body.get(name, PydanticUndefined) is None:
                del body[name]
        return body

    def wire(self) -> dict[str, Any]:
        """The JSON body as Python objects: rounded numbers, base64 images, absent parts left out."""
        return self.model_dump()

    def wire_json(self) -> bytes:
        """The JSON body as sent: compact separators, ASCII (non-ASCII escaped)."""
        return json.dumps(self.wire(), separators=(",", ":")).encode()


# -- /predictions -----------------------------------------------------------------------------


class Prediction(Answer):
    """One class of the top-k: index, label and softmax probability."""

    index: int = Field(ge=0)
    label: str
    probability: Decimals6 = on_wire(minimum=0, maximum=1)

    @classmethod
    def top(cls, probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[Prediction]:
        """probabilities: (K,) -> the k most probable classes, highest first (ties: lower index first)."""
        p = np.asarray(probabilities, dtype=np.float64)
        order = np.argsort(-p, kind="stable")[:k]
        return [cls(index=int(i), label=classes[int(i)], probability=float(p[i])) for i in order]


class PredictionsAnswer(Answer):
    """The ``/predictions`` body: the top-k classes, most probable first."""

    predictions: list[Prediction] = Field(min_length=1)


# -- /explanations ----------------------------------------------------------------------------


class Target(Answer):
    """The class explained: the request's ``target`` or the predicted class."""

    index: int = Field(ge=0)
    label: str


class Intervention(Answer):
    """P(target | do(concept = state), evidence on the concept's non-descendants)."""

    state: int = Field(ge=0)
    probability: Decimals6 = on_wire(minimum=0, maximum=1)


class Verified(Answer):
    """The network's own answer to a concept's interventions (``"verify": true``): the code
    channel set to each state's typical value, decoded, the rest of the classifier run."""

    interventions: list[Intervention] = Field(min_length=1, description="the network's P(target | do(state)), one per state")
    effect: Decimals6 = Field(description="the network's effect, with the served weights pi")
    abs_error: Decimals6 = on_wire(minimum=0, maximum=1, description=(
        "mean over states of |served P(target | do(state)) - the network's|"))


class Verification(Answer):
    """How far the answer's verified concepts are from the network's own interventions."""

    concepts: int = Field(ge=1, description="concepts verified: the answer's first ones")
    mae_p: Decimals6 = on_wire(minimum=0, maximum=1, description="mean |served - network| P(target | do(state))")
    effect_mae: Decimals6 = on_wire(minimum=0, description="mean |served effect - network effect|")
    ccc: Decimals6 | None = Field(description="Lin's concordance of the served and the network's effects; null for one concept")
    recall3: Decimals6 = on_wire(minimum=0, maximum=1, description=(
        "share of the network's three largest |effects| among the answer's first three concepts"))


class ConceptAtlas(Answer):
    """The concept's face (``"atlas": true``): the training images where it fires most, as one
    PNG strip of thumbnails, each cropped around the code map's peak (the crop is the layer's
    effective receptive field); for a concept whose lowest state is not "absent", its lowest
    images too."""

    thumb: int = Field(ge=1, description="side of one thumbnail in pixels; the strip is thumb high")
    crop_px: list[int] = Field(min_length=2, max_length=2, description="input pixels (height, width) one thumbnail shows")
    top_png: Png = Field(description="the highest images, left to right, thumb x thumb each")
    top_images: list[str] = Field(min_length=1, description="their training images (paths in the data folder)")
    top_values: list[Decimals5] = Field(min_length=1, description="the concept's pooled value on each")
    low_png: Png | Absent = omitted("the lowest images; absent where the lowest state means the concept is absent")
    low_images: list[str] | Absent = omitted("their training images; present with low_png")
    low_values: list[Decimals5] | Absent = omitted("the concept's pooled value on each; present with low_png")


class Concept(Answer):
    """One concept of the concepts view (method 1)."""

    id: str = Field(description="layer/c<channel>")
    layer: str
    channel: int = Field(ge=0)
    name: str = Field(description="the generative factor the concept shares most information with, or the id")
    name_bits: float | None = Field(description="information shared with the named factor, in bits")
    activation: Decimals5 = Field(description="the concept's pooled value (spatial max) on this image")
    state: int = Field(ge=0, description="the observed state (0 low ... states-1 high)")
    effect: Decimals6
    sensitivity: Decimals6
    source: Literal["network", "network_interpolated", "bayesian_network"] = Field(description=(
        "who answered the interventions: the network itself at every state (code set, decoded, rest of the "
        "classifier run); the network at some states with the others interpolated linearly in the code's peak value "
        "through them and the unchanged code (network_interpolated; the bundle chose how many states per layer so "
        "the interpolation error stays well under the layer's noise floor); "
        "or the Bayesian network's tables (their differences between states, anchored at the network's P(target) "
        "with the concept's layer spliced in, where the bundle has intervention graphs)"))
    interventions: list[Intervention] = Field(min_length=1, description="one per state")
    heatmap_png: Png | Absent = omitted("the concept's map: an overlay palette PNG or, with heatmap=blended, an RGB PNG; "
                               "absent with images=false")
    verified: Verified | Absent = omitted("the network's own answer; present with verify on the verified concepts")
    atlas: ConceptAtlas | Absent = omitted("the concept's atlas strips; present with atlas=true where the bundle has them")


class ClaDecImage(Answer):
    """One ClaDec decoder's reconstruction of the image from a layer's activation (method 2)."""

    layer: str
    alpha: float
    reconstruction_png: Png | Absent = omitted("the decoder's image (image_format png; the default below 128 px)")
    reconstruction_jpeg: Jpeg | Absent = omitted("the decoder's image with image_format jpeg (the default from 128 px)")
    reference_png: Png | Absent = omitted("the reference autoencoder's reconstruction: on the first entry "
                                 "of each layer only (the layer's other alphas share it); absent with "
                                 "reference=false")
    reference_jpeg: Jpeg | Absent = omitted("reference_png with image_format jpeg (the default from 128 px)")

    @model_validator(mode="after")
    def _one_format(self) -> ClaDecImage:
        if (self.reconstruction_png is None) == (self.reconstruction_jpeg is None):
            raise ValueError("a ClaDec entry has exactly one of reconstruction_png and reconstruction_jpeg")
        if self.reference_png is not None and self.reference_jpeg is not None:
            raise ValueError("a ClaDec entry has at most one reference image")
        if (self.reference_jpeg is not None and self.reconstruction_png is not None) or (
                self.reference_png is not None and self.reconstruction_jpeg is not None):
            raise ValueError("a ClaDec entry's images share one format")
        return self

    @classmethod
    def encoded(cls, layer: str, alpha: float, image_format: str, reconstruction: bytes,
                reference: bytes | None) -> ClaDecImage:
        """An entry whose images (already encoded as ``image_format``: "png" or "jpeg") go into
        that format's fields."""
        if image_format not in CLADEC_IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {CLADEC_IMAGE_FORMATS}, got {image_format!r}")
        return cls(layer=layer, alpha=alpha, **{f"reconstruction_{image_format}": reconstruction,
                                                f"reference_{image_format}": reference})


class Contribution(Answer):
    """A feature i of a class's subset: ``contribution = W[c, i] h_i``; ``share`` = contribution /
    (full logit - bias), null when that evidence is exactly 0."""

    index: int
    contribution: Decimals6
    share: Decimals6 | None


class OutsideSubset(Answer):
    """Evidence of the features outside a class's subset: sums of the positive and negative
    terms ``W[c, i] h_i``; ``total`` = positive + negative = full logit - decomposed logit."""

    features: int = Field(ge=0)
    positive: Decimals6 = Field(ge=0)
    negative: Decimals6 = Field(le=0)
    total: Decimals6


class RunnerUp(Answer):
    """The class the target is compared with (the full head's second class when the target is
    its top class, else its top class) and its evidence."""

    index: int
    label: str | None
    logit: Decimals6
    decomposed_logit: Decimals6
    bias: Decimals6
    subset_size: int
    contributions: list[Contribution]
    outside_subset: OutsideSubset


class Features(Answer):
    """The class-specific features view (method 3) for the target."""

    layer: str
    subset_size: int
    decomposed_agrees: bool
    decomposed_prediction: int
    decomposed_prediction_logit: Decimals6
    target_logit: Decimals6
    decomposed_target_logit: Decimals6
    target_bias: Decimals6
    contributions: list[Contribution] = Field(description="the target's subset features, largest contribution first")
    outside_subset: OutsideSubset
    runner_up: RunnerUp | None = Field(description="null for a single-class head")
    decomposed_agreement_held_out: Decimals6 | None = on_wire(
        minimum=0, maximum=1, description="share of the export's held-out images on which the decomposed head's class equals the full "
                    "head's; null when the bundle lacks the figure")
    decomposed_agreement_held_out_class: Decimals6 | None = on_wire(
        minimum=0, maximum=1, description="the same over the held-out images of this image's full-head class")
    held_out_images: int | None


class EffectTruth(Answer):
    """The served causal numbers against the network's own interventions, in probability
    units, on the export's held-out images: error of P(target | do(state)), the effect's
    error, skill over answering "no effect" and Lin's concordance (pooled and per layer),
    per-image nDCG@5 (median) and recall@3 (mean) of the answer's order."""

    mae_p: Decimals4 | None
    effect_mae: Decimals4
    skill: Decimals4 | None
    ccc: Decimals4 | None
    ccc_per_layer: dict[str, Decimals4 | None]
    ndcg5: Decimals4 | None
    recall3: Decimals4 | None
    below_resolution: list[str] = Field(description="layers whose measured effects sit under the noise floor")
    network_concepts: int = Field(ge=0, description="concepts per answer the network answered when measured")


class ConceptValidity(Answer):
    """Short form of the concepts report: held-out agreement (worst layer), fidelity, causal
    validity (pooled, mean per image, per layer), the share of interventions read at an unseen
    parent configuration, and the checks that failed."""

    agreement_min: Decimals4 | None
    fidelity: Decimals4 | None
    causal_spearman: Decimals4 | None
    causal_spearman_per_image: Decimals4 | None
    causal_spearman_per_layer: dict[str, Decimals4 | None]
    unseen_configurations: Decimals4 | Absent = omitted("absent for a bundle exported without it")
    effect_truth: EffectTruth | Absent = omitted("absent for a bundle exported without it")
    failed_checks: list[str]
    checked: bool


class FeaturesValidity(Answer):
    """The decomposed head's held-out agreement with the full head."""

    decomposed_agreement: Decimals4 | None


class Validity(Answer):
    """The bundle's validity figures; ``passed`` only when the concept checks ran and all passed."""

    concepts: ConceptValidity | Absent = omitted("absent without the concepts view")
    features: FeaturesValidity | Absent = omitted("absent without the features view")
    passed: bool


class ModelInfo(Answer):
    """The model that answered."""

    name: str
    version: str
    artifact_sha256: str = Field(pattern="^[0-9a-f]{64}$", description="the bundle's hash (manifest.json)")
    device: str = Field(pattern="^(cpu|cuda:[0-9]+)$", description="where the worker's sessions run")
    providers: list[str] = Field(min_length=1, description="onnxruntime execution providers in use, in order")
    int8_graphs: list[str] = Field(default_factory=list, description=(
        "explanation graphs served in their 8-bit version (concept encoders, reference autoencoders; "
        "the classifier never is), by float file name"))


class Timings(Answer):
    """Milliseconds measured in the worker: decode, classifier and concept encoders once per
    batch (``batch_size`` requests), the rest per request; a stage that did not run is absent."""

    decode: Millis = Field(ge=0)
    classifier: Millis = Field(ge=0)
    batch_size: int = Field(ge=1)
    concepts: Millis | Absent = omitted("concept encoders, once per batch")
    causal: Millis | Absent = omitted("causal queries")
    encode: Millis | Absent = omitted("heatmap encoding")
    features: Millis | Absent = omitted("features view")
    cladec: Millis | Absent = omitted("ClaDec decoders and reference autoencoders (only with reconstructions)")
    verify: Millis | Absent = omitted("the network's interventions of a request with verify")

    def stages(self) -> dict[str, float]:
        """The stages that ran: name -> milliseconds (unrounded), without ``batch_size``."""
        return {k: v for k, v in self if k != "batch_size" and v is not None}


class Explanation(Answer):
    """The ``/explanations`` body. ``concepts``, ``features`` and ``cladec`` are present when
    the view is in the archive and asked for (``cladec`` also needs images=true)."""

    predictions: list[Prediction]
    target: Target
    concepts: list[Concept] | Absent = omitted("sorted by |effect|, largest first")
    verification: Verification | Absent = omitted("with verify: the verified concepts against the network's own answers")
    features: Features | Absent = omitted("the class-specific features view")
    validity: Validity
    model: ModelInfo
    timings_ms: Timings
    cladec: list[ClaDecImage] | Absent = omitted("per decoder in archive order")


# -- errors -----------------------------------------------------------------------------------


class ErrorDetail(Answer):
    """``type``: the error's class name (see handlers/runtime/errors.py); ``message``: for people."""

    type: str = on_wire(minLength=1)
    message: str = on_wire(minLength=1)


class ErrorAnswer(Answer):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


# -- KServe envelopes (handlers/runtime/protocols.py) ---------------------------------------


class V1Predictions(Answer):
    """KServe v1 ``:predict`` body: one entry per instance, in order, each exactly the body
    ``/predictions`` returns for that instance (an error body for a bad instance)."""

    predictions: list[PredictionsAnswer | ErrorAnswer] = Field(min_length=1)


class V1Explanations(Answer):
    """KServe v1 ``:explain`` body: one entry per instance, each the ``/explanations`` body."""

    explanations: list[Explanation | ErrorAnswer] = Field(min_length=1)


class V2Tensor(Answer):
    """One output tensor of the Open Inference Protocol: ``data`` flat, row-major."""

    name: str
    datatype: str
    shape: list[int]
    data: list[str] | list[Decimals6]
    parameters: dict[str, str] | Absent = omitted("e.g. content_type of a BYTES tensor")


class V2Answer(Answer):
    """Open Inference Protocol (v2) response: ``answer`` (BYTES, one JSON text per instance:
    the ``/predictions`` or ``/explanations`` body, or the error body), ``label`` (BYTES,
    the top class, "" for a failed instance) and ``probability`` (FP32, its probability,
    0 for a failed instance)."""

    id: str
    model_name: str
    model_version: str
    outputs: list[V2Tensor]


class ProtocolError(Answer):
    """The error body of the KServe protocols (v1, v2): ``{"error": "<Type>: <message>"}``,
    the shape KServe's own servers and clients use."""

    error: str = on_wire(minLength=1)


# -- JSON Schema ------------------------------------------------------------------------------

SCHEMAS: dict[str, type[Answer]] = {"predictions": PredictionsAnswer, "explanations": Explanation,
                                    "error": ErrorAnswer, "v1-predictions": V1Predictions,
                                    "v1-explanations": V1Explanations, "v2": V2Answer,
                                    "protocol-error": ProtocolError}
DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Generator(GenerateJsonSchema):
    """Pydantic's generator without the per-property titles it derives from field names."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _normalised(node: Any) -> Any:
    """The same schema in the form every pydantic 2.x writes: a lone ``allOf: [{$ref}]`` as
    ``$ref`` (2020-12 allows siblings), and no ``default`` (an answer has no defaults)."""
    if isinstance(node, list):
        return [_normalised(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _normalised(v) for k, v in node.items() if k != "default"}
    all_of = out.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and set(all_of[0]) == {"$ref"} and "$ref" not in out:
        del out["allOf"]
        out = {"$ref": all_of[0]["$ref"], **out}
    return out


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one kind of body, as serialised on the wire."""
    schema = SCHEMAS[kind].model_json_schema(mode="serialization", schema_generator=_Generator)
    return {"$schema": DIALECT, **_normalised(schema)}


def schema_files() -> dict[str, str]:
    """File name -> text of every published schema."""
    return {f"{kind}.schema.json": json.dumps(json_schema(kind), indent=2) + "\n" for kind in SCHEMAS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.runtime.answer",
                                     description="Write or check the JSON Schemas of the REST answers.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="DIR", type=Path, help="write <kind>.schema.json files into DIR")
    group.add_argument("--check", metavar="DIR", type=Path, help="exit 1 if the files in DIR differ")
    args = parser.parse_args(argv)
    files = schema_files()
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (args.write / name).write_text(text)
            print(args.write / name)
        return 0
    stale = [name for name, text in files.items()
             if not (args.check / name).is_file() or (args.check / name).read_text() != text]
    for name in stale:
        print(f"{args.check / name} differs from the answer models; run "
              f"python -m handlers.runtime.answer --write {args.check}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
