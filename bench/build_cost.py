"""What an offline build costs: wall time and peak memory of each ``concept-explainer`` step
against the input size, the concepts per layer, the states per concept and the intervention
images, on this machine.

    python -m bench.build_cost --out bench/results/build-cost.json     # about 9 minutes on 2 cores

Every step runs as its own ``concept-explainer`` process (the command a user runs), so its
peak memory is that process's maximum resident set (``wait4``'s ``ru_maxrss``) and its time
the process's wall time, interpreter start and imports included. One build per input size
(32, 64 and 224 px, the demo architecture) with the timing model's counts: 400 training
images, a one-step classifier, autoencoders and decoders one epoch over 300 images, 40
intervention and 20 validity images, no fresh classifiers; the counts, not the model's
quality, set the cost. Then, at 64 px, the concept step alone with one setting changed at a
time (concepts per layer, states, intervention images). One run per cell: timings on a
shared machine move by several per cent, so read the growth, not the third digit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The timing model's counts (as bench.build_model's), as each step's CLI options.
BASE_CONCEPTS = {"k": 8, "states": 4, "intervention-images": 40}
CONCEPT_OPTIONS = ["--epochs", "1", "--min-steps", "0", "--train-images", "300", "--validity-images", "20"]
VARIATIONS = [("k", 4), ("k", 16), ("states", 3), ("states", 5), ("intervention-images", 160)]


def run_step(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``concept-explainer ARGS`` in a fresh process: its wall seconds and peak resident MB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "export.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"concept-explainer {' '.join(args)} failed:\n{output.decode(errors='replace')[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_mb": round(usage.ru_maxrss / 1024, 1)}  # Linux: ru_maxrss in KiB


def concept_args(bundle: Path, data: Path, settings: dict[str, int]) -> list[str]:
    args = ["concepts", "--bundle", str(bundle), "--data", str(data), "--device", "cpu", *CONCEPT_OPTIONS]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    return args


def build_at(size: int, root: Path, env: dict[str, str], arch: str) -> dict[str, Any]:
    """Every step of one build at ``size`` px; returns {step: {seconds, peak_mb}}."""
    data, classifier, bundle = root / "data", root / "classifier", root / "bundle"
    steps: dict[str, list[str]] = {
        "render": ["render", "--out", str(data), "--n-train", "400", "--n-test", "100", "--size", str(size)],
        "train": ["train", "--data", str(data), "--out", str(classifier), "--arch", arch, "--device", "cpu",
                  "--epochs", "1", "--batch-size", "16", "--max-steps", "1"],
        "export": ["export", "--classifier", str(classifier), "--out", str(bundle), "--name", f"cost{size}"],
        "concepts": concept_args(bundle, data, BASE_CONCEPTS),
        "cladec": ["cladec", "--bundle", str(bundle), "--data", str(data), "--device", "cpu", "--epochs", "1",
                   "--min-steps", "0", "--train-images", "300", "--eval-images", "20",
                   "--fresh-classifier-epochs", "0", "--sweep-alphas", ""],
        "features": ["features", "--bundle", str(bundle), "--data", str(data), "--device", "cpu",
                     "--finetune-epochs", "0"],
        "quantize": ["quantize", "--bundle", str(bundle), "--data", str(data)],
        "analyze": ["analyze", "--bundle", str(bundle), "--data", str(data), "--device", "cpu",
                    "--out", str(root / "analysis")],
        "archive": ["archive", "--bundle", str(bundle), "--name", f"cost{size}", "--model-store",
                    str(root / "model_store"), "--accept-failed-checks"],
    }
    out = {}
    for name, args in steps.items():
        out[name] = run_step(args, env)
        print(f"  {size:>3} px  {name:<9} {out[name]['seconds']:7.1f} s  {out[name]['peak_mb']:7.0f} MB", flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The two tables of the docs: steps by size, and the concept step's settings at 64 px."""
    sizes = result["sizes"]
    names = list(next(iter(sizes.values())))
    head = "| step | " + " | ".join(f"{s} px: s / MB" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{sizes[s][n]['seconds']} / {sizes[s][n]['peak_mb']:.0f}"
                                              for s in sizes) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(v['seconds'] for v in sizes[s].values()):.1f}** / "
                                             f"{max(v['peak_mb'] for v in sizes[s].values()):.0f}"
                                             for s in sizes) + " |")
    lines += ["", "| concept step at 64 px | seconds | peak MB |", "|---|---|---|"]
    for row in result["concepts_64"]:
        lines.append(f"| {row['setting']} | {row['seconds']} | {row['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def headline(result: dict[str, Any]) -> str:
    """The README's short table: per input size, the whole build, its two largest steps and the
    peak memory."""
    lines = ["| input | whole build | concepts | ClaDec | peak memory |", "|---|---|---|---|---|"]
    for size, steps in result["sizes"].items():
        total = sum(v["seconds"] for v in steps.values())
        peak = max(v["peak_mb"] for v in steps.values())
        lines.append(f"| {size}×{size} px | {total:.0f} s | {steps['concepts']['seconds']:.0f} s | "
                     f"{steps['cladec']['seconds']:.0f} s | {peak:,.0f} MB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/build-cost.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    ap.add_argument("--arch", default="demo_resnet")
    ap.add_argument("--no-variations", action="store_true", help="skip the concept step's settings at 64 px")
    args = ap.parse_args()
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                              "command": "python -m bench.build_cost", "arch": args.arch, "sizes": {},
                              "concepts_64": []}
    with tempfile.TemporaryDirectory(prefix="build-cost-") as tmp:
        for size in args.sizes:
            result["sizes"][str(size)] = build_at(size, Path(tmp) / str(size), env, args.arch)
        if not args.no_variations:
            root = Path(tmp) / "64"
            if not (root / "bundle").is_dir():
                build_at(64, root, env, args.arch)
            base = result["sizes"].get("64", {}).get("concepts")
            result["concepts_64"].append({"setting": "k 8, states 4, 40 intervention images (base)", **(base or {})})
            for key, value in VARIATIONS:
                work = Path(tmp) / f"v-{key}-{value}"
                shutil.copytree(root / "bundle", work)
                row = run_step(concept_args(work, root / "data", {**BASE_CONCEPTS, key: value}), env)
                result["concepts_64"].append({"setting": f"{key.replace('-', ' ')} {value}", **row})
                print(f"  concepts 64 px, {key} {value}: {row['seconds']} s, {row['peak_mb']:.0f} MB", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
