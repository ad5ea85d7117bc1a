"""What it costs the concepts view to let the network answer interventions itself.

For test images of a data folder, side by side in one process: the classifier run, and the
causal answer (:meth:`ConceptExplainer.answer`) from the Bayesian network's tables alone (no
intervention graphs), and with the graphs for each ``--counts`` value of ``network_concepts``
(0: the tables anchored at the network's level; the largest: every concept), each with the
bundle's probes (states per concept the network is run at, the others interpolated), and
every concept at every state ("exact"). Prints medians in milliseconds, and for each how
well the answer's order ranks the image's concepts against the network's own effects of all
of them at every state (recall@3 mean, nDCG@5 median), and how far its numbers are from them
in probability units over every concept of every image: the mean absolute error of
``P(target | do(state))``, of the effect, and Lin's concordance of the effects.

    python -m bench.network_answers --bundle build/shapes/bundle --data data/shapes
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from handlers.runtime.bundle import load_bundle
from handlers.runtime.classifier import OnnxClassifier, make_session
from handlers.runtime.concept_view import ConceptExplainer
from handlers.runtime.faithfulness import ccc, ndcg_at_k, recall_at_k
from handlers.runtime.imaging import decode_image, normalize, to_pixels
from handlers.runtime.verify import verify_records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 3, 5, 8, 10**6],
                        help="network_concepts values to time (capped at the number of concepts)")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    spec = bundle.metadata.input
    classifier = OnnxClassifier.from_bundle(bundle, ["CPUExecutionProvider"], 1)
    explainer = ConceptExplainer.load(bundle, bundle.metadata.extra["concepts"],
                                      lambda name: make_session(bundle.path(name), ["CPUExecutionProvider"], 1))
    files = sorted((args.data / "test").glob("*/*.png"))
    files = files[:: max(1, len(files) // args.images)][: args.images]
    counts = tuple(dict.fromkeys(min(n, explainer.num_concepts) for n in args.counts))
    tables = ConceptExplainer(explainer.spec, explainer.network, explainer.sessions, None)
    exact = explainer.every_state()
    probes = {l.layer: l.probes or explainer.spec.states for l in explainer.spec.layers}
    print("network runs per concept (probes) by layer:", probes)
    variants: dict[str, tuple[ConceptExplainer, int]] = {
        **{f"network_concepts={n}": (explainer, n) for n in counts},
        "exact": (exact, explainer.num_concepts)}
    times: dict[str, list[float]] = {"classifier": [], "tables alone (no anchor)": [], **{k: [] for k in variants}}
    recall: dict[str, list[float]] = {k: [] for k in variants}
    ndcg: dict[str, list[float]] = {k: [] for k in variants}
    p_error: dict[str, list[float]] = {k: [] for k in variants}
    effects: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in variants}
    for f in files:
        x = normalize(to_pixels(decode_image(f.read_bytes(), max_pixels=10**8, allowed_formats=("PNG", "JPEG")),
                                spec)[None], spec)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = classifier(x)
            times["classifier"].append((time.perf_counter() - t0) * 1000)
            batch, target = explainer.encode(out.activations), int(out.logits[0].argmax())
            t0 = time.perf_counter()
            tables.answer(batch, 0, target, 0)
            times["tables alone (no anchor)"].append((time.perf_counter() - t0) * 1000)
            for name, (view, n) in variants.items():
                t0 = time.perf_counter()
                view.answer(batch, 0, target, n)
                times[name].append((time.perf_counter() - t0) * 1000)
        # the answer's ranking against the network's own effects of every concept at every state
        exact_answer = exact.answer(batch, 0, target, None)
        truth = {r.record.concept: r.record for r in exact_answer}
        network = {c.concept: c.network_effect for c in verify_records(explainer, batch, 0, target, exact_answer)}
        for name, (view, n) in variants.items():
            served = view.answer(batch, 0, target, n)
            p_error[name] += [float(np.abs(r.record.probabilities - truth[r.record.concept].probabilities).mean())
                              for r in served]
            effects[name][0].extend(r.record.effect for r in served)
            effects[name][1].extend(truth[r.record.concept].effect for r in served)
            listed = [network[r.record.concept] for r in served]
            order = np.arange(len(listed), 0, -1, dtype=np.float64)
            recall[name].append(recall_at_k(order, np.array(listed), 3))
            value = ndcg_at_k(order, np.array(listed), 5)
            if value is not None:
                ndcg[name].append(value)
    for name, values in times.items():
        print(f"{name:<22} median {np.median(values):7.2f} ms over {len(values)} runs")
    print("numbers of every concept against the network's own at every state (probability units):")
    for name in variants:
        served_e, exact_e = (np.array(v) for v in effects[name])
        c = ccc(served_e, exact_e)
        print(f"{name:<22} error of P(target | do) {np.mean(p_error[name]):.4f}, effect error "
              f"{np.mean(np.abs(served_e - exact_e)):.4f}, CCC {float('nan') if c is None else c:.3f}")
    print("ranking of each image's concepts against the network's effects of all of them:")
    for name in variants:
        print(f"{name:<22} recall@3 mean {np.mean(recall[name]):.3f}, nDCG@5 median "
              f"{np.median(ndcg[name]) if ndcg[name] else float('nan'):.3f} over {len(recall[name])} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
