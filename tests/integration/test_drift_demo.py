"""A drift you can watch: the demo archive on a real TorchServe with ``verify_fraction: 1``,
scraped by a real Prometheus that loads the shipped alert rules.

First held-out test images (the live agreement stays at the bundle's offline figure and the
alert expression is false), then the same kind of shapes on coloured backgrounds the
classifier never saw (the agreement falls and the expression becomes true). Each phase is
read from Prometheus over its own time window.

Needs the demo build (``make build``: ``build/shapes/bundle`` and ``data/shapes``); skipped
without it, since ``make test`` does not train the demo model. Run it alone with::

    .venv/bin/python -m pytest -s tests/integration/test_drift_demo.py
"""
from __future__ import annotations

import io
import math
import time

import pytest
from PIL import Image

from bench.verify_drift import drifted_images, held_out_images
from tests.integration.prometheus import Prometheus, alert_expression, query, wait_for
from tests.integration.server import REPO, TorchServe, post
from tests.integration.test_verify_live import verifying_archive

pytestmark = pytest.mark.integration
BUNDLE, DATA = REPO / "build" / "shapes" / "bundle", REPO / "data" / "shapes"
RULES = REPO / "deploy" / "prometheus-rules.yml"
IMAGES = 60


def png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo_mar(tmp_path_factory):
    if not (BUNDLE / "manifest.json").is_file() or not (DATA / "test").is_dir():
        print("\nSKIP: no demo build (make build writes build/shapes/bundle and data/shapes)")
        pytest.skip("the demo build is not there")
    return verifying_archive(BUNDLE, "shapesv", "1.0", tmp_path_factory.mktemp("drift"))


def test_live_agreement_falls_and_the_alert_fires_on_drift(demo_mar, tmp_path_factory):
    held, _, _ = held_out_images(DATA, IMAGES, seed=0)
    shifted, _ = drifted_images(IMAGES, 64, seed=1)
    m = 'ModelName="shapesv",layer="all"'
    count = f"sum(concept_explainer_verify_agreement_count{{{m}}})"
    with TorchServe(tmp_path_factory.mktemp("ts-drift"), demo_mar.parent, {"shapesv": demo_mar.name}) as ts:
        target = ts.metrics_url.split("//")[1].split("/")[0]
        with Prometheus(tmp_path_factory.mktemp("prom-drift"), [target], [RULES]) as prom:

            def send(images, expected_count):
                for img in images:
                    assert post(ts, png(img), endpoint="explanations", model="shapesv").status_code == 200
                wait_for(prom, count, expected_count, timeout=120)
                return time.time()

            t0 = send(held[:1], 1)  # the series exist before the first phase
            t1 = send(held, 1 + IMAGES)
            time.sleep(2)
            t2 = send(shifted, 1 + 2 * IMAGES)
            offline = float(query(prom, f"max(concept_explainer_verify_offline_agreement{{{m}}})")[0]["value"][1])
            figures = {}
            for phase, start, end in (("held out", t0, t1), ("coloured backgrounds", t1 + 1, t2)):
                window = f"{math.floor(end - start)}s"
                live = query(prom, f"sum(rate(concept_explainer_verify_agreement_sum{{{m}}}[{window}])) / "
                                   f"sum(rate(concept_explainer_verify_agreement_count{{{m}}}[{window}]))", at=end)
                error = query(prom, f"sum(rate(concept_explainer_verify_probability_error_sum{{{m}}}[{window}])) / "
                                    f"sum(rate(concept_explainer_verify_probability_error_count{{{m}}}[{window}]))",
                              at=end)
                fired = query(prom, alert_expression(RULES, "ConceptExplainerAgreementLow", window), at=end)
                figures[phase] = (float(live[0]["value"][1]), float(error[0]["value"][1]), bool(fired))
            print(f"\noffline agreement {offline:.3f}")
            for phase, (live, error, fired) in figures.items():
                print(f"{phase:<22} live agreement {live:.3f}  |dp| {error:.4f}  alert expression {fired}")
            assert not figures["held out"][2] and figures["held out"][0] > offline - 0.15
            assert figures["coloured backgrounds"][2] and figures["coloured backgrounds"][0] < offline - 0.15
            assert figures["coloured backgrounds"][1] > figures["held out"][1]
