"""What JPEG costs ClaDec's images, in pixels: served answers of held-out images, each ClaDec
and reference-autoencoder image re-encoded as the server's JPEG (quality 90), against the
lossless PNG the server sends with ``"image_format": "png"``.

    python -m bench.image_format_error --model-dir build/shapes --data data/shapes
    python -m bench.image_format_error --model-dir build/bench/resnet18_224_trained \\
        --data build/bench/resnet18_224_trained/data

Per layer and image kind it prints the median RMS difference (pixels in 0..1) of the PNG
image from the input, of the JPEG from the PNG, the share JPEG adds to the image's squared
error against the input (per image: MSE(JPEG, PNG) / MSE(PNG, input); median and largest) and
the median bytes of each encoding. This is what ``cladec_image_format: auto`` rests on
(:data:`handlers.runtime.imaging.AUTO_JPEG_MIN_SIDE`).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from handlers.runtime.imaging import encode_jpeg
from handlers.runtime.service import ExplainerService, RawRequest
from handlers.runtime.settings import HandlerSettings


def _unit(image: bytes) -> np.ndarray:
    """Encoded image -> float (H, W, 3) in 0..1."""
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float64) / 255.0


def measure(model_dir: Path, data: Path, images: int) -> dict[str, dict[str, float]]:
    """Per "layer/kind" (kind: reconstruction or reference) the medians described above, over
    ``images`` held-out images spread over ``data``'s test split."""
    service = ExplainerService.load(model_dir, HandlerSettings(cladec_image_format="png"), None)
    try:
        files = sorted(data.glob("test/*/*.png"))
        picked = [files[i] for i in np.linspace(0, len(files) - 1, min(images, len(files))).round().astype(int)]
        rows: dict[str, dict[str, list[float]]] = {}
        for f in picked:
            raw = f.read_bytes()
            reply = service.handle_batch([RawRequest(raw, "image/png", True)])[0]
            if reply.status != 200:
                raise RuntimeError(f"{f}: {reply.body}")
            x = _unit(raw)
            for entry in reply.body.get("cladec", []):
                for kind in ("reconstruction", "reference"):
                    png = entry.get(f"{kind}_png")
                    if png is None:
                        continue
                    png_bytes = base64.b64decode(png)
                    a = _unit(png_bytes)
                    jpeg = encode_jpeg((a * 255).round().astype(np.uint8))
                    own, added = np.mean((a - x) ** 2), np.mean((_unit(jpeg) - a) ** 2)
                    r = rows.setdefault(f"{entry['layer']}/{kind}", {"own": [], "jpeg": [], "share": [],
                                                                       "png_bytes": [], "jpeg_bytes": []})
                    r["own"].append(float(np.sqrt(own)))
                    r["jpeg"].append(float(np.sqrt(added)))
                    r["share"].append(float(added / own) if own > 0 else float("inf"))
                    r["png_bytes"].append(len(png_bytes))
                    r["jpeg_bytes"].append(len(jpeg))
    finally:
        service.close()
    return {k: {"images": len(r["own"]), "rms_png_vs_input": round(float(np.median(r["own"])), 4),
                "rms_jpeg_vs_png": round(float(np.median(r["jpeg"])), 4),
                "added_share_median": round(float(np.median(r["share"])), 4),
                "added_share_max": round(float(np.max(r["share"])), 4),
                "png_bytes": int(np.median(r["png_bytes"])), "jpeg_bytes": int(np.median(r["jpeg_bytes"]))}
            for k, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="folder holding the archive's bundle/")
    ap.add_argument("--data", type=Path, required=True, help="image folder with a test/ split")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    result = measure(args.model_dir, args.data, args.images)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'layer/kind':24} {'RMS vs input':>12} {'JPEG vs PNG':>11} {'added (median/max)':>19} {'bytes PNG -> JPEG':>18}")
    for k, r in result.items():
        print(f"{k:24} {r['rms_png_vs_input']:12.4f} {r['rms_jpeg_vs_png']:11.4f} "
              f"{r['added_share_median']:9.1%} / {r['added_share_max']:6.1%} {r['png_bytes']:>8} -> {r['jpeg_bytes']:<6}")


if __name__ == "__main__":
    main()
