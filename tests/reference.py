"""Independent reference computations used by several test layers."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def reference_probabilities(bundle_dir: Path, png: bytes) -> np.ndarray:
    """Softmax of the bundle's ONNX logits for one image, preprocessed with plain Pillow/numpy
    from metadata.json (not through handlers.runtime), as a check on the serving path."""
    meta = json.loads((bundle_dir / "metadata.json").read_text())
    spec = meta["input"]
    mode = "RGB" if spec["channels"] == 3 else "L"
    img = Image.open(io.BytesIO(png)).convert(mode).resize((spec["width"], spec["height"]), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).reshape(spec["height"], spec["width"], spec["channels"]) / 255.0
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    x = x.transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(str(bundle_dir / meta["classifier"]["file"]), providers=["CPUExecutionProvider"])
    logits = sess.run([meta["classifier"]["logits"]], {meta["classifier"]["input"]: x})[0][0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def offline_evidence(bundle: Path, png: bytes) -> tuple[dict[str, int], int]:
    """Concept states computed without handlers.runtime: Pillow, numpy and onnxruntime only."""
    meta = json.loads((bundle / "metadata.json").read_text())
    concepts = json.loads((bundle / "concepts.json").read_text())
    spec = meta["input"]
    img = Image.open(io.BytesIO(png)).convert("RGB").resize((spec["width"], spec["height"]), Image.BILINEAR)
    x = (np.asarray(img, np.float32) / 255.0 - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    x = x.transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(str(bundle / meta["classifier"]["file"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {meta["classifier"]["input"]: x})))
    evidence = {}
    for layer in concepts["layers"]:
        enc = ort.InferenceSession(str(bundle / layer["encoder_file"]), providers=["CPUExecutionProvider"])
        z = enc.run(None, {"activation": outs[layer["activation"]]})[0][0]
        for c, (peak, edges) in enumerate(zip(z.reshape(z.shape[0], -1).max(axis=1), layer["edges"])):
            evidence[f"{layer['layer']}/c{c}"] = int(sum(peak > e for e in edges))
    return evidence, int(np.argmax(outs[meta["classifier"]["logits"]][0]))


def offline_activations(bundle: Path, png: bytes) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Classifier ONNX outputs by layer name for one image, preprocessed with Pillow/numpy only."""
    meta = json.loads((bundle / "metadata.json").read_text())
    spec = meta["input"]
    img = Image.open(io.BytesIO(png)).convert("RGB").resize((spec["width"], spec["height"]), Image.BILINEAR)
    x = (np.asarray(img, np.float32) / 255.0 - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    x = x.transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(str(bundle / meta["classifier"]["file"]), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {meta["classifier"]["input"]: x})))
    return {l["name"]: outs[l["output"]] for l in meta["layers"]}, x
