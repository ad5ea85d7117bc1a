"""A digest of what the serving runtime answers, for checking that a refactor changed nothing.

Loads a bundle as a worker does (the shipped model-config's handler settings) and answers,
in one batch per image, a fixed set of requests over a sample of the data's test images:
plain images, every request option (targets, views, heatmap styles, ClaDec choices, JPEG,
``verify``), predictions, and bad requests. Writes one line per answer (status and body,
timing values left out, the stages that ran kept) and prints the count and a SHA-256 digest.
Run it before and after a change on the same bundle and compare the digests or the files.

    python -m bench.answer_digest --bundle build/shapes/bundle --data data/shapes --out /tmp/answers.jsonl
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.server import REPO
from handlers.runtime.service import ExplainerService, RawRequest
from handlers.runtime.settings import HandlerSettings

#: The options of the explanation requests, None for a raw image body.
OPTIONS: tuple[dict[str, Any] | None, ...] = (
    None, {}, {"target": 1}, {"target": "star"}, {"top_concepts": 3}, {"top_concepts": 24, "images": False},
    {"views": ["features"]}, {"views": ["cladec"], "alphas": "all"}, {"heatmap": "blended", "top_concepts": 2},
    {"reference": False}, {"image_format": "jpeg"}, {"verify": True, "images": False}, {"verify": 2},
    {"top_k": 2}, {"target": 99}, {"views": ["nope"]}, {"verify": 50}, {"layers": ["layer2"]})


def requests_for(raw: bytes) -> list[RawRequest]:
    """The fixed requests of one image: explanations with every option set, two predictions, junk."""
    data = base64.b64encode(raw).decode()
    out = [RawRequest(raw, "image/png", True) if o is None else RawRequest({"data": data, **o}, "application/json", True)
           for o in OPTIONS]
    return out + [RawRequest(raw, "image/png", False), RawRequest({"data": data, "top_k": 3}, "application/json", False),
                  RawRequest(b"junk", "image/png", True)]


def answers(bundle: Path, images: Sequence[Path]) -> list[str]:
    """One JSON line per answer: [status, body] with ``timings_ms`` reduced to the stages that ran."""
    handler = yaml.safe_load((REPO / "export" / "model-config.yaml").read_text())["handler"]
    settings = HandlerSettings.from_mapping({**handler, "bundle_dir": bundle.name, "verify_fraction": 0})
    service = ExplainerService.load(bundle.parent, settings, None)
    lines = []
    try:
        for path in images:
            for reply in service.handle_batch(requests_for(path.read_bytes())):
                body = reply.body
                if "timings_ms" in body:
                    body["timings_ms"] = sorted(k for k in body["timings_ms"] if k != "batch_size")
                lines.append(json.dumps([reply.status, body]))
    finally:
        service.close()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a data folder with test/<class>/*.png")
    parser.add_argument("--images", type=int, default=12, help="test images, spread over the sorted list")
    parser.add_argument("--out", type=Path, required=True, help="where to write the answers (JSON lines)")
    args = parser.parse_args(argv)
    files = sorted((args.data / "test").glob("*/*.png"))
    picks = files[::max(1, len(files) // args.images)][:args.images]
    text = "\n".join(answers(args.bundle, picks)) + "\n"
    args.out.write_text(text)
    print(f"{text.count(chr(10))} answers, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
