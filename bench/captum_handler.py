"""Benchmark baseline: TorchServe's own explanation path, on our classifier.

What TorchServe's built-in ``VisionHandler`` does for ``/explanations``: the eager torch
model, Captum ``IntegratedGradients`` with ``n_steps=15`` for the request's ``target``
(class 0 when none is given, as upstream), and the attributions returned as a nested JSON
list of floats (C x H x W per image). ``/predictions`` runs the same eager model and returns
top-5 probabilities. The model is ``classifier.json`` + ``weights.safetensors`` (the output
of ``concept-explainer train``) archived beside this file; preprocessing is the project's
own (decode, resize, normalise), so both servers see the same tensors.

Bench only (captum is the ``bench`` extra); the archive is built by ``bench.run``. One
class per module, as TorchServe's loader requires.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients
from PIL import Image

from export.models import build_model, load_weights
from handlers.runtime.imaging import InputSpec, normalize, to_pixels

log = logging.getLogger(__name__)


class CaptumIGHandler:
    """``initialize(context)`` once; ``handle(data, context)`` per batch."""

    N_STEPS = 15  # TorchServe's VisionHandler.get_insights

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        info = json.loads((model_dir / "classifier.json").read_text())
        # torch's own thread count (all cores), as TorchServe's handlers leave it. Ours uses up
        # to two threads for an explanation (the concept view and ClaDec beside it).
        self.spec = InputSpec.from_json(info["input"])
        self.classes = list(info["classes"])
        self.model = build_model(info["architecture"], len(self.classes), self.spec.channels)
        load_weights(self.model, model_dir / "weights.safetensors")
        self.model.eval()
        self.ig = IntegratedGradients(self.model)
        self.initialized = True

    def _tensor(self, row: dict[str, Any]) -> torch.Tensor:
        body = row.get("data") or row.get("body")
        if isinstance(body, (bytes, bytearray)):
            image = Image.open(io.BytesIO(body))
        else:
            raise ValueError("send the image as raw bytes")
        return torch.from_numpy(normalize(to_pixels(image, self.spec)[None], self.spec))

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        x = torch.cat([self._tensor(row) for row in data])
        # upstream (BaseHandler._is_explain) looks at the first request's header for the batch
        if str(context.get_request_header(0, "explain")) != "True":
            with torch.no_grad():
                probs = torch.softmax(self.model(x), dim=1).numpy()
            out = []
            for p in probs:
                top = np.argsort(-p)[:5]
                out.append(json.dumps({"predictions": [{"index": int(i), "label": self.classes[i],
                                                        "probability": round(float(p[i]), 6)} for i in top]}))
            return out
        # upstream's explain_handle takes the first row's target (default 0) for the whole batch
        target = int(data[0].get("target") or 0) if isinstance(data[0], dict) else 0
        attributions = self.ig.attribute(x, target=target, n_steps=self.N_STEPS)
        return [json.dumps(a) for a in attributions.tolist()]
