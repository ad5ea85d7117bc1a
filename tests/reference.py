"""Independent reference computations used by several test layers.

Preprocessing here is written with plain Pillow and numpy from metadata.json, not through
``handlers.runtime``, so the tests check the serving path against a second implementation.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def classifier_outputs(bundle: Path, png: bytes) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """(metadata, every classifier ONNX output by name, the normalised input (1, C, H, W))."""
    meta = json.loads((bundle / "metadata.json").read_text())
    spec = meta["input"]
    mode = "RGB" if spec["channels"] == 3 else "L"
    img = Image.open(io.BytesIO(png)).convert(mode).resize((spec["width"], spec["height"]), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).reshape(spec["height"], spec["width"], spec["channels"]) / 255.0
    x = ((x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)).transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(str(bundle / meta["classifier"]["file"]), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {meta["classifier"]["input"]: x})))
    return meta, outs, x


def reference_probabilities(bundle_dir: Path, png: bytes) -> np.ndarray:
    """Softmax of the bundle's ONNX logits for one image: (K,) float64."""
    meta, outs, _ = classifier_outputs(bundle_dir, png)
    logits = outs[meta["classifier"]["logits"]][0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def worker_encoder(bundle: Path, encoder: str, int8: bool) -> str:
    """The encoder file a CPU worker opens: with ``int8`` the accepted 8-bit version named in the
    bundle's quantization.json (when there is one), else the float graph."""
    if not int8:
        return encoder
    from handlers.runtime.bundle import load_bundle
    from handlers.runtime.quantized import int8_variants
    return int8_variants(load_bundle(bundle)).get(encoder, encoder)


def offline_evidence(bundle: Path, png: bytes, int8: bool = False) -> tuple[dict[str, int], int]:
    """Concept states and the predicted class, with Pillow, numpy and onnxruntime only; with
    ``int8`` the states come from the encoders a CPU worker opens (see ``worker_encoder``): an
    8-bit code peak near a bin edge may fall in the neighbouring state."""
    meta, outs, _ = classifier_outputs(bundle, png)
    concepts = json.loads((bundle / "concepts.json").read_text())
    evidence = {}
    for layer in concepts["layers"]:
        enc = ort.InferenceSession(str(bundle / worker_encoder(bundle, layer["encoder_file"], int8)),
                                   providers=["CPUExecutionProvider"])
        z = enc.run(None, {"activation": outs[layer["activation"]]})[0][0]
        for c, (peak, edges) in enumerate(zip(z.reshape(z.shape[0], -1).max(axis=1), layer["edges"])):
            evidence[f"{layer['layer']}/c{c}"] = int(sum(peak > e for e in edges))
    return evidence, int(np.argmax(outs[meta["classifier"]["logits"]][0]))


def offline_activations(bundle: Path, png: bytes) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Classifier activations by layer name for one image, and the normalised input."""
    meta, outs, x = classifier_outputs(bundle, png)
    return {l["name"]: outs[l["output"]] for l in meta["layers"]}, x


def _spliced_probabilities(bundle: Path, classifier: Path, png: bytes, layer_name: str, target: int, int8: bool,
                           edit: Callable[[np.ndarray], list[np.ndarray]]) -> np.ndarray:
    """P(target) from the torch classifier with ``layer_name``'s output replaced by the ONNX
    decoder's reconstruction of each code ``edit`` makes from the image's code (float64)."""
    import torch

    from export.concepts import spliced_logits
    from export.pipeline import ModelSource, load_classifier
    acts, x = offline_activations(bundle, png)
    spec = json.loads((bundle / "concepts.json").read_text())
    layer = next(l for l in spec["layers"] if l["layer"] == layer_name)
    enc = ort.InferenceSession(str(bundle / worker_encoder(bundle, layer["encoder_file"], int8)),
                               providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(bundle / layer["decoder_file"]), providers=["CPUExecutionProvider"])
    z = enc.run(None, {"activation": acts[layer_name]})[0]
    model = load_classifier(ModelSource(classifier=classifier)).model.eval()
    out = []
    for zz in edit(z.astype(np.float64)):
        a = dec.run(None, {"code": zz.astype(np.float32)})[0]
        with torch.no_grad():
            logits = spliced_logits(model, layer_name, torch.from_numpy(x), torch.from_numpy(a))
        out.append(float(torch.softmax(logits.double(), dim=1)[0, target]))
    return np.array(out)


def offline_network_interventions(bundle: Path, classifier: Path, png: bytes, concept: str, target: int,
                                  int8: bool = True) -> np.ndarray:
    """P(target | do(concept = x)) for every state x, answered by the network with torch: the
    concept's code channel (ONNX encoder; its accepted 8-bit version with ``int8``, as a CPU
    worker with ``cpu_int8`` opens it) rescaled to each state's typical peak, decoded by the
    ONNX decoder, and the torch classifier run with the layer's output replaced. Returns (S,)."""
    layer_name, channel = concept.rsplit("/c", 1)
    c = int(channel)
    spec = json.loads((bundle / "concepts.json").read_text())
    typical = next(l for l in spec["layers"] if l["layer"] == layer_name)["typical"][c]

    def states(z: np.ndarray) -> list[np.ndarray]:
        out = []
        for value in typical:
            zz = z.copy()
            peak = zz[0, c].max()
            zz[0, c] = zz[0, c] * (value / peak) if peak > 1e-6 else value
            out.append(zz)
        return out
    return _spliced_probabilities(bundle, classifier, png, layer_name, target, int8, states)


def offline_anchor(bundle: Path, classifier: Path, png: bytes, layer_name: str, target: int,
                   int8: bool = True) -> float:
    """P(target) with the layer's autoencoder spliced into the torch classifier, code unchanged:
    the level a Bayesian-network answer for a concept of that layer is anchored at."""
    return float(_spliced_probabilities(bundle, classifier, png, layer_name, target, int8, lambda z: [z])[0])
