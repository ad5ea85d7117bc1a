"""What verification costs a served explanation, on one TorchServe.

Two archives of one bundle: the shipped settings (``verify_fraction: 0.01``) and the same with
``verify_fraction: 0``. Side by side, alternating:

- concurrency 1: /predictions, the default /explanations and /explanations with
  ``"verify": true`` (the network's answers to every listed concept's interventions);
- concurrency 8: /explanations with sampled verification at 0.01 against without it (p50 and
  throughput), beside a second identical worker without it (how far two workers differ anyway).

    python -m bench.verify_cost --bundle build/shapes/bundle --image data/shapes/test/star/<file>.png
"""
from __future__ import annotations

import argparse
import base64
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.server import REPO, TorchServe, post
from bench.stats import summary, write_json
from export.archive import build_mar


def _config(out: Path, **handler: Any) -> Path:
    cfg = yaml.safe_load((REPO / "export" / "model-config.yaml").read_text())
    cfg["handler"].update(handler)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg))
    return out


def archives(bundle: Path, store: Path, tmp: Path) -> dict[str, str]:
    """The archives: "v" (shipped settings), "v0" and its twin "v0b" (``verify_fraction: 0``: two
    identical workers measure how far apart two workers land without any difference); name -> file."""
    build_mar(bundle, "v", "1.0", store)
    config = _config(tmp / "v0" / "model-config.yaml", verify_fraction=0.0)
    build_mar(bundle, "v0", "1.0", store, model_config=config)
    build_mar(bundle, "v0b", "1.0", store, model_config=config)
    return {"v": "v.mar", "v0": "v0.mar", "v0b": "v0b.mar"}


def measure(ts: TorchServe, image: bytes, n: int) -> dict[str, Any]:
    """The comparisons of the module docstring on a TorchServe serving :func:`archives`."""
    from bench.run import alternate

    def call(endpoint: str, model: str, options: dict[str, Any] | None = None) -> Callable[[], Any]:
        body = image if options is None else json.dumps({"data": base64.b64encode(image).decode(), **options}).encode()
        kind = "image/png" if options is None else "application/json"

        def send() -> Any:
            return post(ts, body, kind, endpoint=endpoint, model=model)
        return send

    c1 = {"predictions": call("predictions", "v0"), "explanations": call("explanations", "v0"),
          "explanations_verify": call("explanations", "v0", {"verify": True})}
    c8 = {"explanations_sampled_0.01": call("explanations", "v"), "explanations_unsampled": call("explanations", "v0"),
          "explanations_unsampled_twin": call("explanations", "v0b")}
    out: dict[str, Any] = {}
    for label, calls, clients in (("concurrency_1", c1, 1), ("concurrency_8", c8, 8)):
        for send in calls.values():
            send()  # warm-up
        lat, last, wall = alternate(calls, n if clients == 1 else max(n, 40) * 2, clients,
                                    block=1 if clients == 1 else 5 * clients)
        out[label] = {k: {**summary(v), "response_bytes": len(last[k].content),
                          "throughput_rps": round(len(v) / wall[k], 1)} for k, v in lat.items()}
    one = out["concurrency_1"]
    one["verify_over_explanation_p50"] = round(one["explanations_verify"]["p50_ms"] / one["explanations"]["p50_ms"], 2)
    one["verify_added_ms"] = round(one["explanations_verify"]["p50_ms"] - one["explanations"]["p50_ms"], 2)
    eight = out["concurrency_8"]
    sampled, plain = eight["explanations_sampled_0.01"], eight["explanations_unsampled"]
    eight["p50_change"] = round(sampled["p50_ms"] / plain["p50_ms"] - 1, 3)
    eight["throughput_change"] = round(sampled["throughput_rps"] / plain["throughput_rps"] - 1, 3)
    twin = eight["explanations_unsampled_twin"]
    eight["twin_p50_change"] = round(twin["p50_ms"] / plain["p50_ms"] - 1, 3)
    eight["twin_throughput_change"] = round(twin["throughput_rps"] / plain["throughput_rps"] - 1, 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=200, help="requests per kind at concurrency 1")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="verify-cost-") as tmp:
        store = Path(tmp) / "store"
        models = archives(args.bundle, store, Path(tmp))
        with TorchServe(Path(tmp) / "ts", store, models, timeout=300) as ts:
            result = measure(ts, args.image.read_bytes(), args.requests)
    one, eight = result["concurrency_1"], result["concurrency_8"]
    print(f"concurrency 1, p50 ms: predictions {one['predictions']['p50_ms']}, explanations "
          f"{one['explanations']['p50_ms']}, with verify {one['explanations_verify']['p50_ms']} "
          f"(+{one['verify_added_ms']} ms, {one['verify_over_explanation_p50']}x an explanation)")
    print(f"concurrency 8, explanations with verify_fraction 0.01 vs 0: p50 "
          f"{eight['explanations_sampled_0.01']['p50_ms']} vs {eight['explanations_unsampled']['p50_ms']} ms "
          f"({eight['p50_change']:+.1%}), throughput {eight['explanations_sampled_0.01']['throughput_rps']} vs "
          f"{eight['explanations_unsampled']['throughput_rps']} req/s ({eight['throughput_change']:+.1%}); "
          f"two identical workers without it differ by {eight['twin_p50_change']:+.1%} / "
          f"{eight['twin_throughput_change']:+.1%}")
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
